//! Shared contract between `branch-listener` and `hq-puller`.
//!
//! - [`catalogue`]: the replicated tables (the built-in product-management schema plus
//!   tables added by a catalogue file), validated identifiers and column types.
//! - [`wire`]: the JSON types of the pull protocol (`/v1/changes`, `/v1/status`, errors).
//! - [`cursor`]: the opaque cursor HQ stores and sends back as `after`.
//! - [`sql`]: SQL generated from the catalogue: the branch pull area and triggers for
//!   SQLite and PostgreSQL, and the HQ mirror tables, views and apply statements.
//! - [`files`]: the file events (`_files`) and the path rules of the files pull area.
//! - [`migrations`]: the sqlx migrations of the HQ `sync` schema.
//! - [`secret`]: bearer tokens read from files with permission checks, compared in
//!   constant time, never printed.
//! - [`canonical`]: canonical values and row hashes (verify, the test oracle).
//! - [`telemetry`]: tracing set-up shared by both binaries.
//! - [`systemd`]: `READY=1` / `STOPPING=1` notifications (`Type=notify`).

pub mod canonical;
pub mod catalogue;
pub mod cursor;
pub mod files;
pub mod migrations;
pub mod secret;
pub mod sql;
pub mod systemd;
pub mod telemetry;
pub mod wire;

pub use catalogue::{Catalogue, Column, ColumnType, Table};
pub use cursor::Cursor;
