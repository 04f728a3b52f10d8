//! Connections to the branch database (SQLite or PostgreSQL).

use crate::config::{Backend, Config};
use crate::error::{Error, Result};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use std::str::FromStr;
use std::time::Duration;

/// The branch database.
#[derive(Clone, Debug)]
pub enum Db {
    Sqlite {
        pool: SqlitePool,
        /// Kept to open the dedicated `PRAGMA data_version` connection of the wake task
        /// (shared: the state holding it is cloned per request).
        options: std::sync::Arc<SqliteConnectOptions>,
    },
    Postgres(PgPool),
}

/// How long a request waits for a pooled connection before answering 503.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a SQLite statement waits for a lock held by the application.
pub const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

pub fn sqlite_options(url: &str, create_if_missing: bool) -> Result<SqliteConnectOptions> {
    Ok(SqliteConnectOptions::from_str(url)
        .map_err(|e| Error::config("database_url", format!("not a SQLite URL: {e}")))?
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(SQLITE_BUSY_TIMEOUT)
        .create_if_missing(create_if_missing))
}

impl Db {
    /// Opens a lazy pool: the server starts (and answers 503) while the database is
    /// unreachable, and recovers when it is back.
    pub fn connect_lazy(config: &Config, create_if_missing: bool) -> Result<Db> {
        match config.backend()? {
            Backend::Sqlite => {
                let options = sqlite_options(&config.database_url, create_if_missing)?;
                let pool = SqlitePoolOptions::new()
                    .max_connections(4)
                    .acquire_timeout(ACQUIRE_TIMEOUT)
                    .connect_lazy_with(options.clone());
                Ok(Db::Sqlite {
                    pool,
                    options: std::sync::Arc::new(options),
                })
            }
            Backend::Postgres => {
                let options = PgConnectOptions::from_str(&config.database_url)
                    .map_err(|_| Error::config("database_url", "not a valid PostgreSQL URL"))?;
                let pool = PgPoolOptions::new()
                    .max_connections(8)
                    .acquire_timeout(ACQUIRE_TIMEOUT)
                    .connect_lazy_with(options.application_name("branch-listener"));
                Ok(Db::Postgres(pool))
            }
        }
    }

    pub fn backend(&self) -> Backend {
        match self {
            Db::Sqlite { .. } => Backend::Sqlite,
            Db::Postgres(_) => Backend::Postgres,
        }
    }

    pub async fn close(&self) {
        match self {
            Db::Sqlite { pool, .. } => pool.close().await,
            Db::Postgres(pool) => pool.close().await,
        }
    }
}
