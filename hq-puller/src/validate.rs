//! Validation of a fetched batch before anything touches HQ. Every violation is a
//! permanent error naming the problem: the location is paused and nothing is applied.
//!
//! Values stay JSON text throughout (never parsed into Rust numbers); only the object
//! *keys* of the primary key and row image are inspected.

use crate::error::{Error, Result};
use schemas::files::{FileKey, FileRow, FILES_TABLE};
use schemas::wire::{Change, ChangesResponse, Op, PROTOCOL_VERSION};
use schemas::{Catalogue, Cursor};
use serde_json::value::RawValue;
use std::collections::{BTreeMap, HashSet};
use uuid::Uuid;

/// One change, checked against the catalogue, ready for the apply.
#[derive(Debug)]
pub struct Checked<'a> {
    /// Index of the table in the catalogue (apply order).
    pub table: usize,
    /// Canonical text of the primary key (key columns in catalogue order).
    pub key: String,
    pub seq: i64,
    pub deleted: bool,
    /// The JSON object applied: the row image, or the pk object for a delete.
    pub image: &'a str,
}

/// A file event (wire table `_files`), checked: safe relative path, strict shape.
#[derive(Debug, Clone)]
pub struct FileEvent {
    pub seq: i64,
    pub path: String,
    /// `None` for a delete.
    pub row: Option<FileRow>,
}

/// A batch that passed every check.
#[derive(Debug)]
pub struct CheckedBatch<'a> {
    pub changes: Vec<Checked<'a>>,
    /// File events, in stream order.
    pub files: Vec<FileEvent>,
}

/// A path for an error message: quoted, control characters escaped, cut at 200 chars.
fn show_path(p: &str) -> String {
    format!("{:?}", p.chars().take(200).collect::<String>())
}

/// Checks one `_files` event strictly: pk exactly `{"path"}`, row exactly
/// `{"path","size","sha256","mtime"}` with the same path, a lowercase hex sha256, a
/// size >= 0, and a safe relative path (see [`schemas::files::check_path`]).
fn check_file_event(c: &Change) -> std::result::Result<FileEvent, String> {
    let seq = c.seq;
    let key: FileKey = serde_json::from_str(c.pk.get()).map_err(|e| {
        format!("change seq {seq}: file event pk must be exactly {{\"path\": text}}: {e}")
    })?;
    if let Err(why) = schemas::files::check_path(&key.path) {
        return Err(format!(
            "change seq {seq}: file path {} refused: {why}",
            show_path(&key.path)
        ));
    }
    let row = match (c.op, &c.row) {
        (Op::Delete, None) => None,
        (Op::Delete, Some(_)) => {
            return Err(format!("change seq {seq}: a delete must have row null"))
        }
        (_, None) => return Err(format!("change seq {seq}: file event has no row image")),
        (_, Some(r)) => {
            let row: FileRow = serde_json::from_str(r.get()).map_err(|e| {
                format!("change seq {seq}: file event row must be exactly {{path, size, sha256, mtime}}: {e}")
            })?;
            if row.path != key.path {
                return Err(format!(
                    "change seq {seq}: file row path {} differs from its pk {}",
                    show_path(&row.path),
                    show_path(&key.path)
                ));
            }
            if !schemas::files::is_sha256_hex(&row.sha256) {
                return Err(format!(
                    "change seq {seq}: file {}: sha256 is not 64 lowercase hex characters",
                    show_path(&key.path)
                ));
            }
            if row.size < 0 {
                return Err(format!(
                    "change seq {seq}: file {}: negative size",
                    show_path(&key.path)
                ));
            }
            Some(row)
        }
    };
    Ok(FileEvent {
        seq,
        path: key.path,
        row,
    })
}

/// What HQ knows about the location before this batch.
#[derive(Debug, Clone, Default)]
pub struct Expected {
    pub location: String,
    /// The cursor we sent as `after` (the stored cursor).
    pub after: Option<Cursor>,
    /// The instance id stored with the cursor.
    pub instance_id: Option<Uuid>,
}

fn object<'a>(what: &str, seq: i64, raw: &'a RawValue) -> Result<BTreeMap<String, &'a RawValue>> {
    serde_json::from_str::<BTreeMap<String, &'a RawValue>>(raw.get())
        .map_err(|_| Error::permanent(format!("change seq {seq}: {what} is not a JSON object")))
}

pub fn check<'a>(
    resp: &'a ChangesResponse,
    expected: &Expected,
    catalogue: &Catalogue,
) -> Result<CheckedBatch<'a>> {
    let bad = |m: String| {
        Err(Error::permanent(format!(
            "listener sent an invalid batch: {m}"
        )))
    };
    if resp.protocol != PROTOCOL_VERSION {
        return bad(format!(
            "protocol version {} (this hq-puller speaks {PROTOCOL_VERSION})",
            resp.protocol
        ));
    }
    if resp.location != expected.location {
        return bad(format!(
            "batch is for location {:?}, configured location is {:?} (wrong url or token?)",
            clip(&resp.location),
            expected.location
        ));
    }
    if resp.after != expected.after {
        return bad(format!(
            "batch starts after {} but our cursor is {}",
            show(resp.after.as_ref()),
            show(expected.after.as_ref())
        ));
    }
    if resp.next.instance_id != resp.instance_id {
        return bad(format!(
            "next cursor belongs to instance {} but the response is from instance {}",
            resp.next.instance_id, resp.instance_id
        ));
    }
    if let Some(stored) = expected.instance_id {
        if stored != resp.instance_id {
            return Err(Error::resync(format!(
                "branch pull-area instance changed from {stored} to {} (re-installed or replaced branch database)",
                resp.instance_id
            )));
        }
    }
    if let Some(after) = &resp.after {
        if after.instance_id != resp.instance_id {
            return bad(format!(
                "after cursor belongs to instance {} but the response is from instance {}",
                after.instance_id, resp.instance_id
            ));
        }
        if resp.next.tick < after.tick || (resp.next.tick == after.tick && !resp.changes.is_empty())
        {
            return bad(format!(
                "cursor goes backwards: next tick {} is not after tick {}",
                resp.next.tick, after.tick
            ));
        }
        if resp.next.tick == after.tick && resp.next.tick_uuid != after.tick_uuid {
            return bad(format!("tick {} changed its uuid", after.tick));
        }
    }
    let mut seqs = HashSet::with_capacity(resp.changes.len());
    let mut out = Vec::with_capacity(resp.changes.len());
    let mut files = Vec::new();
    // Sequences are not required to increase: on a PostgreSQL branch a transaction that
    // drew lower sequence numbers can commit later, into a later window of the same
    // batch (the apply keeps the newest sequence per key). Duplicates are refused.
    for c in &resp.changes {
        if !seqs.insert(c.seq) {
            return bad(format!("duplicate seq {} in one batch", c.seq));
        }
        if c.table == FILES_TABLE {
            files.push(
                check_file_event(c).map_err(|m| {
                    Error::permanent(format!("listener sent an invalid batch: {m}"))
                })?,
            );
            continue;
        }
        let Some(ti) = catalogue.tables.iter().position(|t| t.name == c.table) else {
            return bad(format!(
                "change seq {}: unknown table {:?} (not in the catalogue)",
                c.seq,
                c.table.chars().take(64).collect::<String>()
            ));
        };
        let table = &catalogue.tables[ti];
        let pk = object("pk", c.seq, &c.pk)?;
        let pk_cols: Vec<&str> = pk.keys().map(String::as_str).collect();
        let mut want: Vec<&str> = table.primary_key.iter().map(String::as_str).collect();
        want.sort_unstable();
        if pk_cols != want {
            return bad(format!(
                "change seq {}: pk of table {} has columns {:?}, expected exactly {:?}",
                c.seq,
                table.name,
                pk_cols.iter().take(8).map(|k| clip(k)).collect::<Vec<_>>(),
                want
            ));
        }
        for (k, v) in &pk {
            if v.get().trim() == "null" {
                return bad(format!(
                    "change seq {}: pk column {}.{k} is null",
                    c.seq, table.name
                ));
            }
        }
        let key = table
            .primary_key
            .iter()
            .map(|k| pk[k].get().trim())
            .collect::<Vec<_>>()
            .join("\u{1f}");
        let (deleted, image) = match (c.op, &c.row) {
            (Op::Delete, None) => (true, c.pk.get()),
            (Op::Delete, Some(_)) => {
                return bad(format!("change seq {}: a delete must have row null", c.seq))
            }
            (_, None) => {
                return bad(format!(
                    "change seq {}: {} on {} has no row image",
                    c.seq,
                    c.op.as_code(),
                    table.name
                ))
            }
            (_, Some(row)) => {
                let r = object("row", c.seq, row)?;
                for col in r.keys() {
                    if table.column(col).is_none() {
                        return bad(format!(
                            "change seq {}: unknown column {}.{} (not in the catalogue)",
                            c.seq,
                            table.name,
                            col.chars().take(64).collect::<String>()
                        ));
                    }
                }
                for k in &table.primary_key {
                    match r.get(k) {
                        None => {
                            return bad(format!(
                                "change seq {}: row of {} lacks key column {k}",
                                c.seq, table.name
                            ))
                        }
                        Some(v) if v.get().trim() != pk[k].get().trim() => {
                            return bad(format!(
                                "change seq {}: row of {} has key {k} = {} but pk says {}",
                                c.seq,
                                table.name,
                                clip(v.get()),
                                clip(pk[k].get())
                            ))
                        }
                        _ => {}
                    }
                }
                (false, row.get())
            }
        };
        out.push(Checked {
            table: ti,
            key,
            seq: c.seq,
            deleted,
            image,
        });
    }
    Ok(CheckedBatch {
        changes: out,
        files,
    })
}

/// At most 64 characters of a value from the wire, for messages.
fn clip(s: &str) -> String {
    let mut out: String = s.chars().take(64).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}

fn show(c: Option<&Cursor>) -> String {
    c.map(|c| c.to_string()).unwrap_or_else(|| "(start)".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    fn resp(changes: &str) -> ChangesResponse {
        let i = Uuid::nil();
        serde_json::from_str(&format!(
            r#"{{"protocol":1,"location":"b01","instance_id":"{i}","time_zone":"UTC","after":null,
            "next":"{i}:2:{i}","more":false,"limit":10,"limit_clamped":false,"backlog":0,"changes":[{changes}]}}"#
        ))
        .unwrap()
    }
    fn exp() -> Expected {
        Expected {
            location: "b01".into(),
            ..Default::default()
        }
    }
    fn err(changes: &str) -> String {
        let r = resp(changes);
        let e = check(&r, &exp(), &Catalogue::product_management()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Permanent);
        e.to_string()
    }
    const TS: &str = r#""ts":"2026-01-01T00:00:00Z""#;

    #[test]
    fn good_batch_passes() {
        let r = resp(&format!(
            r#"{{"seq":1,"table":"inventory","op":"I","pk":{{"product_id":1}},"row":{{"product_id":1,"quantity_on_hand":5}},{TS}}},
               {{"seq":2,"table":"inventory","op":"D","pk":{{"product_id":1}},"row":null,{TS}}}"#
        ));
        let b = check(&r, &exp(), &Catalogue::product_management()).unwrap();
        assert_eq!(b.changes.len(), 2);
        assert!(b.changes[1].deleted);
        assert_eq!(b.changes[0].key, b.changes[1].key);
    }

    #[test]
    fn violations_name_the_problem() {
        assert!(err(&format!(
            r#"{{"seq":1,"table":"nope","op":"D","pk":{{"id":1}},"row":null,{TS}}}"#
        ))
        .contains("unknown table \"nope\""));
        assert!(err(&format!(r#"{{"seq":1,"table":"inventory","op":"I","pk":{{"product_id":1}},"row":{{"product_id":1,"colour":1}},{TS}}}"#)).contains("unknown column inventory.colour"));
        assert!(err(&format!(
            r#"{{"seq":1,"table":"inventory","op":"D","pk":{{"sku":1}},"row":null,{TS}}}"#
        ))
        .contains("pk of table inventory"));
        assert!(err(&format!(r#"{{"seq":1,"table":"inventory","op":"D","pk":{{"product_id":1}},"row":null,{TS}}},{{"seq":1,"table":"inventory","op":"D","pk":{{"product_id":2}},"row":null,{TS}}}"#)).contains("duplicate seq 1"));
        assert!(err(&format!(
            r#"{{"seq":1,"table":"inventory","op":"U","pk":{{"product_id":1}},"row":null,{TS}}}"#
        ))
        .contains("no row image"));
        assert!(err(&format!(r#"{{"seq":1,"table":"inventory","op":"D","pk":{{"product_id":1}},"row":{{"product_id":1}},{TS}}}"#)).contains("row null"));
        assert!(err(&format!(r#"{{"seq":1,"table":"inventory","op":"I","pk":{{"product_id":1}},"row":{{"product_id":2}},{TS}}}"#)).contains("pk says"));
    }

    /// Timestamps are information, never a reason to refuse: a branch clock minutes
    /// ahead or behind HQ's changes nothing, and the lag is never negative.
    #[test]
    fn branch_clock_skew_is_accepted_and_lag_is_sane() {
        let future = (chrono::Utc::now() + chrono::Duration::minutes(30)).to_rfc3339();
        let past = (chrono::Utc::now() - chrono::Duration::minutes(30)).to_rfc3339();
        let mut r = resp(&format!(
            r#"{{"seq":1,"table":"inventory","op":"D","pk":{{"product_id":1}},"row":null,"ts":"{future}"}},
               {{"seq":2,"table":"inventory","op":"D","pk":{{"product_id":2}},"row":null,"ts":"{past}"}}"#
        ));
        assert_eq!(
            check(&r, &exp(), &Catalogue::product_management())
                .unwrap()
                .changes
                .len(),
            2
        );
        r.more = true;
        assert_eq!(
            crate::apply::lag_seconds(&r),
            0.0,
            "a future ts gives no lag"
        );
        r.changes.remove(0);
        let lag = crate::apply::lag_seconds(&r);
        assert!((1700.0..1900.0).contains(&lag), "{lag}");
        r.more = false;
        assert_eq!(crate::apply::lag_seconds(&r), 0.0, "caught up: no lag");
    }

    #[test]
    fn file_events_are_checked_strictly() {
        let sha = "ab".repeat(32);
        let row = |p: &str| {
            format!(r#"{{"path":"{p}","size":3,"sha256":"{sha}","mtime":"2026-01-01T00:00:00Z"}}"#)
        };
        let ev = |op: &str, pk: &str, row: &str| {
            format!(r#"{{"seq":1,"table":"_files","op":"{op}","pk":{pk},"row":{row},{TS}}}"#)
        };
        let r = resp(&format!(
            "{},{}",
            ev("I", r#"{"path":"dir/ä b.jpg"}"#, &row("dir/ä b.jpg")),
            ev("D", r#"{"path":"x"}"#, "null").replace("\"seq\":1", "\"seq\":2")
        ));
        let b = check(&r, &exp(), &Catalogue::product_management()).unwrap();
        assert_eq!(b.changes.len(), 0);
        assert_eq!(b.files.len(), 2);
        assert_eq!(b.files[0].path, "dir/ä b.jpg");
        assert!(b.files[1].row.is_none());
        for (pk, row, want) in [
            (
                r#"{"path":"../etc/passwd"}"#,
                "null".to_string(),
                "\"../etc/passwd\" refused",
            ),
            (r#"{"path":"/etc/passwd"}"#, "null".to_string(), "absolute"),
            (r#"{"path":"a\u0000b"}"#, "null".to_string(), "NUL"),
            (r#"{"path":"a//b"}"#, "null".to_string(), "empty component"),
            (r#"{"path":"a","x":1}"#, "null".to_string(), "exactly"),
            (r#"{"path":"a"}"#, row("b"), "differs"),
            (r#"{"path":"a"}"#, row("a").replace(&sha, "XYZ"), "sha256"),
            (
                r#"{"path":"a"}"#,
                row("a").replace("\"size\":3", "\"size\":-1"),
                "negative",
            ),
            (
                r#"{"path":"a"}"#,
                row("a").replace("}", ",\"owner\":1}"),
                "exactly",
            ),
        ] {
            let op = if row == "null" { "D" } else { "U" };
            let e = err(&ev(op, pk, &row));
            assert!(e.contains(want), "{pk} {row}: {e}");
        }
    }

    #[test]
    fn wrong_location_and_cursor_are_refused() {
        let r = resp("");
        let mut e = exp();
        e.location = "b02".into();
        assert!(check(&r, &e, &Catalogue::product_management())
            .unwrap_err()
            .to_string()
            .contains("configured location is \"b02\""));
        let e = Expected {
            location: "b01".into(),
            after: Some(format!("{0}:1:{0}", Uuid::nil()).parse().unwrap()),
            instance_id: None,
        };
        assert!(check(&r, &e, &Catalogue::product_management())
            .unwrap_err()
            .to_string()
            .contains("our cursor is"));
        let e = Expected {
            location: "b01".into(),
            after: None,
            instance_id: Some(Uuid::new_v4()),
        };
        let err = check(&r, &e, &Catalogue::product_management()).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NeedsResync);
        assert!(err.to_string().contains("instance changed"));
    }
}
