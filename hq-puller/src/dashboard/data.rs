//! What the dashboard shows, read from `sync.*` in one go: each location's status (the
//! same rows as `hq-puller status --json`), its recent runs and its lag history.

use super::samples::{self, Sample};
use crate::config::Settings;
use crate::error::Result;
use crate::status::LocationStatus;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use std::collections::HashMap;

/// Runs listed per location.
pub const RECENT_RUNS: i64 = 5;

/// One run as listed on the dashboard.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct RunView {
    #[serde(skip)]
    pub location_id: String,
    pub run_id: i64,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub outcome: String,
    pub batches: i32,
    pub changes: i64,
    pub error: Option<String>,
}

/// One location: its status and recent runs.
#[derive(Debug, Clone, Serialize)]
pub struct LocationView {
    #[serde(flatten)]
    pub status: LocationStatus,
    pub recent_runs: Vec<RunView>,
}

/// The whole page's data (also the body of `GET /api/status`).
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub generated_at: DateTime<Utc>,
    pub locations: Vec<LocationView>,
    /// Lag samples of the chart window, oldest first (not part of the JSON).
    #[serde(skip)]
    pub samples: Vec<Sample>,
    #[serde(skip)]
    pub window_hours: u32,
}

/// Reads a snapshot; `window_hours` of lag history.
pub async fn load(pool: &PgPool, settings: &Settings, window_hours: u32) -> Result<Snapshot> {
    let now = Utc::now();
    let rows = crate::store::status(pool).await?;
    let statuses = crate::status::build(rows, settings, now);
    let runs: Vec<RunView> = sqlx::query_as(
        "SELECT r.location_id, r.run_id, r.started_at, r.finished_at, r.outcome, r.batches, \
           r.changes, r.error \
         FROM sync.locations l CROSS JOIN LATERAL \
           (SELECT * FROM sync.runs WHERE location_id = l.id ORDER BY run_id DESC LIMIT $1) r \
         ORDER BY r.location_id, r.run_id DESC",
    )
    .bind(RECENT_RUNS)
    .fetch_all(pool)
    .await?;
    let mut by_location: HashMap<String, Vec<RunView>> = HashMap::new();
    for r in runs {
        by_location
            .entry(r.location_id.clone())
            .or_default()
            .push(r);
    }
    let locations = statuses
        .into_iter()
        .map(|status| LocationView {
            recent_runs: by_location.remove(&status.row.id).unwrap_or_default(),
            status,
        })
        .collect();
    // 360 slices per window: finer than the charts draw.
    let window = chrono::Duration::hours(i64::from(window_hours));
    let samples = samples::since(pool, now - window, window.num_seconds() as f64 / 360.0).await?;
    Ok(Snapshot {
        generated_at: now,
        locations,
        samples,
        window_hours,
    })
}
