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

-- name: bind_least_bound_candidate
-- $3/$4: candidates' providers and routing identities in preference order.
-- Picks the routing identity with the fewest live bindings (not counting this key's
-- own row, which is being replaced), earlier candidates first on ties, and upserts it.
WITH candidate AS (
    SELECT provider, routing_identity, position
    FROM unnest($3::text[], $4::text[]) WITH ORDINALITY AS listed(provider, routing_identity, position)
),
live_count AS (
    SELECT routing_identity, count(*) AS bindings
    FROM affinity_bindings
    WHERE routing_identity = ANY($4::text[])
      AND expires_at > now()
      AND NOT (api_key_id = $1 AND model = $2)
    GROUP BY routing_identity
),
chosen AS (
    SELECT candidate.provider, candidate.routing_identity
    FROM candidate LEFT JOIN live_count USING (routing_identity)
    ORDER BY coalesce(live_count.bindings, 0), candidate.position
    LIMIT 1
)
INSERT INTO affinity_bindings (api_key_id, model, provider, routing_identity, expires_at)
SELECT $1, $2, provider, routing_identity, now() + make_interval(secs => $5::float8)
FROM chosen
ON CONFLICT (api_key_id, model) DO UPDATE
SET provider = excluded.provider,
    routing_identity = excluded.routing_identity,
    expires_at = excluded.expires_at,
    created_at = now(),
    updated_at = now()
RETURNING api_key_id, model, provider, routing_identity, expires_at,
          extract(epoch FROM expires_at - now())::float8 AS ttl_remaining;

-- name: renew
UPDATE affinity_bindings
SET expires_at = now() + make_interval(secs => $4::float8), updated_at = now()
WHERE api_key_id = $1 AND model = $2 AND provider = $3;

-- name: rebind
-- Compare-and-set on the old provider; inserts only when the key has no row at all.
WITH moved AS (
    UPDATE affinity_bindings
    SET provider = $4,
        routing_identity = $5,
        expires_at = now() + make_interval(secs => $6::float8),
        updated_at = now()
    WHERE api_key_id = $1 AND model = $2 AND provider = $3
    RETURNING 1
),
created AS (
    INSERT INTO affinity_bindings (api_key_id, model, provider, routing_identity, expires_at)
    SELECT $1, $2, $4, $5, now() + make_interval(secs => $6::float8)
    WHERE NOT EXISTS (SELECT 1 FROM moved)
    ON CONFLICT (api_key_id, model) DO NOTHING
    RETURNING 1
)
SELECT (SELECT count(*) FROM moved) + (SELECT count(*) FROM created) > 0;

-- name: count_live
SELECT identity.routing_identity, count(affinity_bindings.api_key_id) AS bindings
FROM unnest($1::text[]) AS identity(routing_identity)
LEFT JOIN affinity_bindings
       ON affinity_bindings.routing_identity = identity.routing_identity
      AND affinity_bindings.expires_at > now()
GROUP BY identity.routing_identity;

-- name: try_lock_janitor
SELECT pg_try_advisory_xact_lock($1::int4, $2::int4);

-- name: purge_expired_batch
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
    RETURNING 1
)
SELECT count(*) FROM deleted;

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
-- $1 response id, $2 provider, $3 ttl in seconds, $4 the creating key's id. Each write also deletes a few rows expired
-- for a while, so the table stays near its live size without a janitor of its own.
WITH purged AS (
    DELETE FROM response_bindings
    WHERE response_id IN (
        SELECT response_id FROM response_bindings
        WHERE expires_at < now() - interval '5 minutes'
        LIMIT 10
        FOR UPDATE SKIP LOCKED
    )
)
INSERT INTO response_bindings (response_id, api_key_id, provider, expires_at)
VALUES ($1, $4, $2, now() + make_interval(secs => $3::float8))
ON CONFLICT (response_id) DO UPDATE
SET api_key_id = excluded.api_key_id, provider = excluded.provider,
    expires_at = excluded.expires_at;

-- name: response_provider
SELECT provider FROM response_bindings
WHERE response_id = $1 AND api_key_id = $2 AND expires_at > now();
