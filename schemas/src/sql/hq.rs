//! HQ side: mirror tables `hq.<table>`, views `hq.<table>_live`, apply statements.
//!
//! A mirror table has `location_id` (first column; last in its primary key), the branch columns (all
//! nullable but the key, so a delete can leave a tombstone), and the bookkeeping columns
//! `_seq` (branch sequence of the last applied change), `_deleted`, `_applied_at`.
//!
//! The apply statement takes the batch's newest image per key as one JSON array
//! (`$1`, elements: the row image plus `_seq` and `_deleted`) and the location id (`$2`),
//! decodes it with `json_to_recordset` (PostgreSQL parses the numbers: exact; plain
//! `json`, not `jsonb`, so the array is not first normalized into a sorted jsonb), and
//! upserts with the guard `WHERE t._seq < EXCLUDED._seq`: an older change never wins,
//! a tombstone is never resurrected by a late update, and redelivery changes nothing.
//!
//! A mirror table is LIST-partitioned by `location_id`: one partition per location,
//! `hq."<table>@<location>"` ([`partition`]). An initial load fills an unindexed table of
//! its own, `hq_load."<table>@<location>"` ([`load_table`]), and the load's last
//! transaction builds its key and attaches it ([`attach_load_table`]): a bulk load
//! without index maintenance per row, and readers see the location's rows all at once.
//! ATTACH locks the mirror table only `SHARE UPDATE EXCLUSIVE`: readers and the other
//! locations' upserts go on. An empty partition is made the same way.

use super::{lit, q};
use crate::catalogue::{Catalogue, ColumnType, Table};

pub fn mirror_table(table: &Table) -> String {
    format!("hq.{}", q(&table.name))
}

pub fn live_view(table: &Table) -> String {
    format!("hq.{}", q(&format!("{}_live", table.name)))
}

/// Idempotent DDL creating (or extending with new columns) the mirror tables and views.
pub fn create_mirror_tables(catalogue: &Catalogue) -> Vec<String> {
    let mut v = vec![
        "CREATE SCHEMA IF NOT EXISTS hq".to_string(),
        "CREATE SCHEMA IF NOT EXISTS hq_load".to_string(),
    ];
    for t in &catalogue.tables {
        let mut cols = vec!["location_id text NOT NULL".to_string()];
        for c in &t.columns {
            cols.push(format!("{} {}", q(&c.name), c.ty.hq_type()));
        }
        cols.push("_seq bigint NOT NULL".into());
        cols.push("_deleted boolean NOT NULL DEFAULT false".into());
        cols.push("_applied_at timestamptz NOT NULL DEFAULT now()".into());
        cols.push(format!("PRIMARY KEY ({})", mirror_key(t)));
        v.push(format!(
            "CREATE TABLE IF NOT EXISTS {} ({}) PARTITION BY LIST (location_id)",
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

/// The primary key of a mirror table: the branch's key, then `location_id` (the
/// partition key, which a partitioned table's key must hold). Last, not first: each
/// partition holds one location, and a leading text column would make every key
/// comparison deform it first (no cached offset for the columns after a varlena),
/// which made building and maintaining the key about three times as costly.
fn mirror_key(table: &Table) -> String {
    let mut cols: Vec<String> = table.primary_key.iter().map(|k| q(k)).collect();
    cols.push("location_id".into());
    cols.join(", ")
}

/// The longest identifier PostgreSQL keeps whole.
const MAX_IDENTIFIER: usize = 63;

/// The unquoted name of `table`'s partition (and load table) for `location`:
/// `<table>@<location>`, or, when that is longer than an identifier may be, the table
/// name cut short and a hash of both (names stay distinct and stable).
pub fn partition_name(table: &Table, location: &str) -> String {
    let name = format!("{}@{location}", table.name);
    if name.len() <= MAX_IDENTIFIER {
        return name;
    }
    use sha2::Digest;
    let hash = hex::encode(&sha2::Sha256::digest(name.as_bytes())[..8]);
    let keep = MAX_IDENTIFIER - 1 - hash.len();
    format!("{}@{hash}", &table.name[..table.name.len().min(keep)])
}

/// The partition of `table` holding `location`'s rows.
pub fn partition(table: &Table, location: &str) -> String {
    format!("hq.{}", q(&partition_name(table, location)))
}

/// The table an initial load of `location` fills before it becomes [`partition`].
pub fn load_table(table: &Table, location: &str) -> String {
    format!("hq_load.{}", q(&partition_name(table, location)))
}

/// DDL of [`load_table`]: the mirror table's columns and defaults, no index, and a check
/// of the location that lets ATTACH skip its scan. Logged: a load's pages commit into it
/// and a crashed load resumes.
pub fn create_load_table(table: &Table, location: &str) -> Vec<String> {
    vec![format!(
        "CREATE TABLE IF NOT EXISTS {} (LIKE {} INCLUDING DEFAULTS, \
         CONSTRAINT location_only CHECK (location_id = {}))",
        load_table(table, location),
        mirror_table(table),
        lit(location)
    )]
}

/// Turns [`load_table`] into [`partition`], in the caller's transaction: the columns the
/// mirror table gained meanwhile, the key (one sorted build), then ATTACH (which adopts
/// that key as the partition's part of the mirror table's key).
pub fn attach_load_table(table: &Table, location: &str) -> Vec<String> {
    let load = load_table(table, location);
    let mut v: Vec<String> = table
        .columns
        .iter()
        .map(|c| {
            format!(
                "ALTER TABLE {load} ADD COLUMN IF NOT EXISTS {} {}",
                q(&c.name),
                c.ty.hq_type()
            )
        })
        .collect();
    v.push(format!(
        "ALTER TABLE {load} ADD PRIMARY KEY ({})",
        mirror_key(table)
    ));
    v.push(format!("ALTER TABLE {load} SET SCHEMA hq"));
    v.push(format!(
        "ALTER TABLE {} ATTACH PARTITION {} FOR VALUES IN ({})",
        mirror_table(table),
        partition(table, location),
        lit(location)
    ));
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
        assert!(ddl.contains("PRIMARY KEY (\"product_id\", location_id)"));
        assert!(ddl.contains("CREATE OR REPLACE VIEW hq.\"products_live\""));
        assert!(ddl.contains("_seq bigint NOT NULL"));
        assert!(ddl.contains("f.path = t.\"file_path\" AND f.state = 'stored'"));
        assert_eq!(ddl.matches("sync.files").count(), 1, "only product_images");
        assert!(ddl.contains(") PARTITION BY LIST (location_id)"));
    }

    #[test]
    fn partition_names_fit_an_identifier_and_stay_distinct() {
        let cat = Catalogue::product_management();
        let t = cat.table("products").unwrap();
        assert_eq!(partition(t, "b01"), "hq.\"products@b01\"");
        assert_eq!(load_table(t, "b01"), "hq_load.\"products@b01\"");
        let mut long = t.clone();
        long.name = "a".repeat(48);
        let (x, y) = ("x".repeat(32), format!("{}y", "x".repeat(31)));
        let (nx, ny) = (partition_name(&long, &x), partition_name(&long, &y));
        assert!(nx.len() <= 63 && ny.len() <= 63, "{nx} {ny}");
        assert_ne!(nx, ny);
        assert_eq!(nx, partition_name(&long, &x), "stable");
        assert!(nx.starts_with(&"a".repeat(40)));
    }

    #[test]
    fn a_load_table_becomes_the_partition_with_its_key() {
        let cat = Catalogue::product_management();
        let t = cat.table("products").unwrap();
        let create = create_load_table(t, "b'01").join("\n");
        assert!(
            create.contains("(LIKE hq.\"products\" INCLUDING DEFAULTS, "),
            "{create}"
        );
        assert!(create.contains("CHECK (location_id = 'b''01')"), "{create}");
        let attach = attach_load_table(t, "b01");
        let n = attach.len();
        assert!(attach[..n - 3]
            .iter()
            .all(|s| s.contains("ADD COLUMN IF NOT EXISTS")));
        assert_eq!(
            attach[n - 3],
            "ALTER TABLE hq_load.\"products@b01\" ADD PRIMARY KEY (\"product_id\", location_id)"
        );
        assert_eq!(
            attach[n - 2],
            "ALTER TABLE hq_load.\"products@b01\" SET SCHEMA hq"
        );
        assert_eq!(
            attach[n - 1],
            "ALTER TABLE hq.\"products\" ATTACH PARTITION hq.\"products@b01\" FOR VALUES IN ('b01')"
        );
    }
}
