//! `GET /v1/files/{sha256}`: the current content of an indexed file, with single-range
//! `Range` support (206 + `Content-Range`, 416 when unsatisfiable). A part of up to
//! [`READ_WHOLE`] bytes (a typical image) is found, checked and read in one blocking
//! call; a longer one is streamed from disk with bounded memory.
//!
//! The file is looked up in the index by its sha256, opened, and served only if it is
//! still a regular file inside `files_dir` with the indexed size; otherwise (changed
//! again, deleted) the answer is 404 `file_not_found`: a later event in the stream
//! supersedes the one HQ is fetching. HQ verifies the sha256 of what it receives.

use super::index;
use crate::error::{Error, Result};
use crate::http::AppState;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use std::io::SeekFrom;

/// A parsed `Range` header against a file of `size` bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum Range {
    /// No (usable) range: the whole file.
    Full,
    /// Inclusive byte range.
    Part(u64, u64),
    /// Unsatisfiable: 416.
    Unsatisfiable,
}

/// Parses `bytes=a-b`, `bytes=a-`, `bytes=-n`. Multiple ranges and other units are
/// answered with the whole file (allowed by RFC 9110).
pub fn parse_range(value: Option<&str>, size: u64) -> Range {
    let Some(spec) = value.and_then(|v| v.trim().strip_prefix("bytes=")) else {
        return Range::Full;
    };
    if spec.contains(',') {
        return Range::Full;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return Range::Full;
    };
    let (a, b) = (a.trim(), b.trim());
    let parse = |s: &str| s.parse::<u64>().ok();
    match (a.is_empty(), b.is_empty()) {
        (true, false) => match parse(b) {
            Some(0) => Range::Unsatisfiable,
            Some(n) if size > 0 => Range::Part(size.saturating_sub(n), size - 1),
            Some(_) => Range::Unsatisfiable,
            None => Range::Full,
        },
        (false, _) => {
            let Some(start) = parse(a) else {
                return Range::Full;
            };
            let end = if b.is_empty() {
                Some(size.saturating_sub(1))
            } else {
                parse(b)
            };
            match end {
                None => Range::Full,
                Some(_) if start >= size => Range::Unsatisfiable,
                Some(end) if end < start => Range::Full,
                Some(end) => Range::Part(start, end.min(size - 1)),
            }
        }
        (true, true) => Range::Full,
    }
}

/// A served part of a file at most this long is read in one blocking call and sent as
/// one body (a typical image); longer ones are streamed in [`STREAM_CHUNK`] reads. With
/// `max_concurrent_requests` (64 by default) that bounds the memory of whole reads.
const READ_WHOLE: u64 = 1 << 20;

/// Read size of a streamed file.
const STREAM_CHUNK: usize = 1 << 20;

/// Streamed chunks read ahead of the network (bounded memory: a few MiB per download).
const STREAM_AHEAD: usize = 4;

/// Read buffers kept for reuse: a fresh buffer of a whole read costs a page fault per
/// 4 KiB (zeroed by the kernel) and the allocator's work, more than reading the file
/// from the page cache (tests/bench/notes/files.md).
static BUFFERS: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());

/// Buffers kept in [`BUFFERS`] (HQ fetches up to 32 contents at a time).
const BUFFERS_KEEP: usize = 32;

/// A read buffer from [`BUFFERS`], given back when the body that holds it is dropped.
struct Pooled(Vec<u8>);

impl Pooled {
    /// `len` bytes read from `file` into a pooled buffer.
    fn read(file: &mut std::fs::File, len: u64) -> std::io::Result<Pooled> {
        use std::io::Read;
        let pooled = BUFFERS.lock().ok().and_then(|mut b| b.pop());
        let mut buf = Pooled(pooled.unwrap_or_default());
        buf.0.reserve(READ_WHOLE.max(len) as usize);
        file.take(len).read_to_end(&mut buf.0)?;
        if buf.0.len() as u64 != len {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(buf)
    }
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let mut buf = std::mem::take(&mut self.0);
        buf.clear();
        if let Ok(mut b) = BUFFERS.lock() {
            if b.len() < BUFFERS_KEEP {
                b.push(buf);
            }
        }
    }
}

/// The served part of a file.
#[derive(Clone, Copy)]
struct Part {
    start: u64,
    len: u64,
    size: u64,
    /// Answered with 206 and `Content-Range` (the request asked for a range).
    partial: bool,
}

/// What is served for a request, found and read by one blocking call.
enum Served {
    Unsatisfiable { size: u64 },
    Whole { part: Part, bytes: Pooled },
    Stream { part: Part, file: std::fs::File },
}

/// Opens the first candidate (indexed path with this content) that is still a regular
/// file inside `root` with its indexed size, and reads the requested part when it is
/// short. Blocking: one call per request, not one round trip per file operation.
fn open_and_read(
    root: &std::path::Path,
    candidates: Vec<(String, i64)>,
    range: Option<&str>,
) -> Option<std::io::Result<Served>> {
    use std::io::Seek;
    let canonical_root = std::fs::canonicalize(root).ok()?;
    for (path, size) in candidates {
        if schemas::files::check_path(&path).is_err() {
            continue;
        }
        let abs = root.join(&path);
        // A symlink swapped in after indexing must not lead outside files_dir.
        match std::fs::canonicalize(&abs) {
            Ok(real) if real.starts_with(&canonical_root) => {}
            _ => continue,
        }
        let Ok(mut file) = std::fs::File::open(&abs) else {
            continue;
        };
        let Ok(meta) = file.metadata() else {
            continue;
        };
        if !meta.is_file() || i64::try_from(meta.len()).ok() != Some(size) {
            continue;
        }
        let size = meta.len();
        let part = match parse_range(range, size) {
            Range::Full => Part {
                start: 0,
                len: size,
                size,
                partial: false,
            },
            Range::Part(a, b) => Part {
                start: a,
                len: b - a + 1,
                size,
                partial: true,
            },
            Range::Unsatisfiable => return Some(Ok(Served::Unsatisfiable { size })),
        };
        let read = || -> std::io::Result<Served> {
            if part.start > 0 {
                file.seek(SeekFrom::Start(part.start))?;
            }
            if part.len > READ_WHOLE {
                return Ok(Served::Stream { part, file });
            }
            let bytes = Pooled::read(&mut file, part.len)?;
            Ok(Served::Whole { part, bytes })
        };
        return Some(read());
    }
    None
}

/// A long file's body: read by a blocking task in [`STREAM_CHUNK`]s, [`STREAM_AHEAD`]
/// of them ahead of the network. A read error ends the body early (HQ sees a short
/// download and resumes it).
fn stream_body(mut file: std::fs::File, len: u64) -> Body {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(STREAM_AHEAD);
    tokio::task::spawn_blocking(move || {
        let mut left = len;
        while left > 0 {
            let n = left.min(STREAM_CHUNK as u64);
            let r = Pooled::read(&mut file, n).map(Bytes::from_owner);
            let failed = r.is_err();
            if tx.blocking_send(r).is_err() || failed {
                return;
            }
            left -= n;
        }
    });
    Body::from_stream(futures::stream::poll_fn(move |cx| rx.poll_recv(cx)))
}

pub async fn get_file(
    State(state): State<AppState>,
    Path(sha256): Path<String>,
    headers: HeaderMap,
) -> Result<Response> {
    if !schemas::files::is_sha256_hex(&sha256) {
        return Err(Error::BadRequest(
            "sha256: expected 64 lowercase hex characters".into(),
        ));
    }
    let not_found = || Error::FileNotFound(sha256.clone());
    let Some(root) = state.config.files_dir.clone() else {
        return Err(not_found());
    };
    let db = state.db.clone();
    let sha = sha256.clone();
    let candidates = tokio::spawn(async move { index::by_sha256(&db, &sha).await })
        .await
        .map_err(|e| Error::Database(format!("request task failed: {e}")))??;
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let served =
        tokio::task::spawn_blocking(move || open_and_read(&root, candidates, range.as_deref()))
            .await
            .map_err(|e| Error::Io(format!("file read task failed: {e}")))?
            .ok_or_else(not_found)?
            .map_err(|e| Error::Io(format!("reading a served file: {e}")))?;
    let (part, body) = match served {
        Served::Unsatisfiable { size } => {
            return Ok((
                StatusCode::RANGE_NOT_SATISFIABLE,
                [(header::CONTENT_RANGE, format!("bytes */{size}"))],
            )
                .into_response())
        }
        Served::Whole { part, bytes } => (part, Body::from(Bytes::from_owner(bytes))),
        Served::Stream { part, file } => (part, stream_body(file, part.len)),
    };
    let Part {
        start,
        len,
        size,
        partial,
    } = part;
    let status = if partial {
        StatusCode::PARTIAL_CONTENT
    } else {
        StatusCode::OK
    };
    metrics::counter!(crate::metrics::FILES_SERVED_BYTES_TOTAL).increment(len);
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    // Already compressed images: the compression layer leaves the body alone.
    h.insert(
        header::CONTENT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if let Ok(v) = HeaderValue::from_str(&format!("\"{sha256}\"")) {
        h.insert(header::ETAG, v);
    }
    if status == StatusCode::PARTIAL_CONTENT {
        let v = format!("bytes {start}-{}/{size}", start + len - 1);
        if let Ok(v) = HeaderValue::from_str(&v) {
            h.insert(header::CONTENT_RANGE, v);
        }
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooled_reads_hold_exactly_their_file() {
        let d = tempfile::tempdir().unwrap();
        let (long, short) = (d.path().join("long"), d.path().join("short"));
        std::fs::write(&long, vec![7u8; 300_000]).unwrap();
        std::fs::write(&short, b"0123456789").unwrap();
        let a = Pooled::read(&mut std::fs::File::open(&long).unwrap(), 300_000).unwrap();
        assert_eq!(a.as_ref(), &vec![7u8; 300_000][..]);
        drop(a);
        // The long file's buffer, reused: nothing of it may show.
        let b = Pooled::read(&mut std::fs::File::open(&short).unwrap(), 10).unwrap();
        assert_eq!(b.as_ref(), b"0123456789");
        // Asking for more than the file holds is an error, not a short body.
        let e = Pooled::read(&mut std::fs::File::open(&short).unwrap(), 11)
            .err()
            .unwrap();
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn ranges() {
        let r = |v: &str| parse_range(Some(v), 100);
        assert_eq!(parse_range(None, 100), Range::Full);
        assert_eq!(r("bytes=0-9"), Range::Part(0, 9));
        assert_eq!(r("bytes=10-"), Range::Part(10, 99));
        assert_eq!(r("bytes=-10"), Range::Part(90, 99));
        assert_eq!(r("bytes=90-1000"), Range::Part(90, 99));
        assert_eq!(r("bytes=100-"), Range::Unsatisfiable);
        assert_eq!(r("bytes=-0"), Range::Unsatisfiable);
        assert_eq!(r("bytes=0-1,5-6"), Range::Full);
        assert_eq!(r("items=0-1"), Range::Full);
        assert_eq!(r("bytes=x-"), Range::Full);
        assert_eq!(r("bytes=9-3"), Range::Full);
        assert_eq!(parse_range(Some("bytes=0-"), 0), Range::Unsatisfiable);
    }
}
