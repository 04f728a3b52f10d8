//! HTTP client of one listener: bearer token, gzip/zstd, timeouts, and the mapping of
//! HTTP failures to [`ErrorKind`]s.

use crate::config::Location;
use crate::error::{Error, Result};
use schemas::wire::{
    error_code, ChangesResponse, ChecksumsResponse, ErrorBody, SnapshotPage, SnapshotStart,
};
use schemas::Cursor;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    changes_url: url::Url,
    /// `v1/files/` under the location's base URL.
    files_url: url::Url,
    /// Base URL of the listener (ends with '/'), for the snapshot and checksum calls.
    base: url::Url,
    /// The first token of the location's token file is sent (redacted in `Debug`).
    tokens: schemas::secret::Tokens,
    request_timeout: Duration,
    /// Largest response body accepted (decompressed): `max_response_bytes`.
    max_body_bytes: u64,
}

/// A fetched batch and its size on the wire (decompressed).
#[derive(Debug)]
pub struct Fetched {
    pub response: ChangesResponse,
    pub bytes: u64,
}

impl Client {
    pub fn new(loc: &Location) -> Result<Client> {
        let http = loc
            .transport
            .configure(reqwest::Client::builder())
            .gzip(true)
            .zstd(true)
            .connect_timeout(loc.connect_timeout)
            .user_agent(concat!("hq-puller/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Error::Other(format!("building HTTP client: {e}")))?;
        let mut base = loc.url.clone();
        if !base.path().ends_with('/') {
            let p = format!("{}/", base.path());
            base.set_path(&p);
        }
        let changes_url = base
            .clone()
            .join("v1/changes")
            .map_err(|e| Error::Config(format!("location {}: url: {e}", loc.id)))?;
        let files_url = base
            .join("v1/files/")
            .map_err(|e| Error::Config(format!("location {}: url: {e}", loc.id)))?;
        Ok(Client {
            http,
            changes_url,
            files_url,
            base,
            tokens: loc.tokens.clone(),
            request_timeout: loc.request_timeout,
            max_body_bytes: loc.transport.max_response_bytes,
        })
    }

    /// `GET /v1/changes?after=..&limit=..[&wait=..]`. With `wait`, the request timeout is
    /// extended by the wait.
    pub async fn changes(
        &self,
        after: Option<&Cursor>,
        limit: u32,
        wait: Option<u32>,
    ) -> Result<Fetched> {
        let mut url = self.changes_url.clone();
        {
            let mut q = url.query_pairs_mut();
            if let Some(a) = after {
                q.append_pair("after", &a.to_string());
            }
            q.append_pair("limit", &limit.to_string());
            if let Some(w) = wait {
                q.append_pair("wait", &w.to_string());
            }
        }
        let timeout = self.request_timeout + Duration::from_secs(u64::from(wait.unwrap_or(0)));
        let body = self.get_body(url, timeout).await?;
        let response: ChangesResponse = parse_json("changes", &body)?;
        Ok(Fetched {
            response,
            bytes: body.len() as u64,
        })
    }
}

impl Client {
    /// `GET url` with the token; the body (bounded by [`MAX_BODY_BYTES`]) of a
    /// successful response, or the error mapped to its kind.
    async fn get_body(&self, url: url::Url, timeout: Duration) -> Result<Vec<u8>> {
        Ok(self.get_typed_body(url, timeout).await?.0)
    }

    /// [`Client::get_body`] with the response's `Content-Type` (empty when absent).
    async fn get_typed_body(&self, url: url::Url, timeout: Duration) -> Result<(Vec<u8>, String)> {
        let mut resp = self
            .http
            .get(url)
            .bearer_auth(self.tokens.current())
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| Error::transient(describe(&e)))?;
        let status = resp.status();
        let content_type = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let max = self.max_body_bytes;
        let too_big = |n: u64| {
            Error::permanent(format!(
                "listener response of {n} bytes or more exceeds max_response_bytes = {max}"
            ))
        };
        if let Some(len) = resp.content_length() {
            if len > max {
                return Err(too_big(len));
            }
        }
        // Read chunk by chunk so that an endless (or decompression-bomb) body is cut off.
        let mut body = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| Error::transient(describe(&e)))?
        {
            if (body.len() + chunk.len()) as u64 > max {
                return Err(too_big((body.len() + chunk.len()) as u64));
            }
            body.extend_from_slice(&chunk);
        }
        if !status.is_success() {
            if status == reqwest::StatusCode::NOT_FOUND {
                return Err(Error::NotSupported(format!(
                    "listener has no {} endpoint (older version?)",
                    resp.url().path()
                )));
            }
            return Err(http_error(status, &body));
        }
        Ok((body, content_type))
    }

    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<(T, u64)> {
        let body = self
            .get_body(self.url(path, query)?, self.request_timeout)
            .await?;
        Ok((parse_json(path, &body)?, body.len() as u64))
    }

    /// `path` under the listener's base URL with `query`.
    fn url(&self, path: &str, query: &[(&str, String)]) -> Result<url::Url> {
        let mut url = self
            .base
            .join(path)
            .map_err(|e| Error::Other(format!("listener url: {e}")))?;
        {
            let mut q = url.query_pairs_mut();
            for (k, v) in query {
                q.append_pair(k, v);
            }
        }
        Ok(url)
    }

    /// `GET /v1/snapshot/start`: T0 and the tables.
    pub async fn snapshot_start(&self) -> Result<SnapshotStart> {
        Ok(self.get_json("v1/snapshot/start", &[]).await?.0)
    }

    /// `GET /v1/snapshot?table=..&after=..&limit=..[&format=copy]`; also returns the body
    /// size. `copy`: ask for the rows as `COPY` text (a PostgreSQL branch's catalogue
    /// tables; other pages, and older listeners, answer JSON rows).
    pub async fn snapshot_page(
        &self,
        table: &str,
        after: Option<&str>,
        limit: u32,
        copy: bool,
    ) -> Result<(SnapshotPage, u64)> {
        let mut q = vec![("table", table.to_string()), ("limit", limit.to_string())];
        if copy {
            q.push(("format", schemas::wire::SNAPSHOT_FORMAT_COPY.to_string()));
        }
        if let Some(a) = after {
            q.push(("after", a.to_string()));
        }
        let path = "v1/snapshot";
        let (body, content_type) = self
            .get_typed_body(self.url(path, &q)?, self.request_timeout)
            .await?;
        let n = body.len() as u64;
        let page = if content_type.starts_with(schemas::wire::COPY_PAGE_CONTENT_TYPE) {
            schemas::wire::decode_copy_page(body).map_err(|e| malformed(path, e))?
        } else {
            parse_json(path, &body)?
        };
        Ok((page, n))
    }

    /// `GET /v1/checksums?table=..&after=..&chunk=..&chunks=..`.
    pub async fn checksums(
        &self,
        table: &str,
        after: Option<&str>,
        chunk: u32,
        chunks: u32,
    ) -> Result<ChecksumsResponse> {
        let mut q = vec![
            ("table", table.to_string()),
            ("chunk", chunk.to_string()),
            ("chunks", chunks.to_string()),
        ];
        if let Some(a) = after {
            q.push(("after", a.to_string()));
        }
        Ok(self.get_json("v1/checksums", &q).await?.0)
    }
}

impl Client {
    /// `GET /v1/files/{sha256}` with the bearer token (the caller adds `Range`).
    pub fn file_request(&self, sha256: &str) -> Result<reqwest::RequestBuilder> {
        let url = self
            .files_url
            .join(sha256)
            .map_err(|e| Error::Other(format!("file url: {e}")))?;
        Ok(self.http.get(url).bearer_auth(self.tokens.current()))
    }

    /// The per-request time limit (for files: per chunk).
    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }
}

/// The error of a response body that is not what `path` answers.
fn malformed(path: &str, e: impl std::fmt::Display) -> Error {
    Error::permanent(format!("listener sent a malformed {path} response: {e}"))
}

/// A JSON response body of `path`.
fn parse_json<T: serde::de::DeserializeOwned>(path: &str, body: &[u8]) -> Result<T> {
    serde_json::from_slice(body).map_err(|e| malformed(path, e))
}

/// A short description of a transport error: what failed, where (URL without query),
/// and the root cause. reqwest's errors never contain headers: the token stays out.
pub fn describe(e: &reqwest::Error) -> String {
    let what = if e.is_timeout() {
        "request to the listener timed out"
    } else if e.is_connect() {
        "cannot connect to the listener"
    } else if e.is_body() || e.is_decode() {
        "reading the listener's response failed"
    } else {
        "request to the listener failed"
    };
    let at = e
        .url()
        .map(|u| {
            let mut u = u.clone();
            u.set_query(None);
            format!(" at {u}")
        })
        .unwrap_or_default();
    let mut root: &dyn std::error::Error = e;
    while let Some(s) = root.source() {
        root = s;
    }
    let hint = if root.to_string().contains("certificate") {
        " (TLS: check the location's ca_file and the listener's tls_cert_file)"
    } else {
        ""
    };
    format!("{what}{at}: {root}{hint}")
}

/// Maps an HTTP error status (and the listener's error body, when it has one) to a kind.
pub fn http_error(status: reqwest::StatusCode, body: &[u8]) -> Error {
    let detail = serde_json::from_slice::<ErrorBody>(body)
        .ok()
        .map(|b| b.error);
    let code = detail.as_ref().map(|d| d.code.as_str()).unwrap_or("");
    let message = detail
        .as_ref()
        .map(|d| d.message.chars().take(500).collect::<String>())
        .unwrap_or_default();
    let s = status.as_u16();
    match s {
        401 | 403 => Error::permanent(format!(
            "token rejected by the listener (HTTP {s}); check the location's token_file"
        )),
        409 => {
            let what = if code == error_code::INSTANCE_MISMATCH {
                "instance mismatch (the branch pull area was re-installed or replaced)"
            } else if code == error_code::LINEAGE_MISMATCH {
                "lineage mismatch (the branch database was restored or replaced)"
            } else {
                "conflict"
            };
            Error::resync(format!("listener refused our cursor: {what}: {message}"))
        }
        410 => Error::resync(format!(
            "our cursor points into pruned history at the branch: {message}"
        )),
        429 => Error::transient(format!("listener rate-limited us (HTTP 429): {message}")),
        400..=499 => Error::permanent(format!(
            "listener refused the request (HTTP {s} {code}): {message}"
        )),
        _ => Error::transient(format!("listener error (HTTP {s} {code}): {message}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use reqwest::StatusCode;

    #[test]
    fn statuses_map_to_kinds() {
        let body = |c: &str| format!(r#"{{"error":{{"code":"{c}","message":"m"}}}}"#).into_bytes();
        assert_eq!(
            http_error(StatusCode::CONFLICT, &body("instance_mismatch")).kind(),
            ErrorKind::NeedsResync
        );
        assert_eq!(
            http_error(StatusCode::CONFLICT, &body("lineage_mismatch")).kind(),
            ErrorKind::NeedsResync
        );
        assert_eq!(
            http_error(StatusCode::GONE, &body("pruned")).kind(),
            ErrorKind::NeedsResync
        );
        let e = http_error(StatusCode::UNAUTHORIZED, &body("unauthorized"));
        assert_eq!(e.kind(), ErrorKind::Permanent);
        assert!(e.to_string().contains("token rejected"));
        assert_eq!(
            http_error(StatusCode::SERVICE_UNAVAILABLE, b"").kind(),
            ErrorKind::Transient
        );
        assert_eq!(
            http_error(StatusCode::INTERNAL_SERVER_ERROR, b"x").kind(),
            ErrorKind::Transient
        );
        assert_eq!(
            http_error(StatusCode::BAD_REQUEST, &body("bad_request")).kind(),
            ErrorKind::Permanent
        );
        // A rate limit is a reason to come back later, not to pause.
        let e = http_error(StatusCode::TOO_MANY_REQUESTS, &body("rate_limited"));
        assert_eq!(e.kind(), ErrorKind::Transient);
        assert!(e.to_string().contains("rate-limited"));
    }
}
