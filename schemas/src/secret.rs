//! Bearer tokens: read from files that only their owner may read, held in `secrecy`
//! types (never printed by `Debug`), compared in constant time.
//!
//! A token file holds one token per line. The listener accepts every token in its file
//! (rotation without downtime: add the new token, switch HQ over, remove the old one);
//! HQ sends the first. Both re-read the file when it changes (checked at most every
//! [`RELOAD_CHECK`]), without a restart; a changed file that is unsafe or empty is
//! refused with a warning and the previous tokens stay in force.

use secrecy::{ExposeSecret, SecretString};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};
use subtle::ConstantTimeEq;

/// How often a token file is checked for changes (modification time and size).
pub const RELOAD_CHECK: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("token file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "token file {path} is accessible by group or others (mode {mode:o}); run: chmod 600 {path}"
    )]
    Permissions { path: String, mode: u32 },
    #[error("token file {path} holds no token")]
    Empty { path: String },
    #[error("token file {path}: a token must be at least 16 characters of visible ASCII")]
    Weak { path: String },
}

/// The tokens of one token file (clones share them and their reloads).
#[derive(Clone)]
pub struct Tokens(Arc<Inner>);

struct Inner {
    path: PathBuf,
    tokens: RwLock<Vec<SecretString>>,
    /// (modification time, size) of the file as last read, and when it was checked.
    seen: Mutex<(Option<(SystemTime, u64)>, Instant)>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.0.tokens.read().map(|t| t.len()).unwrap_or(0);
        write!(f, "Tokens([{n} redacted])")
    }
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

impl Tokens {
    /// Reads a token file, refusing one that group or others can access.
    pub fn from_file(path: &Path) -> Result<Tokens, SecretError> {
        let stamp = stamp(path);
        let tokens = Self::read(path)?;
        Ok(Tokens(Arc::new(Inner {
            path: path.to_path_buf(),
            tokens: RwLock::new(tokens),
            seen: Mutex::new((stamp, Instant::now())),
        })))
    }

    /// Re-reads the file if it changed since it was last read. On a refused file the
    /// previous tokens stay (and the error is returned).
    pub fn reload_if_changed(&self) -> Result<bool, SecretError> {
        let now = stamp(&self.0.path);
        let mut seen = self.0.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.1 = Instant::now();
        if now == seen.0 {
            return Ok(false);
        }
        let tokens = Self::read(&self.0.path)?;
        *self.0.tokens.write().unwrap_or_else(|e| e.into_inner()) = tokens;
        seen.0 = now;
        tracing::info!(path = %self.0.path.display(), "token file changed: tokens reloaded");
        Ok(true)
    }

    /// [`Tokens::reload_if_changed`] at most every [`RELOAD_CHECK`].
    fn maybe_reload(&self) {
        let due = self
            .0
            .seen
            .lock()
            .map(|s| s.1.elapsed() >= RELOAD_CHECK)
            .unwrap_or(true);
        if due {
            if let Err(e) = self.reload_if_changed() {
                tracing::warn!(error = %e, "changed token file refused; the previous tokens stay in force");
            }
        }
    }

    fn read(path: &Path) -> Result<Vec<SecretString>, SecretError> {
        let p = path.display().to_string();
        let meta = std::fs::metadata(path).map_err(|source| SecretError::Read {
            path: p.clone(),
            source,
        })?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(SecretError::Permissions { path: p, mode });
            }
        }
        #[cfg(not(unix))]
        let _ = meta;
        let text = std::fs::read_to_string(path).map_err(|source| SecretError::Read {
            path: p.clone(),
            source,
        })?;
        let tokens: Vec<SecretString> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| {
                if l.len() < 16 || !l.bytes().all(|b| b.is_ascii_graphic()) {
                    Err(SecretError::Weak { path: p.clone() })
                } else {
                    Ok(SecretString::from(l.to_string()))
                }
            })
            .collect::<Result<_, _>>()?;
        if tokens.is_empty() {
            return Err(SecretError::Empty { path: p });
        }
        Ok(tokens)
    }

    /// Whether `presented` equals one of the tokens. Every token is compared, in
    /// constant time, so timing tells nothing about which or how much matched.
    pub fn accepts(&self, presented: &str) -> bool {
        self.maybe_reload();
        let tokens = self.0.tokens.read().unwrap_or_else(|e| e.into_inner());
        let mut ok = subtle::Choice::from(0u8);
        for t in tokens.iter() {
            ok |= t.expose_secret().as_bytes().ct_eq(presented.as_bytes());
        }
        ok.into()
    }

    /// The token a client sends (the first in the file).
    pub fn current(&self) -> String {
        self.maybe_reload();
        let tokens = self.0.tokens.read().unwrap_or_else(|e| e.into_inner());
        tokens[0].expose_secret().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn write(dir: &Path, name: &str, text: &str, mode: u32) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn two_tokens_for_rotation_and_constant_time_check() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            d.path(),
            "t",
            "old-token-0123456789\nnew-token-0123456789\n",
            0o600,
        );
        let t = Tokens::from_file(&p).unwrap();
        assert!(t.accepts("old-token-0123456789"));
        assert!(t.accepts("new-token-0123456789"));
        assert!(!t.accepts("new-token-012345678"));
        assert!(!t.accepts(""));
        assert_eq!(t.current(), "old-token-0123456789");
        assert!(!format!("{t:?}").contains("token-0"));
    }

    #[test]
    fn a_changed_file_is_reloaded_and_a_bad_one_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "t", "old-token-0123456789\n", 0o600);
        let t = Tokens::from_file(&p).unwrap();
        let shared = t.clone();
        assert!(!t.reload_if_changed().unwrap());
        // Rotation step 1: the new token is added (longer file: a new size).
        write(
            d.path(),
            "t",
            "new-token-0123456789\nold-token-0123456789\n",
            0o600,
        );
        assert!(t.reload_if_changed().unwrap());
        assert!(shared.accepts("new-token-0123456789"));
        assert!(shared.accepts("old-token-0123456789"));
        assert_eq!(shared.current(), "new-token-0123456789");
        // A file made readable by others is refused; the tokens in force stay.
        write(d.path(), "t", "evil-token-0123456789\n", 0o644);
        assert!(t.reload_if_changed().is_err());
        assert!(t.accepts("new-token-0123456789"));
        assert!(!t.accepts("evil-token-0123456789"));
    }

    #[test]
    fn readable_by_others_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "t", "abcdefghijklmnopqrstu\n", 0o644);
        let e = Tokens::from_file(&p).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
    }

    #[test]
    fn empty_and_weak_files_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "e", "\n# comment\n", 0o600);
        assert!(matches!(
            Tokens::from_file(&p),
            Err(SecretError::Empty { .. })
        ));
        let p = write(d.path(), "w", "short\n", 0o600);
        assert!(matches!(
            Tokens::from_file(&p),
            Err(SecretError::Weak { .. })
        ));
    }
}
