-- Each worker's heartbeat also writes a small JSON snapshot of itself (requests in flight,
-- shedding, cooling providers, config digest, version), so any worker's status page can show the
-- whole cluster. NULL until the worker's first heartbeat after this migration.
ALTER TABLE gateway_workers ADD COLUMN snapshot jsonb;
