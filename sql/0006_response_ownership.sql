-- Stored responses per key are capped (`affinity.responses_max_per_key`): each key numbers the
-- responses it creates, and a write evicts the key's responses numbered that many below the
-- newest (its oldest). A response id stays the key's that created it: another key's write of the
-- same id changes nothing. Rows written before this migration count as the oldest (number 0).
ALTER TABLE response_bindings ADD COLUMN sequence bigint NOT NULL DEFAULT 0;

CREATE INDEX response_bindings_key_sequence_idx ON response_bindings (api_key_id, sequence);

-- The last number each key gave a stored response (one short row per key that ever stored one).
CREATE TABLE response_sequences (
    api_key_id text PRIMARY KEY,
    last_sequence bigint NOT NULL
);
