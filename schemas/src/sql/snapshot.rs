//! SQL of the snapshot (initial load, resync) and of verify: pages of row images in
//! primary-key order, keyset-paginated.
//!
//! A page statement returns `(row image, key image)` as JSON text, the row image holding
//! the same values as the capture triggers' (SQLite: the same expressions; PostgreSQL:
//! `row_to_json` of a sub-select, equal as `jsonb` to the trigger's `jsonb_build_object`
//! and several times cheaper, see [`postgres::json_row`]), so HQ applies snapshot rows
//! with the ordinary upsert. `after` is the key image of the last row of the previous page (a JSON
//! object of the key columns, as returned); pages are ordered by the key columns, text
//! keys in byte order (`COLLATE "C"` on PostgreSQL, SQLite's default `BINARY`), so that
//! both engines and HQ agree on the order of key ranges.
//!
//! Parameters: SQLite `?1` after (JSON text, only in the `after` variant), `?2` limit;
//! PostgreSQL `$1` after, `$2` limit. HQ reads ([`hq_range`]) take `$1` location,
//! `$2` lower bound (exclusive), `$3` upper bound (inclusive), `$4` limit.

use super::{postgres, q, sqlite};
use crate::catalogue::{ColumnType, Table};

fn keys(table: &Table) -> Vec<(&str, ColumnType)> {
    table
        .primary_key
        .iter()
        .map(|k| {
            (
                k.as_str(),
                table.column(k).expect("catalogue key column").ty,
            )
        })
        .collect()
}

/// A key column as compared and ordered on PostgreSQL (byte order for text).
fn pg_key_col(alias: &str, name: &str, ty: ColumnType) -> String {
    let c = format!("{alias}.{}", q(name));
    match ty {
        ColumnType::Text => format!("({c} COLLATE \"C\")"),
        _ => c,
    }
}

/// A key value taken from the JSON key image in parameter `param` (PostgreSQL).
fn pg_key_param(param: &str, name: &str, ty: ColumnType) -> String {
    let v = format!("({param}::jsonb ->> '{name}')");
    match ty {
        ColumnType::Text => format!("({v} COLLATE \"C\")"),
        ColumnType::Blob => format!("decode({v}, 'hex')"),
        _ => format!("CAST({v} AS {})", ty.postgres_type()),
    }
}

fn pg_key_tuple(alias: &str, table: &Table) -> String {
    let v: Vec<String> = keys(table)
        .into_iter()
        .map(|(k, ty)| pg_key_col(alias, k, ty))
        .collect();
    format!("({})", v.join(", "))
}

fn pg_param_tuple(param: &str, table: &Table) -> String {
    let v: Vec<String> = keys(table)
        .into_iter()
        .map(|(k, ty)| pg_key_param(param, k, ty))
        .collect();
    format!("({})", v.join(", "))
}

fn pg_order(alias: &str, table: &Table) -> String {
    keys(table)
        .into_iter()
        .map(|(k, ty)| pg_key_col(alias, k, ty))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A page of a SQLite branch table. `with_after`: the variant continuing after `?1`.
pub fn sqlite_page(table: &Table, with_after: bool) -> String {
    sqlite_page_from(table, &q(&table.name), with_after)
}

/// [`sqlite_page`] reading from the physical table `from` (the file index of wire
/// table `_files`: [`files_source`]).
pub fn sqlite_page_from(table: &Table, from: &str, with_after: bool) -> String {
    let cols: Vec<String> = keys(table)
        .into_iter()
        .map(|(k, _)| format!("t.{}", q(k)))
        .collect();
    let filter = if with_after {
        let params: Vec<String> = keys(table)
            .into_iter()
            .map(|(k, _)| format!("json_extract(?1, '$.{k}')"))
            .collect();
        format!("WHERE ({}) > ({})", cols.join(", "), params.join(", "))
    } else {
        String::new()
    };
    format!(
        "SELECT {row}, {pk} FROM {tbl} AS t {filter} ORDER BY {order} LIMIT ?2",
        row = sqlite::row_object("t", table),
        pk = sqlite::pk_object("t", table),
        tbl = from,
        order = cols.join(", "),
    )
}

/// A page of a PostgreSQL branch table. `with_after`: the variant continuing after `$1`.
pub fn postgres_page(table: &Table, with_after: bool) -> String {
    postgres_page_from(table, &q(&table.name), with_after)
}

/// [`postgres_page`] reading from the physical table `from`.
pub fn postgres_page_from(table: &Table, from: &str, with_after: bool) -> String {
    let all: Vec<&str> = table.column_names().collect();
    let ks: Vec<&str> = table.primary_key.iter().map(String::as_str).collect();
    let filter = if with_after {
        format!(
            "WHERE {} > {}",
            pg_key_tuple("t", table),
            pg_param_tuple("$1", table)
        )
    } else {
        "WHERE $1::text IS NULL".into()
    };
    format!(
        "SELECT ({row})::text, ({pk})::text FROM {tbl} AS t {filter} ORDER BY {order} LIMIT $2",
        row = postgres::json_row("t", table, &all),
        pk = postgres::json_row("t", table, &ks),
        tbl = from,
        order = pg_order("t", table),
    )
}

/// A string literal that reads the same whatever `standard_conforming_strings` says.
fn pg_e_lit(s: &str) -> String {
    format!("E'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
}

/// A page of a PostgreSQL branch table as `COPY (...) TO STDOUT` text (the `format=copy`
/// page, [`crate::wire::CopyRows`]): the catalogue columns in catalogue order with the
/// values of the row image (blobs as hex, reals with `-0` as `0` like `to_jsonb`). The
/// listener takes the next page's `after` from the key fields of the last line
/// ([`copy_key_image`]). `COPY` takes no parameters: `after` (a JSON object already
/// checked) and `limit` are inlined, `after` as an escaped literal.
pub fn postgres_copy_page(table: &Table, after: Option<&str>, limit: u32) -> String {
    let cols: Vec<String> = table
        .columns
        .iter()
        .map(|c| {
            let v = format!("t.{}", q(&c.name));
            match c.ty {
                ColumnType::Blob => format!("encode({v}, 'hex')"),
                ColumnType::Real => format!("CASE WHEN {v} = 0 THEN 0::float8 ELSE {v} END"),
                _ => v,
            }
        })
        .collect();
    let filter = match after {
        Some(a) => format!(
            "WHERE {} > {}",
            pg_key_tuple("t", table),
            pg_param_tuple(&pg_e_lit(a), table)
        ),
        None => String::new(),
    };
    format!(
        "COPY (SELECT {cols} FROM {tbl} AS t {filter} ORDER BY {order} LIMIT {limit}) TO STDOUT",
        cols = cols.join(", "),
        tbl = q(&table.name),
        order = pg_order("t", table),
    )
}

/// The key image (`after` of the next page) of one line of a [`postgres_copy_page`]:
/// a JSON object of the key columns, each value the field's text with `COPY`'s escapes
/// undone, as a JSON string. The page statements read key values with `->>` and cast
/// them to the column's type, so a string holding PostgreSQL's own output of the value
/// selects exactly the rows after it. `None` when the line is malformed (too few fields,
/// a bad escape, a NULL key).
pub fn copy_key_image(table: &Table, line: &[u8]) -> Option<String> {
    let fields: Vec<&[u8]> = line.split(|&b| b == b'\t').collect();
    if fields.len() != table.columns.len() {
        return None;
    }
    let mut key = serde_json::Map::new();
    for k in &table.primary_key {
        let i = table.columns.iter().position(|c| &c.name == k)?;
        key.insert(
            k.clone(),
            serde_json::Value::String(unescape_copy(fields[i])?),
        );
    }
    Some(serde_json::Value::Object(key).to_string())
}

/// One field of `COPY` text as its value (`None` for `\N` or a malformed escape).
fn unescape_copy(field: &[u8]) -> Option<String> {
    if field == b"\\N" {
        return None;
    }
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let b = field[i];
        if b != b'\\' {
            out.push(b);
            i += 1;
            continue;
        }
        out.push(match *field.get(i + 1)? {
            b'b' => 8,
            b'f' => 12,
            b'n' => b'\n',
            b'r' => b'\r',
            b't' => b'\t',
            b'v' => 11,
            b'\\' => b'\\',
            _ => return None,
        });
        i += 2;
    }
    String::from_utf8(out).ok()
}

/// Live rows of one location in `target` (`hq.<t>` or a staging table) whose key is
/// after `$2` (when `lower`) and at most `$3` (when `upper`), in key order, at most `$4`:
/// `(row image, key image)` as JSON text.
pub fn hq_range(table: &Table, target: &str, lower: bool, upper: bool) -> String {
    let all: Vec<&str> = table.column_names().collect();
    let ks: Vec<&str> = table.primary_key.iter().map(String::as_str).collect();
    let mut filter = "t.location_id = $1 AND NOT t._deleted".to_string();
    if lower {
        filter.push_str(&format!(
            " AND {} > {}",
            pg_key_tuple("t", table),
            pg_param_tuple("$2", table)
        ));
    } else {
        filter.push_str(" AND $2::text IS NULL");
    }
    if upper {
        filter.push_str(&format!(
            " AND {} <= {}",
            pg_key_tuple("t", table),
            pg_param_tuple("$3", table)
        ));
    } else {
        filter.push_str(" AND $3::text IS NULL");
    }
    format!(
        "SELECT ({row})::text, ({pk})::text FROM {target} AS t WHERE {filter} ORDER BY {order} LIMIT $4",
        row = postgres::json_row("t", table, &all),
        pk = postgres::json_row("t", table, &ks),
        order = pg_order("t", table),
    )
}

/// The physical file index behind wire table `_files`: (SQLite, PostgreSQL).
pub const fn files_source() -> (&'static str, &'static str) {
    (sqlite::FILES, "pull.files")
}

/// HQ's live file records of a location as a relation shaped like a mirror table of
/// [`crate::catalogue::files_table`] (`location_id`, the index columns, `_deleted`), for
/// [`hq_range`]'s `target`: verify compares it with the branch's index.
pub const HQ_FILES_RELATION: &str = "(SELECT location_id, path, size, sha256, mtime, \
     deleted AS _deleted FROM sync.files)";

/// The staging table of `table` used by a resync.
pub fn stage_table(table: &Table) -> String {
    format!("hq_stage.{}", q(&table.name))
}

/// DDL of the staging table of `table`: the mirror table's columns and key, unlogged
/// (a crashed resync restarts its staging, nothing there needs to survive a crash of
/// HQ's PostgreSQL).
pub fn create_stage_table(table: &Table) -> Vec<String> {
    vec![
        "CREATE SCHEMA IF NOT EXISTS hq_stage".into(),
        format!(
            "CREATE UNLOGGED TABLE IF NOT EXISTS {} (LIKE {} INCLUDING DEFAULTS INCLUDING INDEXES)",
            stage_table(table),
            super::hq::mirror_table(table)
        ),
    ]
}

/// The switch of a resync, for one table: the location's rows are replaced by the staged
/// ones (`$1`: location). Run in one transaction with the cursor update.
pub fn switch_from_stage(table: &Table) -> Vec<String> {
    let mut cols: Vec<String> = vec!["location_id".into()];
    cols.extend(table.columns.iter().map(|c| q(&c.name)));
    cols.extend(["_seq".into(), "_deleted".into(), "_applied_at".into()]);
    let cols = cols.join(", ");
    vec![
        format!(
            "DELETE FROM {} WHERE location_id = $1",
            super::hq::mirror_table(table)
        ),
        format!(
            "INSERT INTO {} ({cols}) SELECT {cols} FROM {} WHERE location_id = $1",
            super::hq::mirror_table(table),
            stage_table(table)
        ),
        format!("DELETE FROM {} WHERE location_id = $1", stage_table(table)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Catalogue;

    #[test]
    fn pages_are_keyset_paginated_in_key_order() {
        let cat = Catalogue::product_management();
        let t = cat.table("products").unwrap();
        let s = sqlite_page(t, true);
        assert!(s.contains("WHERE (t.\"product_id\") > (json_extract(?1, '$.product_id'))"));
        assert!(s.contains("ORDER BY t.\"product_id\" LIMIT ?2"));
        assert!(!sqlite_page(t, false).contains("WHERE"));
        let p = postgres_page(t, true);
        assert!(p.contains("CAST(($1::jsonb ->> 'product_id') AS bigint)"));
        let h = hq_range(t, "hq.\"products\"", true, true);
        assert!(h.contains("NOT t._deleted") && h.contains("<= (CAST(($3::jsonb"));
        let text_key = Table {
            name: "x".into(),
            primary_key: vec!["a".into(), "b".into()],
            columns: vec![
                crate::Column {
                    name: "a".into(),
                    ty: ColumnType::Text,
                    nullable: false,
                },
                crate::Column {
                    name: "b".into(),
                    ty: ColumnType::Integer,
                    nullable: false,
                },
            ],
            file_column: None,
        };
        let c = postgres_copy_page(t, Some(r#"{"product_id":7}"#), 5);
        assert!(c.starts_with("COPY (SELECT t.\"product_id\", "), "{c}");
        assert!(
            c.contains("> (CAST((E'{\"product_id\":7}'::jsonb ->> 'product_id') AS bigint))"),
            "{c}"
        );
        assert!(
            c.ends_with("ORDER BY t.\"product_id\" LIMIT 5) TO STDOUT"),
            "{c}"
        );
        assert_eq!(pg_e_lit(r"a'b\c"), r"E'a''b\\c'");
        // The next page's `after` from the last line: key fields as JSON strings.
        assert!(!c.contains("row_to_json"), "no key image per row: {c}");
        let img = copy_key_image(&text_key, b"x\\ty\\\\z\t42");
        assert_eq!(img.as_deref(), Some(r#"{"a":"x\ty\\z","b":"42"}"#));
        assert_eq!(copy_key_image(&text_key, b"\\N\t1"), None, "NULL key");
        assert_eq!(copy_key_image(&text_key, b"a"), None, "a field short");
        assert_eq!(
            copy_key_image(&text_key, b"a\t1\t2"),
            None,
            "a field too many"
        );
        assert_eq!(copy_key_image(&text_key, b"a\\q\t1"), None, "bad escape");
        let p = postgres_page(&text_key, true);
        assert!(
            p.contains("ORDER BY (t.\"a\" COLLATE \"C\"), t.\"b\""),
            "{p}"
        );
    }
}
