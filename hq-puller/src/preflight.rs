//! `check-config`'s database check: is the HQ database reachable, and are its migrations
//! applied? Reported; `--require-database` makes an unreachable database an error (exit 1).

use crate::config::Settings;
use sqlx::postgres::PgConnection;
use sqlx::Connection;
use std::time::Duration;

/// How long the check waits for the database.
const TIMEOUT: Duration = Duration::from_secs(10);

/// What the check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseState {
    /// Reachable; `pending` migrations not applied yet (run `hq-puller migrate`).
    Reachable {
        pending: usize,
    },
    Unreachable(String),
}

impl DatabaseState {
    pub fn reachable(&self) -> bool {
        matches!(self, DatabaseState::Reachable { .. })
    }

    /// One line for `check-config` (sqlx errors never carry the URL's password).
    pub fn line(&self) -> String {
        match self {
            DatabaseState::Reachable { pending: 0 } => "database: reachable, migrated".into(),
            DatabaseState::Reachable { pending } => {
                format!("database: reachable, {pending} migrations pending (run hq-puller migrate)")
            }
            DatabaseState::Unreachable(e) => format!("database: NOT reachable: {e}"),
        }
    }
}

/// Connects once and counts the migrations not applied yet.
pub async fn database(settings: &Settings) -> DatabaseState {
    let check = async {
        // One connection attempt (a pool would retry until its timeout and then report
        // only "timed out", hiding e.g. "connection refused").
        let mut conn = PgConnection::connect(&settings.database_url).await?;
        // A database never migrated has no _sqlx_migrations table: everything is pending.
        let applied: Vec<i64> =
            sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
                .fetch_all(&mut conn)
                .await
                .unwrap_or_default();
        let _ = conn.close().await;
        let pending = schemas::migrations::MIGRATOR
            .iter()
            .filter(|m| !applied.contains(&m.version))
            .count();
        Ok::<_, sqlx::Error>(pending)
    };
    match tokio::time::timeout(TIMEOUT, check).await {
        Ok(Ok(pending)) => DatabaseState::Reachable { pending },
        Ok(Err(e)) => DatabaseState::Unreachable(e.to_string()),
        Err(_) => DatabaseState::Unreachable(format!("no answer within {TIMEOUT:?}")),
    }
}
