//! Bearer tokens: read from files that only their owner may read, held in `secrecy`
//! types (never printed by `Debug`), compared in constant time.
//!
//! A token file holds one token per line. The listener accepts every token in its file
//! (rotation without downtime: add the new token, switch HQ over, remove the old one);
//! HQ sends the first.

use secrecy::{ExposeSecret, SecretString};
use std::path::Path;
use subtle::ConstantTimeEq;

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

/// The tokens of one token file.
#[derive(Clone)]
pub struct Tokens(Vec<SecretString>);

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokens([{} redacted])", self.0.len())
    }
}

impl Tokens {
    /// Reads a token file, refusing one that group or others can access.
    pub fn from_file(path: &Path) -> Result<Tokens, SecretError> {
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
        Ok(Tokens(tokens))
    }

    /// Whether `presented` equals one of the tokens. Every token is compared, in
    /// constant time, so timing tells nothing about which or how much matched.
    pub fn accepts(&self, presented: &str) -> bool {
        let mut ok = subtle::Choice::from(0u8);
        for t in &self.0 {
            ok |= t.expose_secret().as_bytes().ct_eq(presented.as_bytes());
        }
        ok.into()
    }

    /// The token a client sends (the first in the file).
    pub fn current(&self) -> &str {
        self.0[0].expose_secret()
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
