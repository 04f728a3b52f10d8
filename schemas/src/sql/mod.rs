//! SQL generated from the catalogue.
//!
//! - [`sqlite`] and [`postgres`]: the branch pull area (change log, ticks, metadata) and
//!   the capture triggers, plus the optional demo schema.
//! - [`hq`]: the HQ mirror tables `hq.<table>`, the views `hq.<table>_live` and the
//!   set-wise apply statement of each table.
//!
//! Identifiers come from a validated [`crate::Catalogue`] only and are always quoted.

pub mod hq;
pub mod postgres;
pub mod sqlite;

/// Version of the branch pull-area layout. Stored in the pull area's metadata; install
/// upgrades an older layout and refuses a newer one.
pub const PULL_AREA_VERSION: i64 = 1;

/// Quote an identifier (already validated by the catalogue) for SQLite and PostgreSQL.
pub fn q(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// Quote a string literal.
pub fn lit(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}
