//! Canonical values and row hashes: the one definition of "equal" shared by
//! `branch-listener` (`/v1/checksums`), `hq-puller verify` and the test oracle.
//!
//! Both sides hand a row image (the JSON object the capture triggers and the snapshot
//! produce, or HQ's `json_build_object` of a mirror row) to [`canonical_row`], which
//! brings each catalogue column to a canonical text per column type:
//! - integer: the decimal text;
//! - numeric: decimal text without insignificant zeros (`19.9` == `19.90` == `1.99e1`),
//!   read from the JSON text (never through a float);
//! - timestamp: the instant in UTC with microseconds (`2026-11-24T06:31:03.123000Z`).
//!   Zone-less text (SQLite branches) is read in the branch's zone, as PostgreSQL reads it
//!   at apply (an ambiguous local time takes the offset after the transition, a skipped
//!   one the offset before it); text with an offset is read as such;
//! - boolean: `true`/`false` (SQLite's 0/1 included); real: Rust's shortest exact form;
//!   blob: lowercase hex; text as it is; NULL stays distinct from the empty string.
//!
//! A value of the wrong JSON kind for its column keeps its raw JSON text behind a `?`,
//! so it compares unequal instead of failing.

use crate::catalogue::{ColumnType, Table};
use chrono::{DateTime, LocalResult, NaiveDateTime, TimeZone, Utc};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use std::collections::HashMap;

/// A time zone in which zone-less timestamps are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Zone(chrono_tz::Tz);

impl Zone {
    pub const UTC: Zone = Zone(chrono_tz::UTC);

    /// Parses an IANA zone name (`Europe/Berlin`, `UTC`).
    pub fn parse(name: &str) -> Option<Zone> {
        name.parse::<chrono_tz::Tz>().ok().map(Zone)
    }

    /// The instant of a local time in this zone, the way PostgreSQL resolves it.
    fn instant(&self, local: NaiveDateTime) -> DateTime<Utc> {
        match self.0.from_local_datetime(&local) {
            LocalResult::Single(t) => t.with_timezone(&Utc),
            // Fall back: the offset in force just after the transition.
            LocalResult::Ambiguous(_, later) => later.with_timezone(&Utc),
            // Spring forward: the offset in force just before the transition.
            LocalResult::None => {
                let before = local - chrono::Duration::hours(3);
                let offset = match self.0.from_local_datetime(&before) {
                    LocalResult::Single(t) | LocalResult::Ambiguous(t, _) => {
                        t.offset().fix().local_minus_utc()
                    }
                    LocalResult::None => 0,
                };
                Utc.from_utc_datetime(&(local - chrono::Duration::seconds(i64::from(offset))))
            }
        }
    }
}

use chrono::Offset;

/// Decimal text in canonical form; `None` if `s` is not a decimal number.
pub fn canonical_decimal(s: &str) -> Option<String> {
    let s = s.trim();
    let (neg, body) = match s.as_bytes().first()? {
        b'-' => (true, &s[1..]),
        b'+' => (false, &s[1..]),
        _ => (false, s),
    };
    let (mantissa, exp) = match body.find(['e', 'E']) {
        Some(i) => (&body[..i], body[i + 1..].parse::<i64>().ok()?),
        None => (body, 0),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if int.is_empty() && frac.is_empty() {
        return None;
    }
    if !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
        return None;
    }
    if exp.abs() > 1000 {
        return None;
    }
    // digits * 10^(exp - frac.len())
    let digits: String = format!("{int}{frac}");
    let point = int.len() as i64 + exp; // position of the decimal point in `digits`
    let digits = digits.trim_start_matches('0');
    let lead_zeros = (int.len() + frac.len()) as i64 - digits.len() as i64;
    let point = point - lead_zeros;
    let digits = digits.to_string();
    if digits.is_empty() {
        return Some("0".into());
    }
    let (i, f) = if point <= 0 {
        (
            "0".to_string(),
            format!("{}{}", "0".repeat((-point) as usize), digits),
        )
    } else if point as usize >= digits.len() {
        (
            format!("{}{}", digits, "0".repeat(point as usize - digits.len())),
            String::new(),
        )
    } else {
        (
            digits[..point as usize].to_string(),
            digits[point as usize..].to_string(),
        )
    };
    let f = f.trim_end_matches('0');
    let mut out = String::new();
    if neg {
        out.push('-');
    }
    out.push_str(&i);
    if !f.is_empty() {
        out.push('.');
        out.push_str(f);
    }
    Some(out)
}

/// `true`/`false` for the spellings of both engines (`1`, `t`, `true`, ...).
pub fn canonical_bool(s: &str) -> String {
    match s.trim().to_ascii_lowercase().as_str() {
        "1" | "t" | "true" => "true".into(),
        "0" | "f" | "false" => "false".into(),
        other => other.to_string(),
    }
}

const INSTANT: &str = "%Y-%m-%dT%H:%M:%S%.6fZ";

/// A timestamp text as a canonical UTC instant; `None` if it is not a timestamp.
pub fn canonical_instant(s: &str, zone: Zone) -> Option<String> {
    let s = s.trim();
    // With an offset: RFC 3339 (`T` or space), PostgreSQL's `+00` short offsets.
    for cand in [s.to_string(), format!("{s}:00")] {
        if let Ok(t) = DateTime::parse_from_rfc3339(&cand.replacen(' ', "T", 1)) {
            return Some(t.with_timezone(&Utc).format(INSTANT).to_string());
        }
    }
    for f in [
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M",
        "%Y-%m-%d %H:%M",
    ] {
        if let Ok(local) = NaiveDateTime::parse_from_str(s, f) {
            return Some(zone.instant(local).format(INSTANT).to_string());
        }
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        let local = d.and_hms_opt(0, 0, 0)?;
        return Some(zone.instant(local).format(INSTANT).to_string());
    }
    None
}

/// The canonical text of one JSON value of a column of type `ty` (`None`: NULL).
pub fn canonical_value(raw: &str, ty: ColumnType, zone: Zone) -> Option<String> {
    let raw = raw.trim();
    if raw == "null" {
        return None;
    }
    let odd = || Some(format!("?{raw}"));
    let string = || serde_json::from_str::<String>(raw).ok();
    let is_number = raw
        .as_bytes()
        .first()
        .is_some_and(|b| b.is_ascii_digit() || *b == b'-');
    match ty {
        ColumnType::Integer | ColumnType::Numeric { .. } if is_number => {
            canonical_decimal(raw).or_else(odd)
        }
        ColumnType::Real if is_number => match raw.parse::<f64>() {
            Ok(x) => Some(format!("{x:?}")),
            Err(_) => odd(),
        },
        ColumnType::Boolean => match raw {
            "true" | "1" => Some("true".into()),
            "false" | "0" => Some("false".into()),
            _ => odd(),
        },
        ColumnType::Timestamp => match string() {
            Some(s) => canonical_instant(&s, zone).or_else(odd),
            None => odd(),
        },
        ColumnType::Blob => match string() {
            Some(s) => Some(s.to_ascii_lowercase()),
            None => odd(),
        },
        ColumnType::Text => string().or_else(odd),
        _ => odd(),
    }
}

/// One row brought to canonical form: its key text and its values in catalogue order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanonicalRow {
    /// `k1=v1,k2=v2` of the primary key (canonical values).
    pub key: String,
    pub values: Vec<Option<String>>,
}

/// Error of [`canonical_row`]: the image is not a JSON object.
#[derive(Debug, thiserror::Error)]
#[error("row image of table {table} is not a JSON object: {message}")]
pub struct RowError {
    pub table: String,
    pub message: String,
}

/// Brings a row image (JSON object text) to canonical form. Columns missing from the
/// image are NULL; keys that are not catalogue columns are ignored.
pub fn canonical_row(table: &Table, image: &str, zone: Zone) -> Result<CanonicalRow, RowError> {
    let obj: HashMap<&str, &RawValue> = serde_json::from_str(image).map_err(|e| RowError {
        table: table.name.clone(),
        message: e.to_string(),
    })?;
    let values: Vec<Option<String>> = table
        .columns
        .iter()
        .map(|c| {
            obj.get(c.name.as_str())
                .and_then(|v| canonical_value(v.get(), c.ty, zone))
        })
        .collect();
    Ok(CanonicalRow {
        key: key_text(table, &values),
        values,
    })
}

/// `k1=v1,k2=v2` of the primary key of canonical `values` (catalogue order).
pub fn key_text(table: &Table, values: &[Option<String>]) -> String {
    table
        .primary_key
        .iter()
        .map(|k| {
            let v = table
                .columns
                .iter()
                .position(|c| &c.name == k)
                .and_then(|i| values.get(i).cloned().flatten());
            format!("{k}={}", v.as_deref().unwrap_or("NULL"))
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Hash of a sequence of canonical rows (in key order): sha256 over each row's values
/// as a JSON array and a newline, first 16 bytes in hex.
#[derive(Default)]
pub struct RowHasher {
    h: Sha256,
    rows: u64,
}

impl RowHasher {
    pub fn new() -> RowHasher {
        RowHasher::default()
    }

    pub fn add(&mut self, row: &CanonicalRow) {
        self.h.update(
            serde_json::to_string(&row.values)
                .expect("strings serialize")
                .as_bytes(),
        );
        self.h.update(b"\n");
        self.rows += 1;
    }

    pub fn rows(&self) -> u64 {
        self.rows
    }

    pub fn finish(self) -> String {
        hex::encode(&self.h.finalize()[..16])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Catalogue;

    #[test]
    fn decimals_compare_by_value() {
        for (a, b) in [
            ("19.9", "19.90"),
            ("20", "20.00"),
            ("0.05", "000.0500"),
            ("-1.50", "-1.5"),
            ("1.99e1", "19.9"),
            ("1.0e+15", "1000000000000000"),
            ("12345678901.23", "12345678901.230"),
            ("0", "0.00"),
            ("5e-3", "0.005"),
        ] {
            assert_eq!(canonical_decimal(a), canonical_decimal(b), "{a} vs {b}");
        }
        assert_ne!(canonical_decimal("19.9"), canonical_decimal("19.09"));
        assert_eq!(canonical_decimal("abc"), None);
        assert_eq!(canonical_decimal("-0.10").as_deref(), Some("-0.1"));
        assert_eq!(canonical_bool("1"), "true");
        assert_eq!(canonical_bool("f"), "false");
    }

    #[test]
    fn instants_are_read_in_the_zone_unless_they_carry_an_offset() {
        let ny = Zone::parse("America/New_York").unwrap();
        let want = Some("2026-01-15T15:30:00.250000Z".to_string());
        assert_eq!(canonical_instant("2026-01-15 10:30:00.25", ny), want);
        assert_eq!(canonical_instant("2026-01-15T10:30:00.250", ny), want);
        assert_eq!(canonical_instant("2026-01-15T15:30:00.25Z", ny), want);
        assert_eq!(canonical_instant("2026-01-15T16:30:00.25+01:00", ny), want);
        assert_eq!(canonical_instant("2026-01-15 16:30:00.25+01", ny), want);
        assert_eq!(
            canonical_instant("2026-01-15 10:30:00.25", Zone::UTC).as_deref(),
            Some("2026-01-15T10:30:00.250000Z")
        );
        // Fall back: 01:30 happens twice; PostgreSQL takes standard time (-05).
        assert_eq!(
            canonical_instant("2026-11-01 01:30:00", ny).as_deref(),
            Some("2026-11-01T06:30:00.000000Z")
        );
        // Spring forward: 02:30 does not exist; PostgreSQL reads it with -05.
        assert_eq!(
            canonical_instant("2026-03-08 02:30:00", ny).as_deref(),
            Some("2026-03-08T07:30:00.000000Z")
        );
        assert_eq!(canonical_instant("yesterday", ny), None);
    }

    #[test]
    fn rows_of_both_engines_hash_equal_and_differences_show() {
        let cat = Catalogue::product_management();
        let t = cat.table("products").unwrap();
        let z = Zone::parse("Europe/Berlin").unwrap();
        // A SQLite image (zone-less time, 0/1) and HQ's json_build_object of the same row.
        let sqlite = r#"{"product_id":9007199254740993,"sku":"A-1","name":"Zoë","description":"","category":null,"unit_price":19.9,"currency":"EUR","updated_at":"2026-06-01 12:00:00.5"}"#;
        let hq = r#"{"product_id":9007199254740993,"sku":"A-1","name":"Zoë","description":"","category":null,"unit_price":19.90,"currency":"EUR","updated_at":"2026-06-01T10:00:00.5+00:00"}"#;
        let a = canonical_row(t, sqlite, z).unwrap();
        let b = canonical_row(t, hq, z).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.key, "product_id=9007199254740993");
        let mut h1 = RowHasher::new();
        h1.add(&a);
        let mut h2 = RowHasher::new();
        h2.add(&b);
        assert_eq!(h1.finish(), h2.finish());
        // NULL and empty text differ; a cent differs; a string in a number column differs.
        let c = canonical_row(
            t,
            &hq.replace(r#""description":"""#, r#""description":null"#),
            z,
        )
        .unwrap();
        assert_ne!(a, c);
        let d = canonical_row(t, &hq.replace("19.90", "19.91"), z).unwrap();
        assert_ne!(a, d);
        let e = canonical_row(t, &hq.replace("19.90", "\"19.90\""), z).unwrap();
        assert_ne!(a, e);
        assert!(canonical_row(t, "[1]", z).is_err());
    }
}
