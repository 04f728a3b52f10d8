//! `branch-listener`: the branch side of branch-to-HQ replication.
//!
//! - [`config`]: the TOML + `BRANCH_*` configuration and its validation.
//! - [`db`]: connections to the branch database (SQLite or PostgreSQL).
//! - [`install`]: install/uninstall of the pull area and capture triggers (idempotent).
//! - [`pull_area`]: metadata, ticks, windows, acknowledgement, status figures.
//! - [`ticker`]: the background ticker cutting the change log into windows.
//! - [`wake`]: change notification for long-polls (LISTEN/NOTIFY, `PRAGMA data_version`).
//! - [`prune`]: deletion of acknowledged history after the retention.
//! - [`files`]: the files pull area (scan, index, watcher, `/v1/files/{sha256}`).
//! - [`http`]: the pull protocol endpoints (`app(state) -> Router`).
//! - [`snapshot`]: `/v1/snapshot` pages and `/v1/checksums` (initial load, resync, verify).
//! - [`metrics`]: Prometheus metric names and the recorder.
//! - [`serve`]: `run(config, listener, shutdown)`.
//! - [`error`]: the crate's error type and its HTTP mapping.
//! - [`tls`]: HTTPS (rustls) from PEM files; [`limits`]: rate, concurrency and header limits.

pub mod config;
pub mod db;
pub mod error;
pub mod files;
pub mod http;
pub mod install;
pub mod limits;
pub mod metrics;
pub mod preflight;
pub mod prune;
pub mod pull_area;
pub mod serve;
pub mod snapshot;
pub mod ticker;
pub mod tls;
pub mod wake;

pub use config::Config;
pub use error::{Error, ErrorKind, Result};
