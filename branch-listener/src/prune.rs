//! Pruning of acknowledged history.
//!
//! Retention is measured on ticks: the newest tick `T` that HQ acknowledged (`T` ≤ the
//! acked tick) and that is older than `retention` becomes the oldest tick kept; every
//! older tick is deleted, and so is every change at or before `T` (no cursor can reach
//! them any more: a cursor into deleted ticks gets 410). The acked tick and the newest
//! tick are never deleted, and unacknowledged changes never are. Deletes run in bounded
//! batches so the application's writers are never blocked for long.

use crate::db::Db;
use crate::error::Result;
use chrono::Utc;
use schemas::sql::sqlite as sq;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Rows deleted per statement.
const BATCH: i64 = 5_000;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pruned {
    pub changes: u64,
    pub ticks: u64,
}

/// One pruning pass.
pub async fn prune_once(db: &Db, retention: Duration) -> Result<Pruned> {
    let meta = db.meta().await?;
    if meta.acked_tick <= 0 {
        return Ok(Pruned::default());
    }
    let retention = chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::MAX);
    let cutoff = Utc::now()
        .checked_sub_signed(retention)
        .unwrap_or(chrono::DateTime::<Utc>::MIN_UTC);
    let mut out = Pruned::default();
    match db {
        Db::Sqlite { pool, .. } => {
            let cutoff = cutoff.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string();
            let keep: Option<(i64, i64)> = sqlx::query_as(&format!(
                "SELECT tick_id, head_seq FROM {} WHERE tick_id <= ?1 AND created_at < ?2 \
                 ORDER BY tick_id DESC LIMIT 1",
                sq::TICKS
            ))
            .bind(meta.acked_tick)
            .bind(&cutoff)
            .fetch_optional(pool)
            .await?;
            let Some((keep_id, keep_head)) = keep else {
                return Ok(out);
            };
            out.ticks = sqlx::query(&format!("DELETE FROM {} WHERE tick_id < ?1", sq::TICKS))
                .bind(keep_id)
                .execute(pool)
                .await?
                .rows_affected();
            loop {
                let n = sqlx::query(&format!(
                    "DELETE FROM {c} WHERE seq IN (SELECT seq FROM {c} WHERE seq <= ?1 ORDER BY seq LIMIT ?2)",
                    c = sq::CHANGES
                ))
                .bind(keep_head)
                .bind(BATCH)
                .execute(pool)
                .await?
                .rows_affected();
                out.changes += n;
                if n < BATCH as u64 {
                    break;
                }
            }
        }
        Db::Postgres(pool) => {
            let keep: Option<i64> = sqlx::query_scalar(
                "SELECT tick_id FROM pull.ticks WHERE tick_id <= $1 AND created_at < $2 \
                 ORDER BY tick_id DESC LIMIT 1",
            )
            .bind(meta.acked_tick)
            .bind(cutoff)
            .fetch_optional(pool)
            .await?;
            let Some(keep_id) = keep else {
                return Ok(out);
            };
            out.ticks = sqlx::query("DELETE FROM pull.ticks WHERE tick_id < $1")
                .bind(keep_id)
                .execute(pool)
                .await?
                .rows_affected();
            loop {
                let n = sqlx::query(
                    "DELETE FROM pull.changes WHERE seq IN (\
                       SELECT c.seq FROM pull.changes c, pull.ticks t WHERE t.tick_id = $1 \
                         AND c.txid < pg_snapshot_xmax(t.snap) AND pg_visible_in_snapshot(c.txid, t.snap) \
                       LIMIT $2)",
                )
                .bind(keep_id)
                .bind(BATCH)
                .execute(pool)
                .await?
                .rows_affected();
                out.changes += n;
                if n < BATCH as u64 {
                    break;
                }
            }
        }
    }
    if out.changes > 0 || out.ticks > 0 {
        metrics::counter!(crate::metrics::PRUNED_CHANGES_TOTAL).increment(out.changes);
        tracing::info!(
            changes = out.changes,
            ticks = out.ticks,
            "pruned acknowledged history"
        );
    }
    Ok(out)
}

/// Prunes every `interval` until shutdown.
pub async fn run(db: Db, retention: Duration, interval: Duration, shutdown: CancellationToken) {
    let mut every = tokio::time::interval(interval);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = every.tick() => {}
        }
        if let Err(e) = prune_once(&db, retention).await {
            tracing::warn!(error = %e, "pruning failed; will retry");
        }
    }
}
