//! `GET /v1/files/{sha256}`: the current content of an indexed file, streamed from disk
//! (bounded memory), with single-range `Range` support (206 + `Content-Range`, 416 when
//! unsatisfiable).
//!
//! The file is looked up in the index by its sha256, opened, and served only if it is
//! still a regular file inside `files_dir` with the indexed size; otherwise (changed
//! again, deleted) the answer is 404 `file_not_found`: a later event in the stream
//! supersedes the one HQ is fetching. HQ verifies the sha256 of what it receives.

use super::index;
use crate::error::{Error, Result};
use crate::http::AppState;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use std::io::SeekFrom;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

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

/// Opens the indexed file with this content, if one is still as indexed.
async fn open(state: &AppState, sha256: &str) -> Result<(tokio::fs::File, u64)> {
    let not_found = || Error::FileNotFound(sha256.to_string());
    let Some(root) = state.config.files_dir.clone() else {
        return Err(not_found());
    };
    let db = state.db.clone();
    let sha = sha256.to_string();
    let candidates = tokio::spawn(async move { index::by_sha256(&db, &sha).await })
        .await
        .map_err(|e| Error::Database(format!("request task failed: {e}")))??;
    let Ok(canonical_root) = tokio::fs::canonicalize(&root).await else {
        return Err(not_found());
    };
    for (path, size) in candidates {
        if schemas::files::check_path(&path).is_err() {
            continue;
        }
        let abs = root.join(&path);
        // A symlink swapped in after indexing must not lead outside files_dir.
        match tokio::fs::canonicalize(&abs).await {
            Ok(real) if real.starts_with(&canonical_root) => {}
            _ => continue,
        }
        let Ok(file) = tokio::fs::File::open(&abs).await else {
            continue;
        };
        let Ok(meta) = file.metadata().await else {
            continue;
        };
        if meta.is_file() && i64::try_from(meta.len()).ok() == Some(size) {
            return Ok((file, meta.len()));
        }
    }
    Err(not_found())
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
    let (mut file, size) = open(&state, &sha256).await?;
    let range = parse_range(
        headers.get(header::RANGE).and_then(|v| v.to_str().ok()),
        size,
    );
    let (status, start, len) = match range {
        Range::Full => (StatusCode::OK, 0, size),
        Range::Part(a, b) => (StatusCode::PARTIAL_CONTENT, a, b - a + 1),
        Range::Unsatisfiable => {
            return Ok((
                StatusCode::RANGE_NOT_SATISFIABLE,
                [(header::CONTENT_RANGE, format!("bytes */{size}"))],
            )
                .into_response())
        }
    };
    if start > 0 {
        file.seek(SeekFrom::Start(start))
            .await
            .map_err(|e| Error::Io(format!("seeking a served file: {e}")))?;
    }
    metrics::counter!(crate::metrics::FILES_SERVED_BYTES_TOTAL).increment(len);
    let stream = tokio_util::io::ReaderStream::with_capacity(file.take(len), 256 * 1024);
    let mut resp = Response::new(Body::from_stream(stream));
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
