//! Lag history (`sync.lag_samples`): one sample per location at the end of every run,
//! trimmed to [`RETENTION_HOURS`]. The dashboard's charts are drawn from it.

use crate::error::Result;
use chrono::{DateTime, Utc};
use sqlx::PgPool;

/// Samples older than this are deleted (at the next run of their location).
pub const RETENTION_HOURS: i32 = 48;

/// Records the location's current lag, backlog and state, and trims its old samples.
pub async fn record(pool: &PgPool, location: &str) -> Result<()> {
    sqlx::query(
        "INSERT INTO sync.lag_samples (location_id, lag_seconds, backlog, state) \
         SELECT id, lag_seconds, backlog, state FROM sync.locations WHERE id = $1",
    )
    .bind(location)
    .execute(pool)
    .await?;
    sqlx::query(
        "DELETE FROM sync.lag_samples \
         WHERE location_id = $1 AND at < now() - make_interval(hours => $2)",
    )
    .bind(location)
    .bind(RETENTION_HOURS)
    .execute(pool)
    .await?;
    Ok(())
}

/// One stored sample.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Sample {
    pub location_id: String,
    pub at: DateTime<Utc>,
    pub lag_seconds: f64,
}

/// Per location, the largest lag in each `bucket_seconds` slice of time since `since`
/// (oldest first): the page's size stays bounded however often runs end.
pub async fn since(
    pool: &PgPool,
    since: DateTime<Utc>,
    bucket_seconds: f64,
) -> Result<Vec<Sample>> {
    Ok(sqlx::query_as(
        "SELECT location_id, to_timestamp(floor(extract(epoch FROM at) / $2) * $2) AS at, \
           max(lag_seconds) AS lag_seconds \
         FROM sync.lag_samples WHERE at >= $1 GROUP BY 1, 2 ORDER BY 2",
    )
    .bind(since)
    .bind(bucket_seconds.max(1.0))
    .fetch_all(pool)
    .await?)
}
