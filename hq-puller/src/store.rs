//! Bookkeeping in `sync.locations` and `sync.runs`.

use crate::config::Location;
use crate::error::{Error, Result};
use chrono::{DateTime, Utc};
use schemas::Cursor;
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

/// Location states (`sync.locations.state`).
pub mod state {
    pub const OK: &str = "ok";
    pub const FAILING: &str = "failing";
    pub const PAUSED: &str = "paused";
    pub const NEEDS_RESYNC: &str = "needs_resync";
    /// An initial load or a resync is running (see `sync.loads`).
    pub const LOADING: &str = "loading";
    pub const ALL: [&str; 5] = [OK, FAILING, PAUSED, NEEDS_RESYNC, LOADING];
}

/// Run outcomes (`sync.runs.outcome`).
pub mod outcome {
    pub const RUNNING: &str = "running";
    pub const OK: &str = "ok";
    pub const FAILED: &str = "failed";
    pub const PAUSED: &str = "paused";
    pub const NEEDS_RESYNC: &str = "needs_resync";
    pub const INTERRUPTED: &str = "interrupted";
}

/// What a pull needs to know about a location before fetching.
#[derive(Debug, Clone)]
pub struct LocationRow {
    pub state: String,
    pub cursor: Option<Cursor>,
    pub instance_id: Option<Uuid>,
}

/// Registers (or renames) the configured locations. Never touches cursors or states.
pub async fn register_locations(pool: &PgPool, locations: &[Location]) -> Result<()> {
    for l in locations {
        sqlx::query(
            "INSERT INTO sync.locations (id, name) VALUES ($1, $2) \
             ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, updated_at = now()",
        )
        .bind(&l.id)
        .bind(&l.name)
        .execute(pool)
        .await?;
    }
    Ok(())
}

pub async fn load_location(pool: &PgPool, id: &str) -> Result<LocationRow> {
    let row: Option<(String, Option<String>, Option<Uuid>)> =
        sqlx::query_as("SELECT state, cursor, instance_id FROM sync.locations WHERE id = $1")
            .bind(id)
            .fetch_optional(pool)
            .await?;
    let Some((state, cursor, instance_id)) = row else {
        return Err(Error::permanent(format!(
            "location {id} is not registered in sync.locations (run hq-puller migrate)"
        )));
    };
    let cursor = match cursor {
        Some(c) => Some(c.parse::<Cursor>().map_err(|e| {
            Error::permanent(format!("stored cursor of location {id} is corrupt: {e}"))
        })?),
        None => None,
    };
    Ok(LocationRow {
        state,
        cursor,
        instance_id,
    })
}

pub async fn mark_fired(pool: &PgPool, id: &str) -> Result<()> {
    sqlx::query("UPDATE sync.locations SET last_fired_at = now() WHERE id = $1")
        .bind(id)
        .execute(pool)
        .await?;
    Ok(())
}

pub async fn start_run(pool: &PgPool, id: &str, cursor_before: Option<&Cursor>) -> Result<i64> {
    let run_id: i64 = sqlx::query_scalar(
        "INSERT INTO sync.runs (location_id, cursor_before) VALUES ($1, $2) RETURNING run_id",
    )
    .bind(id)
    .bind(cursor_before.map(|c| c.to_string()))
    .fetch_one(pool)
    .await?;
    Ok(run_id)
}

/// Totals of one run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RunTotals {
    pub batches: i32,
    pub changes: i64,
    pub bytes: i64,
}

pub async fn finish_run(
    pool: &PgPool,
    run_id: i64,
    totals: &RunTotals,
    cursor_after: Option<&Cursor>,
    outcome: &str,
    error: Option<&str>,
) -> Result<()> {
    sqlx::query(
        "UPDATE sync.runs SET finished_at = now(), batches = $2, changes = $3, bytes = $4, \
         cursor_after = $5, outcome = $6, error = $7 WHERE run_id = $1",
    )
    .bind(run_id)
    .bind(totals.batches)
    .bind(totals.changes)
    .bind(totals.bytes)
    .bind(cursor_after.map(|c| c.to_string()))
    .bind(outcome)
    .bind(error)
    .execute(pool)
    .await?;
    Ok(())
}

/// Records a failure. A transient one sets `failing` (unless the location is already
/// paused or awaiting resync); `paused` and `needs_resync` carry the reason.
pub async fn record_failure(pool: &PgPool, id: &str, new_state: &str, error: &str) -> Result<()> {
    let reason = (new_state != state::FAILING).then_some(error);
    sqlx::query(
        "UPDATE sync.locations SET \
           state = CASE WHEN $2 = 'failing' AND state IN ('paused', 'needs_resync') THEN state ELSE $2 END, \
           paused_reason = CASE WHEN $2 = 'failing' THEN paused_reason ELSE $3 END, \
           last_error = $4, last_error_at = now(), updated_at = now() \
         WHERE id = $1",
    )
    .bind(id)
    .bind(new_state)
    .bind(reason)
    .bind(error)
    .execute(pool)
    .await?;
    Ok(())
}

/// A successful run that found nothing to apply still ends a `failing` state.
pub async fn clear_failing(pool: &PgPool, id: &str) -> Result<()> {
    sqlx::query(
        "UPDATE sync.locations SET state = 'ok', last_success_at = now(), updated_at = now() \
         WHERE id = $1 AND state IN ('ok', 'failing')",
    )
    .bind(id)
    .execute(pool)
    .await?;
    Ok(())
}

/// `hq-puller resume`: back to `ok` after the operator fixed the cause. Returns the
/// previous state.
pub async fn resume(pool: &PgPool, id: &str) -> Result<String> {
    let prev: Option<String> = sqlx::query_scalar(
        "UPDATE sync.locations l SET state = 'ok', paused_reason = NULL, updated_at = now() \
         FROM (SELECT id, state FROM sync.locations WHERE id = $1 FOR UPDATE) old \
         WHERE l.id = old.id RETURNING old.state",
    )
    .bind(id)
    .fetch_optional(pool)
    .await?;
    prev.ok_or_else(|| Error::Other(format!("unknown location {id:?} (not in sync.locations)")))
}

/// Runs left `running` by a process that died are marked `interrupted`.
pub async fn close_stale_runs(pool: &PgPool) -> Result<u64> {
    let r = sqlx::query(
        "UPDATE sync.runs SET outcome = 'interrupted', finished_at = now(), \
         error = 'hq-puller stopped during the run' WHERE outcome = 'running'",
    )
    .execute(pool)
    .await?;
    Ok(r.rows_affected())
}

/// One location as shown by `hq-puller status`.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct StatusRow {
    pub id: String,
    pub name: String,
    pub state: String,
    pub paused_reason: Option<String>,
    pub cursor: Option<String>,
    pub instance_id: Option<Uuid>,
    pub backlog: i64,
    pub lag_seconds: f64,
    pub applied_changes: i64,
    pub last_fired_at: Option<DateTime<Utc>>,
    pub last_success_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub last_error_at: Option<DateTime<Utc>>,
    pub last_run_id: Option<i64>,
    pub last_run_started_at: Option<DateTime<Utc>>,
    pub last_run_finished_at: Option<DateTime<Utc>>,
    pub last_run_outcome: Option<String>,
    pub last_run_batches: Option<i32>,
    pub last_run_changes: Option<i64>,
    pub last_run_error: Option<String>,
}

pub async fn status(pool: &PgPool) -> Result<Vec<StatusRow>> {
    Ok(sqlx::query_as(
        "SELECT l.id, l.name, l.state, l.paused_reason, l.cursor, l.instance_id, l.backlog, \
           l.lag_seconds, l.applied_changes, l.last_fired_at, l.last_success_at, l.last_error, \
           l.last_error_at, r.run_id AS last_run_id, r.started_at AS last_run_started_at, \
           r.finished_at AS last_run_finished_at, r.outcome AS last_run_outcome, \
           r.batches AS last_run_batches, r.changes AS last_run_changes, r.error AS last_run_error \
         FROM sync.locations l \
         LEFT JOIN LATERAL (SELECT * FROM sync.runs WHERE location_id = l.id \
                            ORDER BY run_id DESC LIMIT 1) r ON true \
         ORDER BY l.id",
    )
    .fetch_all(pool)
    .await?)
}
