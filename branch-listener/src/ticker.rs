//! The ticker (like PgQ's `pgqd`): a tick every `tick_interval` while new committed
//! changes exist, none when idle. Long ticks-apart windows would make a branch that was
//! unreachable for a day serve one huge window; regular ticks keep windows small.

use crate::db::Db;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub async fn run(db: Db, interval: Duration, shutdown: CancellationToken) {
    let mut every = tokio::time::interval(interval);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = every.tick() => {}
        }
        match db.tick_if_new(crate::db::SQLITE_BUSY_TIMEOUT).await {
            Ok(_) => {
                if failing {
                    tracing::info!("ticker: branch database reachable again");
                }
                failing = false;
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "ticker: cannot tick; will keep trying");
                }
                failing = true;
            }
        }
    }
}
