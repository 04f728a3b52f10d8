//! Garbage collection of the file store: content objects no file refers to any more,
//! and leftovers of interrupted downloads and placements.
//!
//! Every placed file (and every archived one) is a hard link of its object in
//! `.objects/ab/<sha256>`, so an object whose link count is 1 is referenced by nothing
//! but the store itself: the branch changed or deleted every file that had this content
//! (in `mirror` mode; archived files keep their object). Such objects are removed once
//! older than `min_age`, which spares an object that a running batch has just
//! downloaded and not placed yet. Even that case is safe, only slower: a batch whose
//! object vanished fails to place it (transient), retries and downloads it again; no
//! batch commits without its files. Where the store cannot hard-link (files were
//! copied into place), objects are only a download cache, and removing one costs a
//! download at most.
//!
//! In `.tmp/`: partial downloads (`*.part`, kept for resuming) and placement links
//! (`place-*`, left by a crash between link and rename) older than `min_age` go too.

use super::Store;
use crate::error::{Error, Result};
use crate::metrics as m;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

/// What a sweep removed (or, in a dry run, would remove).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    /// Unreferenced content objects.
    pub objects: u64,
    /// Their bytes.
    pub object_bytes: u64,
    /// Leftovers in `.tmp/` (partial downloads, placement links).
    pub leftovers: u64,
    /// Their bytes.
    pub leftover_bytes: u64,
    /// Objects still referenced (kept).
    pub kept: u64,
}

fn old_enough(meta: &std::fs::Metadata, cutoff: SystemTime) -> bool {
    meta.modified().map(|t| t <= cutoff).unwrap_or(false)
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::transient(format!("file store gc: {what} {}: {e}", path.display()))
}

/// Removes `path` (not in a dry run); false when it was already gone.
fn remove(path: &Path, dry_run: bool) -> Result<bool> {
    if dry_run {
        return Ok(true);
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err("removing", path, e)),
    }
}

/// Removes what is unreferenced and older than `min_age` (nothing when `dry_run`).
/// Blocking: call it from a blocking thread.
pub fn sweep(store: &Store, min_age: Duration, dry_run: bool) -> Result<Swept> {
    let cutoff = SystemTime::now()
        .checked_sub(min_age)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let mut s = Swept::default();
    let objects = store.root.join(".objects");
    let shards = match std::fs::read_dir(&objects) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(s),
        Err(e) => return Err(io_err("reading", &objects, e)),
    };
    for shard in shards {
        let shard = shard.map_err(|e| io_err("reading", &objects, e))?.path();
        if !shard.is_dir() {
            continue;
        }
        for entry in std::fs::read_dir(&shard).map_err(|e| io_err("reading", &shard, e))? {
            let path = entry.map_err(|e| io_err("reading", &shard, e))?.path();
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue; // removed meanwhile
            };
            if !meta.is_file() {
                continue;
            }
            if meta.nlink() > 1 || !old_enough(&meta, cutoff) {
                s.kept += 1;
                continue;
            }
            if !remove(&path, dry_run)? {
                continue;
            }
            s.objects += 1;
            s.object_bytes += meta.len();
        }
    }
    let tmp = store.tmp_dir();
    if let Ok(entries) = std::fs::read_dir(&tmp) {
        for entry in entries {
            let path = entry.map_err(|e| io_err("reading", &tmp, e))?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if !(name.ends_with(".part") || name.starts_with("place-")) {
                continue;
            }
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            if !meta.is_file() || !old_enough(&meta, cutoff) {
                continue;
            }
            if !remove(&path, dry_run)? {
                continue;
            }
            s.leftovers += 1;
            s.leftover_bytes += meta.len();
        }
    }
    if !dry_run {
        metrics::counter!(m::FILES_GC_REMOVED).increment(s.objects + s.leftovers);
        metrics::counter!(m::FILES_GC_REMOVED_BYTES).increment(s.object_bytes + s.leftover_bytes);
    }
    Ok(s)
}

/// The scheduled sweep of the service (`files_gc_schedule`): logs what it removed.
pub async fn scheduled(store: Store, min_age: Duration) {
    let started = std::time::Instant::now();
    match tokio::task::spawn_blocking(move || sweep(&store, min_age, false)).await {
        Ok(Ok(s)) => tracing::info!(
            objects = s.objects,
            object_bytes = s.object_bytes,
            leftovers = s.leftovers,
            leftover_bytes = s.leftover_bytes,
            kept = s.kept,
            seconds = started.elapsed().as_secs_f64(),
            "file store swept"
        ),
        Ok(Err(e)) => tracing::warn!(error = %e, "file store sweep failed; next at its schedule"),
        Err(e) => tracing::warn!(error = %e, "file store sweep task failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn age(path: &Path, secs: u64) {
        let f = std::fs::File::options().write(true).open(path).unwrap();
        f.set_modified(SystemTime::now() - Duration::from_secs(secs))
            .unwrap();
    }

    fn object(store: &Store, sha: &str, body: &[u8]) -> std::path::PathBuf {
        let p = store.object(sha);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, body).unwrap();
        p
    }

    #[test]
    fn removes_old_unreferenced_objects_and_leftovers_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        let a = "aa".to_string() + &"0".repeat(62); // placed: kept
        let b = "bb".to_string() + &"1".repeat(62); // unreferenced, old: removed
        let c = "cc".to_string() + &"2".repeat(62); // unreferenced, young: kept
        let d = "dd".to_string() + &"3".repeat(62); // archived only: kept
        let pa = object(&store, &a, b"placed");
        let pb = object(&store, &b, b"garbage!");
        let pc = object(&store, &c, b"just downloaded");
        let pd = object(&store, &d, b"archived");
        std::fs::create_dir_all(dir.path().join("b01/img")).unwrap();
        std::fs::hard_link(&pa, dir.path().join("b01/img/a.jpg")).unwrap();
        std::fs::create_dir_all(dir.path().join(".archive/b01")).unwrap();
        std::fs::hard_link(&pd, dir.path().join(".archive/b01/d.jpg.20261124T000000Z")).unwrap();
        std::fs::create_dir_all(store.tmp_dir()).unwrap();
        let part_old = store.tmp_dir().join(format!("{b}.b01.part"));
        let part_new = store.tmp_dir().join(format!("{c}.b01.part"));
        let place_old = store.tmp_dir().join("place-0000");
        let other = store.tmp_dir().join("unrelated");
        for p in [&part_old, &part_new, &place_old, &other] {
            std::fs::write(p, b"xyz").unwrap();
        }
        for p in [&pa, &pb, &pd, &part_old, &place_old, &other] {
            age(p, 7200);
        }

        let dry = sweep(&store, Duration::from_secs(3600), true).unwrap();
        assert_eq!((dry.objects, dry.object_bytes), (1, 8));
        assert_eq!((dry.leftovers, dry.leftover_bytes), (2, 6));
        assert!(
            pb.exists() && part_old.exists(),
            "a dry run removes nothing"
        );

        let s = sweep(&store, Duration::from_secs(3600), false).unwrap();
        assert_eq!(s, dry);
        assert_eq!(s.kept, 3);
        assert!(!pb.exists());
        assert!(pa.exists() && pc.exists() && pd.exists());
        assert_eq!(
            std::fs::read(dir.path().join("b01/img/a.jpg")).unwrap(),
            b"placed"
        );
        assert!(!part_old.exists() && !place_old.exists());
        assert!(part_new.exists() && other.exists());

        // Once the placed file is gone (mirror delete), its object goes too.
        std::fs::remove_file(dir.path().join("b01/img/a.jpg")).unwrap();
        let s = sweep(&store, Duration::from_secs(3600), false).unwrap();
        assert_eq!(s.objects, 1);
        assert!(!pa.exists());
    }

    #[test]
    fn an_empty_or_missing_store_is_fine() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(&dir.path().join("none"));
        assert_eq!(
            sweep(&store, Duration::ZERO, false).unwrap(),
            Swept::default()
        );
    }
}
