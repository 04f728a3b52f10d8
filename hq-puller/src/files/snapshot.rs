//! Files already in a branch's folder, in the initial load and the resync: the pages of
//! wire table `_files` (the branch's file index, keyset by path) after the catalogue
//! tables.
//!
//! - **initial load**: per page, every content is downloaded and verified ([`prepare`],
//!   outside any transaction), then inside the page's transaction the files are placed
//!   and recorded in `sync.files` with `_seq = 0` ([`place_and_record`]) together with
//!   the load's progress. All of a page's file I/O is done before it commits; the stream
//!   from T0 then brings every later file event (its `_seq` > 0 wins).
//! - **resync**: per page, contents are downloaded, new/changed files placed, and the
//!   page's index rows staged in `hq_stage.files` with the progress. The switch
//!   transaction ([`switch`]) replaces the location's `sync.files` rows by the staged set
//!   (paths live at HQ but absent at the branch become `deleted` records); after it
//!   commits, [`sweep`] removes or archives (`file_delete`) every file under
//!   `files_dir/<LOCATION>/` that is not live in `sync.files`.
//!
//! Crashes: before the switch, staged rows and placed files are the branch's current
//! ones, the load resumes at its next page (a re-placed file is the same content);
//! the switch is one transaction; a crash after it leaves at most stray files that are
//! no longer live, which the sweep of the next resync removes/archives (the sweep reads
//! the directory, not a to-do list, so it converges whatever was interrupted).

use super::{place, prepare, Action, FileDelete, Item, Store};
use crate::error::{Error, Result};
use crate::validate::FileEvent;
use crate::App;
use schemas::files::{check_path, is_sha256_hex, FileRow};
use schemas::wire::SnapshotPage;
use std::collections::HashSet;
use std::path::Path;

/// The staging table of a resync's file set.
pub const STAGE: &str = "hq_stage.files";

/// `sync.loads.table_name` once the `_files` pages are all loaded.
pub const FILES_DONE: &str = "(files done)";

/// DDL of [`STAGE`] (unlogged, like the other staging tables).
pub fn create_stage() -> [&'static str; 2] {
    [
        "CREATE SCHEMA IF NOT EXISTS hq_stage",
        "CREATE UNLOGGED TABLE IF NOT EXISTS hq_stage.files (location_id text NOT NULL, \
         path text NOT NULL, sha256 text NOT NULL, size bigint NOT NULL, \
         mtime timestamptz NOT NULL, state text NOT NULL, PRIMARY KEY (location_id, path))",
    ]
}

/// The rows of a `_files` snapshot page as file events (`seq` 0), checked like stream
/// events: exact shape, safe path, lowercase hex sha256, size >= 0.
pub fn page_events(page: &SnapshotPage) -> Result<Vec<FileEvent>> {
    page.rows
        .iter()
        .map(|r| {
            let row: FileRow = serde_json::from_str(r.get()).map_err(|e| {
                Error::permanent(format!(
                    "snapshot page of _files: a row is not exactly {{path, size, sha256, mtime}}: {e}"
                ))
            })?;
            let shown = || format!("{:?}", row.path.chars().take(200).collect::<String>());
            if let Err(why) = check_path(&row.path) {
                return Err(Error::permanent(format!(
                    "snapshot page of _files: path {} refused: {why}",
                    shown()
                )));
            }
            if !is_sha256_hex(&row.sha256) || row.size < 0 {
                return Err(Error::permanent(format!(
                    "snapshot page of _files: file {}: bad sha256 or negative size",
                    shown()
                )));
            }
            Ok(FileEvent {
                seq: 0,
                path: row.path.clone(),
                row: Some(row),
            })
        })
        .collect()
}

/// Downloads and verifies a page's contents (outside any transaction).
pub async fn prepare_page(app: &App, location: &str, page: &SnapshotPage) -> Result<super::Plan> {
    let events = page_events(page)?;
    prepare(app, location, &events).await
}

/// Resync, before the page's transaction: places the page's new/changed files.
pub async fn place_page(location: &str, plan: &super::Plan) -> Result<()> {
    let Some(store) = plan.store.clone() else {
        return Ok(());
    };
    let items: Vec<Item> = plan
        .items
        .iter()
        .filter(|i| matches!(i.action, Action::Store(_)))
        .cloned()
        .collect();
    let loc = location.to_string();
    tokio::task::spawn_blocking(move || place::apply(&store, &loc, &items, FileDelete::Archive))
        .await
        .map_err(|e| Error::Other(format!("file placement task: {e}")))??;
    Ok(())
}

/// Resync, inside the page's transaction: stages the page's index rows.
pub async fn stage_page(
    tx: &mut sqlx::PgConnection,
    location: &str,
    plan: &super::Plan,
) -> Result<()> {
    let rows: Vec<serde_json::Value> = plan
        .items
        .iter()
        .filter_map(|it| match &it.action {
            Action::Store(r) => Some((r, "stored")),
            Action::Superseded(r) => Some((r, "superseded")),
            Action::Delete => None,
        })
        .map(|(r, state)| {
            serde_json::json!({"path": r.path, "sha256": r.sha256, "size": r.size,
                               "mtime": r.mtime, "state": state})
        })
        .collect();
    if rows.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO hq_stage.files AS f (location_id, path, sha256, size, mtime, state) \
         SELECT $2, r.path, r.sha256, r.size, r.mtime, r.state \
         FROM json_to_recordset($1::json) AS r(path text, sha256 text, size bigint, \
              mtime timestamptz, state text) \
         ON CONFLICT (location_id, path) DO UPDATE SET sha256 = EXCLUDED.sha256, \
              size = EXCLUDED.size, mtime = EXCLUDED.mtime, state = EXCLUDED.state",
    )
    .bind(serde_json::Value::Array(rows).to_string())
    .bind(location)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Removes a location's staged file set (a fresh or discarded resync).
pub async fn clear_stage(tx: &mut sqlx::PgConnection, location: &str) -> Result<()> {
    for s in create_stage() {
        sqlx::query(s).execute(&mut *tx).await?;
    }
    sqlx::query("DELETE FROM hq_stage.files WHERE location_id = $1")
        .bind(location)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// The resync's switch, in its transaction: the location's `sync.files` rows become the
/// staged set (`_seq` 0); paths live before and absent at the branch are kept as
/// `deleted` records. Returns how many paths became deleted.
pub async fn switch(tx: &mut sqlx::PgConnection, location: &str) -> Result<u64> {
    let gone = sqlx::query(
        "UPDATE sync.files AS f SET deleted = true, state = 'deleted', sha256 = NULL, \
              size = NULL, mtime = NULL, _seq = 0, stored_at = now() \
         WHERE f.location_id = $1 AND NOT f.deleted AND NOT EXISTS \
              (SELECT 1 FROM hq_stage.files s WHERE s.location_id = $1 AND s.path = f.path)",
    )
    .bind(location)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    sqlx::query(
        "DELETE FROM sync.files f WHERE f.location_id = $1 AND EXISTS \
              (SELECT 1 FROM hq_stage.files s WHERE s.location_id = $1 AND s.path = f.path)",
    )
    .bind(location)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO sync.files (location_id, path, sha256, size, mtime, _seq, deleted, state, stored_at) \
         SELECT location_id, path, sha256, size, mtime, 0, false, state, now() \
         FROM hq_stage.files WHERE location_id = $1",
    )
    .bind(location)
    .execute(&mut *tx)
    .await?;
    sqlx::query("DELETE FROM hq_stage.files WHERE location_id = $1")
        .bind(location)
        .execute(&mut *tx)
        .await?;
    Ok(gone)
}

/// Relative paths of the regular files under `dir` (`/`-separated).
fn files_under(dir: &Path) -> std::io::Result<Vec<String>> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let rd = match std::fs::read_dir(&d) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for e in rd {
            let e = e?;
            let ft = e.file_type()?;
            if ft.is_dir() {
                todo.push(e.path());
            } else if ft.is_file() {
                if let Ok(rel) = e.path().strip_prefix(dir) {
                    if let Some(s) = rel.to_str() {
                        out.push(s.replace(std::path::MAIN_SEPARATOR, "/"));
                    }
                }
            }
        }
    }
    out.sort();
    Ok(out)
}

/// After a resync's switch: every file under `files_dir/<LOCATION>/` that is not live in
/// `sync.files` is removed (`mirror`) or archived (`archive`); archived paths are noted
/// in `sync.files.archived_as`. Idempotent. Returns the paths handled.
pub async fn sweep(app: &App, location: &str, mode: FileDelete) -> Result<Vec<String>> {
    let Some(root) = app.settings.files_dir.as_deref() else {
        return Ok(Vec::new());
    };
    let store = Store::new(root);
    let live: HashSet<String> =
        sqlx::query_scalar("SELECT path FROM sync.files WHERE location_id = $1 AND NOT deleted")
            .bind(location)
            .fetch_all(&app.pool)
            .await?
            .into_iter()
            .collect();
    let dir = store.root.join(location);
    let on_disk = tokio::task::spawn_blocking(move || files_under(&dir))
        .await
        .map_err(|e| Error::Other(format!("file sweep task: {e}")))?
        .map_err(|e| Error::transient(format!("file store: listing {location}: {e}")))?;
    let stray: Vec<Item> = on_disk
        .into_iter()
        .filter(|p| !live.contains(p) && check_path(p).is_ok())
        .map(|path| Item {
            seq: 0,
            path,
            action: Action::Delete,
        })
        .collect();
    if stray.is_empty() {
        return Ok(Vec::new());
    }
    let items = stray.clone();
    let loc = location.to_string();
    let archived = tokio::task::spawn_blocking(move || place::apply(&store, &loc, &items, mode))
        .await
        .map_err(|e| Error::Other(format!("file sweep task: {e}")))??;
    for (it, a) in stray.iter().zip(archived) {
        tracing::info!(location, path = %it.path, archived_as = ?a, "file absent at the branch after resync: removed from HQ's folder");
        if let Some(a) = a {
            sqlx::query(
                "UPDATE sync.files SET archived_as = $3 WHERE location_id = $1 AND path = $2",
            )
            .bind(location)
            .bind(&it.path)
            .bind(a)
            .execute(&app.pool)
            .await?;
        }
    }
    Ok(stray.into_iter().map(|i| i.path).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_under_lists_relative_paths() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("a/b")).unwrap();
        std::fs::write(d.path().join("a/b/x.jpg"), "x").unwrap();
        std::fs::write(d.path().join("y.png"), "y").unwrap();
        assert_eq!(files_under(d.path()).unwrap(), vec!["a/b/x.jpg", "y.png"]);
        assert!(files_under(&d.path().join("none")).unwrap().is_empty());
    }

    #[test]
    fn page_rows_are_checked() {
        let page = |row: &str| SnapshotPage {
            protocol: schemas::wire::PROTOCOL_VERSION,
            location: "b01".into(),
            instance_id: uuid::Uuid::nil(),
            table: "_files".into(),
            rows: vec![serde_json::value::RawValue::from_string(row.into()).unwrap()],
            copy: None,
            next_after: None,
            head: "00000000-0000-0000-0000-000000000000:1:00000000-0000-0000-0000-000000000000"
                .parse()
                .unwrap(),
        };
        let sha = "ab".repeat(32);
        let ok = format!(
            r#"{{"path":"a/b.jpg","size":3,"sha256":"{sha}","mtime":"2026-11-24T09:16:44.123456Z"}}"#
        );
        let ev = page_events(&page(&ok)).unwrap();
        assert_eq!((ev[0].seq, ev[0].path.as_str()), (0, "a/b.jpg"));
        let bad = ok.replace("a/b.jpg", "../x");
        assert!(page_events(&page(&bad))
            .unwrap_err()
            .to_string()
            .contains("refused"));
        let bad = ok.replace(&sha, "XY");
        assert!(page_events(&page(&bad)).is_err());
    }
}
