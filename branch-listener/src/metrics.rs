//! Prometheus metrics (`GET /metrics`). Counters are recorded where things happen;
//! the pull-area gauges are refreshed from the database at each scrape.

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;

pub const PULL_AREA_DEPTH: &str = "branch_listener_pull_area_depth";
pub const UNACKED_CHANGES: &str = "branch_listener_unacked_changes";
pub const OLDEST_UNACKED_AGE_SECONDS: &str = "branch_listener_oldest_unacked_age_seconds";
pub const HEAD_SEQ: &str = "branch_listener_head_seq";
pub const SERVED_CHANGES_TOTAL: &str = "branch_listener_served_changes_total";
pub const REQUESTS_TOTAL: &str = "branch_listener_requests_total";
pub const PRUNED_CHANGES_TOTAL: &str = "branch_listener_pruned_changes_total";
pub const TICKS_TOTAL: &str = "branch_listener_ticks_total";
pub const FILES_INDEXED_TOTAL: &str = "branch_listener_files_indexed_total";
pub const FILES_SKIPPED_TOTAL: &str = "branch_listener_files_skipped_total";
pub const FILES_SCAN_DURATION_SECONDS: &str = "branch_listener_files_scan_duration_seconds";
pub const FILES_SERVED_BYTES_TOTAL: &str = "branch_listener_files_served_bytes_total";
pub const SNAPSHOT_ROWS_TOTAL: &str = "branch_listener_snapshot_rows_total";

/// Installs the process-wide recorder once (tests start several servers in one process).
pub fn handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let h = PrometheusBuilder::new()
                .install_recorder()
                .expect("no other metrics recorder is installed");
            metrics::describe_gauge!(PULL_AREA_DEPTH, "Rows in the pull area");
            metrics::describe_gauge!(UNACKED_CHANGES, "Changes not yet acknowledged by HQ");
            metrics::describe_gauge!(
                OLDEST_UNACKED_AGE_SECONDS,
                "Age of the oldest change not yet acknowledged by HQ"
            );
            metrics::describe_gauge!(HEAD_SEQ, "Highest sequence written to the pull area");
            metrics::describe_counter!(SERVED_CHANGES_TOTAL, "Changes served to HQ");
            metrics::describe_counter!(REQUESTS_TOTAL, "HTTP requests by endpoint and status");
            metrics::describe_counter!(PRUNED_CHANGES_TOTAL, "Acknowledged changes pruned");
            metrics::describe_counter!(TICKS_TOTAL, "Ticks made");
            metrics::describe_counter!(
                FILES_INDEXED_TOTAL,
                "File index rows written (op: upsert or delete), each one a file event"
            );
            metrics::describe_counter!(
                FILES_SKIPPED_TOTAL,
                "Files refused by a scan (reason: symlink_outside, not_utf8, bad_name, unreadable)"
            );
            metrics::describe_histogram!(
                FILES_SCAN_DURATION_SECONDS,
                "Duration of a scan of files_dir (walk, hash of changed files, index writes)"
            );
            metrics::describe_counter!(FILES_SERVED_BYTES_TOTAL, "File content bytes served");
            metrics::describe_counter!(SNAPSHOT_ROWS_TOTAL, "Rows served by /v1/snapshot");
            h
        })
        .clone()
}
