-- Usage rollups (see sql/0007_usage_rollups.sql), loaded by name by affinity_store/usage.py.

-- name: add_usage
-- One statement for a whole flush: the rows arrive as arrays, each adds to its minute's row.
INSERT INTO usage_rollups AS r (
    minute, api_key_id, model, provider, outcome,
    requests, prompt_tokens, completion_tokens, cached_tokens
)
SELECT * FROM unnest(
    $1::timestamptz[], $2::text[], $3::text[], $4::text[], $5::text[],
    $6::bigint[], $7::bigint[], $8::bigint[], $9::bigint[]
)
ON CONFLICT (minute, api_key_id, model, provider, outcome) DO UPDATE SET
    requests = r.requests + excluded.requests,
    prompt_tokens = r.prompt_tokens + excluded.prompt_tokens,
    completion_tokens = r.completion_tokens + excluded.completion_tokens,
    cached_tokens = r.cached_tokens + excluded.cached_tokens

-- name: usage_totals
-- $2..$5: whether to keep the key, model, provider and outcome apart; a field not kept is ''
-- and summed over (fewer groups: a cheaper aggregate over many keys' minutes).
SELECT CASE WHEN $2 THEN api_key_id ELSE '' END AS api_key_id,
       CASE WHEN $3 THEN model ELSE '' END AS model,
       CASE WHEN $4 THEN provider ELSE '' END AS provider,
       CASE WHEN $5 THEN outcome ELSE '' END AS outcome,
       sum(requests)::bigint AS requests,
       sum(prompt_tokens)::bigint AS prompt_tokens,
       sum(completion_tokens)::bigint AS completion_tokens,
       sum(cached_tokens)::bigint AS cached_tokens
FROM usage_rollups
WHERE minute >= $1
GROUP BY 1, 2, 3, 4

-- name: usage_by_minute
SELECT minute,
       sum(requests)::bigint AS requests,
       sum(prompt_tokens)::bigint AS prompt_tokens,
       sum(completion_tokens)::bigint AS completion_tokens,
       sum(cached_tokens)::bigint AS cached_tokens
FROM usage_rollups
WHERE minute >= $1
GROUP BY minute
ORDER BY minute

-- name: purge_usage
WITH doomed AS (
    SELECT minute, api_key_id, model, provider, outcome
    FROM usage_rollups
    WHERE minute < $1
    LIMIT $2
)
DELETE FROM usage_rollups AS r
USING doomed
WHERE (r.minute, r.api_key_id, r.model, r.provider, r.outcome)
    = (doomed.minute, doomed.api_key_id, doomed.model, doomed.provider, doomed.outcome)
