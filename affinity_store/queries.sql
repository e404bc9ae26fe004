-- Queries of the Postgres affinity store, loaded once by name (see queries.py).
-- Every time comes from the database's now(); ttl_remaining is seconds left at read time.

-- name: lookup
SELECT api_key_id, model, provider, routing_identity, expires_at,
       extract(epoch FROM expires_at - now())::float8 AS ttl_remaining
FROM affinity_bindings
WHERE api_key_id = $1 AND model = $2 AND expires_at > now();

-- name: set_transaction_timeouts
-- $1: a duration such as '500ms'; both settings end with the transaction.
SELECT set_config('lock_timeout', $1, true), set_config('statement_timeout', $1, true);

-- name: lock_binding
SELECT pg_advisory_xact_lock($1::int4, $2::int4);

-- name: lock_row
-- The key's row whatever its expiry, locked until the transaction ends (the janitor skips it).
SELECT api_key_id, model, provider, routing_identity, expires_at,
       extract(epoch FROM expires_at - now())::float8 AS ttl_remaining
FROM affinity_bindings
WHERE api_key_id = $1 AND model = $2
FOR UPDATE;

-- name: count_bindings
-- $1: routing identities. Sums the counter shards; identities without a row count 0.
SELECT identity.routing_identity, coalesce(sum(counts.bindings), 0)::int8 AS bindings
FROM unnest($1::text[]) AS identity(routing_identity)
LEFT JOIN affinity_binding_counts AS counts USING (routing_identity)
GROUP BY identity.routing_identity;

-- name: write_binding
-- Under the key's lock: upsert the binding, move its count from $6 (the identity of the row it
-- replaces, NULL when there was none) to $4 in counter shard $7, and tell every listening
-- gateway that the key's binding changed (delivered at commit).
WITH written AS (
    INSERT INTO affinity_bindings (api_key_id, model, provider, routing_identity, expires_at)
    VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5::float8))
    ON CONFLICT (api_key_id, model) DO UPDATE
    SET provider = excluded.provider,
        routing_identity = excluded.routing_identity,
        expires_at = excluded.expires_at,
        created_at = now(),
        updated_at = now()
    RETURNING api_key_id, model, provider, routing_identity, expires_at,
              extract(epoch FROM expires_at - now())::float8 AS ttl_remaining
),
counted AS (
    INSERT INTO affinity_binding_counts (routing_identity, shard, bindings)
    SELECT change.routing_identity, $7::int2, sum(change.delta)
    FROM (VALUES ($4::text, 1), ($6::text, -1)) AS change(routing_identity, delta)
    WHERE change.routing_identity IS NOT NULL
    GROUP BY change.routing_identity
    HAVING sum(change.delta) <> 0
    -- One lock order for every writer: no deadlock between claims moving counts both ways.
    ORDER BY change.routing_identity
    ON CONFLICT (routing_identity, shard) DO UPDATE
    SET bindings = affinity_binding_counts.bindings + excluded.bindings
),
notified AS (
    SELECT pg_notify('affinity_binding_changed', $1 || E'\n' || $2)
)
SELECT written.* FROM written, notified;

-- name: renew
UPDATE affinity_bindings
SET expires_at = now() + make_interval(secs => $4::float8), updated_at = now()
WHERE api_key_id = $1 AND model = $2 AND provider = $3;

-- name: renew_many
-- $1/$2/$3: keys, models and the providers they were served by; compare-and-set on each.
UPDATE affinity_bindings AS binding
SET expires_at = now() + make_interval(secs => $4::float8), updated_at = now()
FROM unnest($1::text[], $2::text[], $3::text[]) AS renewal(api_key_id, model, provider)
WHERE binding.api_key_id = renewal.api_key_id
  AND binding.model = renewal.model
  AND binding.provider = renewal.provider
RETURNING binding.api_key_id, binding.model;

-- name: count_rows
-- A full count per routing identity: what the counters must equal (for checks, not routing).
SELECT routing_identity, count(*) AS bindings
FROM affinity_bindings
GROUP BY routing_identity;

-- name: notify_binding_channel
-- A listener's ping, sent the way writers notify (see notifications.py).
SELECT pg_notify('affinity_binding_changed', $1);

-- name: try_lock_janitor
SELECT pg_try_advisory_xact_lock($1::int4, $2::int4);

-- name: purge_expired_batch
-- $3: the counter shard that takes the deleted rows' decrements.
WITH doomed AS (
    SELECT api_key_id, model
    FROM affinity_bindings
    WHERE expires_at < now() - make_interval(secs => $1::float8)
    ORDER BY expires_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
),
deleted AS (
    DELETE FROM affinity_bindings
    USING doomed
    WHERE affinity_bindings.api_key_id = doomed.api_key_id
      AND affinity_bindings.model = doomed.model
    RETURNING affinity_bindings.routing_identity
),
per_identity AS (
    SELECT routing_identity, count(*) AS bindings FROM deleted GROUP BY routing_identity
),
counted AS (
    INSERT INTO affinity_binding_counts (routing_identity, shard, bindings)
    SELECT routing_identity, $3::int2, -bindings
    FROM per_identity
    ORDER BY routing_identity
    ON CONFLICT (routing_identity, shard) DO UPDATE
    SET bindings = affinity_binding_counts.bindings + excluded.bindings
)
SELECT coalesce(sum(bindings), 0)::int8 FROM per_identity;

-- name: list_bindings
SELECT api_key_id, model, provider, routing_identity, expires_at,
       extract(epoch FROM expires_at - now())::float8 AS ttl_remaining
FROM affinity_bindings
WHERE expires_at > now()
  AND ($1::text IS NULL OR api_key_id = $1)
  AND ($2::text IS NULL OR model = $2)
ORDER BY api_key_id, model
LIMIT $3;

-- name: record_response
-- $1 response id, $2 provider, $3 ttl in seconds, $4 the creating key's id, $5 the most stored
-- responses a key keeps. Returns true when written; no row when the id is another key's (an id
-- stays its creator's: never taken over, refreshed or moved by another key). A written response
-- takes the key's next number and evicts the key's responses numbered $5 or more below it (its
-- oldest). Each write also deletes a few rows expired for a while, so the table stays near its
-- live size without a janitor of its own.
WITH purged AS (
    DELETE FROM response_bindings
    WHERE response_id IN (
        SELECT response_id FROM response_bindings
        WHERE expires_at < now() - interval '5 minutes' AND response_id <> $1
        LIMIT 10
        FOR UPDATE SKIP LOCKED
    )
),
numbered AS (
    INSERT INTO response_sequences AS sequences (api_key_id, last_sequence)
    SELECT $4, 1
    WHERE NOT EXISTS (
        SELECT 1 FROM response_bindings WHERE response_id = $1 AND api_key_id <> $4
    )
    ON CONFLICT (api_key_id) DO UPDATE SET last_sequence = sequences.last_sequence + 1
    RETURNING last_sequence
),
evicted AS (
    DELETE FROM response_bindings
    WHERE api_key_id = $4 AND response_id <> $1
      AND sequence <= (SELECT last_sequence FROM numbered) - $5
)
INSERT INTO response_bindings AS bindings (response_id, api_key_id, provider, expires_at, sequence)
SELECT $1, $4, $2, now() + make_interval(secs => $3::float8), last_sequence FROM numbered
ON CONFLICT (response_id) DO UPDATE
SET provider = excluded.provider, expires_at = excluded.expires_at, sequence = excluded.sequence
WHERE bindings.api_key_id = excluded.api_key_id
RETURNING true;

-- name: response_taken
-- $1 response id, $2 a key's id: whether another key's response (live or not yet purged) holds
-- the id.
SELECT EXISTS (SELECT 1 FROM response_bindings WHERE response_id = $1 AND api_key_id <> $2);

-- name: response_provider
SELECT provider FROM response_bindings
WHERE response_id = $1 AND api_key_id = $2 AND expires_at > now();

-- name: register_worker
-- $1 worker id, $2 ttl in seconds, $3 its snapshot (JSON text, or NULL to keep the last). Registers or renews the worker. A worker whose row had expired
-- (or was gone) loses its shares: others may have been granted them meanwhile. Workers expired for
-- over a minute are forgotten with their shares (expired, they already count for nothing).
WITH previous AS (
    SELECT bool_or(expires_at > now()) AS live FROM gateway_workers WHERE worker_id = $1
),
lapsed AS (
    DELETE FROM key_limit_shares
    WHERE worker_id = $1 AND NOT coalesce((SELECT live FROM previous), false)
),
forgotten AS (
    -- Rows another heartbeat is deleting are skipped: no two heartbeats wait on each other.
    DELETE FROM gateway_workers
    WHERE worker_id IN (
        SELECT worker_id FROM gateway_workers
        WHERE expires_at < now() - interval '1 minute' AND worker_id <> $1
        FOR UPDATE SKIP LOCKED
    )
    RETURNING worker_id
),
forgotten_shares AS (
    DELETE FROM key_limit_shares WHERE worker_id IN (SELECT worker_id FROM forgotten)
)
INSERT INTO gateway_workers (worker_id, expires_at, snapshot)
VALUES ($1, now() + make_interval(secs => $2::float8), $3::text::jsonb)
ON CONFLICT (worker_id) DO UPDATE SET
    expires_at = excluded.expires_at,
    snapshot = coalesce(excluded.snapshot, gateway_workers.snapshot);

-- name: own_shares
SELECT api_key_id, resource, granted FROM key_limit_shares WHERE worker_id = $1;

-- name: live_workers
SELECT worker_id FROM gateway_workers WHERE expires_at > now() ORDER BY worker_id;

-- name: worker_snapshots
SELECT worker_id, started_at, snapshot::text AS snapshot
FROM gateway_workers WHERE expires_at > now() ORDER BY worker_id;

-- name: worker_is_live
SELECT coalesce(bool_or(expires_at > now()), false) FROM gateway_workers WHERE worker_id = $1;

-- name: lock_key_shares
SELECT pg_advisory_xact_lock($1::int4, $2::int4);

-- name: other_shares
-- The key's shares held by other live workers.
SELECT share.worker_id, share.granted, share.wanted
FROM key_limit_shares AS share
JOIN gateway_workers AS worker USING (worker_id)
WHERE share.api_key_id = $1 AND share.resource = $2 AND share.worker_id <> $3
  AND worker.expires_at > now()
ORDER BY share.worker_id;

-- name: write_share
-- $1 key id, $2 resource, $3 worker id, $4 granted, $5 wanted.
INSERT INTO key_limit_shares (api_key_id, resource, worker_id, granted, wanted)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (api_key_id, resource, worker_id) DO UPDATE
SET granted = excluded.granted, wanted = excluded.wanted;

-- name: claim_unit
-- $1 key id, $2 resource, $3 worker id, $4 limit, $5 units needed, $6/$7 the key's share lock,
-- $8 how long to wait for it (see sql/0005_key_limit_units.sql).
SELECT gateway_claim_unit($1, $2, $3, $4, $5, $6, $7, $8);

-- name: release_units
-- $1 key id, $2 resource, $3 worker id, $4 what it keeps: lowering a grant needs no lock.
UPDATE key_limit_shares SET granted = least(granted, $4)
WHERE api_key_id = $1 AND resource = $2 AND worker_id = $3;

-- name: leave
WITH shares AS (
    DELETE FROM key_limit_shares WHERE worker_id = $1
)
DELETE FROM gateway_workers WHERE worker_id = $1;

-- name: list_shares
SELECT share.api_key_id, share.resource, share.worker_id, share.granted, share.wanted
FROM key_limit_shares AS share
JOIN gateway_workers AS worker USING (worker_id)
WHERE worker.expires_at > now()
ORDER BY share.api_key_id, share.resource, share.worker_id;
