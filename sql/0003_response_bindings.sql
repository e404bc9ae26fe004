-- Stored /v1/responses objects live on the node that created them: response id → provider,
-- kept for `affinity.responses_ttl_seconds` after the last write. Only the key that created a
-- response finds it again (api_key_id is the key's stable id, never the key or its digest).
CREATE TABLE response_bindings (
    response_id text PRIMARY KEY,
    api_key_id text NOT NULL,
    provider text NOT NULL,
    expires_at timestamptz NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX response_bindings_expires_at_idx ON response_bindings (expires_at);
