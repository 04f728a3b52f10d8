//! The HQ file store: what a batch's file events (`_files`) become at HQ.
//!
//! Layout under `files_dir`:
//! - `<LOCATION>/<PATH>`: the current files of each location (hard links to objects);
//! - `.objects/ab/<sha256>`: content stored once, verified (size and sha256);
//! - `.tmp/`: downloads in progress (`<sha256>.<location>.part`, resumed with `Range`) and
//!   placement temporaries;
//! - `.archive/<LOCATION>/<PATH>.<UTC timestamp>`: deleted files (`file_delete =
//!   "archive"`, the default).
//!
//! Per batch: [`prepare`] keeps the newest event per path and downloads (bounded
//! concurrency) every content not yet stored, before the HQ transaction; then, inside
//! the batch's transaction after its cursor check, [`place_and_record`] links/removes
//! the files (temp name + rename + directory fsync) and records every event in
//! `sync.files`. All file I/O completes before the batch commits (invariant 6). A
//! checksum or size mismatch is an error (retried, never stored, cursor unmoved); a
//! listener answering `file_not_found` means a later event supersedes this one: it is
//! recorded as `superseded` and the batch goes on.

pub mod direct;
pub mod download;
pub mod gc;
pub mod place;
pub mod snapshot;

use crate::error::{Error, Result};
use crate::validate::FileEvent;
use crate::{metrics as m, App};
use schemas::files::FileRow;
use serde::Deserialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Downloads running at once per batch. Many in flight keep both the listener's disk
/// reads and HQ's fsyncs overlapped (10,000 images: 8 → 32 took 7.4 s → 5.9 s,
/// `bench-files`); [`download::ALL_DOWNLOADS`] bounds them across locations.
pub const DOWNLOAD_CONCURRENCY: usize = 32;

/// What a file deleted at the branch becomes at HQ.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileDelete {
    /// Removed.
    Mirror,
    /// Moved to `.archive/<LOCATION>/<PATH>.<UTC timestamp>`.
    #[default]
    Archive,
}

/// The file store under `files_dir`.
#[derive(Debug, Clone)]
pub struct Store {
    pub root: PathBuf,
}

impl Store {
    pub fn new(root: &Path) -> Store {
        Store {
            root: root.to_path_buf(),
        }
    }
    pub fn object(&self, sha256: &str) -> PathBuf {
        self.root.join(".objects").join(&sha256[..2]).join(sha256)
    }
    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join(".tmp")
    }
    /// `files_dir/<location>/<path>` (path already checked: relative, no `..`).
    pub fn target(&self, location: &str, path: &str) -> PathBuf {
        self.root.join(location).join(path)
    }
    pub fn archive_dir(&self, location: &str) -> PathBuf {
        self.root.join(".archive").join(location)
    }
}

/// What happens to one path in this batch (its newest event).
#[derive(Debug, Clone)]
pub enum Action {
    /// Content verified in the object store: place it.
    Store(FileRow),
    /// The listener no longer has this content: a later event supersedes it.
    Superseded(FileRow),
    /// Deleted at the branch.
    Delete,
}

#[derive(Debug, Clone)]
pub struct Item {
    pub seq: i64,
    pub path: String,
    pub action: Action,
}

/// A batch's file work, ready for its transaction.
#[derive(Debug, Default)]
pub struct Plan {
    pub store: Option<Store>,
    pub delete_mode: FileDelete,
    /// Newest event per path, in sequence order.
    pub items: Vec<Item>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

/// The newest event per path, in sequence order.
pub fn newest_per_path(events: &[FileEvent]) -> Vec<&FileEvent> {
    let mut newest: HashMap<&str, &FileEvent> = HashMap::new();
    for e in events {
        newest
            .entry(e.path.as_str())
            .and_modify(|n| {
                if n.seq < e.seq {
                    *n = e
                }
            })
            .or_insert(e);
    }
    let mut v: Vec<&FileEvent> = newest.into_values().collect();
    v.sort_unstable_by_key(|e| e.seq);
    v
}

/// Downloads and verifies the contents a batch needs (outside any transaction).
pub async fn prepare(app: &App, location: &str, events: &[FileEvent]) -> Result<Plan> {
    use futures::StreamExt;
    if events.is_empty() {
        return Ok(Plan::default());
    }
    let Some(root) = app.settings.files_dir.as_deref() else {
        return Err(Error::permanent(format!(
            "location {location} sent file events (table _files, first path {:?}) but files_dir is not configured at HQ: set files_dir, then run hq-puller resume",
            events[0].path.chars().take(200).collect::<String>()
        )));
    };
    let store = Store::new(root);
    let loc = app
        .settings
        .location(location)
        .ok_or_else(|| Error::Other(format!("unknown location {location:?}")))?;
    let client = app.client(location)?;
    let newest = newest_per_path(events);
    // One download per distinct content.
    let mut seen = std::collections::HashSet::new();
    let wanted: Vec<(String, i64, String)> = newest
        .iter()
        .filter_map(|e| e.row.as_ref())
        .filter(|r| seen.insert(r.sha256.as_str()))
        .map(|r| (r.sha256.clone(), r.size, r.path.clone()))
        .collect();
    let results: Vec<Result<(String, download::Fetched)>> =
        futures::stream::iter(wanted.into_iter().map(|(sha, size, path)| {
            let store = &store;
            async move {
                download::fetch(client, store, location, &path, &sha, size)
                    .await
                    .map(|f| (sha, f))
            }
        }))
        .buffer_unordered(DOWNLOAD_CONCURRENCY)
        .collect()
        .await;
    let mut fetched = HashMap::new();
    for r in results {
        let (sha, f) = r?;
        fetched.insert(sha, f);
    }
    let items = newest
        .into_iter()
        .map(|e| {
            let action = match &e.row {
                None => Action::Delete,
                Some(r) => match fetched.get(&r.sha256) {
                    Some(download::Fetched::Superseded) => {
                        metrics::counter!(m::FILES_SUPERSEDED, "location" => location.to_string())
                            .increment(1);
                        tracing::info!(location, seq = e.seq, path = %e.path, sha256 = %r.sha256, "file event superseded: the branch no longer has this content");
                        Action::Superseded(r.clone())
                    }
                    _ => Action::Store(r.clone()),
                },
            };
            Item {
                seq: e.seq,
                path: e.path.clone(),
                action,
            }
        })
        .collect();
    Ok(Plan {
        store: Some(store),
        delete_mode: loc.file_delete,
        items,
    })
}

/// Inside the batch's transaction (after its cursor check): places and removes the
/// files, then records every event in `sync.files` (guarded by `_seq`).
pub async fn place_and_record(
    tx: &mut sqlx::PgConnection,
    location: &str,
    plan: &Plan,
) -> Result<()> {
    let Some(store) = plan.store.clone() else {
        return Ok(());
    };
    let items = plan.items.clone();
    let mode = plan.delete_mode;
    let loc = location.to_string();
    let archived = tokio::task::spawn_blocking(move || place::apply(&store, &loc, &items, mode))
        .await
        .map_err(|e| Error::Other(format!("file placement task: {e}")))??;
    let rows: Vec<serde_json::Value> = plan
        .items
        .iter()
        .zip(archived)
        .map(|(it, archived_as)| {
            let (row, state, deleted) = match &it.action {
                Action::Store(r) => (Some(r), "stored", false),
                Action::Superseded(r) => (Some(r), "superseded", false),
                Action::Delete => (None, "deleted", true),
            };
            serde_json::json!({
                "path": it.path,
                "sha256": row.map(|r| r.sha256.clone()),
                "size": row.map(|r| r.size),
                "mtime": row.map(|r| r.mtime),
                "_seq": it.seq,
                "deleted": deleted,
                "state": state,
                "archived_as": archived_as,
            })
        })
        .collect();
    let json = serde_json::Value::Array(rows).to_string();
    sqlx::query(
        "INSERT INTO sync.files AS f (location_id, path, sha256, size, mtime, _seq, deleted, state, archived_as, stored_at) \
         SELECT $2, r.path, r.sha256, r.size, r.mtime, r._seq, r.deleted, r.state, r.archived_as, now() \
         FROM json_to_recordset($1::json) AS r(path text, sha256 text, size bigint, mtime timestamptz, \
              _seq bigint, deleted boolean, state text, archived_as text) \
         ON CONFLICT (location_id, path) DO UPDATE SET sha256 = EXCLUDED.sha256, size = EXCLUDED.size, \
              mtime = EXCLUDED.mtime, _seq = EXCLUDED._seq, deleted = EXCLUDED.deleted, \
              state = EXCLUDED.state, archived_as = COALESCE(EXCLUDED.archived_as, f.archived_as), \
              stored_at = EXCLUDED.stored_at \
         WHERE f._seq < EXCLUDED._seq",
    )
    .bind(&json)
    .bind(location)
    .execute(&mut *tx)
    .await
    .map_err(|e| {
        let kind = crate::error::db_error_kind(&e);
        let msg = format!("recording file events in sync.files: {e}");
        match kind {
            crate::ErrorKind::Transient => Error::transient(msg),
            _ => Error::permanent(msg),
        }
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(seq: i64, path: &str, sha: Option<&str>) -> FileEvent {
        FileEvent {
            seq,
            path: path.into(),
            row: sha.map(|s| FileRow {
                path: path.into(),
                size: 1,
                sha256: s.repeat(64),
                mtime: chrono::Utc::now(),
            }),
        }
    }

    #[test]
    fn newest_event_per_path_in_sequence_order() {
        let evs = vec![
            ev(1, "a", Some("1")),
            ev(2, "b", Some("2")),
            ev(3, "a", Some("3")),
            ev(4, "b", None),
            ev(5, "c", Some("5")),
        ];
        let n = newest_per_path(&evs);
        let got: Vec<(i64, &str)> = n.iter().map(|e| (e.seq, e.path.as_str())).collect();
        assert_eq!(got, vec![(3, "a"), (4, "b"), (5, "c")]);
    }

    #[test]
    fn file_delete_default_and_per_location_override() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let token = d.path().join("token");
        std::fs::write(&token, "test-token-0123456789abcdef\n").unwrap();
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
        let loc = |id: &str, extra: &str| {
            format!(
                "[[locations]]\nid = \"{id}\"\nurl = \"http://127.0.0.1:1\"\ntoken_file = \"{}\"\n{extra}\n",
                token.display()
            )
        };
        let load = |top: &str| {
            let p = d.path().join("c.toml");
            std::fs::write(
                &p,
                format!(
                    "database_url = \"postgres://x@h/db\"\nallow_plain_http = true\n{top}\n{}{}",
                    loc("b01", ""),
                    loc("b02", "file_delete = \"archive\"")
                ),
            )
            .unwrap();
            crate::config::load(&p)
        };
        let s = load("").unwrap();
        assert_eq!(s.location("b01").unwrap().file_delete, FileDelete::Archive);
        let s = load("file_delete = \"mirror\"").unwrap();
        assert_eq!(s.location("b01").unwrap().file_delete, FileDelete::Mirror);
        assert_eq!(s.location("b02").unwrap().file_delete, FileDelete::Archive);
        let e = load("file_delete = \"shred\"").unwrap_err().to_string();
        assert!(e.contains("shred"), "{e}");
    }

    #[test]
    fn delete_mode_parses() {
        #[derive(Deserialize)]
        struct C {
            m: FileDelete,
        }
        let c: C = serde_json::from_str(r#"{"m":"mirror"}"#).unwrap();
        assert_eq!(c.m, FileDelete::Mirror);
        assert!(serde_json::from_str::<C>(r#"{"m":"shred"}"#).is_err());
        assert_eq!(FileDelete::default(), FileDelete::Archive);
    }
}
