//! Change notification for long-polls.
//!
//! - PostgreSQL: `LISTEN` on [`schemas::sql::postgres::NOTIFY_CHANNEL`]; the capture
//!   trigger notifies at commit.
//! - SQLite: a dedicated connection polls `PRAGMA data_version` (which changes when
//!   another connection commits) every few milliseconds, only while a long-poll waits.
//!
//! Waiters subscribe to a `watch` channel whose value counts wake-ups.

use crate::db::Db;
use sqlx::Connection;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

/// How often SQLite's `data_version` is checked while a long-poll waits.
const SQLITE_POLL: Duration = Duration::from_millis(5);
/// Pause before reconnecting after the database was unreachable.
const RECONNECT_PAUSE: Duration = Duration::from_secs(1);

#[derive(Clone)]
pub struct Wake {
    tx: Arc<watch::Sender<u64>>,
    waiters: Arc<AtomicUsize>,
    waiter_arrived: Arc<Notify>,
}

/// Held by a waiting long-poll; counts as a waiter until dropped.
pub struct Waiter {
    pub rx: watch::Receiver<u64>,
    waiters: Arc<AtomicUsize>,
}

impl Drop for Waiter {
    fn drop(&mut self) {
        self.waiters.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Default for Wake {
    fn default() -> Self {
        Self::new()
    }
}

impl Wake {
    pub fn new() -> Wake {
        let (tx, _) = watch::channel(0);
        Wake {
            tx: Arc::new(tx),
            waiters: Arc::new(AtomicUsize::new(0)),
            waiter_arrived: Arc::new(Notify::new()),
        }
    }

    /// Subscribe *before* checking for changes, so a commit in between is not missed.
    pub fn subscribe(&self) -> Waiter {
        self.waiters.fetch_add(1, Ordering::SeqCst);
        self.waiter_arrived.notify_one();
        let mut rx = self.tx.subscribe();
        rx.mark_unchanged();
        Waiter {
            rx,
            waiters: self.waiters.clone(),
        }
    }

    pub fn notify(&self) {
        self.tx.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Runs the notification source until shutdown.
    pub async fn run(self, db: Db, shutdown: CancellationToken) {
        let this = &self;
        match db {
            Db::Postgres(pool) => {
                let pool = &pool;
                reconnecting(&shutdown, "change notification listener", || async move {
                    let mut listener = sqlx::postgres::PgListener::connect_with(pool).await?;
                    listener
                        .listen(schemas::sql::postgres::NOTIFY_CHANNEL)
                        .await?;
                    // Anything committed while (re)connecting: let waiters re-check.
                    this.notify();
                    loop {
                        listener.recv().await?;
                        this.notify();
                    }
                })
                .await
            }
            Db::Sqlite { options, .. } => {
                let options = &options;
                reconnecting(&shutdown, "data_version poller", || async move {
                    let mut conn = sqlx::SqliteConnection::connect_with(options).await?;
                    let mut last: i64 = sqlx::query_scalar("PRAGMA data_version")
                        .fetch_one(&mut conn)
                        .await?;
                    loop {
                        if this.waiters.load(Ordering::SeqCst) == 0 {
                            this.waiter_arrived.notified().await;
                            continue;
                        }
                        tokio::time::sleep(SQLITE_POLL).await;
                        let v: i64 = sqlx::query_scalar("PRAGMA data_version")
                            .fetch_one(&mut conn)
                            .await?;
                        if v != last {
                            last = v;
                            this.notify();
                        }
                    }
                })
                .await
            }
        }
    }
}

/// Runs `watch` (which only returns when its connection fails) until shutdown,
/// reconnecting after [`RECONNECT_PAUSE`] whenever it fails.
async fn reconnecting<F, Fut>(shutdown: &CancellationToken, what: &str, mut watch: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<std::convert::Infallible, sqlx::Error>>,
{
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            Err(e) = watch() => {
                tracing::debug!(error = %e, what, "lost its connection");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(RECONNECT_PAUSE) => {}
        }
    }
}
