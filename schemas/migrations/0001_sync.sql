-- HQ bookkeeping: locations and their cursors, the audit of runs, file records.
CREATE SCHEMA IF NOT EXISTS sync;

CREATE TABLE sync.locations (
    id              text PRIMARY KEY,
    name            text NOT NULL DEFAULT '',
    -- Pull-area instance the cursor belongs to; NULL until the first batch.
    instance_id     uuid,
    -- Cursor of the last applied batch (text form, see schemas::Cursor); NULL: start.
    cursor          text,
    -- ok | failing | paused | needs_resync
    state           text NOT NULL DEFAULT 'ok',
    paused_reason   text,
    last_fired_at   timestamptz,
    last_success_at timestamptz,
    last_error      text,
    last_error_at   timestamptz,
    backlog         bigint NOT NULL DEFAULT 0,
    lag_seconds     double precision NOT NULL DEFAULT 0,
    applied_changes bigint NOT NULL DEFAULT 0,
    updated_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE sync.runs (
    run_id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    location_id   text NOT NULL REFERENCES sync.locations (id),
    started_at    timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz,
    batches       integer NOT NULL DEFAULT 0,
    changes       bigint NOT NULL DEFAULT 0,
    bytes         bigint NOT NULL DEFAULT 0,
    cursor_before text,
    cursor_after  text,
    -- running | ok | failed | paused | needs_resync | interrupted
    outcome       text NOT NULL DEFAULT 'running',
    error         text
);
CREATE INDEX runs_location_started_idx ON sync.runs (location_id, started_at DESC);

CREATE TABLE sync.files (
    location_id text NOT NULL REFERENCES sync.locations (id),
    path        text NOT NULL,
    sha256      text,
    size        bigint,
    mtime       timestamptz,
    _seq        bigint NOT NULL,
    deleted     boolean NOT NULL DEFAULT false,
    stored_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (location_id, path)
);

-- A decimal that does not fit its HQ column is an error, never a silent rounding.
CREATE FUNCTION sync.fit_numeric(v numeric, p integer, s integer, col text)
RETURNS numeric LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF v IS NULL THEN
        RETURN NULL;
    END IF;
    IF v <> round(v, s) OR abs(v) >= 10::numeric ^ (p - s) THEN
        RAISE EXCEPTION 'value % of column % does not fit numeric(%,%)', v, col, p, s
            USING ERRCODE = '22003';
    END IF;
    RETURN v;
END
$$;
