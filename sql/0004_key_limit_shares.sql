-- Cluster-wide key limits: the live gateway workers, and each worker's share of a key's limit.
-- A worker renews its row with every heartbeat; a worker whose row expired (it stopped, or lost
-- the store) counts for nothing, and neither do its shares. Times are the database's.
CREATE TABLE gateway_workers (
    worker_id text PRIMARY KEY,
    started_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);

-- `resource` is the limit shared out ('max_concurrency' or 'requests_per_minute'); `granted` is
-- what the worker may use, `wanted` what it asked for. The grants of a key's live workers never
-- sum above its limit: they are only written under the key's advisory lock (see locks.py), and a
-- worker that comes back after its row expired finds its shares deleted.
CREATE TABLE key_limit_shares (
    api_key_id text NOT NULL,
    resource text NOT NULL,
    worker_id text NOT NULL,
    granted integer NOT NULL CHECK (granted >= 0),
    wanted integer NOT NULL CHECK (wanted >= 0),
    PRIMARY KEY (api_key_id, resource, worker_id)
);

CREATE INDEX key_limit_shares_worker_idx ON key_limit_shares (worker_id);
