-- One more unit of a key's limit for a worker whose share is spent, asked on the request path:
-- one statement, under the key's advisory lock (the same lock `claim_share` takes, held to the
-- end of the statement's transaction). A function, so that its reads come after the lock: a
-- volatile function's statements each see what committed before them (READ COMMITTED), where a
-- single query would read from a snapshot taken before it waited for the lock. Returns the
-- worker's grant afterwards, negated (-1 - grant) when refused, and NULL when the worker is not
-- live (its registration lapsed: it must heartbeat first). The arithmetic is `shares.unit_grant`.
CREATE FUNCTION gateway_claim_unit(
    key_id text,
    limited text,
    worker text,
    key_limit integer,
    needed integer,
    lock_namespace integer,
    lock_key integer,
    lock_wait text
) RETURNS integer
LANGUAGE plpgsql
VOLATILE
AS $$
DECLARE
    mine integer;
    others integer;
BEGIN
    PERFORM set_config('lock_timeout', lock_wait, true);
    PERFORM pg_advisory_xact_lock(lock_namespace, lock_key);
    IF NOT EXISTS (
        SELECT 1 FROM gateway_workers WHERE worker_id = worker AND expires_at > now()
    ) THEN
        RETURN NULL;
    END IF;
    SELECT coalesce(sum(share.granted) FILTER (WHERE share.worker_id = worker), 0),
           coalesce(sum(share.granted) FILTER (WHERE share.worker_id <> worker), 0)
    INTO mine, others
    FROM key_limit_shares AS share
    JOIN gateway_workers AS live USING (worker_id)
    WHERE share.api_key_id = key_id AND share.resource = limited AND live.expires_at > now();
    IF mine >= needed THEN
        RETURN mine;
    END IF;
    IF others + needed <= key_limit THEN
        INSERT INTO key_limit_shares (api_key_id, resource, worker_id, granted, wanted)
        VALUES (key_id, limited, worker, needed, needed)
        ON CONFLICT (api_key_id, resource, worker_id) DO UPDATE
        SET granted = excluded.granted,
            wanted = greatest(key_limit_shares.wanted, excluded.wanted);
        RETURN needed;
    END IF;
    INSERT INTO key_limit_shares (api_key_id, resource, worker_id, granted, wanted)
    VALUES (key_id, limited, worker, mine, needed)
    ON CONFLICT (api_key_id, resource, worker_id) DO UPDATE
    SET wanted = greatest(key_limit_shares.wanted, excluded.wanted);
    RETURN -1 - mine;
END;
$$;
