//! `hq-puller`: pulls each branch's change stream and applies it exactly once to the
//! central PostgreSQL.
//!
//! - [`config`]: TOML + `HQ_*` env, validated into [`config::Settings`].
//! - [`client`]: the listener's HTTP client and the mapping of HTTP failures to kinds.
//! - [`validate`]: checks of a fetched batch (location, cursor, catalogue, keys).
//! - [`apply`]: one HQ transaction per batch: newest change per key, set-wise upserts
//!   guarded by sequence, the cursor.
//! - [`files`]: the file store: download, verify, store once, place, delete/archive.
//! - [`store`]: `sync.locations` and `sync.runs`.
//! - [`pull`]: draining one location (fetch → validate → apply).
//! - [`schedule`]: cron jobs, stream tasks, no overlap, concurrency cap, backoff, watchdog.
//! - [`metrics`]: Prometheus metrics and `/metrics`.
//! - [`dashboard`]: the read-only dashboard and `/api/status` on `admin_listen`.
//! - [`status`]: the `status` command's table and JSON.
//! - [`load`]: initial load and resync by snapshot pages (`sync.loads`), then the stream.
//! - [`verify`]: `verify`: chunk checksums against the branch, drilled to differing keys.
//! - [`progress`]: progress bars (terminal) or periodic log lines.
//! - [`error`]: the error type and its kinds (transient / permanent / needs resync).
//! - [`transport`]: per-location TLS trust (`ca_file`), `allow_plain_http`, response size cap.

pub mod apply;
pub mod client;
pub mod config;
pub mod copy_page;
pub mod dashboard;
pub mod error;
pub mod files;
pub mod load;
pub mod metrics;
pub mod partitions;
pub mod preflight;
pub mod progress;
pub mod pull;
pub mod schedule;
pub mod status;
pub mod store;
pub mod transport;
pub mod validate;
pub mod verify;

use crate::config::Settings;
pub use crate::error::{Error, ErrorKind, Result};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Everything a run needs, shared by the jobs.
pub struct App {
    pub settings: Settings,
    pub pool: PgPool,
    pub statements: apply::Statements,
    clients: HashMap<String, client::Client>,
    /// Cancelled on SIGTERM/SIGINT: no new batches are fetched.
    pub shutdown: CancellationToken,
    /// Global cap on concurrent scheduled pulls.
    pub permits: Arc<tokio::sync::Semaphore>,
    /// In-flight runs, awaited at shutdown.
    pub tracker: TaskTracker,
}

impl App {
    pub async fn connect(settings: Settings, shutdown: CancellationToken) -> Result<Arc<App>> {
        let pool = PgPoolOptions::new()
            // Loads insert a page while committing the previous one: two per pull.
            .max_connections((settings.max_concurrent_pulls * 2 + 4) as u32)
            .acquire_timeout(Duration::from_secs(10))
            .connect(&settings.database_url)
            .await?;
        let mut clients = HashMap::new();
        for l in &settings.locations {
            clients.insert(l.id.clone(), client::Client::new(l)?);
        }
        Ok(Arc::new(App {
            statements: apply::Statements::new(&settings.catalogue),
            permits: Arc::new(tokio::sync::Semaphore::new(settings.max_concurrent_pulls)),
            settings,
            pool,
            clients,
            shutdown,
            tracker: TaskTracker::new(),
        }))
    }

    pub fn client(&self, location: &str) -> Result<&client::Client> {
        self.clients
            .get(location)
            .ok_or_else(|| Error::Other(format!("unknown location {location:?}")))
    }
}

/// `hq-puller migrate`: the `sync` schema, the mirror tables, the configured locations.
pub async fn migrate(app: &App) -> Result<()> {
    schemas::migrations::MIGRATOR.run(&app.pool).await?;
    for stmt in schemas::sql::hq::create_mirror_tables(&app.settings.catalogue) {
        sqlx::query(&stmt).execute(&app.pool).await?;
    }
    register(app).await
}

/// The configured locations in `sync.locations`, and the partitions of those that stream.
async fn register(app: &App) -> Result<()> {
    store::register_locations(&app.pool, &app.settings.locations).await?;
    partitions::ensure_streaming(&app.pool, &app.settings.catalogue).await
}

/// Refuses to run against a database whose migrations are missing or behind.
pub async fn check_migrated(app: &App) -> Result<()> {
    let applied: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
            .fetch_all(&app.pool)
            .await
            .map_err(|_| {
                Error::Other("the HQ database is not migrated: run hq-puller migrate".into())
            })?;
    for m in schemas::migrations::MIGRATOR.iter() {
        if !applied.contains(&m.version) {
            return Err(Error::Other(format!(
                "HQ database lacks migration {} ({}): run hq-puller migrate",
                m.version, m.description
            )));
        }
    }
    for t in &app.settings.catalogue.tables {
        let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(format!("hq.\"{}\"", t.name))
            .fetch_one(&app.pool)
            .await?;
        if !exists {
            return Err(Error::Other(format!(
                "mirror table hq.{} is missing: run hq-puller migrate",
                t.name
            )));
        }
    }
    Ok(())
}

/// `hq-puller pull`: drains the given locations once, at most `max_concurrent_pulls` at
/// a time, and returns one report per location.
pub async fn pull_once(app: &Arc<App>, locations: &[String]) -> Result<Vec<pull::RunReport>> {
    register(app).await?;
    let mut tasks = Vec::new();
    for id in locations {
        let (app, id) = (app.clone(), id.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = app.permits.clone().acquire_owned().await;
            pull::drain(&app, &id, None).await
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(
            t.await
                .map_err(|e| Error::Other(format!("pull task: {e}")))??,
        );
    }
    Ok(out)
}

/// `hq-puller run`: the service. Returns after `shutdown` once in-flight batches have
/// committed or rolled back.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> Result<()> {
    transport::warn_plain_http(&settings);
    let app = App::connect(settings, shutdown.clone()).await?;
    check_migrated(&app).await?;
    register(&app).await?;
    let stale = store::close_stale_runs(&app.pool).await?;
    if stale > 0 {
        tracing::warn!(
            runs = stale,
            "marked runs of a previous process as interrupted"
        );
    }
    for row in store::status(&app.pool).await? {
        metrics::set_state(&row.id, &row.state);
    }
    if let Some(addr) = app.settings.metrics_listen {
        if let Some(handle) = metrics::install() {
            // Every location's state; the rest for enabled ones only: a disabled location
            // must not look stale to alerts.
            for row in store::status(&app.pool).await? {
                metrics::set_state(&row.id, &row.state);
                if app.settings.location(&row.id).is_some_and(|l| l.enabled) {
                    metrics::restore(&row);
                }
            }
            let token = shutdown.clone();
            app.tracker.spawn(async move {
                if let Err(e) = metrics::serve(addr, handle, token).await {
                    tracing::error!(%addr, error = %e, "metrics endpoint failed");
                }
            });
        }
    }
    if let Some(addr) = app.settings.admin_listen {
        let (a, token) = (app.clone(), shutdown.clone());
        app.tracker.spawn(async move {
            if let Err(e) = dashboard::serve(a, addr, token).await {
                tracing::error!(%addr, error = %e, "dashboard failed");
            }
        });
    }
    let sched = schedule::Scheduler::start(app.clone()).await?;
    schemas::systemd::notify_ready();
    schemas::systemd::spawn_watchdog();
    tracing::info!(
        locations = app.settings.locations.iter().filter(|l| l.enabled).count(),
        "hq-puller running"
    );
    shutdown.cancelled().await;
    schemas::systemd::notify_stopping();
    tracing::info!("shutting down: finishing in-flight batches");
    sched.shutdown().await;
    app.tracker.close();
    app.tracker.wait().await;
    let stale = store::close_stale_runs(&app.pool).await?;
    if stale > 0 {
        tracing::warn!(runs = stale, "runs interrupted by shutdown");
    }
    app.pool.close().await;
    tracing::info!("stopped");
    Ok(())
}
