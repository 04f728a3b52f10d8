//! The oracle: does HQ hold exactly what a branch holds?
//!
//! For one location and every catalogue table, [`compare`] reads the live rows at HQ
//! (`hq.<table> WHERE location_id = L AND NOT _deleted`: the mirror itself, because the
//! `_live` view of a table with a `file_column` also waits for the file, which the files
//! tests check on their own) and all rows of the branch table, brings
//! each value to a canonical text, and reports row counts, a checksum per side, and
//! every differing key: missing at HQ, extra at HQ, or different values.
//!
//! Canonical values (numeric and boolean forms from `schemas::canonical`, shared with
//! `hq-puller verify` and `/v1/checksums`):
//! - numeric: decimal text without insignificant zeros (`19.9` == `19.90` == `1.99e1`);
//! - timestamp: the instant in UTC with microseconds. Zone-less SQLite text is read in
//!   the branch's zone (converted by HQ's PostgreSQL, `AT TIME ZONE`), text with an
//!   explicit offset is read as such;
//! - boolean: `true`/`false` (SQLite's 0/1 included); real: Rust's shortest exact form;
//!   blob: lowercase hex; text and integers as they are.
//! - NULL stays distinct from the empty string.

use crate::db::Backend;
use anyhow::{Context, Result};
use schemas::canonical::{canonical_bool, canonical_decimal};
use schemas::catalogue::{ColumnType, Table};
use schemas::sql::q;
use schemas::Catalogue;
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::postgres::{PgPool, PgRow};
use sqlx::sqlite::SqliteRow;
use sqlx::{Connection, Row};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

/// Canonical rows of one side, by key.
type Rows = BTreeMap<String, Vec<Option<String>>>;

/// One differing row.
#[derive(Debug, Clone, Serialize)]
pub struct Difference {
    pub key: String,
    /// (column, branch value, HQ value) of every differing column.
    pub columns: Vec<(String, Option<String>, Option<String>)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TableReport {
    pub table: String,
    pub branch_rows: usize,
    pub hq_rows: usize,
    /// First 16 hex digits of sha256 over the canonical rows in key order.
    pub branch_checksum: String,
    pub hq_checksum: String,
    pub missing_at_hq: Vec<String>,
    pub extra_at_hq: Vec<String>,
    pub different: Vec<Difference>,
}

impl TableReport {
    pub fn is_equal(&self) -> bool {
        self.missing_at_hq.is_empty() && self.extra_at_hq.is_empty() && self.different.is_empty()
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct LocationReport {
    pub location: String,
    pub tables: Vec<TableReport>,
}

impl LocationReport {
    pub fn is_equal(&self) -> bool {
        self.tables.iter().all(TableReport::is_equal)
    }

    pub fn total_rows(&self) -> usize {
        self.tables.iter().map(|t| t.branch_rows).sum()
    }
}

const SHOWN: usize = 10;

impl fmt::Display for LocationReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for t in &self.tables {
            writeln!(
                f,
                "{:<8} {:<16} branch {:>7} rows {}  hq {:>7} rows {}  {}",
                self.location,
                t.table,
                t.branch_rows,
                t.branch_checksum,
                t.hq_rows,
                t.hq_checksum,
                if t.is_equal() { "OK" } else { "DIFF" }
            )?;
            if !t.missing_at_hq.is_empty() {
                writeln!(
                    f,
                    "    missing at HQ ({}): {}",
                    t.missing_at_hq.len(),
                    first(&t.missing_at_hq)
                )?;
            }
            if !t.extra_at_hq.is_empty() {
                writeln!(
                    f,
                    "    extra at HQ ({}): {}",
                    t.extra_at_hq.len(),
                    first(&t.extra_at_hq)
                )?;
            }
            for d in t.different.iter().take(SHOWN) {
                let cols: Vec<String> = d
                    .columns
                    .iter()
                    .map(|(c, b, h)| format!("{c}: branch {b:?} hq {h:?}"))
                    .collect();
                writeln!(f, "    different {}: {}", d.key, cols.join("; "))?;
            }
            if t.different.len() > SHOWN {
                writeln!(
                    f,
                    "    ... {} more different rows",
                    t.different.len() - SHOWN
                )?;
            }
        }
        Ok(())
    }
}

fn first(keys: &[String]) -> String {
    let mut s = keys
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if keys.len() > SHOWN {
        s.push_str(", ...");
    }
    s
}

const PG_INSTANT: &str = "'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'";

/// Select expression of one column at HQ or on a PostgreSQL branch.
fn pg_expr(name: &str, ty: ColumnType) -> String {
    let c = q(name);
    match ty {
        ColumnType::Text => c,
        ColumnType::Integer | ColumnType::Numeric { .. } | ColumnType::Boolean => {
            format!("{c}::text")
        }
        ColumnType::Timestamp => format!("to_char({c} AT TIME ZONE 'UTC', {PG_INSTANT})"),
        ColumnType::Real => format!("{c}::float8"),
        ColumnType::Blob => format!("encode({c}, 'hex')"),
    }
}

/// Select expression of one column on a SQLite branch.
fn sqlite_expr(name: &str, ty: ColumnType) -> String {
    let c = q(name);
    match ty {
        ColumnType::Real => format!("CAST({c} AS REAL)"),
        ColumnType::Blob => format!("CASE WHEN {c} IS NULL THEN NULL ELSE lower(hex({c})) END"),
        _ => format!("CAST({c} AS TEXT)"),
    }
}

fn real_text(v: Option<f64>) -> Option<String> {
    v.map(|x| format!("{x:?}"))
}

fn decode_pg(row: &PgRow, table: &Table) -> Result<Vec<Option<String>>> {
    table
        .columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            Ok(match c.ty {
                ColumnType::Real => real_text(row.try_get::<Option<f64>, _>(i)?),
                _ => row.try_get::<Option<String>, _>(i)?,
            })
        })
        .collect()
}

fn decode_sqlite(row: &SqliteRow, table: &Table) -> Result<Vec<Option<String>>> {
    table
        .columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            Ok(match c.ty {
                ColumnType::Real => real_text(row.try_get::<Option<f64>, _>(i)?),
                _ => row.try_get::<Option<String>, _>(i)?,
            })
        })
        .collect()
}

/// Brings values of types whose text differs between engines to one form.
fn normalize(table: &Table, mut values: Vec<Option<String>>) -> Vec<Option<String>> {
    for (v, c) in values.iter_mut().zip(&table.columns) {
        if let Some(s) = v.as_mut() {
            match c.ty {
                ColumnType::Numeric { .. } => {
                    if let Some(d) = canonical_decimal(s) {
                        *s = d;
                    }
                }
                ColumnType::Boolean => *s = canonical_bool(s),
                ColumnType::Blob => *s = s.to_ascii_lowercase(),
                _ => {}
            }
        }
    }
    values
}

fn key_of(table: &Table, values: &[Option<String>]) -> String {
    table
        .primary_key
        .iter()
        .map(|k| {
            let i = table
                .columns
                .iter()
                .position(|c| &c.name == k)
                .expect("key column");
            format!("{k}={}", values[i].as_deref().unwrap_or("NULL"))
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn checksum(rows: &Rows) -> String {
    let mut h = Sha256::new();
    for v in rows.values() {
        h.update(
            serde_json::to_string(v)
                .expect("strings serialize")
                .as_bytes(),
        );
        h.update(b"\n");
    }
    hex::encode(h.finalize())[..16].to_string()
}

/// Sorts keys numerically where they are numbers (product_id=9 before product_id=10).
fn sort_key(k: &str) -> (Vec<(String, i128)>, String) {
    let parts = k
        .split(',')
        .map(|p| {
            let (n, v) = p.split_once('=').unwrap_or((p, ""));
            (n.to_string(), v.parse::<i128>().unwrap_or(i128::MAX))
        })
        .collect();
    (parts, k.to_string())
}

async fn hq_rows(hq: &PgPool, table: &Table, location: &str) -> Result<Rows> {
    let exprs: Vec<String> = table
        .columns
        .iter()
        .map(|c| pg_expr(&c.name, c.ty))
        .collect();
    let sql = format!(
        "SELECT {} FROM hq.{} WHERE location_id = $1 AND NOT _deleted",
        exprs.join(", "),
        q(&table.name)
    );
    let rows = sqlx::query(&sql)
        .bind(location)
        .fetch_all(hq)
        .await
        .with_context(|| format!("reading hq.{} for {location}", table.name))?;
    let mut out = Rows::new();
    for r in &rows {
        let v = normalize(table, decode_pg(r, table)?);
        out.insert(key_of(table, &v), v);
    }
    Ok(out)
}

/// A branch database opened for reading.
enum BranchConn {
    Sqlite(sqlx::SqliteConnection),
    Postgres(sqlx::PgConnection),
}

async fn branch_rows(
    conn: &mut BranchConn,
    hq: &PgPool,
    table: &Table,
    time_zone: &str,
) -> Result<Rows> {
    let mut raw: Vec<Vec<Option<String>>> = Vec::new();
    match conn {
        BranchConn::Sqlite(c) => {
            let exprs: Vec<String> = table
                .columns
                .iter()
                .map(|c| sqlite_expr(&c.name, c.ty))
                .collect();
            let sql = format!("SELECT {} FROM {}", exprs.join(", "), q(&table.name));
            for r in sqlx::query(&sql)
                .fetch_all(&mut *c)
                .await
                .with_context(|| format!("reading branch table {}", table.name))?
            {
                raw.push(decode_sqlite(&r, table)?);
            }
            // Zone-less timestamps: read in the branch's zone, by PostgreSQL.
            let ts_cols: Vec<usize> = table
                .columns
                .iter()
                .enumerate()
                .filter(|(_, c)| c.ty == ColumnType::Timestamp)
                .map(|(i, _)| i)
                .collect();
            if !ts_cols.is_empty() {
                let texts: HashSet<String> = raw
                    .iter()
                    .flat_map(|r| ts_cols.iter().filter_map(|i| r[*i].clone()))
                    .collect();
                let map = instants(hq, texts.into_iter().collect(), time_zone).await?;
                for r in &mut raw {
                    for i in &ts_cols {
                        if let Some(s) = r[*i].as_mut() {
                            if let Some(v) = map.get(s.as_str()) {
                                *s = v.clone();
                            }
                        }
                    }
                }
            }
        }
        BranchConn::Postgres(c) => {
            let exprs: Vec<String> = table
                .columns
                .iter()
                .map(|c| pg_expr(&c.name, c.ty))
                .collect();
            let sql = format!("SELECT {} FROM {}", exprs.join(", "), q(&table.name));
            for r in sqlx::query(&sql)
                .fetch_all(&mut *c)
                .await
                .with_context(|| format!("reading branch table {}", table.name))?
            {
                raw.push(decode_pg(&r, table)?);
            }
        }
    }
    let mut out = Rows::new();
    for v in raw {
        let v = normalize(table, v);
        out.insert(key_of(table, &v), v);
    }
    Ok(out)
}

/// Converts branch timestamp texts to canonical UTC instants. Texts PostgreSQL cannot
/// parse stay as they are (and will show up as differences).
async fn instants(hq: &PgPool, texts: Vec<String>, zone: &str) -> Result<HashMap<String, String>> {
    let sql = format!(
        "SELECT v, to_char((CASE WHEN v ~ '\\d:\\d\\d(:\\d\\d(\\.\\d+)?)?\\s*(Z|z|[+-]\\d\\d(:?\\d\\d)?)$' \
         THEN v::timestamptz ELSE v::timestamp AT TIME ZONE $2 END) AT TIME ZONE 'UTC', {PG_INSTANT}) \
         FROM unnest($1::text[]) AS u(v)"
    );
    let mut out = HashMap::new();
    for chunk in texts.chunks(10_000) {
        match sqlx::query_as::<_, (String, String)>(&sql)
            .bind(chunk)
            .bind(zone)
            .fetch_all(hq)
            .await
        {
            Ok(rows) => out.extend(rows),
            Err(_) => {
                // One bad value fails the whole statement: convert one by one.
                for t in chunk {
                    if let Ok(mut rows) = sqlx::query_as::<_, (String, String)>(&sql)
                        .bind(std::slice::from_ref(t))
                        .bind(zone)
                        .fetch_all(hq)
                        .await
                    {
                        out.extend(rows.drain(..));
                    }
                }
            }
        }
    }
    Ok(out)
}

fn diff(table: &Table, branch: &Rows, hq: &Rows) -> TableReport {
    let mut missing: Vec<String> = branch
        .keys()
        .filter(|k| !hq.contains_key(*k))
        .cloned()
        .collect();
    let mut extra: Vec<String> = hq
        .keys()
        .filter(|k| !branch.contains_key(*k))
        .cloned()
        .collect();
    let mut different = Vec::new();
    for (k, b) in branch {
        if let Some(h) = hq.get(k) {
            let cols: Vec<_> = table
                .columns
                .iter()
                .enumerate()
                .filter(|(i, _)| b[*i] != h[*i])
                .map(|(i, c)| (c.name.clone(), b[i].clone(), h[i].clone()))
                .collect();
            if !cols.is_empty() {
                different.push(Difference {
                    key: k.clone(),
                    columns: cols,
                });
            }
        }
    }
    missing.sort_by_key(|k| sort_key(k));
    extra.sort_by_key(|k| sort_key(k));
    different.sort_by_key(|d| sort_key(&d.key));
    TableReport {
        table: table.name.clone(),
        branch_rows: branch.len(),
        hq_rows: hq.len(),
        branch_checksum: checksum(branch),
        hq_checksum: checksum(hq),
        missing_at_hq: missing,
        extra_at_hq: extra,
        different,
    }
}

/// Compares location `location` at HQ with the branch database at `branch_url`, for
/// every table of `catalogue`. `time_zone` is the branch's zone (its config's
/// `time_zone`), used for zone-less SQLite timestamps.
pub async fn compare(
    hq: &PgPool,
    catalogue: &Catalogue,
    location: &str,
    branch_url: &str,
    time_zone: &str,
) -> Result<LocationReport> {
    let mut conn = match Backend::of_url(branch_url)? {
        Backend::Sqlite => {
            use std::str::FromStr;
            let opts = sqlx::sqlite::SqliteConnectOptions::from_str(branch_url)?
                .read_only(true)
                .busy_timeout(std::time::Duration::from_secs(10));
            BranchConn::Sqlite(
                sqlx::SqliteConnection::connect_with(&opts)
                    .await
                    .with_context(|| format!("opening {branch_url}"))?,
            )
        }
        Backend::Postgres => BranchConn::Postgres(
            sqlx::PgConnection::connect(branch_url)
                .await
                .with_context(|| format!("connecting to {}", crate::db::redact(branch_url)))?,
        ),
    };
    // One read transaction: a consistent view of the branch across its tables.
    match &mut conn {
        BranchConn::Sqlite(c) => sqlx::query("BEGIN").execute(&mut *c).await.map(|_| ())?,
        BranchConn::Postgres(c) => sqlx::query("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .execute(&mut *c)
            .await
            .map(|_| ())?,
    }
    let mut tables = Vec::new();
    for t in &catalogue.tables {
        let b = branch_rows(&mut conn, hq, t, time_zone).await?;
        let h = hq_rows(hq, t, location).await?;
        tables.push(diff(t, &b, &h));
    }
    match &mut conn {
        BranchConn::Sqlite(c) => {
            let _ = sqlx::query("COMMIT").execute(&mut *c).await;
        }
        BranchConn::Postgres(c) => {
            let _ = sqlx::query("COMMIT").execute(&mut *c).await;
        }
    }
    Ok(LocationReport {
        location: location.to_string(),
        tables,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn booleans_and_sorting() {
        assert_eq!(canonical_bool("1"), "true");
        assert_eq!(canonical_bool("f"), "false");
        let mut v = vec!["product_id=10".to_string(), "product_id=9".to_string()];
        v.sort_by_key(|k| sort_key(k));
        assert_eq!(v, ["product_id=9", "product_id=10"]);
    }

    #[test]
    fn null_and_empty_differ() {
        let cat = Catalogue::product_management();
        let t = cat.table("products").unwrap();
        let row = |d: Option<&str>| {
            let mut v: Vec<Option<String>> = vec![
                Some("1".into()),
                Some("SKU".into()),
                Some("n".into()),
                d.map(str::to_string),
                None,
                Some("1.5".into()),
                Some("EUR".into()),
                None,
            ];
            v = normalize(t, v);
            let mut r = Rows::new();
            r.insert(key_of(t, &v), v);
            r
        };
        let rep = diff(t, &row(None), &row(Some("")));
        assert_eq!(rep.different.len(), 1);
        assert_eq!(rep.different[0].columns[0].0, "description");
        assert!(diff(t, &row(Some("")), &row(Some(""))).is_equal());
    }
}

/// The oracle against a miniature applier built from the `schemas` SQL alone (capture
/// triggers on SQLite, mirror tables and the upsert at HQ), so that it is tested before
/// and independently of the real binaries.
#[cfg(test)]
mod oracle_tests {
    use super::*;
    use crate::workload::{self, Branch, Counters, Mix, RunOptions, Until};
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    async fn hq_db() -> PgPool {
        let url = crate::pg::fresh_database("oracle_hq").await.unwrap();
        let pool = PgPool::connect(&url).await.unwrap();
        schemas::migrations::MIGRATOR.run(&pool).await.unwrap();
        for s in schemas::sql::hq::create_mirror_tables(&Catalogue::product_management()) {
            sqlx::query(&s).execute(&pool).await.unwrap();
        }
        pool
    }

    /// Applies the whole SQLite pull area to HQ: newest image per key, one upsert per table.
    async fn mini_apply(branch: &str, hq: &PgPool, location: &str, zone: &str) {
        let cat = Catalogue::product_management();
        // The location's (empty) partitions, as hq-puller makes them.
        for t in &cat.tables {
            let attach = schemas::sql::hq::attach_load_table(t, location);
            for s in schemas::sql::hq::create_load_table(t, location)
                .iter()
                .chain(&attach)
            {
                sqlx::query(s).execute(hq).await.unwrap();
            }
        }
        let mut c = sqlx::SqliteConnection::connect(branch).await.unwrap();
        let rows: Vec<(i64, String, String, String, Option<String>)> =
            sqlx::query_as("SELECT seq, tbl, op, pk, row_data FROM _pull_changes ORDER BY seq")
                .fetch_all(&mut c)
                .await
                .unwrap();
        type Newest = BTreeMap<(String, String), (i64, String, String, Option<String>)>;
        let mut newest: Newest = BTreeMap::new();
        for (seq, tbl, op, pk, row) in rows {
            newest.insert((tbl.clone(), pk.clone()), (seq, op, pk, row));
        }
        let mut tx = hq.begin().await.unwrap();
        sqlx::query(&format!("SET LOCAL TIME ZONE '{zone}'"))
            .execute(&mut *tx)
            .await
            .unwrap();
        for t in &cat.tables {
            let images: Vec<serde_json::Value> = newest
                .iter()
                .filter(|((tbl, _), _)| tbl == &t.name)
                .map(|(_, (seq, op, pk, row))| {
                    let mut v: serde_json::Value = match row {
                        Some(r) if op != "D" => serde_json::from_str(r).unwrap(),
                        _ => serde_json::from_str(pk).unwrap(),
                    };
                    v["_seq"] = (*seq).into();
                    v["_deleted"] = (op == "D").into();
                    v
                })
                .collect();
            sqlx::query(&schemas::sql::hq::upsert(t))
                .bind(serde_json::to_string(&images).unwrap())
                .bind(location)
                .execute(&mut *tx)
                .await
                .unwrap();
        }
        tx.commit().await.unwrap();
    }

    async fn branch_with_workload(dir: &std::path::Path) -> String {
        let url = format!("sqlite://{}", dir.join("b.db").display());
        let b = Arc::new(Branch::open(0, &url, None, 2).await.unwrap());
        let cat = Catalogue::product_management();
        let mut ddl = schemas::sql::sqlite::create_pull_area();
        for t in &cat.tables {
            ddl.extend(schemas::sql::sqlite::create_triggers(t));
        }
        b.db.batch(&ddl).await.unwrap();
        let counters = Arc::new(Counters::default());
        workload::seed(&b, 150, 3, &counters).await.unwrap();
        let opts = RunOptions {
            rate: None,
            until: Until::Ops(600),
            concurrency: 2,
            seed: 3,
            mix: Mix::default(),
        };
        let s = workload::run(
            std::slice::from_ref(&b),
            &opts,
            counters,
            Arc::new(AtomicBool::new(false)),
        )
        .await
        .unwrap();
        assert_eq!(s.errors, 0);
        assert!(s.ops["delete"] > 0 && s.ops["price"] > 0 && s.ops["stock"] > 0);
        b.db.close().await;
        url
    }

    #[tokio::test]
    async fn equal_after_apply_and_every_kind_of_difference_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let branch = branch_with_workload(dir.path()).await;
        let hq = hq_db().await;
        let cat = Catalogue::product_management();
        mini_apply(&branch, &hq, "b01", "UTC").await;
        let r = compare(&hq, &cat, "b01", &branch, "UTC").await.unwrap();
        assert!(r.is_equal(), "{r}");
        assert!(r
            .tables
            .iter()
            .all(|t| t.branch_rows > 0 && t.branch_checksum == t.hq_checksum));
        // Another location's rows are not this location's.
        let other = compare(&hq, &cat, "b02", &branch, "UTC").await.unwrap();
        assert!(!other.is_equal());
        assert_eq!(other.tables[0].hq_rows, 0);

        // A price off by a cent, a deleted row, an extra row, NULL vs empty text.
        let (p1, p2, p3): (i64, i64, i64) = sqlx::query_as(
            "SELECT min(product_id), max(product_id), (SELECT min(product_id) FROM hq.products_live WHERE location_id = 'b01' AND description IS NOT NULL AND description <> '') FROM hq.products_live WHERE location_id = 'b01'",
        )
        .fetch_one(&hq)
        .await
        .unwrap();
        for s in [
            format!("UPDATE hq.products SET unit_price = unit_price + 0.01 WHERE location_id = 'b01' AND product_id = {p1}"),
            format!("DELETE FROM hq.inventory WHERE location_id = 'b01' AND product_id = {p2}"),
            "INSERT INTO hq.stock_movements (location_id, movement_id, product_id, quantity_delta, reason, moved_at, _seq) VALUES ('b01', 999999, 1, 1, 'x', now(), 1)".to_string(),
            format!("UPDATE hq.products SET description = NULL WHERE location_id = 'b01' AND product_id = {p3}"),
        ] {
            sqlx::query(&s).execute(&hq).await.unwrap();
        }
        let r = compare(&hq, &cat, "b01", &branch, "UTC").await.unwrap();
        let t = |n: &str| r.tables.iter().find(|t| t.table == n).unwrap();
        let diffs = &t("products").different;
        assert!(
            diffs.iter().any(|d| d.key == format!("product_id={p1}")
                && d.columns.iter().any(|c| c.0 == "unit_price")),
            "{r}"
        );
        assert!(
            diffs.iter().any(|d| d.key == format!("product_id={p3}")
                && d.columns.iter().any(|c| c.0 == "description")),
            "{r}"
        );
        assert_eq!(
            t("inventory").missing_at_hq,
            vec![format!("product_id={p2}")]
        );
        assert_eq!(
            t("stock_movements").extra_at_hq,
            vec!["movement_id=999999".to_string()]
        );
        assert_ne!(t("products").branch_checksum, t("products").hq_checksum);
        assert!(t("product_images").is_equal());
    }

    #[tokio::test]
    async fn zone_less_timestamps_are_read_in_the_branch_zone() {
        let dir = tempfile::tempdir().unwrap();
        let branch = branch_with_workload(dir.path()).await;
        let hq = hq_db().await;
        let cat = Catalogue::product_management();
        mini_apply(&branch, &hq, "b07", "America/New_York").await;
        let r = compare(&hq, &cat, "b07", &branch, "America/New_York")
            .await
            .unwrap();
        assert!(r.is_equal(), "{r}");
        let wrong = compare(&hq, &cat, "b07", &branch, "UTC").await.unwrap();
        let d = &wrong.tables[0].different;
        assert!(
            !d.is_empty() && d[0].columns.iter().all(|(c, _, _)| c == "updated_at"),
            "{wrong}"
        );
    }
}
