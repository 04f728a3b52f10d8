//! The files pull area at the branch: `files_dir` → file index → `_files` events.
//!
//! - [`scan`]: walking the folder (refused names, ignore patterns), streaming sha256.
//! - [`index`]: the index table in the branch database (`_pull_files` / `pull.files`),
//!   whose capture triggers put file events into the change log.
//! - [`watch`]: the watcher task (notifications + periodic rescan + settle rule).
//! - [`serve`]: `GET /v1/files/{sha256}` with `Range`.

pub mod index;
pub mod scan;
pub mod serve;
pub mod watch;
