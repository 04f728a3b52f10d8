//! `hq-puller verify LOCATION|--all`: does HQ hold exactly what the branch holds?
//!
//! Per table, the listener's `/v1/checksums` gives, per chunk of rows in key order, the
//! key range (previous chunk's last key, last key], the row count and the hash of the
//! canonical rows ([`schemas::canonical`]). HQ computes the same over its live rows
//! (`NOT _deleted` in `hq.<t>`) of the same ranges, plus the range after the last chunk.
//! Differing ranges are drilled into: the rows of the range from both sides (snapshot
//! pages, HQ range reads), compared by key: changed, missing at HQ, extra at HQ.
//!
//! Replication keeps running meanwhile, so a key may differ only because HQ lags: before
//! reporting, verify waits until HQ's cursor reaches the branch's head seen after the
//! branch read (each response carries it) and re-drills the ranges still differing, a
//! few rounds within `settle`. Verify never writes.

use crate::config::Location;
use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::App;
use futures::StreamExt;
use schemas::canonical::{canonical_row, CanonicalRow, RowHasher, Zone};
use schemas::catalogue::Table;
use schemas::files::FILES_TABLE;
use schemas::sql::{hq, snapshot};
use schemas::Cursor;
use serde::Serialize;
use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant};

/// Tuning of a verify.
#[derive(Debug, Clone)]
pub struct Options {
    /// Rows per checksum chunk.
    pub chunk_rows: u32,
    /// How long to wait for HQ to catch up with the branch before reporting a difference.
    pub settle: Duration,
    /// Drill rounds (re-checks after HQ caught up).
    pub rounds: u32,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            chunk_rows: schemas::wire::DEFAULT_CHUNK_ROWS,
            settle: Duration::from_secs(60),
            rounds: 3,
        }
    }
}

/// One differing column of a changed row: (column, branch value, HQ value).
pub type ColumnDiff = (String, Option<String>, Option<String>);

#[derive(Debug, Clone, Serialize)]
pub struct Changed {
    pub key: String,
    pub columns: Vec<ColumnDiff>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct TableResult {
    pub table: String,
    pub branch_rows: u64,
    pub hq_rows: u64,
    pub chunks: u64,
    pub differing_chunks: u64,
    pub changed: Vec<Changed>,
    pub missing_at_hq: Vec<String>,
    pub extra_at_hq: Vec<String>,
}

impl TableResult {
    pub fn is_equal(&self) -> bool {
        self.changed.is_empty() && self.missing_at_hq.is_empty() && self.extra_at_hq.is_empty()
    }
    fn differences(&self) -> usize {
        self.changed.len() + self.missing_at_hq.len() + self.extra_at_hq.len()
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct LocationResult {
    pub location: String,
    pub equal: bool,
    pub seconds: f64,
    /// Why the location could not be verified (the listener unreachable, ...).
    pub error: Option<String>,
    pub tables: Vec<TableResult>,
}

/// Keys shown per kind in the text output (JSON has them all).
const SHOWN: usize = 20;

impl fmt::Display for LocationResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(e) = &self.error {
            writeln!(f, "{}: NOT VERIFIED: {e}", self.location)?;
        }
        for t in &self.tables {
            writeln!(
                f,
                "{:<10} {:<18} branch {:>9} rows  hq {:>9} rows  {:>5} chunks  {}",
                self.location,
                t.table,
                t.branch_rows,
                t.hq_rows,
                t.chunks,
                if t.is_equal() {
                    "OK".to_string()
                } else {
                    format!(
                        "DIFF: {} changed, {} missing at HQ, {} extra at HQ",
                        t.changed.len(),
                        t.missing_at_hq.len(),
                        t.extra_at_hq.len()
                    )
                }
            )?;
            for c in t.changed.iter().take(SHOWN) {
                let cols: Vec<String> = c
                    .columns
                    .iter()
                    .map(|(n, b, h)| format!("{n}: branch {b:?} hq {h:?}"))
                    .collect();
                writeln!(f, "    changed {}: {}", c.key, cols.join("; "))?;
            }
            for (what, keys) in [
                ("missing at HQ", &t.missing_at_hq),
                ("extra at HQ", &t.extra_at_hq),
            ] {
                for k in keys.iter().take(SHOWN) {
                    writeln!(f, "    {what}: {k}")?;
                }
            }
            let more = t.differences().saturating_sub(
                t.changed.len().min(SHOWN)
                    + t.missing_at_hq.len().min(SHOWN)
                    + t.extra_at_hq.len().min(SHOWN),
            );
            if more > 0 {
                writeln!(f, "    ... {more} more (see --json)")?;
            }
        }
        Ok(())
    }
}

/// A key range (lower exclusive, upper inclusive; `None`: unbounded), as key images.
#[derive(Debug, Clone)]
struct Range {
    lower: Option<String>,
    upper: Option<String>,
}

/// Orders two key images of `table` as the branch and HQ order keys (numbers by value,
/// text by bytes).
fn key_cmp(table: &Table, a: &str, b: &str) -> Ordering {
    let pa: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(a).unwrap_or_default();
    let pb: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(b).unwrap_or_default();
    for k in &table.primary_key {
        let o = match (pa.get(k), pb.get(k)) {
            (Some(serde_json::Value::Number(x)), Some(serde_json::Value::Number(y))) => {
                match (x.as_i64(), y.as_i64()) {
                    (Some(x), Some(y)) => x.cmp(&y),
                    _ => x
                        .as_f64()
                        .partial_cmp(&y.as_f64())
                        .unwrap_or(Ordering::Equal),
                }
            }
            (Some(serde_json::Value::String(x)), Some(serde_json::Value::String(y))) => {
                x.as_bytes().cmp(y.as_bytes())
            }
            (x, y) => x.map(|v| v.to_string()).cmp(&y.map(|v| v.to_string())),
        };
        if o != Ordering::Equal {
            return o;
        }
    }
    Ordering::Equal
}

/// HQ's live rows of `location` in `range`, canonical, in key order.
async fn hq_rows(
    app: &App,
    location: &str,
    table: &Table,
    range: &Range,
    zone: Zone,
    time_zone: &str,
) -> Result<Vec<CanonicalRow>> {
    // `_files`: HQ's file records (`sync.files`) against the branch's file index.
    let target = if table.name == FILES_TABLE {
        snapshot::HQ_FILES_RELATION.to_string()
    } else {
        hq::mirror_table(table)
    };
    let sql = snapshot::hq_range(table, &target, range.lower.is_some(), range.upper.is_some());
    let mut tx = app.pool.begin().await?;
    // Zone-less key bounds (SQLite branches) are read in the branch's zone.
    sqlx::query("SELECT set_config('TimeZone', $1, true)")
        .bind(time_zone)
        .execute(&mut *tx)
        .await?;
    let rows: Vec<(String, String)> = sqlx::query_as(&sql)
        .bind(location)
        .bind(range.lower.as_deref())
        .bind(range.upper.as_deref())
        .bind(i64::MAX)
        .fetch_all(&mut *tx)
        .await?;
    tx.commit().await?;
    rows.iter()
        .map(|(r, _)| canonical_row(table, r, zone).map_err(|e| Error::Other(e.to_string())))
        .collect()
}

/// The branch's rows in `range`, canonical, and the head tick seen after reading them.
async fn branch_rows(
    app: &App,
    loc: &Location,
    table: &Table,
    range: &Range,
    zone: Zone,
    page: u32,
) -> Result<(Vec<CanonicalRow>, Cursor)> {
    let client = app.client(&loc.id)?;
    let mut out = Vec::new();
    let mut after = range.lower.clone();
    loop {
        let (p, _) = client
            .snapshot_page(&table.name, after.as_deref(), page, false)
            .await?;
        let head = p.head;
        let mut past_upper = false;
        for r in &p.rows {
            let c = canonical_row(table, r.get(), zone).map_err(|e| Error::Other(e.to_string()))?;
            out.push((r.get().to_string(), c));
        }
        // Keep only rows up to the upper bound (the page may run past it).
        if let Some(upper) = &range.upper {
            let key_of = |img: &str| -> String {
                let m: serde_json::Map<String, serde_json::Value> =
                    serde_json::from_str(img).unwrap_or_default();
                let k: serde_json::Map<String, serde_json::Value> = table
                    .primary_key
                    .iter()
                    .filter_map(|k| m.get(k).map(|v| (k.clone(), v.clone())))
                    .collect();
                serde_json::Value::Object(k).to_string()
            };
            let before = out.len();
            out.retain(|(img, _)| key_cmp(table, &key_of(img), upper) != Ordering::Greater);
            past_upper = out.len() < before;
        }
        match p.next_after {
            Some(a) if !past_upper => after = Some(a.get().to_string()),
            _ => return Ok((out.into_iter().map(|(_, c)| c).collect(), head)),
        }
    }
}

fn hash(rows: &[CanonicalRow]) -> String {
    let mut h = RowHasher::new();
    for r in rows {
        h.add(r);
    }
    h.finish()
}

/// Differences between the branch's and HQ's rows of one range.
fn diff(table: &Table, branch: &[CanonicalRow], hq: &[CanonicalRow], out: &mut TableResult) {
    let b: BTreeMap<&str, &CanonicalRow> = branch.iter().map(|r| (r.key.as_str(), r)).collect();
    let h: BTreeMap<&str, &CanonicalRow> = hq.iter().map(|r| (r.key.as_str(), r)).collect();
    for (k, br) in &b {
        match h.get(k) {
            None => out.missing_at_hq.push(k.to_string()),
            Some(hr) if hr.values != br.values => out.changed.push(Changed {
                key: k.to_string(),
                columns: table
                    .columns
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| br.values[*i] != hr.values[*i])
                    .map(|(i, c)| (c.name.clone(), br.values[i].clone(), hr.values[i].clone()))
                    .collect(),
            }),
            Some(_) => {}
        }
    }
    for k in h.keys() {
        if !b.contains_key(k) {
            out.extra_at_hq.push(k.to_string());
        }
    }
}

/// HQ's stored cursor of `location`.
async fn hq_cursor(app: &App, location: &str) -> Result<Option<Cursor>> {
    Ok(crate::store::load_location(&app.pool, location)
        .await?
        .cursor)
}

/// Waits until HQ's cursor is at or past `head` (same instance), at most until
/// `deadline`. Returns whether it got there.
async fn wait_for_hq(app: &App, location: &str, head: &Cursor, deadline: Instant) -> Result<bool> {
    loop {
        if let Some(c) = hq_cursor(app, location).await? {
            if c.instance_id != head.instance_id {
                // Another pull-area instance: HQ will not catch up without a resync.
                return Ok(false);
            }
            if c.tick >= head.tick {
                return Ok(true);
            }
        }
        if Instant::now() >= deadline || app.shutdown.is_cancelled() {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn verify_table(
    app: &App,
    loc: &Location,
    table: &Table,
    opts: &Options,
    progress: &mut Progress,
) -> Result<TableResult> {
    let client = app.client(&loc.id)?;
    let mut res = TableResult {
        table: table.name.clone(),
        ..Default::default()
    };
    let mut suspects: Vec<Range> = Vec::new();
    let mut after: Option<String> = None;
    let mut head: Option<Cursor>;
    let mut zone: Zone;
    let mut time_zone: String;
    let per_request =
        (schemas::wire::MAX_CHECKSUM_ROWS / u64::from(opts.chunk_rows.max(1))).clamp(1, 20) as u32;
    // The next checksum request runs while HQ computes the current one's chunks.
    let request = |after: Option<String>| {
        let (client, name, chunk) = (client.clone(), table.name.clone(), opts.chunk_rows);
        tokio::spawn(async move {
            client
                .checksums(&name, after.as_deref(), chunk, per_request)
                .await
        })
    };
    let mut next = Some(request(None));
    loop {
        let resp = next
            .take()
            .expect("a request while more chunks")
            .await
            .map_err(|e| Error::Other(format!("checksum request task: {e}")))??;
        if resp.more {
            let last = resp.chunks.last().map(|c| c.last_key.get().to_string());
            next = Some(request(last.or_else(|| after.clone())));
        }
        zone = Zone::parse(&resp.time_zone).ok_or_else(|| {
            Error::permanent(format!(
                "branch time_zone {:?} is not an IANA zone",
                resp.time_zone
            ))
        })?;
        time_zone = resp.time_zone.clone();
        head = Some(resp.head);
        let ranges: Vec<Range> = resp
            .chunks
            .iter()
            .scan(after.clone(), |lower, c| {
                let upper = c.last_key.get().to_string();
                let r = Range {
                    lower: lower.replace(upper.clone()),
                    upper: Some(upper),
                };
                Some(r)
            })
            .collect();
        // Two HQ ranges at a time: one is read by PostgreSQL while the other is hashed.
        let tz = time_zone.as_str();
        let mut hq_chunks = futures::stream::iter(ranges.iter())
            .map(|range| hq_rows(app, &loc.id, table, range, zone, tz))
            .buffered(2);
        for (c, range) in resp.chunks.iter().zip(&ranges) {
            let rows = hq_chunks.next().await.expect("one HQ range per chunk")?;
            let range = range.clone();
            res.chunks += 1;
            res.branch_rows += c.rows;
            res.hq_rows += rows.len() as u64;
            if rows.len() as u64 != c.rows || hash(&rows) != c.hash {
                res.differing_chunks += 1;
                suspects.push(range);
            }
            progress.inc(c.rows, &table.name);
            after = Some(c.last_key.get().to_string());
        }
        if !resp.more {
            break;
        }
    }
    // HQ rows after the branch's last key (all of them if the branch table is empty).
    let tail = Range {
        lower: after.clone(),
        upper: None,
    };
    let extra = hq_rows(app, &loc.id, table, &tail, zone, &time_zone).await?;
    if !extra.is_empty() {
        res.hq_rows += extra.len() as u64;
        res.differing_chunks += 1;
        suspects.push(tail);
    }
    // Drill, re-checking after HQ caught up with the branch's head.
    let deadline = Instant::now() + opts.settle;
    let mut round = 0;
    while !suspects.is_empty() {
        round += 1;
        if let Some(h) = &head {
            wait_for_hq(app, &loc.id, h, deadline).await?;
        }
        let mut found = TableResult::default();
        let mut still = Vec::new();
        for r in &suspects {
            let (b, h2) = branch_rows(app, loc, table, r, zone, opts.chunk_rows).await?;
            head = Some(h2);
            let h = hq_rows(app, &loc.id, table, r, zone, &time_zone).await?;
            let before = found.differences();
            diff(table, &b, &h, &mut found);
            if found.differences() > before {
                still.push(r.clone());
            }
        }
        suspects = still;
        if suspects.is_empty() || round >= opts.rounds || Instant::now() >= deadline {
            res.changed = found.changed;
            res.missing_at_hq = found.missing_at_hq;
            res.extra_at_hq = found.extra_at_hq;
            break;
        }
        tracing::info!(
            location = %loc.id,
            table = %table.name,
            round,
            differences = found.changed.len() + found.missing_at_hq.len() + found.extra_at_hq.len(),
            "differences found, re-checking after HQ catches up"
        );
    }
    Ok(res)
}

/// Verifies one location (every catalogue table, then the files: `_files`).
pub async fn verify_location(app: &App, loc: &Location, opts: &Options) -> LocationResult {
    let started = Instant::now();
    let mut progress = Progress::new(&loc.id, "verify");
    let mut tables = Vec::new();
    let mut error = None;
    let files = schemas::catalogue::files_table();
    for t in app.settings.catalogue.tables.iter().chain([&files]) {
        match verify_table(app, loc, t, opts, &mut progress).await {
            Ok(r) => tables.push(r),
            Err(e) => {
                error = Some(format!("table {}: {e}", t.name));
                break;
            }
        }
    }
    progress.finish();
    let equal = error.is_none() && tables.iter().all(TableResult::is_equal);
    let seconds = started.elapsed().as_secs_f64();
    tracing::info!(location = %loc.id, equal, rows = progress.rows(), seconds, "verified");
    LocationResult {
        location: loc.id.clone(),
        equal,
        seconds,
        error,
        tables,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use schemas::Catalogue;

    #[test]
    fn keys_order_like_the_databases() {
        let cat = Catalogue::product_management();
        let t = cat.table("products").unwrap();
        assert_eq!(
            key_cmp(t, r#"{"product_id":9}"#, r#"{"product_id":10}"#),
            Ordering::Less
        );
        assert_eq!(
            key_cmp(t, r#"{"product_id":10}"#, r#"{"product_id":10}"#),
            Ordering::Equal
        );
    }

    #[test]
    fn differences_are_named_by_kind() {
        let cat = Catalogue::product_management();
        let t = cat.table("inventory").unwrap();
        let row = |id: i64, q: i64| {
            canonical_row(
                t,
                &format!(r#"{{"product_id":{id},"quantity_on_hand":{q},"reorder_level":null,"updated_at":null}}"#),
                Zone::UTC,
            )
            .unwrap()
        };
        let mut r = TableResult::default();
        diff(t, &[row(1, 5), row(2, 5)], &[row(1, 6), row(3, 5)], &mut r);
        assert_eq!(r.changed.len(), 1);
        assert_eq!(r.changed[0].key, "product_id=1");
        assert_eq!(
            r.changed[0].columns,
            vec![(
                "quantity_on_hand".into(),
                Some("5".into()),
                Some("6".into())
            )]
        );
        assert_eq!(r.missing_at_hq, vec!["product_id=2"]);
        assert_eq!(r.extra_at_hq, vec!["product_id=3"]);
        assert!(!r.is_equal());
    }
}
