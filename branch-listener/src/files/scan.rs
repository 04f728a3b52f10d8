//! Walking `files_dir`: which files exist (relative path, size, mtime), which names are
//! refused and why, and the streaming sha256 of a file.
//!
//! Refused (with a reason, never a crash): names that are not valid UTF-8, names with
//! control characters, symlinks pointing outside the folder (or dangling), symlinked
//! directories (not followed: no loops). Ignored silently: names matching `files_ignore`
//! (matched against every path component, so an ignored directory hides its content).

use chrono::{DateTime, Utc};
use globset::{Glob, GlobSet, GlobSetBuilder};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The `files_ignore` patterns.
#[derive(Debug, Clone)]
pub struct Ignore(GlobSet);

impl Ignore {
    pub fn new(patterns: &[String]) -> Result<Ignore, String> {
        let mut b = GlobSetBuilder::new();
        for p in patterns {
            b.add(Glob::new(p).map_err(|e| format!("pattern {p:?}: {e}"))?);
        }
        b.build().map(Ignore).map_err(|e| e.to_string())
    }

    /// Whether a single path component (a file or directory name) is ignored.
    pub fn is_ignored(&self, name: &str) -> bool {
        self.0.is_match(name)
    }
}

/// A file found by a walk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub abs: PathBuf,
    pub size: i64,
    pub mtime: DateTime<Utc>,
}

/// A name the walk refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// The path relative to `files_dir`, lossily converted for the log.
    pub path: String,
    /// Metric label: `symlink_outside`, `not_utf8`, `bad_name`, `unreadable`.
    pub reason: &'static str,
    pub detail: String,
}

/// The result of one walk.
#[derive(Debug, Default)]
pub struct Walk {
    pub files: BTreeMap<String, Found>,
    pub skipped: Vec<Skipped>,
    /// Directories that could not be read: index entries under them are kept as they
    /// are (a transient error must not turn into deletes). `""` is the root.
    pub unreadable_dirs: Vec<String>,
}

impl Walk {
    /// Whether `path` lies under a directory this walk could not read.
    pub fn is_unknown(&self, path: &str) -> bool {
        self.unreadable_dirs
            .iter()
            .any(|d| d.is_empty() || path.starts_with(&format!("{d}/")))
    }
}

fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}/{name}")
    }
}

/// Walks `root` (blocking: run it in `spawn_blocking`).
pub fn walk(root: &Path, ignore: &Ignore) -> Walk {
    let mut w = Walk::default();
    let canonical_root = match root.canonicalize() {
        Ok(r) => r,
        Err(_) => {
            w.unreadable_dirs.push(String::new());
            return w;
        }
    };
    let mut stack = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, prefix)) = stack.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) => {
                if !prefix.is_empty() {
                    w.skipped.push(Skipped {
                        path: prefix.clone(),
                        reason: "unreadable",
                        detail: e.to_string(),
                    });
                }
                w.unreadable_dirs.push(prefix);
                continue;
            }
        };
        for entry in entries {
            let Ok(entry) = entry else {
                w.unreadable_dirs.push(prefix.clone());
                continue;
            };
            let os_name = entry.file_name();
            let Some(name) = os_name.to_str() else {
                w.skipped.push(Skipped {
                    path: join(&prefix, &os_name.to_string_lossy()),
                    reason: "not_utf8",
                    detail: "the name is not valid UTF-8".into(),
                });
                continue;
            };
            if ignore.is_ignored(name) {
                continue;
            }
            let rel = join(&prefix, name);
            if let Err(why) = schemas::files::check_path(&rel) {
                w.skipped.push(Skipped {
                    path: rel,
                    reason: "bad_name",
                    detail: why.into(),
                });
                continue;
            }
            let abs = entry.path();
            let Ok(ft) = entry.file_type() else {
                w.unreadable_dirs.push(rel);
                continue;
            };
            if ft.is_dir() {
                stack.push((abs, rel));
                continue;
            }
            let meta = if ft.is_symlink() {
                match abs.canonicalize() {
                    Ok(target) if target.starts_with(&canonical_root) => {
                        match std::fs::metadata(&target) {
                            Ok(m) if m.is_file() => m,
                            Ok(_) => {
                                tracing::debug!(path = %rel, "symlinked directory not followed");
                                continue;
                            }
                            Err(e) => {
                                w.skipped.push(Skipped {
                                    path: rel,
                                    reason: "unreadable",
                                    detail: e.to_string(),
                                });
                                continue;
                            }
                        }
                    }
                    Ok(_) => {
                        w.skipped.push(Skipped {
                            path: rel,
                            reason: "symlink_outside",
                            detail: "the symlink points outside files_dir".into(),
                        });
                        continue;
                    }
                    Err(_) => {
                        w.skipped.push(Skipped {
                            path: rel,
                            reason: "symlink_outside",
                            detail: "the symlink is dangling".into(),
                        });
                        continue;
                    }
                }
            } else if ft.is_file() {
                match entry.metadata() {
                    Ok(m) => m,
                    Err(_) => {
                        // Vanished between readdir and stat: a later scan sees it.
                        w.unreadable_dirs.push(rel);
                        continue;
                    }
                }
            } else {
                continue; // sockets, fifos, devices
            };
            let Ok(mtime) = meta.modified() else {
                continue;
            };
            w.files.insert(
                rel,
                Found {
                    abs,
                    size: i64::try_from(meta.len()).unwrap_or(i64::MAX),
                    mtime: schemas::files::index_mtime(mtime),
                },
            );
        }
    }
    w
}

/// Streams a file through sha256 with a fixed buffer (bounded memory); returns the hex
/// digest and the bytes read (blocking).
pub fn sha256_file(path: &Path) -> std::io::Result<(String, u64)> {
    let mut h = Sha256::new();
    let n = schemas::files::hash_into(&mut std::fs::File::open(path)?, &mut h)?;
    Ok((hex::encode(h.finalize()), n))
}

/// Hashes a found file and re-stats it afterwards: `None` when it changed meanwhile
/// (size or mtime differ, or it is gone): it is never indexed half-written.
pub fn hash_if_unchanged(f: &Found) -> std::io::Result<Option<String>> {
    let (sha, read) = sha256_file(&f.abs)?;
    let after = std::fs::metadata(&f.abs)?;
    let same = after.len() == read
        && i64::try_from(read).ok() == Some(f.size)
        && after.modified().ok().map(schemas::files::index_mtime) == Some(f.mtime);
    Ok(same.then_some(sha))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_ignore_patterns() {
        let i = Ignore::new(&crate::config::default_files_ignore()).unwrap();
        for n in [".hidden", "x.tmp", "y.part", "z~", ".git"] {
            assert!(i.is_ignored(n), "{n}");
        }
        for n in ["a.jpg", "tmp", "part.png", "a b.png"] {
            assert!(!i.is_ignored(n), "{n}");
        }
        assert!(Ignore::new(&["[".into()]).is_err());
    }

    #[test]
    fn sha256_of_a_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x");
        std::fs::write(&p, b"abc").unwrap();
        let (h, n) = sha256_file(&p).unwrap();
        assert_eq!(n, 3);
        assert_eq!(
            h,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
