//! The pull area seen by the listener: metadata, ticks, windows, acknowledgement and
//! the figures of `/v1/status`, for both backends.
//!
//! A window (L, H] between two ticks holds whole transactions:
//! - SQLite: `seq` in (L.head_seq, H.head_seq] (writers are serialized, so a tick's
//!   `head_seq` is a transaction boundary and seq order is commit order);
//! - PostgreSQL: the changes whose transaction is visible in H's snapshot and not in
//!   L's, ordered by seq (transactions commit out of seq order).

use crate::db::Db;
use crate::error::{Error, Result};
use chrono::{DateTime, Utc};
use schemas::sql::{postgres as pg, sqlite as sq};
use schemas::wire::{Change, Op, OpenWriter};
use serde_json::value::RawValue;
use sqlx::Row;
use std::time::Duration;
use uuid::Uuid;

/// Metadata stored by install in the pull area.
#[derive(Debug, Clone)]
pub struct Meta {
    pub instance_id: Uuid,
    pub version: i64,
    pub fingerprint: String,
    pub install_tick: i64,
    /// The newest tick HQ acknowledged (0: none yet).
    pub acked_tick: i64,
}

/// A window boundary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tick {
    pub id: i64,
    pub uuid: Uuid,
    /// Highest committed sequence at the tick (PostgreSQL: informational).
    pub head_seq: i64,
}

/// Counts reported by `/v1/status` and `/metrics`.
#[derive(Debug, Clone)]
pub struct Figures {
    pub newest: Tick,
    pub head_seq: i64,
    pub depth: u64,
    pub unacked: u64,
    pub oldest_unacked_age_seconds: Option<f64>,
    pub oldest_open_writer: Option<OpenWriter>,
}

/// Most windows read by one request (each is one query on PostgreSQL).
const MAX_WINDOWS_PER_BATCH: i64 = 1000;

fn not_installed_or(e: sqlx::Error) -> Error {
    if let sqlx::Error::Database(db) = &e {
        let code = db.code().map(|c| c.to_string()).unwrap_or_default();
        if code == "42P01" || code == "3F000" || db.message().contains("no such table") {
            return Error::NotInstalled;
        }
    }
    e.into()
}

fn parse_uuid(s: &str) -> Result<Uuid> {
    Uuid::parse_str(s)
        .map_err(|_| Error::Database(format!("pull area holds a malformed uuid {s:?}")))
}

fn raw(text: String) -> Result<Box<RawValue>> {
    RawValue::from_string(text)
        .map_err(|e| Error::Database(format!("pull area holds malformed JSON: {e}")))
}

fn change(
    seq: i64,
    tbl: String,
    op: &str,
    pk: String,
    row: Option<String>,
    ts: DateTime<Utc>,
) -> Result<Change> {
    Ok(Change {
        seq,
        table: tbl,
        op: Op::from_code(op)
            .ok_or_else(|| Error::Database(format!("pull area holds unknown op {op:?}")))?,
        pk: raw(pk)?,
        row: row.map(raw).transpose()?,
        ts,
    })
}

fn sqlite_ts(s: &str) -> Result<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| Error::Database(format!("pull area holds a malformed timestamp {s:?}")))
}

pub(crate) fn meta_from_pairs(pairs: Vec<(String, String)>) -> Result<Meta> {
    let get = |k: &str| {
        pairs
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
    };
    let instance = get("instance_id").ok_or(Error::NotInstalled)?;
    let int = |k: &str| get(k).and_then(|v| v.parse::<i64>().ok()).unwrap_or(0);
    Ok(Meta {
        instance_id: parse_uuid(&instance)?,
        version: int("pull_area_version"),
        fingerprint: get("catalogue_fingerprint").unwrap_or_default(),
        install_tick: int("install_tick"),
        acked_tick: int("acked_tick"),
    })
}

fn tick_from_sqlite(row: &sqlx::sqlite::SqliteRow) -> Result<Tick> {
    Ok(Tick {
        id: row.try_get(0)?,
        uuid: parse_uuid(&row.try_get::<String, _>(1)?)?,
        head_seq: row.try_get(2)?,
    })
}

fn tick_from_pg(row: &sqlx::postgres::PgRow) -> Result<Tick> {
    Ok(Tick {
        id: row.try_get(0)?,
        uuid: row.try_get(1)?,
        head_seq: row.try_get(2)?,
    })
}

impl Db {
    pub async fn meta(&self) -> Result<Meta> {
        let pairs: Vec<(String, String)> = match self {
            Db::Sqlite { pool, .. } => {
                sqlx::query_as(&format!("SELECT key, value FROM {}", sq::META))
                    .fetch_all(pool)
                    .await
                    .map_err(not_installed_or)?
            }
            Db::Postgres(pool) => sqlx::query_as("SELECT key, value FROM pull.meta")
                .fetch_all(pool)
                .await
                .map_err(not_installed_or)?,
        };
        meta_from_pairs(pairs)
    }

    /// Makes a tick if changes were committed after the newest tick. Returns the new
    /// tick, or `None` when there was nothing new. On SQLite, `patience` bounds the wait
    /// for the write lock (an application transaction may hold it for long); then the
    /// error is `Unavailable`.
    pub async fn tick_if_new(&self, patience: Duration) -> Result<Option<Tick>> {
        let tick = match self {
            Db::Sqlite { pool, .. } => {
                // Read first: most calls find nothing new and must not take the write lock.
                let new: bool = sqlx::query_scalar(&format!(
                    "SELECT COALESCE((SELECT MAX(seq) FROM {c}), 0) > \
                     COALESCE((SELECT head_seq FROM {t} ORDER BY tick_id DESC LIMIT 1), 0)",
                    t = sq::TICKS,
                    c = sq::CHANGES
                ))
                .fetch_one(pool)
                .await
                .map_err(not_installed_or)?;
                if !new {
                    return Ok(None);
                }
                let mut conn = pool.acquire().await?;
                sqlx::query(&format!("PRAGMA busy_timeout = {}", patience.as_millis()))
                    .execute(&mut *conn)
                    .await?;
                let row = sqlite_tick(&mut conn).await;
                sqlx::query(&format!(
                    "PRAGMA busy_timeout = {}",
                    crate::db::SQLITE_BUSY_TIMEOUT.as_millis()
                ))
                .execute(&mut *conn)
                .await?;
                row?.as_ref().map(tick_from_sqlite).transpose()?
            }
            Db::Postgres(pool) => {
                let mut tx = pool.begin().await?;
                // The snapshot must be taken after the lock: READ COMMITTED whatever the
                // database's default isolation.
                sqlx::query("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("SELECT pg_advisory_xact_lock($1)")
                    .bind(pg::TICK_LOCK_KEY)
                    .execute(&mut *tx)
                    .await?;
                let row = sqlx::query(
                    "INSERT INTO pull.ticks (snap, head_seq) \
                     SELECT pg_current_snapshot(), (SELECT COALESCE(max(seq), 0) FROM pull.changes) \
                     FROM (SELECT snap FROM pull.ticks ORDER BY tick_id DESC LIMIT 1) last \
                     WHERE EXISTS (SELECT 1 FROM pull.changes c \
                        WHERE c.txid >= pg_snapshot_xmin(last.snap) \
                          AND NOT pg_visible_in_snapshot(c.txid, last.snap)) \
                     RETURNING tick_id, tick_uuid, head_seq",
                )
                .fetch_optional(&mut *tx)
                .await
                .map_err(not_installed_or)?;
                tx.commit().await?;
                row.as_ref().map(tick_from_pg).transpose()?
            }
        };
        if let Some(t) = &tick {
            metrics::counter!(crate::metrics::TICKS_TOTAL).increment(1);
            tracing::debug!(tick = t.id, head_seq = t.head_seq, "tick");
        }
        Ok(tick)
    }

    pub async fn newest_tick(&self) -> Result<Tick> {
        match self {
            Db::Sqlite { pool, .. } => {
                let row = sqlx::query(&format!(
                    "SELECT tick_id, tick_uuid, head_seq FROM {} ORDER BY tick_id DESC LIMIT 1",
                    sq::TICKS
                ))
                .fetch_optional(pool)
                .await
                .map_err(not_installed_or)?
                .ok_or(Error::NotInstalled)?;
                tick_from_sqlite(&row)
            }
            Db::Postgres(pool) => {
                let row = sqlx::query(
                    "SELECT tick_id, tick_uuid, head_seq FROM pull.ticks ORDER BY tick_id DESC LIMIT 1",
                )
                .fetch_optional(pool)
                .await
                .map_err(not_installed_or)?
                .ok_or(Error::NotInstalled)?;
                tick_from_pg(&row)
            }
        }
    }

    pub async fn tick_by_id(&self, id: i64) -> Result<Option<Tick>> {
        match self {
            Db::Sqlite { pool, .. } => sqlx::query(&format!(
                "SELECT tick_id, tick_uuid, head_seq FROM {} WHERE tick_id = ?1",
                sq::TICKS
            ))
            .bind(id)
            .fetch_optional(pool)
            .await
            .map_err(not_installed_or)?
            .as_ref()
            .map(tick_from_sqlite)
            .transpose(),
            Db::Postgres(pool) => sqlx::query(
                "SELECT tick_id, tick_uuid, head_seq FROM pull.ticks WHERE tick_id = $1",
            )
            .bind(id)
            .fetch_optional(pool)
            .await
            .map_err(not_installed_or)?
            .as_ref()
            .map(tick_from_pg)
            .transpose(),
        }
    }

    /// Records `tick` as acknowledged by HQ (monotonic: an older tick changes nothing).
    /// On SQLite, `patience` bounds the wait for the write lock.
    pub async fn ack(&self, tick: i64, patience: Duration) -> Result<()> {
        match self {
            Db::Sqlite { pool, .. } => {
                let mut conn = pool.acquire().await?;
                sqlx::query(&format!("PRAGMA busy_timeout = {}", patience.as_millis()))
                    .execute(&mut *conn)
                    .await?;
                let r = sqlx::query(&format!(
                    "UPDATE {} SET value = CAST(?1 AS TEXT) WHERE key = 'acked_tick' AND CAST(value AS INTEGER) < ?1",
                    sq::META
                ))
                .bind(tick)
                .execute(&mut *conn)
                .await;
                sqlx::query(&format!(
                    "PRAGMA busy_timeout = {}",
                    crate::db::SQLITE_BUSY_TIMEOUT.as_millis()
                ))
                .execute(&mut *conn)
                .await?;
                r?;
            }
            Db::Postgres(pool) => {
                sqlx::query(
                    "UPDATE pull.meta SET value = $1::text WHERE key = 'acked_tick' AND value::bigint < $1",
                )
                .bind(tick)
                .execute(pool)
                .await?;
            }
        }
        Ok(())
    }

    /// Reads whole windows after `from` until at least `limit` changes (at least one
    /// window when any exists). Returns the end tick (`from` itself when nothing is
    /// servable) and the changes in serving order.
    pub async fn read_batch(&self, from: &Tick, limit: u32) -> Result<(Tick, Vec<Change>)> {
        match self {
            Db::Sqlite { pool, .. } => {
                // One read transaction: the end tick and its changes are consistent.
                let mut tx = pool.begin().await?;
                if !tick_exists_sqlite(&mut tx, from.id).await? {
                    return Err(pruned_while_reading(from.id));
                }
                let end = sqlx::query(&format!(
                    "SELECT tick_id, tick_uuid, head_seq FROM {t} WHERE tick_id > ?1 AND head_seq >= ?2 \
                     ORDER BY tick_id LIMIT 1",
                    t = sq::TICKS
                ))
                .bind(from.id)
                .bind(from.head_seq.saturating_add(i64::from(limit)))
                .fetch_optional(&mut *tx)
                .await?;
                let end = match end {
                    Some(r) => tick_from_sqlite(&r)?,
                    None => {
                        let r = sqlx::query(&format!(
                            "SELECT tick_id, tick_uuid, head_seq FROM {} ORDER BY tick_id DESC LIMIT 1",
                            sq::TICKS
                        ))
                        .fetch_one(&mut *tx)
                        .await?;
                        tick_from_sqlite(&r)?
                    }
                };
                if end.id <= from.id {
                    return Ok((from.clone(), Vec::new()));
                }
                let rows = sqlx::query(&format!(
                    "SELECT seq, tbl, op, pk, row_data, ts FROM {} WHERE seq > ?1 AND seq <= ?2 ORDER BY seq",
                    sq::CHANGES
                ))
                .bind(from.head_seq)
                .bind(end.head_seq)
                .fetch_all(&mut *tx)
                .await?;
                tx.commit().await?;
                let mut changes = Vec::with_capacity(rows.len());
                for r in rows {
                    let ts: String = r.try_get(5)?;
                    changes.push(change(
                        r.try_get(0)?,
                        r.try_get(1)?,
                        &r.try_get::<String, _>(2)?,
                        r.try_get(3)?,
                        r.try_get(4)?,
                        sqlite_ts(&ts)?,
                    )?);
                }
                Ok((end, changes))
            }
            Db::Postgres(pool) => {
                let ticks: Vec<Tick> = sqlx::query(
                    "SELECT tick_id, tick_uuid, head_seq FROM pull.ticks WHERE tick_id > $1 \
                     ORDER BY tick_id LIMIT $2",
                )
                .bind(from.id)
                .bind(MAX_WINDOWS_PER_BATCH)
                .fetch_all(pool)
                .await?
                .iter()
                .map(tick_from_pg)
                .collect::<Result<_>>()?;
                let mut changes = Vec::new();
                let mut lower = from.clone();
                for upper in ticks {
                    let rows = sqlx::query(
                        "SELECT c.seq, c.tbl, c.op, c.pk::text, c.row_data::text, c.ts \
                         FROM pull.changes c, pull.ticks p, pull.ticks n \
                         WHERE p.tick_id = $1 AND n.tick_id = $2 \
                           AND c.txid >= pg_snapshot_xmin(p.snap) AND c.txid < pg_snapshot_xmax(n.snap) \
                           AND NOT pg_visible_in_snapshot(c.txid, p.snap) \
                           AND pg_visible_in_snapshot(c.txid, n.snap) \
                         ORDER BY c.seq",
                    )
                    .bind(lower.id)
                    .bind(upper.id)
                    .fetch_all(pool)
                    .await?;
                    for r in rows {
                        changes.push(change(
                            r.try_get(0)?,
                            r.try_get(1)?,
                            &r.try_get::<String, _>(2)?,
                            r.try_get(3)?,
                            r.try_get(4)?,
                            r.try_get(5)?,
                        )?);
                    }
                    lower = upper;
                    if changes.len() >= limit as usize {
                        break;
                    }
                }
                // Pruning deletes ticks before changes: if `from` still exists now, no
                // change of these windows had been deleted when they were read.
                let still: bool = sqlx::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM pull.ticks WHERE tick_id = $1)",
                )
                .bind(from.id)
                .fetch_one(pool)
                .await?;
                if !still {
                    return Err(pruned_while_reading(from.id));
                }
                Ok((lower, changes))
            }
        }
    }

    /// The figures of `/v1/status` and `/metrics`.
    pub async fn figures(&self, meta: &Meta) -> Result<Figures> {
        let newest = self.newest_tick().await?;
        let acked = if meta.acked_tick > 0 {
            self.tick_by_id(meta.acked_tick).await?
        } else {
            None
        };
        match self {
            Db::Sqlite { pool, .. } => {
                let base = acked.map(|t| t.head_seq).unwrap_or(0);
                let row = sqlx::query(&format!(
                    "SELECT (SELECT COUNT(*) FROM {c}), \
                            (SELECT COUNT(*) FROM {c} WHERE seq > ?1), \
                            (SELECT MIN(ts) FROM {c} WHERE seq > ?1), \
                            COALESCE((SELECT seq FROM sqlite_sequence WHERE name = '{c}'), 0)",
                    c = sq::CHANGES
                ))
                .bind(base)
                .fetch_one(pool)
                .await?;
                let oldest: Option<String> = row.try_get(2)?;
                let oldest = oldest.as_deref().map(sqlite_ts).transpose()?;
                Ok(Figures {
                    newest,
                    head_seq: row.try_get(3)?,
                    depth: row.try_get::<i64, _>(0)? as u64,
                    unacked: row.try_get::<i64, _>(1)? as u64,
                    oldest_unacked_age_seconds: oldest.map(age_seconds),
                    oldest_open_writer: None,
                })
            }
            Db::Postgres(pool) => {
                let acked_id = acked.map(|t| t.id).unwrap_or(0);
                let row = sqlx::query(
                    "WITH a AS (SELECT snap FROM pull.ticks WHERE tick_id = $1), \
                     u AS (SELECT c.ts FROM pull.changes c \
                           WHERE NOT EXISTS (SELECT 1 FROM a WHERE pg_visible_in_snapshot(c.txid, a.snap))) \
                     SELECT (SELECT COUNT(*) FROM pull.changes), (SELECT COUNT(*) FROM u), (SELECT MIN(ts) FROM u), \
                            GREATEST((SELECT COALESCE(max(seq), 0) FROM pull.changes), \
                                     (SELECT max(head_seq) FROM pull.ticks))",
                )
                .bind(acked_id)
                .fetch_one(pool)
                .await?;
                let oldest: Option<DateTime<Utc>> = row.try_get(2)?;
                let writer = sqlx::query(
                    "SELECT a.pid, EXTRACT(EPOCH FROM (clock_timestamp() - a.xact_start))::float8 \
                     FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
                     WHERE l.locktype = 'relation' AND l.relation = 'pull.changes'::regclass \
                       AND l.mode = 'RowExclusiveLock' AND l.granted AND a.pid <> pg_backend_pid() \
                       AND a.application_name IS DISTINCT FROM 'branch-listener' \
                       AND a.xact_start IS NOT NULL \
                     ORDER BY a.xact_start LIMIT 1",
                )
                .fetch_optional(pool)
                .await?
                .map(|r| -> Result<OpenWriter> {
                    Ok(OpenWriter {
                        pid: r.try_get(0)?,
                        age_seconds: r.try_get(1)?,
                    })
                })
                .transpose()?;
                Ok(Figures {
                    newest,
                    head_seq: row.try_get(3)?,
                    depth: row.try_get::<i64, _>(0)? as u64,
                    unacked: row.try_get::<i64, _>(1)? as u64,
                    oldest_unacked_age_seconds: oldest.map(age_seconds),
                    oldest_open_writer: writer,
                })
            }
        }
    }
}

/// Approximate number of servable changes after tick `after` (up to the newest tick):
/// the difference of their head sequences (rolled-back writes leave gaps; on PostgreSQL a
/// window may also hold changes below its lower tick's head).
pub fn backlog(after: &Tick, newest: &Tick) -> u64 {
    if newest.id <= after.id {
        return 0;
    }
    (newest.head_seq - after.head_seq).max(0) as u64
}

/// The SQLite tick: one `BEGIN IMMEDIATE` transaction, so `head_seq` is a transaction
/// boundary.
async fn sqlite_tick(conn: &mut sqlx::SqliteConnection) -> Result<Option<sqlx::sqlite::SqliteRow>> {
    use sqlx::Connection;
    let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
    let row = sqlx::query(&format!(
        "INSERT INTO {t} (tick_uuid, head_seq) \
         SELECT ?1, m FROM (SELECT COALESCE(MAX(seq), 0) AS m FROM {c}) \
         WHERE m > (SELECT head_seq FROM {t} ORDER BY tick_id DESC LIMIT 1) \
         RETURNING tick_id, tick_uuid, head_seq",
        t = sq::TICKS,
        c = sq::CHANGES
    ))
    .bind(Uuid::new_v4().to_string())
    .fetch_optional(&mut *tx)
    .await
    .map_err(not_installed_or)?;
    tx.commit().await?;
    Ok(row)
}

fn pruned_while_reading(tick: i64) -> Error {
    Error::Pruned(format!(
        "tick {tick} was pruned from the branch's history: resync needed"
    ))
}

async fn tick_exists_sqlite(conn: &mut sqlx::SqliteConnection, id: i64) -> Result<bool> {
    Ok(sqlx::query_scalar(&format!(
        "SELECT EXISTS (SELECT 1 FROM {} WHERE tick_id = ?1)",
        sq::TICKS
    ))
    .bind(id)
    .fetch_one(conn)
    .await?)
}

fn age_seconds(t: DateTime<Utc>) -> f64 {
    ((Utc::now() - t).num_milliseconds() as f64 / 1000.0).max(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_timestamps_parse() {
        let t = sqlite_ts("2026-11-24T06:31:03.123Z").unwrap();
        assert_eq!(t.timestamp_subsec_millis(), 123);
        assert!(sqlite_ts("yesterday").is_err());
    }

    #[test]
    fn meta_requires_an_instance() {
        assert!(matches!(meta_from_pairs(vec![]), Err(Error::NotInstalled)));
        let id = Uuid::new_v4();
        let m = meta_from_pairs(vec![
            ("instance_id".into(), id.to_string()),
            ("acked_tick".into(), "7".into()),
        ])
        .unwrap();
        assert_eq!((m.instance_id, m.acked_tick), (id, 7));
    }
}
