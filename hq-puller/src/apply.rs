//! The apply: one HQ transaction per batch holding the batch's rows and the location's
//! new cursor.
//!
//! 1. lock the location's row and check its cursor still equals the batch's `after`
//!    (otherwise someone else applied this batch: roll back, nothing to do);
//! 2. read zone-less timestamps in the branch's zone (`SET LOCAL TimeZone`);
//! 3. keep the newest change (max seq) per (table, key);
//! 4. per table, in catalogue order, one set-wise upsert whose input is a JSON array built
//!    by splicing `"_seq"` and `"_deleted"` into the images' JSON *text* (values are never
//!    parsed into Rust numbers, PostgreSQL parses them as exact numerics);
//! 5. store the cursor, instance, backlog, lag; commit.
//!
//! File events (downloaded and verified before the transaction, see [`crate::files`])
//! are placed and recorded in `sync.files` right after step 1.
//!
//! The upsert's guard `WHERE t._seq < EXCLUDED._seq` makes redelivery a no-op, keeps a
//! stale change from winning, and keeps a tombstone from being resurrected.

use crate::error::{db_error_kind, Error, ErrorKind, Result};
use crate::validate::CheckedBatch;
use schemas::catalogue::{ColumnType, Table};
use schemas::sql::{lit, q};
use schemas::wire::ChangesResponse;
use schemas::Catalogue;
use sqlx::PgPool;
use std::collections::HashMap;

/// The apply statements of the catalogue, generated once.
#[derive(Debug, Clone)]
pub struct Statements {
    upserts: Vec<String>,
}

impl Statements {
    pub fn new(catalogue: &Catalogue) -> Statements {
        Statements {
            upserts: catalogue
                .tables
                .iter()
                .map(schemas::sql::hq::upsert)
                .collect(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Rows and cursor committed.
    Committed { rows: u64 },
    /// The stored cursor had already moved past the batch: nothing done.
    AlreadyApplied,
}

/// Maps a PostgreSQL error of the apply to a pull error naming the table.
fn apply_error(e: sqlx::Error, table: Option<&str>) -> Error {
    let kind = db_error_kind(&e);
    let what = table
        .map(|t| format!("applying table {t}"))
        .unwrap_or_else(|| "applying batch".into());
    let message = match &e {
        sqlx::Error::Database(db) => format!(
            "{what}: {} (SQLSTATE {})",
            db.message(),
            db.code().unwrap_or_default()
        ),
        other => format!("{what}: HQ database: {other}"),
    };
    if let sqlx::Error::Database(db) = &e {
        if db.code().as_deref() == Some("23514") && db.message().starts_with(NO_PARTITION) {
            return Error::transient(format!(
                "{message}: the location's partition is missing (HQ's database lost its \
                 creation in a crash?); it is made again, the batch is retried"
            ));
        }
    }
    match kind {
        ErrorKind::Permanent => Error::permanent(message),
        ErrorKind::NeedsResync => Error::resync(message),
        ErrorKind::Transient => Error::transient(message),
    }
}

/// After a data error, finds the first column whose values PostgreSQL refuses, so that
/// the pause reason names it (the error itself often names only the type). Runs outside
/// the failed transaction; `None` when no single column explains the error.
async fn guilty_column(
    pool: &PgPool,
    table: &Table,
    json: &str,
    time_zone: &str,
) -> Option<String> {
    let mut conn = pool.acquire().await.ok()?;
    let mut tx = sqlx::Connection::begin(&mut *conn).await.ok()?;
    sqlx::query("SELECT set_config('TimeZone', $1, true)")
        .bind(time_zone)
        .execute(&mut *tx)
        .await
        .ok()?;
    for c in &table.columns {
        let r = format!("r.{}", q(&c.name));
        let value = match c.ty {
            ColumnType::Blob => format!("decode({r}, 'hex')::text"),
            ColumnType::Numeric { precision, scale } => format!(
                "sync.fit_numeric({r}, {precision}, {scale}, {})::text",
                lit(&format!("{}.{}", table.name, c.name))
            ),
            _ => format!("{r}::text"),
        };
        let sql = format!(
            "SELECT count({value}) FROM json_to_recordset($1::json) AS r({} {})",
            q(&c.name),
            c.ty.hq_decode_type()
        );
        let failed = sqlx::query(&sql)
            .bind(json)
            .execute(&mut *tx)
            .await
            .is_err();
        if failed {
            return Some(c.name.clone());
        }
    }
    None
}

/// Builds `[img1,img2,...]` with `"_seq":N,"_deleted":b` spliced into each image object.
pub fn images_json<'a>(items: impl Iterator<Item = (&'a str, i64, bool)>) -> String {
    let mut out = String::from("[");
    let mut first = true;
    for (image, seq, deleted) in items {
        if !first {
            out.push(',');
        }
        first = false;
        let body = image.trim();
        // Validated as a JSON object: starts with '{' and ends with '}'.
        let inner = body[1..body.len() - 1].trim();
        out.push('{');
        if !inner.is_empty() {
            out.push_str(inner);
            out.push(',');
        }
        out.push_str(&format!("\"_seq\":{seq},\"_deleted\":{deleted}}}"));
    }
    out.push(']');
    out
}

/// Replication lag after this batch: the age of its newest change while more changes
/// wait at the branch, 0 once caught up.
pub fn lag_seconds(resp: &ChangesResponse) -> f64 {
    if !resp.more {
        return 0.0;
    }
    resp.changes
        .iter()
        .map(|c| c.ts)
        .max()
        .map(|ts| (chrono::Utc::now() - ts).num_milliseconds().max(0) as f64 / 1000.0)
        .unwrap_or(0.0)
}

/// PostgreSQL's message for a row whose location has no partition.
const NO_PARTITION: &str = "no partition of relation";

/// Applies a validated batch in one transaction. A location found without its
/// partition gets it made again, and the batch fails transiently (retried).
pub async fn apply_batch(
    pool: &PgPool,
    catalogue: &Catalogue,
    statements: &Statements,
    location: &str,
    resp: &ChangesResponse,
    batch: &CheckedBatch<'_>,
    files: &crate::files::Plan,
) -> Result<Applied> {
    let r = async {
        let mut tx = pool.begin().await.map_err(|e| apply_error(e, None))?;
        let stored: Option<(Option<String>,)> =
            sqlx::query_as("SELECT cursor FROM sync.locations WHERE id = $1 FOR UPDATE")
                .bind(location)
                .fetch_optional(&mut *tx)
                .await
                .map_err(|e| apply_error(e, None))?;
        let Some((stored,)) = stored else {
            return Err(Error::permanent(format!(
                "location {location} is not registered in sync.locations (run hq-puller migrate)"
            )));
        };
        if stored != resp.after.map(|c| c.to_string()) {
            tx.rollback().await.map_err(|e| apply_error(e, None))?;
            return Ok(Applied::AlreadyApplied);
        }
        sqlx::query("SELECT set_config('TimeZone', $1, true)")
            .bind(&resp.time_zone)
            .execute(&mut *tx)
            .await
            .map_err(|e| {
                Error::permanent(format!(
                    "branch time_zone {:?} is not a zone PostgreSQL knows: {}",
                    resp.time_zone.chars().take(64).collect::<String>(),
                    match &e {
                        sqlx::Error::Database(d) => d.message().to_string(),
                        o => o.to_string(),
                    }
                ))
            })?;

        // Files before the cursor (invariant 6): placed and recorded in this transaction.
        if !files.is_empty() {
            crate::files::place_and_record(&mut tx, location, files).await?;
        }

        // Newest change per (table, key).
        let mut newest: HashMap<(usize, &str), usize> = HashMap::new();
        for (i, c) in batch.changes.iter().enumerate() {
            newest
                .entry((c.table, c.key.as_str()))
                .and_modify(|j| {
                    if batch.changes[*j].seq < c.seq {
                        *j = i
                    }
                })
                .or_insert(i);
        }
        let mut per_table: Vec<Vec<usize>> = vec![Vec::new(); catalogue.tables.len()];
        for i in newest.into_values() {
            per_table[batch.changes[i].table].push(i);
        }
        let mut rows = 0u64;
        for (ti, idx) in per_table.iter_mut().enumerate() {
            if idx.is_empty() {
                continue;
            }
            idx.sort_unstable_by_key(|i| batch.changes[*i].seq);
            let json = images_json(idx.iter().map(|i| {
                let c = &batch.changes[*i];
                (c.image, c.seq, c.deleted)
            }));
            let table = &catalogue.tables[ti];
            let r = match sqlx::query(&statements.upserts[ti])
                .bind(&json)
                .bind(location)
                .execute(&mut *tx)
                .await
            {
                Ok(r) => r,
                Err(e) => {
                    let is_data = matches!(&e, sqlx::Error::Database(d)
                        if d.code().is_some_and(|c| c.starts_with("22")));
                    drop(tx); // rolls back
                    let column = if is_data {
                        guilty_column(pool, table, &json, &resp.time_zone).await
                    } else {
                        None
                    };
                    return Err(apply_error(
                        e,
                        Some(&match column {
                            Some(c) => format!("{}, column {}.{c}", table.name, table.name),
                            None => table.name.clone(),
                        }),
                    ));
                }
            };
            rows += r.rows_affected();
        }

        let lag = lag_seconds(resp);
        sqlx::query(
            "UPDATE sync.locations SET cursor = $2, instance_id = $3, state = 'ok', paused_reason = NULL, \
             last_success_at = now(), backlog = $4, lag_seconds = $5, \
             applied_changes = applied_changes + $6, updated_at = now() WHERE id = $1",
        )
        .bind(location)
        .bind(resp.next.to_string())
        .bind(resp.instance_id)
        .bind(i64::try_from(resp.backlog).unwrap_or(i64::MAX))
        .bind(lag)
        .bind((batch.changes.len() + batch.files.len()) as i64)
        .execute(&mut *tx)
        .await
        .map_err(|e| apply_error(e, None))?;
        tx.commit().await.map_err(|e| apply_error(e, None))?;
        Ok(Applied::Committed { rows })
    }
    .await;
    if matches!(&r, Err(e) if e.to_string().contains(NO_PARTITION)) {
        crate::partitions::ensure(pool, catalogue, location).await?;
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splices_bookkeeping_into_raw_json() {
        let j = images_json(
            [
                (r#"{"a":9223372036854775807,"p":9999999999.99}"#, 5, false),
                (r#" { } "#, 6, true),
            ]
            .into_iter(),
        );
        assert_eq!(
            j,
            r#"[{"a":9223372036854775807,"p":9999999999.99,"_seq":5,"_deleted":false},{"_seq":6,"_deleted":true}]"#
        );
        let v: serde_json::Value = serde_json::from_str(&j).unwrap();
        assert_eq!(v.as_array().unwrap().len(), 2);
    }
}
