-- Initial load and resync progress: a crashed load resumes from its last page instead
-- of restarting. One row per location while a load runs; removed when it completes.
CREATE TABLE sync.loads (
    location_id  text PRIMARY KEY REFERENCES sync.locations (id),
    -- initial (cursor was NULL: load into hq.<t>) | resync (load into hq_stage.<t>, then switch)
    kind         text NOT NULL,
    -- T0: the snapshot's start cursor; the change stream continues from it.
    start_cursor text NOT NULL,
    instance_id  uuid NOT NULL,
    time_zone    text NOT NULL,
    -- The table being loaded and the key image of its last loaded row (NULL: start of
    -- the table); tables before it in catalogue order are complete.
    table_name   text,
    last_key     text,
    rows_loaded  bigint NOT NULL DEFAULT 0,
    started_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);

CREATE SCHEMA IF NOT EXISTS hq_stage;

-- The snapshot start (T0) of the location's last completed initial load or resync:
-- rows loaded from that snapshot carry `_seq = 0` at HQ, changes after it their seq.
ALTER TABLE sync.locations ADD COLUMN snapshot_cursor text;
