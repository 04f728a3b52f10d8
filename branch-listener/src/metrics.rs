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
/// PostgreSQL branches: age of the oldest transaction that wrote to the pull area and is
/// still open (it holds the tick horizon back); 0 when none (always 0 on SQLite).
pub const OLDEST_OPEN_WRITER_AGE_SECONDS: &str = "branch_listener_oldest_open_writer_age_seconds";
/// 1 when the last scrape could read the pull area, 0 when the database was unavailable.
pub const DATABASE_UP: &str = "branch_listener_database_up";

/// Every metric name this binary emits (docs/metrics.md documents each).
pub const ALL: &[&str] = &[
    PULL_AREA_DEPTH,
    UNACKED_CHANGES,
    OLDEST_UNACKED_AGE_SECONDS,
    HEAD_SEQ,
    SERVED_CHANGES_TOTAL,
    REQUESTS_TOTAL,
    PRUNED_CHANGES_TOTAL,
    TICKS_TOTAL,
    OLDEST_OPEN_WRITER_AGE_SECONDS,
    DATABASE_UP,
    FILES_INDEXED_TOTAL,
    FILES_SKIPPED_TOTAL,
    FILES_SCAN_DURATION_SECONDS,
    FILES_SERVED_BYTES_TOTAL,
    SNAPSHOT_ROWS_TOTAL,
    crate::limits::REJECTED_TOTAL,
];

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
            metrics::describe_gauge!(
                OLDEST_OPEN_WRITER_AGE_SECONDS,
                "Age of the oldest open transaction holding the tick horizon back (PostgreSQL)"
            );
            metrics::describe_gauge!(DATABASE_UP, "1 when the pull area could be read");
            // Counters exist from the start (0), so rates and alerts work before traffic.
            metrics::counter!(SERVED_CHANGES_TOTAL).increment(0);
            metrics::counter!(PRUNED_CHANGES_TOTAL).increment(0);
            metrics::counter!(TICKS_TOTAL).increment(0);
            metrics::counter!(FILES_INDEXED_TOTAL, "op" => "upsert").increment(0);
            metrics::counter!(FILES_INDEXED_TOTAL, "op" => "delete").increment(0);
            metrics::counter!(FILES_SERVED_BYTES_TOTAL).increment(0);
            for reason in ["symlink_outside", "not_utf8", "bad_name", "unreadable"] {
                metrics::counter!(FILES_SKIPPED_TOTAL, "reason" => reason).increment(0);
            }
            let _ = metrics::histogram!(FILES_SCAN_DURATION_SECONDS);
            metrics::counter!(SNAPSHOT_ROWS_TOTAL).increment(0);
            metrics::describe_counter!(
                crate::limits::REJECTED_TOTAL,
                "Requests refused by a limit (reason: rate, header_size, concurrency)"
            );
            for reason in ["rate", "header_size", "concurrency"] {
                metrics::counter!(crate::limits::REJECTED_TOTAL, "reason" => reason).increment(0);
            }
            h
        })
        .clone()
}
