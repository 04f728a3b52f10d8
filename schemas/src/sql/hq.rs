//! HQ side: mirror tables `hq.<table>`, views `hq.<table>_live`, apply statements.
//!
//! A mirror table has `location_id` first in its primary key, the branch columns (all
//! nullable but the key, so a delete can leave a tombstone), and the bookkeeping columns
//! `_seq` (branch sequence of the last applied change), `_deleted`, `_applied_at`.
//!
//! The apply statement takes the batch's newest image per key as one JSON array
//! (`$1`, elements: the row image plus `_seq` and `_deleted`) and the location id (`$2`),
//! decodes it with `json_to_recordset` (PostgreSQL parses the numbers: exact; plain
//! `json`, not `jsonb`, so the array is not first normalized into a sorted jsonb), and
//! upserts with the guard `WHERE t._seq < EXCLUDED._seq`: an older change never wins,
//! a tombstone is never resurrected by a late update, and redelivery changes nothing.

use super::q;
use crate::catalogue::{Catalogue, ColumnType, Table};

pub fn mirror_table(table: &Table) -> String {
    format!("hq.{}", q(&table.name))
}

pub fn live_view(table: &Table) -> String {
    format!("hq.{}", q(&format!("{}_live", table.name)))
}

/// Idempotent DDL creating (or extending with new columns) the mirror tables and views.
pub fn create_mirror_tables(catalogue: &Catalogue) -> Vec<String> {
    let mut v = vec!["CREATE SCHEMA IF NOT EXISTS hq".to_string()];
    for t in &catalogue.tables {
        let mut cols = vec!["location_id text NOT NULL".to_string()];
        for c in &t.columns {
            cols.push(format!("{} {}", q(&c.name), c.ty.hq_type()));
        }
        cols.push("_seq bigint NOT NULL".into());
        cols.push("_deleted boolean NOT NULL DEFAULT false".into());
        cols.push("_applied_at timestamptz NOT NULL DEFAULT now()".into());
        let keys: Vec<String> = t.primary_key.iter().map(|k| q(k)).collect();
        cols.push(format!("PRIMARY KEY (location_id, {})", keys.join(", ")));
        v.push(format!(
            "CREATE TABLE IF NOT EXISTS {} ({})",
            mirror_table(t),
            cols.join(", ")
        ));
        for c in &t.columns {
            v.push(format!(
                "ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} {}",
                mirror_table(t),
                q(&c.name),
                c.ty.hq_type()
            ));
        }
        let names: Vec<String> = t
            .columns
            .iter()
            .map(|c| format!("t.{}", q(&c.name)))
            .collect();
        v.push(format!(
            "CREATE OR REPLACE VIEW {} AS SELECT t.location_id, {} FROM {} t WHERE NOT t._deleted{}",
            live_view(t),
            names.join(", "),
            mirror_table(t),
            file_condition(t)
        ));
    }
    v
}

/// For a table with a `file_column`: a row is live only once its file is stored at HQ
/// for the same location (so a row naming an image is never visible before the image).
fn file_condition(t: &Table) -> String {
    match &t.file_column {
        None => String::new(),
        Some(c) => format!(
            " AND EXISTS (SELECT 1 FROM sync.files f WHERE f.location_id = t.location_id \
             AND f.path = t.{} AND f.state = 'stored')",
            q(c)
        ),
    }
}

/// Expression turning the decoded record column into the mirror column's value.
fn decoded(table: &Table, name: &str, ty: ColumnType) -> String {
    let r = format!("r.{}", q(name));
    match ty {
        ColumnType::Blob => format!("decode({r}, 'hex')"),
        ColumnType::Numeric { precision, scale } => fit_numeric(&r, precision, scale, table, name),
        _ => r,
    }
}

/// `sync.fit_numeric` (refuses a value that does not fit `numeric(p,s)` instead of
/// rounding it), with the test of a fitting value inlined: the PL/pgSQL call per value
/// cost about as much as decoding the row. A value failing the inline test (NULL
/// included) goes through the function, which returns NULL or raises its error.
fn fit_numeric(r: &str, precision: u8, scale: u8, table: &Table, name: &str) -> String {
    let magnitude = i64::from(precision) - i64::from(scale);
    format!(
        "CASE WHEN {r} = round({r}, {scale}) AND abs({r}) < 1e{magnitude} THEN {r} \
         ELSE sync.fit_numeric({r}, {precision}, {scale}, '{}.{}') END",
        table.name, name
    )
}

/// The set-wise upsert of one table. `$1`: JSON array of images, `$2`: location id.
pub fn upsert(table: &Table) -> String {
    upsert_into(table, &mirror_table(table))
}

/// The decoded record's columns: `"name" type, ...` (numeric unconstrained, blobs hex text).
fn record(table: &Table) -> String {
    table
        .columns
        .iter()
        .map(|c| format!("{} {}", q(&c.name), c.ty.hq_decode_type()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// [`upsert`] into another table of the same columns (a resync's staging table).
pub fn upsert_into(table: &Table, target: &str) -> String {
    upsert_sql(table, target, "$2", &json_source(table), true)
}

/// [`upsert_into`] without its `ON CONFLICT` clause: a plain insert, for a snapshot page
/// into a table that holds none of its keys yet (an initial load's or resync's pages are
/// disjoint key ranges). Half the cost of the upsert; a page that meets an existing key
/// fails with `unique_violation` (SQLSTATE 23505), and the loader then runs the upsert.
pub fn insert_into(table: &Table, target: &str) -> String {
    upsert_sql(table, target, "$2", &json_source(table), false)
}

fn json_source(table: &Table) -> String {
    format!(
        "json_to_recordset($1::json) AS r({}, _seq bigint, _deleted boolean)",
        record(table)
    )
}

/// The temporary table a snapshot page in `COPY` text is copied into (per transaction).
pub const LOAD_PAGE: &str = "pg_temp._hq_load_page";

/// DDL of [`LOAD_PAGE`] for `table`: the decoded record's columns (the same types as
/// [`upsert`]'s `json_to_recordset`), `_seq` 0, `_deleted` false; dropped at commit.
pub fn create_load_page(table: &Table) -> String {
    format!(
        "CREATE TEMPORARY TABLE _hq_load_page ({}, _seq bigint NOT NULL DEFAULT 0, \
         _deleted boolean NOT NULL DEFAULT false) ON COMMIT DROP",
        record(table)
    )
}

/// [`upsert_into`] reading the rows from [`LOAD_PAGE`] instead of a JSON array, with the
/// same conversions and checks. `$1`: location id.
pub fn upsert_from_load_page(table: &Table, target: &str) -> String {
    upsert_sql(table, target, "$1", &format!("{LOAD_PAGE} AS r"), true)
}

/// [`upsert_from_load_page`] without its `ON CONFLICT` clause (see [`insert_into`]).
pub fn insert_from_load_page(table: &Table, target: &str) -> String {
    upsert_sql(table, target, "$1", &format!("{LOAD_PAGE} AS r"), false)
}

/// The upsert of the rows of `source` (a relation `r` with the record's columns,
/// `_seq`, `_deleted`) into `target`; `location` is the location id's parameter.
/// `conflict`: with the guarded `ON CONFLICT ... DO UPDATE`, else a plain insert.
fn upsert_sql(table: &Table, target: &str, location: &str, source: &str, conflict: bool) -> String {
    let cols: Vec<String> = table.columns.iter().map(|c| q(&c.name)).collect();
    let values: Vec<String> = table
        .columns
        .iter()
        .map(|c| decoded(table, &c.name, c.ty))
        .collect();
    let keys: Vec<String> = table.primary_key.iter().map(|k| q(k)).collect();
    let sets: Vec<String> = table
        .value_columns()
        .map(|c| format!("{0} = EXCLUDED.{0}", q(&c.name)))
        .collect();
    let mut set_clause = sets.join(", ");
    if !set_clause.is_empty() {
        set_clause.push_str(", ");
    }
    let insert = format!(
        "INSERT INTO {target} AS t (location_id, {cols}, _seq, _deleted, _applied_at) \
         SELECT {location}, {values}, r._seq, r._deleted, now() \
         FROM {source}",
        cols = cols.join(", "),
        values = values.join(", "),
    );
    if !conflict {
        return insert;
    }
    format!(
        "{insert} \
         ON CONFLICT (location_id, {keys}) DO UPDATE SET {set_clause}\
         _seq = EXCLUDED._seq, _deleted = EXCLUDED._deleted, _applied_at = EXCLUDED._applied_at \
         WHERE t._seq < EXCLUDED._seq",
        keys = keys.join(", "),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upsert_guards_on_sequence_and_checks_numeric_fit() {
        let cat = Catalogue::product_management();
        let sql = upsert(cat.table("products").unwrap());
        assert!(sql.contains("WHERE t._seq < EXCLUDED._seq"));
        assert!(sql.contains("sync.fit_numeric(r.\"unit_price\", 12, 2, 'products.unit_price')"));
        assert!(sql.contains(
            "CASE WHEN r.\"unit_price\" = round(r.\"unit_price\", 2) AND abs(r.\"unit_price\") < 1e10 THEN"
        ));
        assert!(sql.contains("ON CONFLICT (location_id, \"product_id\")"));
        assert!(!sql.contains("\"product_id\" = EXCLUDED"));
    }

    #[test]
    fn load_page_upsert_reads_the_copied_rows_with_the_same_checks() {
        let cat = Catalogue::product_management();
        let t = cat.table("products").unwrap();
        let json = upsert(t);
        let copied = upsert_from_load_page(t, &mirror_table(t));
        assert!(copied.contains("SELECT $1, r.\"product_id\""), "{copied}");
        assert!(copied.contains("FROM pg_temp._hq_load_page AS r ON CONFLICT"));
        let tail = |s: &str| s[s.find(" ON CONFLICT").unwrap()..].to_string();
        assert_eq!(tail(&json), tail(&copied));
        assert!(copied.contains("sync.fit_numeric(r.\"unit_price\", 12, 2"));
        let plain = insert_from_load_page(t, &mirror_table(t));
        assert_eq!(plain, copied[..copied.find(" ON CONFLICT").unwrap()]);
        let plain = insert_into(t, &mirror_table(t));
        assert_eq!(plain, json[..json.find(" ON CONFLICT").unwrap()]);
        let ddl = create_load_page(t);
        assert!(ddl.contains("\"unit_price\" numeric, ") && ddl.contains("ON COMMIT DROP"));
    }

    #[test]
    fn mirror_ddl_has_bookkeeping_and_live_view() {
        let cat = Catalogue::product_management();
        let ddl = create_mirror_tables(&cat).join("\n");
        assert!(ddl.contains("PRIMARY KEY (location_id, \"product_id\")"));
        assert!(ddl.contains("CREATE OR REPLACE VIEW hq.\"products_live\""));
        assert!(ddl.contains("_seq bigint NOT NULL"));
        assert!(ddl.contains("f.path = t.\"file_path\" AND f.state = 'stored'"));
        assert_eq!(ddl.matches("sync.files").count(), 1, "only product_images");
    }
}
