-- The shared (api key id, model) → provider bindings, with a sliding expiry.
-- api_key_id is the key's stable id, never the key or its digest.
CREATE TABLE affinity_bindings (
    api_key_id text NOT NULL,
    model text NOT NULL,
    provider text NOT NULL,
    routing_identity text NOT NULL,
    expires_at timestamptz NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (api_key_id, model)
);

-- The janitor deletes by age.
CREATE INDEX affinity_bindings_expires_at_idx ON affinity_bindings (expires_at);

-- Cluster-wide spread counts live bindings per routing identity.
CREATE INDEX affinity_bindings_routing_identity_idx
    ON affinity_bindings (routing_identity, expires_at);
