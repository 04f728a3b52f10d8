//! JSON types of the pull protocol (version 1). See `docs/protocol.md`.
//!
//! Row images and primary keys travel as raw JSON (`RawValue`): HQ never parses values
//! into Rust numbers, it hands the JSON text to PostgreSQL, which parses numbers as exact
//! `numeric`. This keeps money exact and 64-bit integers whole end to end.

use crate::cursor::Cursor;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use uuid::Uuid;

pub const PROTOCOL_VERSION: u32 = 1;

/// Default and maximum `limit` of `/v1/changes` (changes per response, soft: a window is
/// never split, so a single window larger than `limit` is served whole).
pub const DEFAULT_LIMIT: u32 = 5_000;
pub const MAX_LIMIT: u32 = 50_000;
/// Maximum `wait` (long-poll) in seconds.
pub const MAX_WAIT_SECONDS: u32 = 60;

/// Kind of a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    #[serde(rename = "I")]
    Insert,
    #[serde(rename = "U")]
    Update,
    #[serde(rename = "D")]
    Delete,
}

impl Op {
    pub fn as_code(&self) -> &'static str {
        match self {
            Op::Insert => "I",
            Op::Update => "U",
            Op::Delete => "D",
        }
    }

    pub fn from_code(s: &str) -> Option<Op> {
        match s {
            "I" => Some(Op::Insert),
            "U" => Some(Op::Update),
            "D" => Some(Op::Delete),
            _ => None,
        }
    }
}

/// One captured row change.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Change {
    /// Branch sequence: strictly increasing, never reused (also across pruning).
    pub seq: i64,
    /// Catalogue table name (looked up at HQ, never interpolated).
    pub table: String,
    pub op: Op,
    /// Primary key as a JSON object of the key columns.
    pub pk: Box<RawValue>,
    /// Full row image after the change (catalogue columns only); `null` for deletes.
    pub row: Option<Box<RawValue>>,
    /// When the change was written at the branch (UTC).
    pub ts: DateTime<Utc>,
}

/// Response of `GET /v1/changes`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChangesResponse {
    pub protocol: u32,
    /// The branch's location id (from its config); HQ refuses a batch for another id.
    pub location: String,
    pub instance_id: Uuid,
    /// IANA zone in which the branch's zone-less timestamps are to be read.
    pub time_zone: String,
    /// The cursor this batch starts after (`None`: the start of the pull area).
    pub after: Option<Cursor>,
    /// The cursor to store with this batch and send as `after` next time.
    pub next: Cursor,
    /// Whether changes after `next` are already servable.
    pub more: bool,
    /// The limit applied (after clamping).
    pub limit: u32,
    /// Set when the requested limit was over the maximum and was clamped.
    pub limit_clamped: bool,
    /// Approximate number of servable changes after `next`.
    pub backlog: u64,
    pub changes: Vec<Change>,
}

/// Body of every error response: `{"error": {"code": ..., "message": ...}}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Stable machine-readable code, see [`error_code`].
    pub code: String,
    pub message: String,
}

/// Error codes of the protocol, with their HTTP status.
pub mod error_code {
    /// 400: a query parameter is malformed.
    pub const BAD_REQUEST: &str = "bad_request";
    /// 401: missing or wrong bearer token.
    pub const UNAUTHORIZED: &str = "unauthorized";
    /// 409: the cursor belongs to another pull-area instance.
    pub const INSTANCE_MISMATCH: &str = "instance_mismatch";
    /// 409: the cursor's tick exists with another uuid, or is ahead of the branch's head
    /// (the branch database was restored or replaced).
    pub const LINEAGE_MISMATCH: &str = "lineage_mismatch";
    /// 410: the cursor points into pruned history (HQ needs a resync).
    pub const PRUNED: &str = "pruned";
    /// 404 (`GET /v1/files/SHA256`): no indexed file has that content any more (it was
    /// changed again or deleted: a later event in the stream supersedes it).
    pub const FILE_NOT_FOUND: &str = "file_not_found";
    /// 503: the branch database is unreachable or busy.
    pub const UNAVAILABLE: &str = "unavailable";
    /// 500: anything else.
    pub const INTERNAL: &str = "internal";
    /// 429: the client exceeded the listener's request rate (retry after `Retry-After`).
    pub const RATE_LIMITED: &str = "rate_limited";
}

/// The oldest open transaction at the branch that has written changes not yet servable
/// (PostgreSQL only: on SQLite an open write transaction cannot be observed).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OpenWriter {
    pub pid: i32,
    pub age_seconds: f64,
}

/// Response of `GET /v1/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusResponse {
    pub protocol: u32,
    pub location: String,
    pub instance_id: Uuid,
    /// "sqlite" or "postgres".
    pub backend: String,
    pub version: String,
    /// Cursor of the newest tick.
    pub head: Cursor,
    /// Highest sequence written to the pull area.
    pub head_seq: i64,
    /// Rows in the pull area (acknowledged ones awaiting retention included).
    pub pull_area_depth: u64,
    /// Changes not yet acknowledged by HQ.
    pub unacked_changes: u64,
    /// Age of the oldest change not yet acknowledged by HQ.
    pub oldest_unacked_age_seconds: Option<f64>,
    /// The newest tick HQ acknowledged.
    pub acked_tick: Option<i64>,
    pub oldest_open_writer: Option<OpenWriter>,
}

/// Default and maximum rows of one `/v1/snapshot` page.
pub const DEFAULT_SNAPSHOT_LIMIT: u32 = 20_000;
pub const MAX_SNAPSHOT_LIMIT: u32 = 100_000;
/// Default rows per chunk of `/v1/checksums`, default and maximum chunks per response,
/// and the most rows one response may cover.
pub const DEFAULT_CHUNK_ROWS: u32 = 10_000;
pub const DEFAULT_CHUNKS: u32 = 20;
pub const MAX_CHECKSUM_ROWS: u64 = 1_000_000;

/// Response of `GET /v1/snapshot/start`: the point the snapshot is consistent with.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotStart {
    pub protocol: u32,
    pub location: String,
    pub instance_id: Uuid,
    pub time_zone: String,
    /// A tick made for this call (T0), taken before any page is read: the change stream
    /// from here replays every change a page may have missed or seen half.
    pub start: Cursor,
    /// The catalogue tables the branch serves, in apply order.
    pub tables: Vec<String>,
}

/// Response of `GET /v1/snapshot?table=T[&after=KEY]&limit=N`: rows in key order.
#[derive(Debug, Serialize, Deserialize)]
pub struct SnapshotPage {
    pub protocol: u32,
    pub location: String,
    pub instance_id: Uuid,
    pub table: String,
    /// Row images (same JSON as the capture triggers produce). Empty when the rows come
    /// as [`SnapshotPage::copy`].
    pub rows: Vec<Box<RawValue>>,
    /// The rows as PostgreSQL `COPY` text instead of JSON images: only when the request
    /// asked for `format=copy`, the branch is PostgreSQL and the table is a catalogue
    /// table (never `_files`). Absent otherwise (an older listener ignores `format` and
    /// answers JSON rows, which HQ still loads).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy: Option<CopyRows>,
    /// Key image of the last row: `after` of the next page; `None` when this page ended
    /// the table.
    pub next_after: Option<Box<RawValue>>,
    /// The newest tick after the page was read: once HQ's cursor reaches it, HQ has
    /// applied every change the page saw (verify waits for it before reporting).
    pub head: Cursor,
}

/// `format` value of `/v1/snapshot` asking for [`CopyRows`].
pub const SNAPSHOT_FORMAT_COPY: &str = "copy";

/// `Content-Type` of a snapshot page whose rows are `COPY` text ([`encode_copy_page`]):
/// the `COPY` text as it is, then the page as one line of JSON (its trailer, with
/// `copy.text` empty). Carrying the text outside the JSON spares both ends escaping and
/// unescaping every tab and backslash of it; the trailer at the end lets the listener
/// stream the text while the branch still produces it (the page's `next_after` and row
/// count are known only at its end). A body cut short has no trailer and is refused.
pub const COPY_PAGE_CONTENT_TYPE: &str = "application/vnd.branch-sync.copy-page.v2";

/// The trailer of a `COPY` text page ([`COPY_PAGE_CONTENT_TYPE`]): `page` as one line of
/// JSON without a newline; `page.copy` must be set and its text empty (the text went
/// before it).
pub fn encode_copy_trailer(page: &SnapshotPage) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(page)
}

/// The whole body of a `COPY` text page ([`COPY_PAGE_CONTENT_TYPE`]): the text of
/// `page.copy`, then the trailer.
pub fn encode_copy_page(mut page: SnapshotPage) -> Result<Vec<u8>, serde_json::Error> {
    let text = page
        .copy
        .as_mut()
        .map(|c| std::mem::take(&mut c.text))
        .unwrap_or_default();
    let mut out = text.into_bytes();
    out.extend_from_slice(&encode_copy_trailer(&page)?);
    Ok(out)
}

/// Reads a body made by [`encode_copy_page`]: the page, with `copy.text` the text before
/// the trailer (everything up to the last newline). The error says what is wrong (no
/// trailer: a body cut short; bad JSON; no `copy`; text that is not UTF-8).
pub fn decode_copy_page(mut body: Vec<u8>) -> Result<SnapshotPage, String> {
    let text_len = memchr::memrchr(b'\n', &body).map_or(0, |i| i + 1);
    let trailer = &body[text_len..];
    if !trailer.starts_with(b"{") {
        return Err("no trailer line (the body was cut short)".into());
    }
    let mut page: SnapshotPage =
        serde_json::from_slice(trailer).map_err(|e| format!("trailer line: {e}"))?;
    body.truncate(text_len);
    let text = String::from_utf8(body).map_err(|e| {
        format!(
            "COPY text is not UTF-8 (at byte {})",
            e.utf8_error().valid_up_to()
        )
    })?;
    match page.copy.as_mut() {
        Some(c) if c.text.is_empty() => c.text = text,
        Some(_) => return Err("trailer line carries COPY text itself".into()),
        None => return Err("trailer line has no copy".into()),
    }
    Ok(page)
}

/// A snapshot page's rows in PostgreSQL's `COPY ... TO STDOUT` text format: one line per
/// row, fields separated by tabs, `\N` for NULL, backslash escapes. The values are those
/// of the row image: numerics and reals as PostgreSQL prints them (`-0` as `0`),
/// timestamps in ISO style with their UTC offset, booleans `t`/`f`, blobs as lowercase
/// hex (as in the JSON image), text as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CopyRows {
    /// The columns of each line, in order (catalogue column names).
    pub columns: Vec<String>,
    /// Number of lines.
    pub rows: u64,
    pub text: String,
}

/// One chunk of `/v1/checksums`: the rows of the key range (previous chunk's last key,
/// `last_key`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Chunk {
    pub first_key: Box<RawValue>,
    pub last_key: Box<RawValue>,
    pub rows: u64,
    /// [`crate::canonical::RowHasher`] over the chunk's canonical rows.
    pub hash: String,
}

/// Response of `GET /v1/checksums?table=T[&after=KEY]&chunk=N&chunks=M`.
#[derive(Debug, Serialize, Deserialize)]
pub struct ChecksumsResponse {
    pub protocol: u32,
    pub location: String,
    pub instance_id: Uuid,
    pub time_zone: String,
    pub table: String,
    pub chunks: Vec<Chunk>,
    /// Whether rows remain after the last chunk (continue with `after` = its last key).
    pub more: bool,
    /// The newest tick after the chunks were read.
    pub head: Cursor,
}

#[cfg(test)]
mod tests {

    fn copy_page(text: &str) -> SnapshotPage {
        SnapshotPage {
            protocol: PROTOCOL_VERSION,
            location: "b01".into(),
            instance_id: Uuid::nil(),
            table: "products".into(),
            rows: Vec::new(),
            copy: Some(CopyRows {
                columns: vec!["product_id".into(), "sku".into()],
                rows: text.lines().count() as u64,
                text: text.into(),
            }),
            next_after: Some(RawValue::from_string(r#"{"product_id":"2"}"#.into()).unwrap()),
            head: "00000000-0000-0000-0000-000000000000:7:00000000-0000-0000-0000-000000000001"
                .parse()
                .unwrap(),
        }
    }

    #[test]
    fn copy_pages_carry_their_text_outside_the_json() {
        let text = "1\ta\\tb \u{e9}\n2\t\\N\n";
        let body = encode_copy_page(copy_page(text)).unwrap();
        assert!(
            body.starts_with(text.as_bytes()),
            "the text as it is, first"
        );
        let mut head = copy_page(text);
        head.copy.as_mut().unwrap().text.clear();
        assert_eq!(
            &body[text.len()..],
            &encode_copy_trailer(&head).unwrap()[..]
        );
        assert!(!body[text.len()..].contains(&b'\n'), "one trailer line");
        let back = decode_copy_page(body).unwrap();
        let c = back.copy.unwrap();
        assert_eq!((c.text.as_str(), c.rows), (text, 2));
        assert_eq!(back.next_after.unwrap().get(), r#"{"product_id":"2"}"#);
        let empty = decode_copy_page(encode_copy_page(copy_page("")).unwrap()).unwrap();
        assert_eq!(empty.copy.unwrap().rows, 0);
        let whole = encode_copy_page(copy_page("1\ta\n2\tb\n")).unwrap();
        for (body, why) in [
            (b"".to_vec(), "no trailer"),
            // Cut inside the text, or inside the trailer.
            (b"1\ta\n2\t".to_vec(), "no trailer"),
            (whole[..whole.len() - 3].to_vec(), "trailer line"),
            (
                [b"\xff\n", &encode_copy_page(copy_page("")).unwrap()[..]].concat(),
                "not UTF-8",
            ),
        ] {
            let e = decode_copy_page(body).unwrap_err();
            assert!(e.contains(why), "{e}");
        }
        let mut no_copy = copy_page("");
        no_copy.copy = None;
        let e = decode_copy_page(encode_copy_page(no_copy).unwrap()).unwrap_err();
        assert!(e.contains("no copy"), "{e}");
    }

    use super::*;

    #[test]
    fn change_round_trips_with_raw_values_intact() {
        let j = r#"{"seq":9007199254740993,"table":"products","op":"U","pk":{"product_id":9007199254740993},"row":{"product_id":9007199254740993,"unit_price":12345678901.23},"ts":"2026-11-24T06:31:03.123Z"}"#;
        let c: Change = serde_json::from_str(j).unwrap();
        assert_eq!(c.seq, 9007199254740993);
        assert_eq!(c.op, Op::Update);
        assert!(c.row.unwrap().get().contains("12345678901.23"));
    }

    #[test]
    fn unknown_fields_and_ops_are_refused() {
        let j = r#"{"seq":1,"table":"t","op":"X","pk":{},"row":null,"ts":"2026-11-24T06:31:03Z"}"#;
        assert!(serde_json::from_str::<Change>(j).is_err());
        let j = r#"{"seq":1,"table":"t","op":"I","pk":{},"row":null,"ts":"2026-11-24T06:31:03Z","x":1}"#;
        assert!(serde_json::from_str::<Change>(j).is_err());
    }
}
