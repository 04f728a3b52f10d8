//! The crate's error type: every failure carries a kind (retry later or not) and maps to
//! one protocol error code. Database text is logged, never sent to a client.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use schemas::wire::{error_code, ErrorBody, ErrorDetail};
use uuid::Uuid;

/// Whether retrying the same operation later can succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The branch database is unreachable or busy: retry with backoff.
    Retryable,
    /// Retrying the same request cannot succeed (bad input, lineage, configuration).
    Permanent,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("config key `{key}`: {message}")]
    Config { key: String, message: String },
    #[error("{0}")]
    BadRequest(String),
    #[error("missing or wrong bearer token")]
    Unauthorized,
    #[error("cursor belongs to pull-area instance {theirs}, this branch's pull area is instance {ours} (the branch database was re-installed or replaced)")]
    InstanceMismatch { ours: Uuid, theirs: Uuid },
    #[error("{0}")]
    LineageMismatch(String),
    #[error("{0}")]
    Pruned(String),
    #[error(
        "the pull area is not installed in the branch database (run: branch-listener install)"
    )]
    NotInstalled,
    #[error("install: {0}")]
    Install(String),
    /// The branch database could not be reached or was busy. The text is for the log.
    #[error("branch database unavailable: {0}")]
    Unavailable(String),
    /// Any other database error. The text is for the log.
    #[error("branch database error: {0}")]
    Database(String),
    #[error("{0}")]
    Io(String),
    /// `GET /v1/files/SHA256`: no indexed file has that content (any more).
    #[error("no file with sha256 {0} is indexed at this branch (changed again or deleted: a later event supersedes it)")]
    FileNotFound(String),
}

impl Error {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Unavailable(_) | Error::NotInstalled | Error::Io(_) => ErrorKind::Retryable,
            _ => ErrorKind::Permanent,
        }
    }

    pub fn config(key: &str, message: impl Into<String>) -> Error {
        Error::Config {
            key: key.into(),
            message: message.into(),
        }
    }

    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            Error::BadRequest(_) => (StatusCode::BAD_REQUEST, error_code::BAD_REQUEST),
            Error::Unauthorized => (StatusCode::UNAUTHORIZED, error_code::UNAUTHORIZED),
            Error::InstanceMismatch { .. } => (StatusCode::CONFLICT, error_code::INSTANCE_MISMATCH),
            Error::LineageMismatch(_) => (StatusCode::CONFLICT, error_code::LINEAGE_MISMATCH),
            Error::Pruned(_) => (StatusCode::GONE, error_code::PRUNED),
            Error::FileNotFound(_) => (StatusCode::NOT_FOUND, error_code::FILE_NOT_FOUND),
            Error::Unavailable(_) | Error::NotInstalled => {
                (StatusCode::SERVICE_UNAVAILABLE, error_code::UNAVAILABLE)
            }
            _ => (StatusCode::INTERNAL_SERVER_ERROR, error_code::INTERNAL),
        }
    }

    /// The message a client sees: never database text.
    fn public_message(&self) -> String {
        match self {
            Error::Unavailable(_) => {
                "the branch database is unreachable or busy; retry later".into()
            }
            Error::Database(_) | Error::Io(_) | Error::Install(_) | Error::Config { .. } => {
                "internal error; see the listener's log".into()
            }
            other => other.to_string(),
        }
    }
}

/// Classifies a database error: connection trouble and lock contention are retryable
/// (503), anything else is an internal error (500).
impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Error {
        use sqlx::Error as E;
        let text = e.to_string();
        match &e {
            E::Io(_)
            | E::Tls(_)
            | E::Protocol(_)
            | E::PoolTimedOut
            | E::PoolClosed
            | E::WorkerCrashed => Error::Unavailable(text),
            E::Database(db) => {
                let code = db.code().map(|c| c.to_string()).unwrap_or_default();
                let pg_unavailable = ["08", "53", "57", "3D", "28"]
                    .iter()
                    .any(|class| code.starts_with(class))
                    || code == "55000"
                    || code == "40001"
                    || code == "40P01";
                // SQLite primary result codes: BUSY, LOCKED, IOERR, CANTOPEN, NOTADB
                // (extended codes keep the primary code in their low byte).
                let sqlite_unavailable = code
                    .parse::<i64>()
                    .map(|c| matches!(c & 0xff, 5 | 6 | 10 | 14 | 26))
                    .unwrap_or(false);
                if pg_unavailable || sqlite_unavailable {
                    Error::Unavailable(text)
                } else {
                    Error::Database(text)
                }
            }
            _ => Error::Database(text),
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        if status.is_server_error() {
            tracing::warn!(error = %self, code, "request failed");
        }
        let body = ErrorBody {
            error: ErrorDetail {
                code: code.into(),
                message: self.public_message(),
            },
        };
        (status, axum::Json(body)).into_response()
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    async fn body(e: Error) -> (u16, ErrorBody) {
        let resp = e.into_response();
        let status = resp.status().as_u16();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn database_text_never_reaches_the_client() {
        let (status, b) = body(Error::Database(
            "syntax error near SELECT secret FROM t".into(),
        ))
        .await;
        assert_eq!((status, b.error.code.as_str()), (500, "internal"));
        assert!(!b.error.message.contains("SELECT"), "{}", b.error.message);
        let (status, b) = body(Error::Unavailable("connection to 10.0.0.1 refused".into())).await;
        assert_eq!((status, b.error.code.as_str()), (503, "unavailable"));
        assert!(!b.error.message.contains("10.0.0.1"));
    }

    #[tokio::test]
    async fn protocol_errors_map_to_their_codes() {
        let ours = Uuid::new_v4();
        let theirs = Uuid::new_v4();
        let (status, b) = body(Error::InstanceMismatch { ours, theirs }).await;
        assert_eq!((status, b.error.code.as_str()), (409, "instance_mismatch"));
        assert!(
            b.error.message.contains(&ours.to_string())
                && b.error.message.contains(&theirs.to_string())
        );
        assert_eq!(body(Error::Pruned("x".into())).await.0, 410);
        assert_eq!(body(Error::LineageMismatch("x".into())).await.0, 409);
        assert_eq!(body(Error::BadRequest("x".into())).await.0, 400);
        assert_eq!(body(Error::Unauthorized).await.0, 401);
        assert_eq!(body(Error::NotInstalled).await.0, 503);
        let (status, b) = body(Error::FileNotFound("ab".into())).await;
        assert_eq!((status, b.error.code.as_str()), (404, "file_not_found"));
    }

    #[test]
    fn connection_failures_are_retryable() {
        let e: Error = sqlx::Error::PoolTimedOut.into();
        assert_eq!(e.kind(), ErrorKind::Retryable);
        let e: Error = sqlx::Error::RowNotFound.into();
        assert_eq!(e.kind(), ErrorKind::Permanent);
    }
}
