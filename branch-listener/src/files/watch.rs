//! The watcher task: keeps the file index equal to `files_dir`.
//!
//! A full scan (walk, compare, hash what changed, write the index) runs at start (which
//! catches changes made while the listener was down), after filesystem notifications
//! (`notify`, debounced), every `files_rescan_interval` (anything notifications missed),
//! and often while files wait to settle.
//!
//! A new or changed file is indexed once complete: renamed into place (a rename
//! notification names it), or its mtime is at least `files_settle` old, or its size and
//! mtime stayed the same over `files_settle` of observation. It is hashed streaming, then
//! re-stat'ed: if it changed meanwhile it is not indexed (it is looked at again). Only
//! changed rows are written (size and mtime compared first, then the hash).

use super::index::{self, Entry};
use super::scan::{self, Found, Ignore, Walk};
use crate::config::Config;
use crate::db::Db;
use crate::metrics as m;
use chrono::Utc;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Notifications arriving within this time are handled by one scan.
const DEBOUNCE: Duration = Duration::from_millis(100);

/// What one scan did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ScanReport {
    pub upserts: usize,
    pub deletes: usize,
    /// Files seen but not (yet) indexed: settling, or changed while hashed.
    pub pending: usize,
    pub skipped: usize,
}

/// The watcher's memory between scans.
pub struct Watcher {
    root: PathBuf,
    ignore: Ignore,
    settle: Duration,
    /// Files changed but not settled: (size, mtime) when first seen so, and when.
    pending: HashMap<String, (Found, Instant)>,
    /// Paths a rename notification named since the last scan.
    renamed: HashSet<String>,
    /// Refused paths already warned about (warn once, not at every scan).
    warned: HashSet<String>,
}

impl Watcher {
    pub fn new(root: PathBuf, ignore: Ignore, settle: Duration) -> Watcher {
        Watcher {
            root,
            ignore,
            settle,
            pending: HashMap::new(),
            renamed: HashSet::new(),
            warned: HashSet::new(),
        }
    }

    /// Records a filesystem path named by a rename-into-place notification.
    pub fn note_renamed(&mut self, abs: &Path) {
        if let Ok(rel) = abs.strip_prefix(&self.root) {
            if let Some(s) = rel.to_str() {
                self.renamed.insert(s.to_string());
            }
        }
    }

    /// Whether files are waiting to settle (the next scan should come soon).
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    fn ready(&mut self, rel: &str, f: &Found, now: Instant) -> bool {
        if self.renamed.contains(rel) {
            return true;
        }
        let age = (Utc::now() - f.mtime).to_std().unwrap_or(Duration::ZERO);
        if age >= self.settle {
            return true;
        }
        match self.pending.get(rel) {
            Some((seen, since)) if seen == f => now.duration_since(*since) >= self.settle,
            _ => {
                self.pending.insert(rel.to_string(), (f.clone(), now));
                false
            }
        }
    }

    /// One full scan: walk, compare with the index, hash, write the changed rows.
    pub async fn scan(&mut self, db: &Db) -> crate::Result<ScanReport> {
        let started = Instant::now();
        let root = self.root.clone();
        let ignore = self.ignore.clone();
        let walk: Walk = tokio::task::spawn_blocking(move || scan::walk(&root, &ignore))
            .await
            .map_err(|e| crate::Error::Io(format!("file scan task: {e}")))?;
        if walk.is_unknown("") {
            tracing::warn!(files_dir = %self.root.display(), "files_dir cannot be read; the index is left as it is");
        }
        let mut report = ScanReport {
            skipped: walk.skipped.len(),
            ..Default::default()
        };
        for s in &walk.skipped {
            metrics::counter!(m::FILES_SKIPPED_TOTAL, "reason" => s.reason).increment(1);
            if self.warned.insert(s.path.clone()) {
                tracing::warn!(path = %s.path, reason = s.reason, detail = %s.detail, "file not replicated");
            }
        }
        let indexed = index::load(db).await?;
        let now = Instant::now();
        let mut candidates: Vec<(String, Found)> = Vec::new();
        for (rel, f) in &walk.files {
            if let Some(e) = indexed.get(rel) {
                if e.size == f.size && e.mtime == f.mtime {
                    self.pending.remove(rel);
                    continue;
                }
            }
            if self.ready(rel, f, now) {
                candidates.push((rel.clone(), f.clone()));
            }
        }
        // Hash off the runtime, one file after the other (bounded memory and I/O).
        let hashed = tokio::task::spawn_blocking(move || {
            candidates
                .into_iter()
                .map(|(rel, f)| {
                    let h = scan::hash_if_unchanged(&f);
                    (rel, f, h)
                })
                .collect::<Vec<_>>()
        })
        .await
        .map_err(|e| crate::Error::Io(format!("file hash task: {e}")))?;
        let mut upserts = Vec::new();
        for (rel, f, h) in hashed {
            match h {
                Ok(Some(sha256)) => {
                    self.pending.remove(&rel);
                    self.renamed.remove(&rel);
                    let entry = Entry {
                        size: f.size,
                        sha256,
                        mtime: f.mtime,
                    };
                    if indexed.get(&rel) != Some(&entry) {
                        upserts.push((rel, entry));
                    }
                }
                Ok(None) => {
                    tracing::debug!(path = %rel, "file changed while being hashed; looked at again later");
                    self.pending.insert(rel, (f, Instant::now()));
                }
                Err(e) => {
                    // Vanished or unreadable now: the next scan decides.
                    tracing::debug!(path = %rel, error = %e, "file could not be hashed");
                    self.pending.insert(rel, (f, Instant::now()));
                }
            }
        }
        let deletes: Vec<String> = indexed
            .keys()
            .filter(|p| !walk.files.contains_key(*p) && !walk.is_unknown(p))
            .cloned()
            .collect();
        self.pending.retain(|p, _| walk.files.contains_key(p));
        self.renamed.retain(|p| walk.files.contains_key(p));
        index::write(db, &upserts, &deletes).await?;
        report.upserts = upserts.len();
        report.deletes = deletes.len();
        report.pending = self.pending.len();
        metrics::counter!(m::FILES_INDEXED_TOTAL, "op" => "upsert").increment(upserts.len() as u64);
        metrics::counter!(m::FILES_INDEXED_TOTAL, "op" => "delete").increment(deletes.len() as u64);
        let secs = started.elapsed().as_secs_f64();
        metrics::histogram!(m::FILES_SCAN_DURATION_SECONDS).record(secs);
        if report.upserts + report.deletes > 0 {
            tracing::info!(
                upserts = report.upserts,
                deletes = report.deletes,
                pending = report.pending,
                files = walk.files.len(),
                duration_s = secs,
                "file index updated"
            );
        }
        Ok(report)
    }
}

/// Starts `notify` on `root`; rename-into-place targets and a "something changed" signal
/// arrive on the channel. `None` (a warning is logged) when notifications are not
/// available: the periodic rescan still finds everything.
fn start_notify(
    root: &Path,
) -> Option<(
    notify::RecommendedWatcher,
    mpsc::UnboundedReceiver<Option<PathBuf>>,
)> {
    use notify::event::{EventKind, ModifyKind, RenameMode};
    use notify::Watcher as _;
    let (tx, rx) = mpsc::unbounded_channel();
    let handler = move |res: notify::Result<notify::Event>| {
        let Ok(ev) = res else {
            let _ = tx.send(None);
            return;
        };
        let renamed_to = match ev.kind {
            EventKind::Modify(ModifyKind::Name(RenameMode::To)) => ev.paths.first(),
            EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => ev.paths.get(1),
            EventKind::Access(_) => return,
            _ => None,
        };
        let _ = tx.send(renamed_to.cloned());
    };
    let mut w = match notify::recommended_watcher(handler) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "file notifications unavailable; relying on the periodic rescan");
            return None;
        }
    };
    if let Err(e) = w.watch(root, notify::RecursiveMode::Recursive) {
        tracing::warn!(files_dir = %root.display(), error = %e, "cannot watch files_dir; relying on the periodic rescan");
        return None;
    }
    Some((w, rx))
}

/// The watcher task of `serve`: runs until `shutdown`.
pub async fn run(config: Arc<Config>, db: Db, shutdown: CancellationToken) {
    let Some(root) = config.files_dir.clone() else {
        return;
    };
    let ignore = match Ignore::new(&config.files_ignore) {
        Ok(i) => i,
        Err(e) => {
            tracing::error!(error = %e, "files_ignore is invalid; files are not replicated");
            return;
        }
    };
    let mut watcher = Watcher::new(root.clone(), ignore, config.files_settle);
    let mut notify = start_notify(&root);
    let mut last_full = Instant::now();
    loop {
        let ready = match db.meta().await {
            Ok(meta) if meta.version < schemas::sql::PULL_AREA_VERSION => {
                tracing::warn!(
                    version = meta.version,
                    "the pull area predates the file index: run branch-listener install to upgrade"
                );
                false
            }
            Ok(_) => true,
            Err(e) => {
                tracing::debug!(error = %e, "file scan waits for the branch database");
                false
            }
        };
        let mut failed = !ready;
        if ready {
            if let Err(e) = watcher.scan(&db).await {
                // E.g. SQLite's write lock held by the application beyond the busy
                // timeout: nothing was lost, the next scan redoes the comparison.
                tracing::warn!(error = %e, "file scan failed; retrying in 1s");
                failed = true;
            }
            last_full = Instant::now();
        }
        if notify.is_none() && last_full.elapsed() >= config.files_rescan_interval {
            notify = start_notify(&root); // files_dir may have appeared
        }
        let next = if failed {
            Duration::from_secs(1).min(config.files_rescan_interval)
        } else if watcher.has_pending() {
            (config.files_settle / 4).clamp(Duration::from_millis(50), Duration::from_secs(1))
        } else {
            config.files_rescan_interval
        };
        let deadline = tokio::time::Instant::now() + next;
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep_until(deadline) => {}
            ev = async {
                match notify.as_mut() {
                    Some((_, rx)) => rx.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                let Some(first) = ev else {
                    notify = None; // the watcher thread ended
                    continue;
                };
                if let Some(p) = first {
                    watcher.note_renamed(&p);
                }
                // Debounce: gather the burst, then scan once.
                let until = tokio::time::Instant::now() + DEBOUNCE;
                if let Some((_, rx)) = notify.as_mut() {
                    while let Ok(Some(ev)) = tokio::time::timeout_at(until, rx.recv()).await {
                        if let Some(p) = ev {
                            watcher.note_renamed(&p);
                        }
                    }
                }
            }
        }
    }
}
