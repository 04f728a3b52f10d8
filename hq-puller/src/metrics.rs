//! Prometheus metrics (names below) and the optional `/metrics` endpoint.

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::net::SocketAddr;
use std::sync::OnceLock;

pub const APPLIED_CHANGES: &str = "hq_puller_applied_changes_total";
pub const APPLIED_BYTES: &str = "hq_puller_applied_bytes_total";
pub const BACKLOG: &str = "hq_puller_backlog_changes";
pub const LAG: &str = "hq_puller_lag_seconds";
pub const LAST_SUCCESS: &str = "hq_puller_last_success_timestamp_seconds";
pub const ERRORS: &str = "hq_puller_errors_total";
pub const PULL_DURATION: &str = "hq_puller_pull_duration_seconds";
pub const APPLY_DURATION: &str = "hq_puller_apply_duration_seconds";
pub const LOCATION_STATE: &str = "hq_puller_location_state";
pub const JOB_STALLED: &str = "hq_puller_job_stalled";
pub const FILES_DOWNLOADED: &str = "hq_puller_files_downloaded_total";
pub const FILES_DOWNLOADED_BYTES: &str = "hq_puller_files_downloaded_bytes_total";
pub const FILES_CHECKSUM_FAILURES: &str = "hq_puller_files_checksum_failures_total";
pub const FILES_THROTTLED: &str = "hq_puller_files_throttled_total";
pub const FILES_GC_REMOVED: &str = "hq_puller_files_gc_removed_total";
pub const FILES_GC_REMOVED_BYTES: &str = "hq_puller_files_gc_removed_bytes_total";
pub const FILES_SUPERSEDED: &str = "hq_puller_files_superseded_total";
/// Rows loaded by initial loads and resyncs.
pub const LOADED_ROWS: &str = "hq_puller_loaded_rows_total";

/// Every metric name this binary emits (docs/metrics.md documents each).
pub const ALL: &[&str] = &[
    APPLIED_CHANGES,
    APPLIED_BYTES,
    BACKLOG,
    LAG,
    LAST_SUCCESS,
    ERRORS,
    PULL_DURATION,
    APPLY_DURATION,
    LOCATION_STATE,
    JOB_STALLED,
    FILES_DOWNLOADED,
    FILES_DOWNLOADED_BYTES,
    FILES_CHECKSUM_FAILURES,
    FILES_THROTTLED,
    FILES_GC_REMOVED,
    FILES_GC_REMOVED_BYTES,
    FILES_SUPERSEDED,
    LOADED_ROWS,
];

const BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the global recorder once per process (later calls return the same handle).
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let b = PrometheusBuilder::new().set_buckets(BUCKETS).ok()?;
            b.install_recorder().ok()
        })
        .clone()
}

/// Sets `hq_puller_location_state{location,state}` to 1 for the current state, 0 else.
pub fn set_state(location: &str, current: &str) {
    for s in crate::store::state::ALL {
        metrics::gauge!(LOCATION_STATE, "location" => location.to_string(), "state" => s)
            .set(if s == current { 1.0 } else { 0.0 });
    }
}

/// Seeds a location's series from `sync.locations` at start: the state, the last success
/// time, backlog and lag survive a restart, and every counter and histogram exists (at 0)
/// before the first run, so alert expressions see every location from the first scrape.
pub fn restore(row: &crate::store::StatusRow) {
    let l = row.id.clone();
    set_state(&l, &row.state);
    metrics::counter!(APPLIED_CHANGES, "location" => l.clone()).increment(0);
    metrics::counter!(APPLIED_BYTES, "location" => l.clone()).increment(0);
    // Not per location (registering twice is harmless).
    metrics::counter!(FILES_GC_REMOVED).increment(0);
    metrics::counter!(FILES_GC_REMOVED_BYTES).increment(0);
    for kind in [
        crate::ErrorKind::Transient,
        crate::ErrorKind::Permanent,
        crate::ErrorKind::NeedsResync,
    ] {
        metrics::counter!(ERRORS, "location" => l.clone(), "kind" => kind.as_str()).increment(0);
    }
    // Registering a histogram makes it render (count 0) before its first sample.
    let _ = metrics::histogram!(PULL_DURATION, "location" => l.clone());
    let _ = metrics::histogram!(APPLY_DURATION, "location" => l.clone());
    metrics::gauge!(BACKLOG, "location" => l.clone()).set(row.backlog as f64);
    metrics::gauge!(LAG, "location" => l.clone()).set(row.lag_seconds);
    // Never succeeded: 0 (1970), which "stale" alerts treat as stale, as they should.
    let last = row.last_success_at.map(|t| t.timestamp()).unwrap_or(0);
    metrics::gauge!(LAST_SUCCESS, "location" => l.clone()).set(last as f64);
    metrics::counter!(FILES_DOWNLOADED, "location" => l.clone()).increment(0);
    metrics::counter!(FILES_DOWNLOADED_BYTES, "location" => l.clone()).increment(0);
    metrics::counter!(FILES_CHECKSUM_FAILURES, "location" => l.clone()).increment(0);
    metrics::counter!(FILES_THROTTLED, "location" => l.clone()).increment(0);
    metrics::counter!(FILES_SUPERSEDED, "location" => l.clone()).increment(0);
    metrics::counter!(LOADED_ROWS, "location" => l.clone()).increment(0);
    metrics::gauge!(JOB_STALLED, "location" => l).set(0.0);
}

/// A run that found its location caught up: no backlog, no lag, a success now.
pub fn caught_up(location: &str) {
    let l = location.to_string();
    metrics::gauge!(BACKLOG, "location" => l.clone()).set(0.0);
    metrics::gauge!(LAG, "location" => l.clone()).set(0.0);
    metrics::gauge!(LAST_SUCCESS, "location" => l).set(chrono::Utc::now().timestamp() as f64);
}

/// Serves `GET /metrics` until `shutdown`.
pub async fn serve(
    addr: SocketAddr,
    handle: PrometheusHandle,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let h = handle.clone();
            async move { h.render() }
        }),
    );
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving metrics");
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}
