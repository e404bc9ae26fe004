-- Usage per minute, by (key, model, provider, outcome): requests and tokens by kind. Every
-- gateway worker adds what it counted with one batched upsert per flush interval; a janitor
-- deletes the minutes older than the retention. Minutes are UTC, truncated.
CREATE TABLE usage_rollups (
    minute timestamptz NOT NULL,
    api_key_id text NOT NULL,
    model text NOT NULL,
    provider text NOT NULL,
    outcome text NOT NULL,
    requests bigint NOT NULL DEFAULT 0 CHECK (requests >= 0),
    prompt_tokens bigint NOT NULL DEFAULT 0 CHECK (prompt_tokens >= 0),
    completion_tokens bigint NOT NULL DEFAULT 0 CHECK (completion_tokens >= 0),
    cached_tokens bigint NOT NULL DEFAULT 0 CHECK (cached_tokens >= 0),
    PRIMARY KEY (minute, api_key_id, model, provider, outcome)
);
