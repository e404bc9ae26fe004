-- Usage rollups (see sql/0007_usage_rollups.sql and sql/0009_usage_spans.sql), loaded by name by
-- affinity_store/usage.py.

-- name: add_usage
-- One statement for a whole flush: the rows arrive as arrays; each adds to its minute's row, to
-- its 10-minute and hour spans and to its minute's total over every key. Rows are written in key
-- order, so two workers' flushes over the same rows wait for each other, never deadlock.
WITH counted AS (
    SELECT * FROM unnest(
        $1::timestamptz[], $2::text[], $3::text[], $4::text[], $5::text[],
        $6::bigint[], $7::bigint[], $8::bigint[], $9::bigint[]
    ) AS c (
        minute, api_key_id, model, provider, outcome,
        requests, prompt_tokens, completion_tokens, cached_tokens
    )
),
minutes AS (
    INSERT INTO usage_rollups AS r (
        minute, api_key_id, model, provider, outcome,
        requests, prompt_tokens, completion_tokens, cached_tokens
    )
    SELECT minute, api_key_id, model, provider, outcome,
           sum(requests), sum(prompt_tokens), sum(completion_tokens), sum(cached_tokens)
    FROM counted
    GROUP BY 1, 2, 3, 4, 5
    ORDER BY 1, 2, 3, 4, 5
    ON CONFLICT (minute, api_key_id, model, provider, outcome) DO UPDATE SET
        requests = r.requests + excluded.requests,
        prompt_tokens = r.prompt_tokens + excluded.prompt_tokens,
        completion_tokens = r.completion_tokens + excluded.completion_tokens,
        cached_tokens = r.cached_tokens + excluded.cached_tokens
),
spans AS (
    INSERT INTO usage_span_rollups AS r (
        span_minutes, start, api_key_id, model, provider, outcome,
        requests, prompt_tokens, completion_tokens, cached_tokens
    )
    SELECT spans.span_minutes,
           date_bin(make_interval(mins => spans.span_minutes), minute, timestamptz 'epoch'),
           api_key_id, model, provider, outcome,
           sum(requests), sum(prompt_tokens), sum(completion_tokens), sum(cached_tokens)
    FROM counted CROSS JOIN (VALUES (10), (60)) AS spans (span_minutes)
    GROUP BY 1, 2, 3, 4, 5, 6
    ORDER BY 1, 2, 3, 4, 5, 6
    ON CONFLICT (span_minutes, start, api_key_id, model, provider, outcome) DO UPDATE SET
        requests = r.requests + excluded.requests,
        prompt_tokens = r.prompt_tokens + excluded.prompt_tokens,
        completion_tokens = r.completion_tokens + excluded.completion_tokens,
        cached_tokens = r.cached_tokens + excluded.cached_tokens
)
INSERT INTO usage_minute_totals AS r (
    minute, requests, prompt_tokens, completion_tokens, cached_tokens
)
SELECT minute, sum(requests), sum(prompt_tokens), sum(completion_tokens), sum(cached_tokens)
FROM counted
GROUP BY minute
ORDER BY minute
ON CONFLICT (minute) DO UPDATE SET
    requests = r.requests + excluded.requests,
    prompt_tokens = r.prompt_tokens + excluded.prompt_tokens,
    completion_tokens = r.completion_tokens + excluded.completion_tokens,
    cached_tokens = r.cached_tokens + excluded.cached_tokens

-- name: usage_totals
-- From minute $1 on, as minutes up to $2, 10-minute spans from $2 up to $3 and hours from $3 on
-- ($2 and $3: the first 10-minute and hour boundaries at or after $1): per key, at most 9
-- minutes, 5 spans and the hours. {key}, {model}, {provider} and {outcome} are filled in before
-- it runs (usage.py): the field's column when kept apart, else '' (summed over), so a plan the
-- server keeps for the statement groups by the fields asked for only.
SELECT {key} AS api_key_id,
       {model} AS model,
       {provider} AS provider,
       {outcome} AS outcome,
       sum(requests)::bigint AS requests,
       sum(prompt_tokens)::bigint AS prompt_tokens,
       sum(completion_tokens)::bigint AS completion_tokens,
       sum(cached_tokens)::bigint AS cached_tokens
FROM (
    SELECT api_key_id, model, provider, outcome,
           requests, prompt_tokens, completion_tokens, cached_tokens
    FROM usage_rollups
    WHERE minute >= $1::timestamptz AND minute < $2::timestamptz
    UNION ALL
    SELECT api_key_id, model, provider, outcome,
           requests, prompt_tokens, completion_tokens, cached_tokens
    FROM usage_span_rollups
    WHERE span_minutes = 10 AND start >= $2::timestamptz AND start < $3::timestamptz
    UNION ALL
    SELECT api_key_id, model, provider, outcome,
           requests, prompt_tokens, completion_tokens, cached_tokens
    FROM usage_span_rollups
    WHERE span_minutes = 60 AND start >= $3::timestamptz
) AS counted
GROUP BY 1, 2, 3, 4

-- name: usage_by_minute
SELECT minute, requests, prompt_tokens, completion_tokens, cached_tokens
FROM usage_minute_totals
WHERE minute >= $1
ORDER BY minute

-- name: purge_usage
-- At most $2 expired rows of each table: the minutes before $1, the spans that start before it
-- (a read from $1 on never uses them) and the minutes' totals; returns how many rows went.
WITH doomed_minutes AS (
    SELECT minute, api_key_id, model, provider, outcome
    FROM usage_rollups
    WHERE minute < $1
    LIMIT $2
),
gone_minutes AS (
    DELETE FROM usage_rollups AS r
    USING doomed_minutes AS d
    WHERE (r.minute, r.api_key_id, r.model, r.provider, r.outcome)
        = (d.minute, d.api_key_id, d.model, d.provider, d.outcome)
    RETURNING 1
),
doomed_spans AS (
    SELECT span_minutes, start, api_key_id, model, provider, outcome
    FROM usage_span_rollups
    WHERE span_minutes IN (10, 60) AND start < $1
    LIMIT $2
),
gone_spans AS (
    DELETE FROM usage_span_rollups AS r
    USING doomed_spans AS d
    WHERE (r.span_minutes, r.start, r.api_key_id, r.model, r.provider, r.outcome)
        = (d.span_minutes, d.start, d.api_key_id, d.model, d.provider, d.outcome)
    RETURNING 1
),
gone_totals AS (
    DELETE FROM usage_minute_totals
    WHERE minute IN (SELECT minute FROM usage_minute_totals WHERE minute < $1 LIMIT $2)
    RETURNING 1
)
SELECT (SELECT count(*) FROM gone_minutes)
     + (SELECT count(*) FROM gone_spans)
     + (SELECT count(*) FROM gone_totals)
