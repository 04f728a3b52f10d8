//! The files pull area's shared contract: the reserved wire table `_files`, the shape of
//! its events, and the path and checksum rules both ends enforce.
//!
//! The listener keeps an index of its `files_dir` in the branch database (SQLite
//! `_pull_files`, PostgreSQL `pull.files`). Capture triggers generated from
//! [`crate::catalogue::files_table`] write its inserts, updates and deletes into the
//! change log under the table name [`FILES_TABLE`], so file events share sequences,
//! ticks and windows with the row changes:
//!
//! - pk: `{"path": "<relative path>"}`
//! - row: `{"path", "size", "sha256", "mtime"}` ([`FileRow`]); `null` for a delete.
//!
//! Paths are relative to `files_dir`, `/`-separated, valid UTF-8 (see [`check_path`]).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The reserved wire table name of file events.
pub const FILES_TABLE: &str = "_files";

/// Longest relative path accepted (bytes).
pub const MAX_PATH_BYTES: usize = 4096;

/// The row image of a file event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRow {
    pub path: String,
    pub size: i64,
    pub sha256: String,
    pub mtime: DateTime<Utc>,
}

/// The primary key of a file event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileKey {
    pub path: String,
}

/// Checks a relative file path from the wire or the folder: not empty, not absolute, no
/// NUL or other control characters, no empty, `.` or `..` components, at most
/// [`MAX_PATH_BYTES`]. The error says what is wrong (the path itself is not repeated).
pub fn check_path(path: &str) -> Result<(), &'static str> {
    if path.is_empty() {
        return Err("the path is empty");
    }
    if path.len() > MAX_PATH_BYTES {
        return Err("the path is too long");
    }
    if path.starts_with('/') {
        return Err("the path is absolute");
    }
    if path.chars().any(char::is_control) {
        return Err("the path contains NUL or control characters");
    }
    for c in path.split('/') {
        match c {
            "" => return Err("the path has an empty component"),
            "." | ".." => return Err("the path has a '.' or '..' component"),
            _ => {}
        }
    }
    Ok(())
}

/// Whether `s` is a sha256 in lowercase hex (64 characters).
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A file's mtime as stored in the index: UTC, truncated to microseconds (PostgreSQL's
/// precision, so both backends compare equal).
pub fn index_mtime(t: std::time::SystemTime) -> DateTime<Utc> {
    let t: DateTime<Utc> = t.into();
    let micros = t.timestamp_micros();
    DateTime::from_timestamp_micros(micros).unwrap_or(t)
}

/// The text form of an index mtime on SQLite (`2026-11-24T09:16:44.123456Z`).
pub fn mtime_text(t: &DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

/// Feeds everything `r` yields into `h` with a fixed buffer (bounded memory); returns
/// the bytes read (blocking). The one streaming hash of file contents: the listener's
/// index and HQ's resumed downloads.
pub fn hash_into(r: &mut impl std::io::Read, h: &mut sha2::Sha256) -> std::io::Result<u64> {
    use sha2::Digest;
    let mut buf = vec![0u8; 256 * 1024];
    let mut n = 0u64;
    loop {
        let k = r.read(&mut buf)?;
        if k == 0 {
            return Ok(n);
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        for ok in [
            "a.jpg",
            "dir/b c.png",
            "ümlaut/日本.jpg",
            "a..b",
            ".hidden/x",
        ] {
            assert_eq!(check_path(ok), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("", "empty"),
            ("/etc/passwd", "absolute"),
            ("../x", "'..'"),
            ("a/../../x", "'..'"),
            ("a//b", "empty component"),
            ("a/", "empty component"),
            ("./a", "'.'"),
            ("a\0b", "NUL"),
        ] {
            let e = check_path(bad).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
        assert!(check_path(&"a/".repeat(3000)).is_err());
    }

    #[test]
    fn sha_and_rows() {
        assert!(is_sha256_hex(&"ab".repeat(32)));
        assert!(!is_sha256_hex(&"AB".repeat(32)));
        assert!(!is_sha256_hex("abc"));
        let r: FileRow = serde_json::from_str(
            r#"{"path":"a b.jpg","size":3,"sha256":"x","mtime":"2026-11-24T09:16:44.123456Z"}"#,
        )
        .unwrap();
        assert_eq!(mtime_text(&r.mtime), "2026-11-24T09:16:44.123456Z");
        let pg: FileRow = serde_json::from_str(
            r#"{"path":"a","size":3,"sha256":"x","mtime":"2026-11-24T10:16:44.123456+01:00"}"#,
        )
        .unwrap();
        assert_eq!(pg.mtime, r.mtime);
        assert!(serde_json::from_str::<FileRow>(
            r#"{"path":"a","size":3,"sha256":"x","mtime":"2026-11-24T09:16:44Z","x":1}"#
        )
        .is_err());
    }
}
