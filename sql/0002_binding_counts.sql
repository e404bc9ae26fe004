-- Bindings per routing identity, kept by the statements that add, move and delete bindings,
-- so a claim's cluster-wide spread reads a few counter rows instead of counting the table.
-- A count is the sum of its identity's shards: concurrent claims of different keys update
-- different shard rows (chosen from the key's hash) instead of queueing on one hot row.
-- Rows count until the janitor deletes them (expired rows within the janitor's grace count).
CREATE TABLE affinity_binding_counts (
    routing_identity text NOT NULL,
    shard smallint NOT NULL,
    bindings bigint NOT NULL,
    PRIMARY KEY (routing_identity, shard)
) WITH (fillfactor = 50);

INSERT INTO affinity_binding_counts (routing_identity, shard, bindings)
SELECT routing_identity, 0, count(*)
FROM affinity_bindings
GROUP BY routing_identity;

-- Spread no longer scans bindings by routing identity.
DROP INDEX affinity_bindings_routing_identity_idx;
