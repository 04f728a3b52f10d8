//! The pull area on a SQLite branch.
//!
//! - `_pull_changes`: the change log. `seq INTEGER PRIMARY KEY AUTOINCREMENT`, so a
//!   sequence number is never reused after pruning. SQLite serializes writers, so
//!   sequence order is commit order and any read sees a committed prefix.
//! - `_pull_ticks`: window boundaries (`head_seq` = highest committed seq at the tick).
//! - `_pull_meta`: instance id, layout version, catalogue fingerprint, acknowledged tick.
//! - `_pull_files`: the file index (path, size, sha256, mtime as UTC text), captured by
//!   the same triggers under the wire table name `_files`.
//!
//! Triggers: `_pull_<table>_ins`, `_pull_<table>_upd`, `_pull_<table>_del`. An UPDATE
//! that changes the primary key is captured as a delete of the old key followed by an
//! upsert of the new one (same transaction, consecutive sequences).

use super::{lit, q};
use crate::catalogue::{Catalogue, ColumnType, Table};

pub const CHANGES: &str = "_pull_changes";
pub const TICKS: &str = "_pull_ticks";
pub const META: &str = "_pull_meta";
/// The file index (`files_dir`'s current state), captured as wire table `_files`.
pub const FILES: &str = "_pull_files";

/// Statements creating the pull-area tables (idempotent).
pub fn create_pull_area() -> Vec<String> {
    vec![
        format!("CREATE TABLE IF NOT EXISTS {META} (key TEXT PRIMARY KEY, value TEXT NOT NULL)"),
        format!(
            "CREATE TABLE IF NOT EXISTS {CHANGES} (\
             seq INTEGER PRIMARY KEY AUTOINCREMENT, \
             tbl TEXT NOT NULL, op TEXT NOT NULL, pk TEXT NOT NULL, row_data TEXT, \
             ts TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')))"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {TICKS} (\
             tick_id INTEGER PRIMARY KEY AUTOINCREMENT, tick_uuid TEXT NOT NULL, \
             head_seq INTEGER NOT NULL, \
             created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')))"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {FILES} (\
             path TEXT PRIMARY KEY, size INTEGER NOT NULL, sha256 TEXT NOT NULL, mtime TEXT NOT NULL)"
        ),
        format!("CREATE INDEX IF NOT EXISTS _pull_files_sha256 ON {FILES} (sha256)"),
    ]
}

/// Statements removing the pull-area tables (after the triggers are dropped).
pub fn drop_pull_area() -> Vec<String> {
    [CHANGES, TICKS, META, FILES]
        .iter()
        .map(|t| format!("DROP TABLE IF EXISTS {t}"))
        .collect()
}

/// Query listing the installed capture triggers (to drop them on upgrade/uninstall).
pub const LIST_TRIGGERS: &str =
    "SELECT name FROM sqlite_master WHERE type = 'trigger' AND name LIKE '\\_pull\\_%' ESCAPE '\\'";

pub fn drop_trigger(name: &str) -> String {
    format!("DROP TRIGGER IF EXISTS {}", q(name))
}

/// JSON value expression of one column of `NEW`/`OLD`.
fn json_value(rec: &str, name: &str, ty: ColumnType) -> String {
    let c = format!("{rec}.{}", q(name));
    match ty {
        ColumnType::Blob => format!("CASE WHEN {c} IS NULL THEN NULL ELSE hex({c}) END"),
        _ => c,
    }
}

pub(crate) fn json_object(rec: &str, table: &Table, cols: &[&str]) -> String {
    let args: Vec<String> = cols
        .iter()
        .map(|name| {
            let ty = table.column(name).expect("catalogue column").ty;
            format!("{}, {}", lit(name), json_value(rec, name, ty))
        })
        .collect();
    format!("json_object({})", args.join(", "))
}

pub(crate) fn pk_object(rec: &str, table: &Table) -> String {
    let keys: Vec<&str> = table.primary_key.iter().map(String::as_str).collect();
    json_object(rec, table, &keys)
}

pub(crate) fn row_object(rec: &str, table: &Table) -> String {
    let cols: Vec<&str> = table.column_names().collect();
    json_object(rec, table, &cols)
}

/// The three capture triggers of one table.
pub fn create_triggers(table: &Table) -> Vec<String> {
    create_triggers_on(table, &table.name)
}

/// The capture triggers of the file index: on [`FILES`], wire name `_files`.
pub fn create_files_triggers() -> Vec<String> {
    create_triggers_on(&crate::catalogue::files_table(), FILES)
}

/// Capture triggers on table `source`, writing changes under `table`'s (wire) name.
fn create_triggers_on(table: &Table, source: &str) -> Vec<String> {
    let t = &table.name;
    let tq = q(source);
    let tl = lit(t);
    let key_changed = table
        .primary_key
        .iter()
        .map(|k| format!("OLD.{0} IS NOT NEW.{0}", q(k)))
        .collect::<Vec<_>>()
        .join(" OR ");
    vec![
        format!(
            "CREATE TRIGGER IF NOT EXISTS {} AFTER INSERT ON {tq} BEGIN \
             INSERT INTO {CHANGES}(tbl, op, pk, row_data) VALUES ({tl}, 'I', {}, {}); END",
            q(&format!("_pull_{t}_ins")),
            pk_object("NEW", table),
            row_object("NEW", table)
        ),
        format!(
            "CREATE TRIGGER IF NOT EXISTS {} AFTER UPDATE ON {tq} BEGIN \
             INSERT INTO {CHANGES}(tbl, op, pk, row_data) SELECT {tl}, 'D', {}, NULL WHERE {key_changed}; \
             INSERT INTO {CHANGES}(tbl, op, pk, row_data) VALUES ({tl}, 'U', {}, {}); END",
            q(&format!("_pull_{t}_upd")),
            pk_object("OLD", table),
            pk_object("NEW", table),
            row_object("NEW", table)
        ),
        format!(
            "CREATE TRIGGER IF NOT EXISTS {} AFTER DELETE ON {tq} BEGIN \
             INSERT INTO {CHANGES}(tbl, op, pk, row_data) VALUES ({tl}, 'D', {}, NULL); END",
            q(&format!("_pull_{t}_del")),
            pk_object("OLD", table)
        ),
    ]
}

/// Demo schema (the catalogue's tables as a product-management application has them).
pub fn create_demo_schema(catalogue: &Catalogue) -> Vec<String> {
    super::demo_schema(catalogue, ColumnType::sqlite_type)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn triggers_name_only_catalogue_columns() {
        let cat = Catalogue::product_management();
        let sql = create_triggers(cat.table("products").unwrap()).join("\n");
        assert!(sql.contains("'unit_price', NEW.\"unit_price\""));
        assert!(sql.contains("OLD.\"product_id\" IS NOT NEW.\"product_id\""));
        assert_eq!(sql.matches("CREATE TRIGGER").count(), 3);
    }

    #[test]
    fn file_index_is_captured_as_files() {
        let sql = create_files_triggers().join("\n");
        assert!(sql.contains("AFTER INSERT ON \"_pull_files\""));
        assert!(sql.contains("VALUES ('_files', 'I'"));
        assert!(sql.contains("\"_pull__files_del\""));
    }
}
