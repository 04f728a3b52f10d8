//! The crate's error type. Every failure carries a [`ErrorKind`] that decides what the
//! scheduler does next: retry later, pause the location, or wait for a resync.

/// What to do about a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Network, timeout, 5xx, HQ database unreachable: retry with backoff.
    Transient,
    /// Bad data or a hostile/buggy listener, rejected token: pause the location until an
    /// operator runs `hq-puller resume`.
    Permanent,
    /// The branch's history no longer matches our cursor (409 instance/lineage, 410
    /// pruned): the location needs a resync.
    NeedsResync,
}

impl ErrorKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            ErrorKind::Transient => "transient",
            ErrorKind::Permanent => "permanent",
            ErrorKind::NeedsResync => "needs_resync",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Invalid configuration (exit code 2).
    #[error("{0}")]
    Config(String),
    /// A pull or apply failure of one location.
    #[error("{message}")]
    Pull { kind: ErrorKind, message: String },
    /// The HQ database, outside a batch (migrations, bookkeeping).
    #[error("HQ database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("HQ database migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("scheduler: {0}")]
    Scheduler(String),
    #[error("{0}")]
    Other(String),
    /// The listener lacks an endpoint (404): an older listener version.
    #[error("{0}")]
    NotSupported(String),
}

impl Error {
    pub fn transient(message: impl Into<String>) -> Error {
        Error::Pull {
            kind: ErrorKind::Transient,
            message: message.into(),
        }
    }
    pub fn permanent(message: impl Into<String>) -> Error {
        Error::Pull {
            kind: ErrorKind::Permanent,
            message: message.into(),
        }
    }
    pub fn resync(message: impl Into<String>) -> Error {
        Error::Pull {
            kind: ErrorKind::NeedsResync,
            message: message.into(),
        }
    }

    /// The kind of this error: how the scheduler reacts to it.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Pull { kind, .. } => *kind,
            Error::Database(e) => db_error_kind(e),
            Error::Config(_) | Error::Migrate(_) => ErrorKind::Permanent,
            Error::Scheduler(_) | Error::Other(_) => ErrorKind::Transient,
            Error::NotSupported(_) => ErrorKind::Permanent,
        }
    }
}

/// Classifies a PostgreSQL error: data errors (SQLSTATE classes 22 and 23), cardinality
/// violations (21: one key written twice by one upsert, i.e. two spellings of one key in
/// a batch) and schema errors (42: mirror tables missing or out of date) are permanent,
/// the rest (connection, serialization, shutdown) transient.
pub fn db_error_kind(e: &sqlx::Error) -> ErrorKind {
    match e {
        sqlx::Error::Database(db) => match db.code().as_deref() {
            Some(c)
                if c.starts_with("21")
                    || c.starts_with("22")
                    || c.starts_with("23")
                    || c.starts_with("42") =>
            {
                ErrorKind::Permanent
            }
            _ => ErrorKind::Transient,
        },
        sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::Decode(_)
        | sqlx::Error::TypeNotFound { .. } => ErrorKind::Permanent,
        _ => ErrorKind::Transient,
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
