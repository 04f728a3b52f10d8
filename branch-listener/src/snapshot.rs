//! The snapshot and checksum endpoints (initial load, resync, verify):
//! - `GET /v1/snapshot/start`: makes a tick (T0) and returns its cursor and the tables;
//! - `GET /v1/snapshot?table=T[&after=KEY]&limit=N`: a page of row images in key order
//!   (keyset pagination, each page one short read statement, no long transaction);
//! - `GET /v1/checksums?table=T[&after=KEY]&chunk=N&chunks=M`: per chunk of N rows in
//!   key order, first/last key, row count and hash of the canonical rows
//!   ([`schemas::canonical`]), the same function HQ's `verify` runs on its side.
//!
//! Why pages need no common transaction: HQ takes T0 before the first page and then
//! replays the change stream from T0. Per row, sequence order is commit order, so the
//! replay ends at the branch's current image whatever state a page saw.

use crate::db::Db;
use crate::error::{Error, Result};
use crate::http::{detached, tolerate_busy, AppState};
use crate::pull_area::Tick;
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use schemas::canonical::{canonical_row, RowHasher, Zone};
use schemas::catalogue::{files_table, Table};
use schemas::files::FILES_TABLE;
use schemas::sql::snapshot as sql;
use schemas::wire::{self, ChecksumsResponse, Chunk, CopyRows, SnapshotPage, SnapshotStart};
use schemas::{Catalogue, Cursor};
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::time::Duration;

/// A `COPY` text page goes out in chunks of about this many bytes.
const COPY_CHUNK: usize = 256 * 1024;

/// Chunks of a `COPY` text page produced ahead of the network.
const COPY_CHUNKS_AHEAD: usize = 4;

/// How long a snapshot call waits for SQLite's write lock to make a tick.
const TICK_PATIENCE: Duration = Duration::from_millis(500);

type Params = std::result::Result<Query<HashMap<String, String>>, QueryRejection>;

fn query(q: Params) -> Result<HashMap<String, String>> {
    q.map(|Query(q)| q)
        .map_err(|e| Error::BadRequest(format!("query string: {e}")))
}

fn catalogue(state: &AppState) -> Result<Catalogue> {
    state.config.catalogue()
}

/// The catalogue table named by `table`, or the file index (`_files`); never a name from
/// the wire in SQL.
fn table_param(q: &HashMap<String, String>, cat: &Catalogue) -> Result<Table> {
    let name = q
        .get("table")
        .ok_or_else(|| Error::BadRequest("table: missing (a catalogue table name)".into()))?;
    if name == FILES_TABLE {
        return Ok(files_table());
    }
    cat.table(name).cloned().ok_or_else(|| {
        Error::BadRequest(format!(
            "table: {:?} is not a replicated table (catalogue: {})",
            name.chars().take(64).collect::<String>(),
            cat.tables
                .iter()
                .map(|t| t.name.as_str())
                .chain([FILES_TABLE])
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })
}

/// `after`: a JSON object holding exactly the table's key columns (scalars).
fn after_param(q: &HashMap<String, String>, table: &Table) -> Result<Option<String>> {
    let Some(s) = q.get("after").filter(|s| !s.is_empty()) else {
        return Ok(None);
    };
    let bad = |why: String| Error::BadRequest(format!("after: {why}"));
    let v: serde_json::Map<String, serde_json::Value> = serde_json::from_str(s)
        .map_err(|e| bad(format!("not a JSON object of the key columns: {e}")))?;
    for k in &table.primary_key {
        match v.get(k) {
            Some(x) if !x.is_null() && !x.is_array() && !x.is_object() => {}
            _ => return Err(bad(format!("key column {k:?} missing or not a scalar"))),
        }
    }
    if v.len() != table.primary_key.len() {
        return Err(bad(format!(
            "holds columns other than the key ({})",
            table.primary_key.join(", ")
        )));
    }
    Ok(Some(s.clone()))
}

fn u32_param(q: &HashMap<String, String>, name: &str, default: u32, max: u32) -> Result<u32> {
    match q.get(name) {
        None => Ok(default),
        Some(s) => match s.parse::<u64>() {
            Ok(n) if n >= 1 => Ok(n.min(u64::from(max)) as u32),
            _ => Err(Error::BadRequest(format!(
                "{name}: {:?} is not a positive integer",
                s.chars().take(40).collect::<String>()
            ))),
        },
    }
}

impl Db {
    /// Rows of `table` after key `after` in key order, at most `limit`:
    /// `(row image, key image)` JSON texts.
    pub async fn snapshot_page(
        &self,
        table: &Table,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<(String, String)>> {
        // `_files` reads the file index; any other name is a catalogue table.
        let (sqlite_from, pg_from) = if table.name == FILES_TABLE {
            let (s, p) = sql::files_source();
            (s.to_string(), p.to_string())
        } else {
            let t = schemas::sql::q(&table.name);
            (t.clone(), t)
        };
        Ok(match self {
            Db::Sqlite { pool, .. } => {
                sqlx::query_as(&sql::sqlite_page_from(table, &sqlite_from, after.is_some()))
                    .bind(after)
                    .bind(i64::from(limit))
                    .fetch_all(pool)
                    .await?
            }
            Db::Postgres(pool) => {
                sqlx::query_as(&sql::postgres_page_from(table, &pg_from, after.is_some()))
                    .bind(after)
                    .bind(i64::from(limit))
                    .fetch_all(pool)
                    .await?
            }
        })
    }

    /// A fresh tick when changes are pending (SQLite: if the write lock is free soon),
    /// then the newest tick.
    async fn fresh_tick(&self) -> Result<Tick> {
        tolerate_busy(self.tick_if_new(TICK_PATIENCE).await.map(|_| ()), "tick")?;
        self.newest_tick().await
    }
}

fn raw(s: String) -> Result<Box<RawValue>> {
    RawValue::from_string(s)
        .map_err(|e| Error::Database(format!("branch produced malformed JSON: {e}")))
}

fn cursor(instance_id: uuid::Uuid, t: &Tick) -> Cursor {
    Cursor {
        instance_id,
        tick: t.id,
        tick_uuid: t.uuid,
    }
}

/// `GET /v1/snapshot/start`.
pub async fn start(State(state): State<AppState>) -> Result<Json<SnapshotStart>> {
    let cat = catalogue(&state)?;
    detached(async move {
        let meta = state.db.meta().await?;
        let t0 = state.db.fresh_tick().await?;
        tracing::info!(location = %state.config.location, tick = t0.id, head_seq = t0.head_seq, "snapshot started");
        Ok(SnapshotStart {
            protocol: wire::PROTOCOL_VERSION,
            location: state.config.location.clone(),
            instance_id: meta.instance_id,
            time_zone: state.config.time_zone.clone(),
            start: cursor(meta.instance_id, &t0),
            // The catalogue tables, then the file index (files already in the folder).
            tables: cat
                .tables
                .iter()
                .map(|t| t.name.clone())
                .chain([FILES_TABLE.to_string()])
                .collect(),
        })
    })
    .await
    .map(Json)
}

/// `GET /v1/snapshot?table=T[&after=KEY]&limit=N`.
/// A page whose rows are `COPY` text goes out as [`wire::COPY_PAGE_CONTENT_TYPE`], any
/// other as JSON.
pub async fn page(State(state): State<AppState>, q: Params) -> Result<Response> {
    let q = query(q)?;
    let cat = catalogue(&state)?;
    let table = table_param(&q, &cat)?;
    let after = after_param(&q, &table)?;
    let limit = u32_param(
        &q,
        "limit",
        wire::DEFAULT_SNAPSHOT_LIMIT,
        wire::MAX_SNAPSHOT_LIMIT,
    )?;
    let copy = match q.get("format").map(String::as_str) {
        None | Some("json") => false,
        Some(wire::SNAPSHOT_FORMAT_COPY) => table.name != FILES_TABLE,
        Some(other) => {
            return Err(Error::BadRequest(format!(
                "format: {:?} is not json or copy",
                other.chars().take(40).collect::<String>()
            )))
        }
    };
    if let (true, Db::Postgres(pool)) = (copy, &state.db) {
        let pool = pool.clone();
        return copy_page(state, pool, table, after, limit).await;
    }
    detached(async move {
        let meta = state.db.meta().await?;
        let rows = state
            .db
            .snapshot_page(&table, after.as_deref(), limit)
            .await?;
        let head = state.db.fresh_tick().await?;
        let full = rows.len() as u64 == u64::from(limit);
        let mut images = Vec::with_capacity(rows.len());
        let mut last = None;
        for (row, key) in rows {
            images.push(raw(row)?);
            last = Some(key);
        }
        let next_after = if full {
            last.map(raw).transpose()?
        } else {
            None
        };
        metrics::counter!(crate::metrics::SNAPSHOT_ROWS_TOTAL).increment(images.len() as u64);
        tracing::debug!(table = %table.name, rows = images.len(), "served snapshot page");
        Ok(Json(SnapshotPage {
            protocol: wire::PROTOCOL_VERSION,
            location: state.config.location.clone(),
            instance_id: meta.instance_id,
            table: table.name.clone(),
            rows: images,
            copy: None,
            next_after,
            head: cursor(meta.instance_id, &head),
        })
        .into_response())
    })
    .await
}

/// Rows of catalogue table `table` after key `after` in key order, at most `limit`,
/// as `COPY` text ([`schemas::wire::CopyRows`]), sent to `out` in chunks of about
/// [`COPY_CHUNK`] bytes as the branch produces them. Returns the row count and the
/// key image of the last row ([`sql::copy_key_image`]). When `out` is gone (the
/// client left), the `COPY` still runs to its end so that the connection returns
/// clean.
async fn copy_page_into(
    pool: &sqlx::PgPool,
    table: &Table,
    after: Option<&str>,
    limit: u32,
    out: &tokio::sync::mpsc::Sender<Result<Bytes>>,
) -> Result<(u64, Option<String>)> {
    let sql = sql::postgres_copy_page(table, after, limit);
    let mut conn = pool.acquire().await?;
    let mut stream = conn.copy_out_raw(&sql).await?;
    let mut rows = 0u64;
    // The last complete line so far, and the bytes after it (a line the branch
    // splits across messages).
    let (mut last_line, mut partial) = (Vec::new(), Vec::new());
    let mut chunk = Vec::with_capacity(COPY_CHUNK);
    let mut open = true;
    while let Some(data) = stream.next().await {
        let data = data?;
        let newlines = memchr::memchr_iter(b'\n', &data).count() as u64;
        if newlines > 0 {
            rows += newlines;
            let end = memchr::memrchr(b'\n', &data).expect("a newline");
            match memchr::memrchr(b'\n', &data[..end]) {
                Some(start) => {
                    last_line.clear();
                    last_line.extend_from_slice(&data[start + 1..end]);
                }
                None => {
                    last_line = std::mem::take(&mut partial);
                    last_line.extend_from_slice(&data[..end]);
                }
            }
            partial.clear();
            partial.extend_from_slice(&data[end + 1..]);
        } else {
            partial.extend_from_slice(&data);
        }
        chunk.extend_from_slice(&data);
        if chunk.len() >= COPY_CHUNK {
            let full = std::mem::replace(&mut chunk, Vec::with_capacity(COPY_CHUNK));
            open = open && out.send(Ok(Bytes::from(full))).await.is_ok();
        }
    }
    drop(stream);
    let bad = |why: &str| Error::Database(format!("branch produced malformed COPY text: {why}"));
    if !partial.is_empty() {
        return Err(bad("unterminated line"));
    }
    if open && !chunk.is_empty() {
        let _ = out.send(Ok(Bytes::from(chunk))).await;
    }
    let last_key = if rows == 0 {
        None
    } else {
        Some(sql::copy_key_image(table, &last_line).ok_or_else(|| bad("key fields"))?)
    };
    Ok((rows, last_key))
}

/// A page of `COPY` text ([`wire::COPY_PAGE_CONTENT_TYPE`]), streamed: the text goes
/// out while the branch produces it, the trailer (row count, `next_after`, head) after
/// it. The work runs detached (a client that leaves does not cut the `COPY` short). A
/// failure before any text is an ordinary error response; one after it ends the body
/// early, without a trailer, which HQ refuses.
async fn copy_page(
    state: AppState,
    pool: sqlx::PgPool,
    table: Table,
    after: Option<String>,
    limit: u32,
) -> Result<Response> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Bytes>>(COPY_CHUNKS_AHEAD);
    tokio::spawn(async move {
        let page = async {
            let meta = state.db.meta().await?;
            let (rows, last_key) =
                copy_page_into(&pool, &table, after.as_deref(), limit, &tx).await?;
            let head = state.db.fresh_tick().await?;
            let full = rows == u64::from(limit);
            metrics::counter!(crate::metrics::SNAPSHOT_ROWS_TOTAL).increment(rows);
            tracing::debug!(table = %table.name, rows, "served snapshot page (COPY text)");
            wire::encode_copy_trailer(&SnapshotPage {
                protocol: wire::PROTOCOL_VERSION,
                location: state.config.location.clone(),
                instance_id: meta.instance_id,
                table: table.name.clone(),
                rows: Vec::new(),
                copy: Some(CopyRows {
                    columns: table.columns.iter().map(|c| c.name.clone()).collect(),
                    rows,
                    text: String::new(),
                }),
                next_after: if full {
                    last_key.map(raw).transpose()?
                } else {
                    None
                },
                head: cursor(meta.instance_id, &head),
            })
            .map_err(|e| Error::Database(format!("encoding a COPY page: {e}")))
        }
        .await;
        if let Err(e) = &page {
            tracing::warn!(table = %table.name, error = %e, "snapshot page (COPY text) failed");
        }
        let _ = tx.send(page.map(Bytes::from)).await;
    });
    // The first chunk decides the status.
    let first = match rx.recv().await {
        Some(Ok(b)) => b,
        Some(Err(e)) => return Err(e),
        None => return Err(Error::Database("snapshot page task ended early".into())),
    };
    let rest = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
    let body = futures::stream::once(async move { Ok::<_, Error>(first) }).chain(rest);
    Ok((
        [(header::CONTENT_TYPE, wire::COPY_PAGE_CONTENT_TYPE)],
        axum::body::Body::from_stream(body),
    )
        .into_response())
}

/// `GET /v1/checksums?table=T[&after=KEY]&chunk=N&chunks=M`.
pub async fn checksums(
    State(state): State<AppState>,
    q: Params,
) -> Result<Json<ChecksumsResponse>> {
    let q = query(q)?;
    let cat = catalogue(&state)?;
    let table = table_param(&q, &cat)?;
    let mut after = after_param(&q, &table)?;
    let chunk = u32_param(
        &q,
        "chunk",
        wire::DEFAULT_CHUNK_ROWS,
        wire::MAX_SNAPSHOT_LIMIT,
    )?;
    let chunks = u32_param(&q, "chunks", wire::DEFAULT_CHUNKS, 10_000)?;
    if u64::from(chunk) * u64::from(chunks) > wire::MAX_CHECKSUM_ROWS {
        return Err(Error::BadRequest(format!(
            "chunk × chunks: at most {} rows per request",
            wire::MAX_CHECKSUM_ROWS
        )));
    }
    let zone = Zone::parse(&state.config.time_zone)
        .ok_or_else(|| Error::config("time_zone", "not an IANA zone name"))?;
    detached(async move {
        let meta = state.db.meta().await?;
        let mut out = Vec::new();
        let mut more = true;
        while out.len() < chunks as usize {
            let rows = state
                .db
                .snapshot_page(&table, after.as_deref(), chunk)
                .await?;
            let n = rows.len();
            let (Some(first), Some(last)) = (rows.first(), rows.last()) else {
                more = false;
                break;
            };
            let (first_key, last_key) = (first.1.clone(), last.1.clone());
            let mut h = RowHasher::new();
            for (row, _) in &rows {
                let c =
                    canonical_row(&table, row, zone).map_err(|e| Error::Database(e.to_string()))?;
                h.add(&c);
            }
            out.push(Chunk {
                first_key: raw(first_key)?,
                last_key: raw(last_key.clone())?,
                rows: h.rows(),
                hash: h.finish(),
            });
            after = Some(last_key);
            if n < chunk as usize {
                more = false;
                break;
            }
        }
        let head = state.db.fresh_tick().await?;
        Ok(ChecksumsResponse {
            protocol: wire::PROTOCOL_VERSION,
            location: state.config.location.clone(),
            instance_id: meta.instance_id,
            time_zone: state.config.time_zone.clone(),
            table: table.name.clone(),
            chunks: out,
            more,
            head: cursor(meta.instance_id, &head),
        })
    })
    .await
    .map(Json)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn bad_parameters_name_the_problem() {
        let cat = Catalogue::product_management();
        let e = table_param(&q(&[]), &cat).unwrap_err().to_string();
        assert!(e.starts_with("table: missing"), "{e}");
        let e = table_param(&q(&[("table", "pull.changes")]), &cat)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a replicated table"), "{e}");
        let f = table_param(&q(&[("table", "_files")]), &cat).unwrap();
        assert_eq!(f.primary_key, vec!["path"]);
        assert!(after_param(&q(&[("after", r#"{"path":"a/b.jpg"}"#)]), &f).is_ok());
        let t = table_param(&q(&[("table", "products")]), &cat).unwrap();
        for (a, why) in [
            ("[1]", "not a JSON object"),
            ("{}", "\"product_id\" missing"),
            (r#"{"product_id":null}"#, "missing or not a scalar"),
            (r#"{"product_id":1,"x":2}"#, "other than the key"),
        ] {
            let e = after_param(&q(&[("after", a)]), &t)
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("after: ") && e.contains(why), "{a}: {e}");
        }
        assert_eq!(
            after_param(&q(&[("after", r#"{"product_id":7}"#)]), &t).unwrap(),
            Some(r#"{"product_id":7}"#.to_string())
        );
        assert!(u32_param(&q(&[("limit", "0")]), "limit", 5, 10).is_err());
        assert_eq!(
            u32_param(&q(&[("limit", "99")]), "limit", 5, 10).unwrap(),
            10
        );
    }
}
