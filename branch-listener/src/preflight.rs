//! `check-config`'s database check: is the branch database reachable, and is the pull
//! area installed? Reported, not fatal (the service starts while its database is down and
//! answers 503 until it is back), unless `--require-database` asks for a reachable one.

use crate::config::Config;
use crate::db::Db;
use crate::error::{Error, Result};
use std::time::Duration;

/// How long the check waits for the database.
const TIMEOUT: Duration = Duration::from_secs(10);

/// What the check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseState {
    Installed { instance_id: uuid::Uuid },
    NotInstalled,
    Unreachable(String),
}

impl DatabaseState {
    pub fn reachable(&self) -> bool {
        !matches!(self, DatabaseState::Unreachable(_))
    }

    /// One line for `check-config` (no secrets: errors never carry the URL's password).
    pub fn line(&self) -> String {
        match self {
            DatabaseState::Installed { instance_id } => {
                format!("database: reachable, pull area installed (instance {instance_id})")
            }
            DatabaseState::NotInstalled => {
                "database: reachable, pull area NOT installed (run branch-listener install)".into()
            }
            DatabaseState::Unreachable(e) => format!("database: NOT reachable: {e}"),
        }
    }
}

/// Connects (without creating a SQLite file) and reads the pull area's identity.
pub async fn database(config: &Config) -> Result<DatabaseState> {
    let db = Db::connect_lazy(config, false)?;
    let state = match tokio::time::timeout(TIMEOUT, db.meta()).await {
        Ok(Ok(meta)) => DatabaseState::Installed {
            instance_id: meta.instance_id,
        },
        Ok(Err(Error::NotInstalled)) => DatabaseState::NotInstalled,
        Ok(Err(e)) => DatabaseState::Unreachable(e.to_string()),
        Err(_) => DatabaseState::Unreachable(format!("no answer within {TIMEOUT:?}")),
    };
    db.close().await;
    Ok(state)
}
