-- Lag history for the HQ dashboard's chart: one sample per location at the end of each
-- run (hq-puller trims samples older than its retention, see hq-puller/src/dashboard).
CREATE TABLE sync.lag_samples (
    location_id  text NOT NULL REFERENCES sync.locations (id) ON DELETE CASCADE,
    at           timestamptz NOT NULL DEFAULT now(),
    lag_seconds  double precision NOT NULL,
    backlog      bigint NOT NULL,
    state        text NOT NULL
);
CREATE INDEX lag_samples_location_at_idx ON sync.lag_samples (location_id, at);
CREATE INDEX lag_samples_at_idx ON sync.lag_samples (at);

-- The latest runs of each location (hq-puller status, the dashboard): without it the
-- LATERAL "ORDER BY run_id DESC LIMIT n" per location walks the primary key backwards
-- through every other location's runs (1.4 s for 46 locations x 2880 runs; 3 ms with).
CREATE INDEX runs_location_run_idx ON sync.runs (location_id, run_id DESC);
