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
pub const FILES_SUPERSEDED: &str = "hq_puller_files_superseded_total";
/// Rows loaded by initial loads and resyncs.
pub const LOADED_ROWS: &str = "hq_puller_loaded_rows_total";
/// Differing rows found by the last `verify` of a location and table.
pub const VERIFY_DIFFERENCES: &str = "hq_puller_verify_differences";

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
