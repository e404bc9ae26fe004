-- Usage pre-added over coarser spans, so a read over many keys sums few rows: per 10 minutes
-- and per hour by (key, model, provider, outcome), and per minute over every key (the status
-- page's chart). The flush that adds a worker's minute rows adds them to these too, in the same
-- statement; the janitor deletes their expired rows with the minutes'. Spans start at multiples
-- of their width since the Unix epoch (UTC).
CREATE TABLE usage_span_rollups (
    span_minutes integer NOT NULL CHECK (span_minutes IN (10, 60)),
    start timestamptz NOT NULL,
    api_key_id text NOT NULL,
    model text NOT NULL,
    provider text NOT NULL,
    outcome text NOT NULL,
    requests bigint NOT NULL DEFAULT 0 CHECK (requests >= 0),
    prompt_tokens bigint NOT NULL DEFAULT 0 CHECK (prompt_tokens >= 0),
    completion_tokens bigint NOT NULL DEFAULT 0 CHECK (completion_tokens >= 0),
    cached_tokens bigint NOT NULL DEFAULT 0 CHECK (cached_tokens >= 0),
    PRIMARY KEY (span_minutes, start, api_key_id, model, provider, outcome)
);

CREATE TABLE usage_minute_totals (
    minute timestamptz PRIMARY KEY,
    requests bigint NOT NULL DEFAULT 0 CHECK (requests >= 0),
    prompt_tokens bigint NOT NULL DEFAULT 0 CHECK (prompt_tokens >= 0),
    completion_tokens bigint NOT NULL DEFAULT 0 CHECK (completion_tokens >= 0),
    cached_tokens bigint NOT NULL DEFAULT 0 CHECK (cached_tokens >= 0)
);

-- The minutes counted before this migration, added up into both.
INSERT INTO usage_span_rollups
SELECT spans.span_minutes,
       date_bin(make_interval(mins => spans.span_minutes), minute, timestamptz 'epoch'),
       api_key_id, model, provider, outcome,
       sum(requests), sum(prompt_tokens), sum(completion_tokens), sum(cached_tokens)
FROM usage_rollups CROSS JOIN (VALUES (10), (60)) AS spans (span_minutes)
GROUP BY 1, 2, 3, 4, 5, 6;

INSERT INTO usage_minute_totals
SELECT minute, sum(requests), sum(prompt_tokens), sum(completion_tokens), sum(cached_tokens)
FROM usage_rollups
GROUP BY minute;

-- A read now sums at most 14 rows per key plus its hours: a parallel plan's workers cost more
-- than they save on such a scan, and far more on a busy server (measured: 48 ms serial against
-- 112 ms with 2 workers over 10,000 keys' last hour).
ALTER TABLE usage_rollups SET (parallel_workers = 0);
ALTER TABLE usage_span_rollups SET (parallel_workers = 0);
