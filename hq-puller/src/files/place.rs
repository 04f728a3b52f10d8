//! Placing and removing files under `files_dir/<LOCATION>/` (blocking; called inside the
//! batch's transaction, after its cursor check).
//!
//! A file is put in place atomically: hard link (or, where links are impossible, a copy
//! that is fsync'ed) of its verified object to a temporary name in `.tmp/`, `rename`
//! over the target; every directory touched (targets, archive, objects) is fsync'ed
//! once at the end, before the batch's transaction commits. A reader sees the old or the new
//! file, never a partial one. Deletes are mirrored (removed) or archived
//! (`.archive/<LOCATION>/<PATH>.<UTC timestamp>`).

use super::download::{create_dirs, sync_dir};
use super::{Action, FileDelete, Item, Store};
use crate::error::{Error, Result};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn io_err(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::transient(format!("file store: {what} {}: {e}", path.display()))
}

/// Applies the items in order; returns per item the archive path (relative to
/// `files_dir`) of an archived delete.
pub fn apply(
    store: &Store,
    location: &str,
    items: &[Item],
    mode: FileDelete,
) -> Result<Vec<Option<String>>> {
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S%.6fZ").to_string();
    let mut out = Vec::with_capacity(items.len());
    // Directories whose entries changed: fsync'ed once each at the end, before the
    // batch's transaction commits.
    let mut dirs = BTreeSet::new();
    if items.iter().any(|it| matches!(it.action, Action::Store(_))) {
        create_dirs(&store.tmp_dir())?;
    }
    for it in items {
        out.push(match &it.action {
            Action::Store(r) => {
                place(store, location, &it.path, &r.sha256, &mut dirs)?;
                None
            }
            Action::Superseded(_) => None,
            Action::Delete => remove(store, location, &it.path, mode, &stamp, &mut dirs)?,
        });
    }
    for d in &dirs {
        sync_dir(d).map_err(|e| io_err("syncing", d, e))?;
    }
    Ok(out)
}

fn place(
    store: &Store,
    location: &str,
    path: &str,
    sha256: &str,
    dirs: &mut BTreeSet<PathBuf>,
) -> Result<()> {
    let object = store.object(sha256);
    if let Some(d) = object.parent() {
        dirs.insert(d.to_path_buf());
    }
    let target = store.target(location, path);
    let dir = target.parent().expect("target has a parent");
    // `dirs` holds the directories already made (and to be synced).
    if !dirs.contains(dir) {
        create_dirs(dir)?;
    }
    let tmp = store
        .tmp_dir()
        .join(format!("place-{}", uuid::Uuid::new_v4()));
    if std::fs::hard_link(&object, &tmp).is_err() {
        std::fs::copy(&object, &tmp).map_err(|e| io_err("copying", &object, e))?;
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(|e| io_err("syncing", &tmp, e))?;
    }
    if let Err(e) = std::fs::rename(&tmp, &target) {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_err("placing", &target, e));
    }
    dirs.insert(dir.to_path_buf());
    Ok(())
}

fn remove(
    store: &Store,
    location: &str,
    path: &str,
    mode: FileDelete,
    stamp: &str,
    dirs: &mut BTreeSet<PathBuf>,
) -> Result<Option<String>> {
    let target = store.target(location, path);
    match std::fs::symlink_metadata(&target) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("reading", &target, e)),
        Ok(m) if m.is_dir() => {
            return Err(Error::transient(format!(
                "file store: {} is a directory, the branch deleted a file there",
                target.display()
            )))
        }
        Ok(_) => {}
    }
    let dir = target.parent().expect("target has a parent");
    match mode {
        FileDelete::Mirror => {
            std::fs::remove_file(&target).map_err(|e| io_err("removing", &target, e))?;
            dirs.insert(dir.to_path_buf());
            Ok(None)
        }
        FileDelete::Archive => {
            let rel = format!(".archive/{location}/{path}.{stamp}");
            let archived = store.root.join(&rel);
            let adir = archived.parent().expect("archive path has a parent");
            create_dirs(adir)?;
            std::fs::rename(&target, &archived).map_err(|e| io_err("archiving", &target, e))?;
            dirs.insert(adir.to_path_buf());
            dirs.insert(dir.to_path_buf());
            Ok(Some(rel))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use schemas::files::FileRow;

    fn object(store: &Store, content: &[u8]) -> String {
        use sha2::Digest;
        let sha = hex::encode(sha2::Sha256::digest(content));
        let p = store.object(&sha);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, content).unwrap();
        sha
    }

    fn item(seq: i64, path: &str, sha: Option<&str>) -> Item {
        Item {
            seq,
            path: path.into(),
            action: match sha {
                Some(s) => Action::Store(FileRow {
                    path: path.into(),
                    size: 1,
                    sha256: s.into(),
                    mtime: chrono::Utc::now(),
                }),
                None => Action::Delete,
            },
        }
    }

    #[test]
    fn place_replace_archive_and_mirror() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::new(d.path());
        let a = object(&store, b"version 1");
        let b = object(&store, b"version 2");
        apply(
            &store,
            "b01",
            &[item(1, "x/ä b.jpg", Some(&a))],
            FileDelete::Archive,
        )
        .unwrap();
        let t = store.target("b01", "x/ä b.jpg");
        assert_eq!(std::fs::read(&t).unwrap(), b"version 1");
        apply(
            &store,
            "b01",
            &[item(2, "x/ä b.jpg", Some(&b))],
            FileDelete::Archive,
        )
        .unwrap();
        assert_eq!(std::fs::read(&t).unwrap(), b"version 2");
        assert_eq!(std::fs::read(store.object(&a)).unwrap(), b"version 1");
        let r = apply(
            &store,
            "b01",
            &[item(3, "x/ä b.jpg", None)],
            FileDelete::Archive,
        )
        .unwrap();
        let rel = r[0].clone().unwrap();
        assert!(rel.starts_with(".archive/b01/x/ä b.jpg."), "{rel}");
        assert_eq!(std::fs::read(d.path().join(&rel)).unwrap(), b"version 2");
        assert!(!t.exists());
        // Deleting again (redelivery) is a no-op.
        assert_eq!(
            apply(
                &store,
                "b01",
                &[item(3, "x/ä b.jpg", None)],
                FileDelete::Mirror
            )
            .unwrap(),
            vec![None]
        );
        apply(&store, "b01", &[item(4, "y", Some(&a))], FileDelete::Mirror).unwrap();
        apply(&store, "b01", &[item(5, "y", None)], FileDelete::Mirror).unwrap();
        assert!(!store.target("b01", "y").exists());
        assert_eq!(
            std::fs::read_dir(store.tmp_dir()).unwrap().count(),
            0,
            "no temporaries left"
        );
    }
}
