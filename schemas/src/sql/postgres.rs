//! The pull area on a PostgreSQL branch, in schema `pull`.
//!
//! - `pull.changes`: the change log; `seq` from an identity with `CACHE 1`, `txid` the
//!   writing transaction's `xid8`. Sequence order is *not* commit order on PostgreSQL,
//!   so changes are served by snapshot windows (see `pull.ticks`).
//! - `pull.ticks`: a stored `pg_snapshot` per tick (PgQ style). The window (L, H] holds
//!   the changes whose transaction is visible in H's snapshot and not in L's.
//! - `pull.meta`: instance id, layout version, catalogue fingerprint, acknowledged tick.
//! - `pull.files`: the file index, captured (function `pull.capture__files`) under the
//!   wire table name `_files`.
//!
//! Capture: one `AFTER INSERT OR UPDATE OR DELETE FOR EACH ROW` trigger per table
//! (`_pull_capture`, function `pull.capture_<table>()`), which also `pg_notify`s the
//! channel [`NOTIFY_CHANNEL`] so the listener wakes up at commit.

use super::{lit, q};
use crate::catalogue::{Catalogue, ColumnType, Table};

pub const SCHEMA: &str = "pull";
pub const NOTIFY_CHANNEL: &str = "pull_changes";
/// Advisory lock key serializing tickers (`pg_advisory_xact_lock`).
pub const TICK_LOCK_KEY: i64 = 0x70_756c_6c74_6963; // "pulltic"
pub const TRIGGER_NAME: &str = "_pull_capture";

pub fn create_pull_area() -> Vec<String> {
    vec![
        "CREATE SCHEMA IF NOT EXISTS pull".into(),
        "CREATE TABLE IF NOT EXISTS pull.meta (key text PRIMARY KEY, value text NOT NULL)".into(),
        "CREATE TABLE IF NOT EXISTS pull.changes (\
         seq bigint GENERATED ALWAYS AS IDENTITY (CACHE 1) PRIMARY KEY, \
         txid xid8 NOT NULL DEFAULT pg_current_xact_id(), \
         tbl text NOT NULL, op text NOT NULL, pk jsonb NOT NULL, row_data jsonb, \
         ts timestamptz NOT NULL DEFAULT clock_timestamp())"
            .into(),
        "CREATE INDEX IF NOT EXISTS changes_txid_idx ON pull.changes (txid)".into(),
        "CREATE TABLE IF NOT EXISTS pull.ticks (\
         tick_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, \
         tick_uuid uuid NOT NULL DEFAULT gen_random_uuid(), \
         snap pg_snapshot NOT NULL, head_seq bigint NOT NULL, \
         created_at timestamptz NOT NULL DEFAULT now())"
            .into(),
        "CREATE TABLE IF NOT EXISTS pull.files (\
         path text PRIMARY KEY, size bigint NOT NULL, sha256 text NOT NULL, mtime timestamptz NOT NULL)"
            .into(),
        "CREATE INDEX IF NOT EXISTS files_sha256_idx ON pull.files (sha256)".into(),
    ]
}

/// Drops everything install created: the capture triggers on `tables` first (they
/// depend on the functions), then the `pull` schema.
pub fn drop_pull_area(tables: &[String]) -> Vec<String> {
    let mut v: Vec<String> = tables
        .iter()
        .map(|t| format!("DROP TRIGGER IF EXISTS {TRIGGER_NAME} ON {}", q(t)))
        .collect();
    v.push("DROP SCHEMA IF EXISTS pull CASCADE".into());
    v
}

/// Query listing the application tables that carry a capture trigger (schema-qualified
/// names are not needed: the demo and application tables live in the search path; the
/// file index in schema `pull` goes with the schema).
pub const LIST_CAPTURED_TABLES: &str = "SELECT c.relname::text FROM pg_trigger g \
     JOIN pg_class c ON c.oid = g.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
     WHERE g.tgname = '_pull_capture' AND NOT g.tgisinternal AND n.nspname <> 'pull'";

fn json_value(rec: &str, name: &str, ty: ColumnType) -> String {
    let c = format!("{rec}.{}", q(name));
    match ty {
        ColumnType::Blob => format!("encode({c}, 'hex')"),
        _ => c,
    }
}

/// `jsonb_build_object` takes at most 100 arguments: chunk and concatenate.
pub(crate) fn jsonb_object(rec: &str, table: &Table, cols: &[&str]) -> String {
    let parts: Vec<String> = cols
        .chunks(40)
        .map(|chunk| {
            let args: Vec<String> = chunk
                .iter()
                .map(|name| {
                    let ty = table.column(name).expect("catalogue column").ty;
                    format!("{}, {}", lit(name), json_value(rec, name, ty))
                })
                .collect();
            format!("jsonb_build_object({})", args.join(", "))
        })
        .collect();
    parts.join(" || ")
}

/// The same image as [`jsonb_object`] (equal as `jsonb`), built as plain `json` by
/// `row_to_json` of a sub-select: several times cheaper per row than
/// `jsonb_build_object`, which the snapshot and checksum pages pay for every row.
/// Key order and spacing differ from the `jsonb` text, values do not: `real` columns
/// go through `to_jsonb` (as in [`jsonb_object`]: `-0` becomes `0`, exponents are
/// spelled out), the other types print the same in `json` and `jsonb`.
pub(crate) fn json_row(rec: &str, table: &Table, cols: &[&str]) -> String {
    let items: Vec<String> = cols
        .iter()
        .map(|name| {
            let ty = table.column(name).expect("catalogue column").ty;
            let v = match ty {
                ColumnType::Real => format!("to_jsonb({rec}.{})", q(name)),
                _ => json_value(rec, name, ty),
            };
            format!("{v} AS {}", q(name))
        })
        .collect();
    format!(
        "(SELECT row_to_json(_img) FROM (SELECT {}) AS _img)",
        items.join(", ")
    )
}

/// The capture function and trigger of one table (idempotent).
pub fn create_capture(table: &Table) -> Vec<String> {
    create_capture_on(table, &q(&table.name))
}

/// The capture function and trigger of the file index `pull.files` (wire name `_files`).
pub fn create_files_capture() -> Vec<String> {
    create_capture_on(&crate::catalogue::files_table(), "pull.files")
}

/// Capture on relation `source` (quoted, maybe schema-qualified) under `table`'s name.
fn create_capture_on(table: &Table, source: &str) -> Vec<String> {
    let t = &table.name;
    let keys: Vec<&str> = table.primary_key.iter().map(String::as_str).collect();
    let cols: Vec<&str> = table.column_names().collect();
    let key_changed = keys
        .iter()
        .map(|k| format!("OLD.{0} IS DISTINCT FROM NEW.{0}", q(k)))
        .collect::<Vec<_>>()
        .join(" OR ");
    let func = format!("pull.{}", q(&format!("capture_{t}")));
    let body = format!(
        "BEGIN \
           IF TG_OP = 'DELETE' THEN \
             INSERT INTO pull.changes (tbl, op, pk, row_data) VALUES ({tl}, 'D', {old_pk}, NULL); \
           ELSE \
             IF TG_OP = 'UPDATE' AND ({key_changed}) THEN \
               INSERT INTO pull.changes (tbl, op, pk, row_data) VALUES ({tl}, 'D', {old_pk}, NULL); \
             END IF; \
             INSERT INTO pull.changes (tbl, op, pk, row_data) \
               VALUES ({tl}, CASE TG_OP WHEN 'INSERT' THEN 'I' ELSE 'U' END, {new_pk}, {new_row}); \
           END IF; \
           PERFORM pg_notify('{NOTIFY_CHANNEL}', ''); \
           RETURN NULL; \
         END",
        tl = lit(t),
        old_pk = jsonb_object("OLD", table, &keys),
        new_pk = jsonb_object("NEW", table, &keys),
        new_row = jsonb_object("NEW", table, &cols),
    );
    vec![
        format!(
            "CREATE OR REPLACE FUNCTION {func}() RETURNS trigger LANGUAGE plpgsql AS $pull$ {body} $pull$"
        ),
        format!("DROP TRIGGER IF EXISTS {TRIGGER_NAME} ON {source}"),
        format!(
            "CREATE TRIGGER {TRIGGER_NAME} AFTER INSERT OR UPDATE OR DELETE ON {source} \
             FOR EACH ROW EXECUTE FUNCTION {func}()"
        ),
    ]
}

/// Demo schema (the catalogue's tables as a product-management application has them).
pub fn create_demo_schema(catalogue: &Catalogue) -> Vec<String> {
    super::demo_schema(catalogue, ColumnType::postgres_type)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_function_handles_key_changes_and_notifies() {
        let cat = Catalogue::product_management();
        let sql = create_capture(cat.table("products").unwrap()).join("\n");
        assert!(sql.contains("OLD.\"product_id\" IS DISTINCT FROM NEW.\"product_id\""));
        assert!(sql.contains("pg_notify('pull_changes'"));
        assert!(sql.contains("jsonb_build_object('product_id', NEW.\"product_id\""));
    }

    #[test]
    fn file_index_is_captured_as_files() {
        let sql = create_files_capture().join("\n");
        assert!(sql.contains("ON pull.files FOR EACH ROW"));
        assert!(sql.contains("VALUES ('_files', 'D'"));
        assert!(sql.contains("pull.\"capture__files\"()"));
    }

    #[test]
    fn wide_tables_are_chunked() {
        let cols: Vec<crate::Column> = (0..120)
            .map(|i| crate::Column {
                name: format!("c{i}"),
                ty: ColumnType::Text,
                nullable: true,
            })
            .collect();
        let t = Table {
            name: "wide".into(),
            primary_key: vec!["c0".into()],
            columns: cols,
            file_column: None,
        };
        let sql = create_capture(&t).join("\n");
        assert!(sql.matches("jsonb_build_object(").count() >= 3 + 2);
    }
}
