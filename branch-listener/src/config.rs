//! The listener's configuration: a TOML file, overridden by `BRANCH_<KEY>` environment
//! variables (nested keys with `__`). Unknown keys are refused; `validate()` checks every
//! value and names the offending key.

use crate::error::{Error, Result};
use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Which database the branch runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This branch's location id; must equal the location's `id` at HQ.
    pub location: String,
    /// `sqlite:///abs/path`, `sqlite://rel/path` or `postgres://...`.
    pub database_url: String,
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Bearer tokens accepted by the listener (one per line, mode 0600).
    pub token_file: PathBuf,
    /// IANA zone of the branch's zone-less timestamps.
    #[serde(default = "default_time_zone")]
    pub time_zone: String,
    /// Extra replicated tables beyond the built-in catalogue.
    #[serde(default)]
    pub catalogue_file: Option<PathBuf>,
    /// The product images folder (the files feature comes later).
    #[serde(default)]
    pub files_dir: Option<PathBuf>,
    /// Acknowledged changes are kept this long before pruning.
    #[serde(default = "default_retention", with = "humantime_serde")]
    pub retention: Duration,
    #[serde(default = "default_prune_interval", with = "humantime_serde")]
    pub prune_interval: Duration,
    #[serde(default = "default_tick_interval", with = "humantime_serde")]
    pub tick_interval: Duration,
    #[serde(default = "default_max_limit")]
    pub max_limit: u32,
    #[serde(default = "default_max_wait", with = "humantime_serde")]
    pub max_wait: Duration,
    #[serde(default = "default_log_format")]
    pub log_format: String,
    /// Full rescan of `files_dir` this often (beside filesystem notifications).
    #[serde(default = "default_files_rescan_interval", with = "humantime_serde")]
    pub files_rescan_interval: Duration,
    /// A file not renamed into place is indexed once its size and mtime were stable
    /// this long.
    #[serde(default = "default_files_settle", with = "humantime_serde")]
    pub files_settle: Duration,
    /// Glob patterns (matched against each path component) of files never indexed.
    #[serde(default = "default_files_ignore")]
    pub files_ignore: Vec<String>,
    /// HTTPS: the server certificate chain (PEM); with `tls_key_file`. Unset: plain HTTP
    /// (warned about at start).
    #[serde(default)]
    pub tls_cert_file: Option<PathBuf>,
    /// HTTPS: the private key (PEM, PKCS#8, PKCS#1 or SEC1) of `tls_cert_file`.
    #[serde(default)]
    pub tls_key_file: Option<PathBuf>,
    /// Requests per second allowed per client IP address for requests without a valid
    /// token (token bucket); 0 = no limit. Requests with a valid token are not limited.
    #[serde(default = "crate::limits::default_rate_limit")]
    pub rate_limit_per_second: u32,
    /// Burst size of the per-client token bucket.
    #[serde(default = "crate::limits::default_rate_burst")]
    pub rate_limit_burst: u32,
    /// Requests served at once; more wait for a slot (503 after the request time limit).
    #[serde(default = "crate::limits::default_max_concurrent")]
    pub max_concurrent_requests: u32,
}

fn default_files_rescan_interval() -> Duration {
    Duration::from_secs(300)
}
fn default_files_settle() -> Duration {
    Duration::from_secs(2)
}
/// Hidden files, temporary and partial downloads, editor backups.
pub fn default_files_ignore() -> Vec<String> {
    [".*", "*.tmp", "*.part", "*~"].map(String::from).to_vec()
}

fn default_listen() -> String {
    "0.0.0.0:7070".into()
}
fn default_time_zone() -> String {
    "UTC".into()
}
fn default_retention() -> Duration {
    Duration::from_secs(24 * 3600)
}
fn default_prune_interval() -> Duration {
    Duration::from_secs(60)
}
fn default_tick_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_max_limit() -> u32 {
    schemas::wire::MAX_LIMIT
}
fn default_max_wait() -> Duration {
    Duration::from_secs(u64::from(schemas::wire::MAX_WAIT_SECONDS))
}
fn default_log_format() -> String {
    "text".into()
}

/// The path used when neither `--config` nor `BRANCH_LISTENER_CONFIG` is given.
pub const DEFAULT_PATH: &str = "/etc/branch-listener/config.toml";

/// Turns a figment error into one line naming the key.
fn figment_error(e: figment::Error) -> Error {
    use figment::error::Kind;
    let key = if !e.path.is_empty() {
        e.path.join(".")
    } else {
        match &e.kind {
            Kind::UnknownField(f, _) => f.to_string(),
            Kind::DuplicateField(f) => f.to_string(),
            Kind::MissingField(f) => f.to_string(),
            _ => "<file>".into(),
        }
    };
    let mut message = e.kind.to_string();
    if let Some(md) = &e.metadata {
        message.push_str(&format!(" (from {})", md.name));
    }
    Error::config(&key, message)
}

impl Config {
    /// Loads the file (if it exists) and the `BRANCH_` environment, then validates.
    pub fn load(path: &Path) -> Result<Config> {
        let mut fig = Figment::new();
        if path.exists() {
            fig = fig.merge(Toml::file_exact(path));
        } else if std::env::var_os("BRANCH_LOCATION").is_none() {
            return Err(Error::config(
                "--config",
                format!("config file {} does not exist", path.display()),
            ));
        }
        // BRANCH_LISTENER_CONFIG names the file (see `main`); it is not a key.
        let env = Env::prefixed("BRANCH_")
            .ignore(&["listener_config"])
            .split("__");
        Self::from_figment(fig.merge(env))
    }

    /// Every key at its default but the three required ones; not validated (tests and
    /// embedders set what they need with struct update syntax, then validate).
    pub fn with_defaults(location: &str, database_url: &str, token_file: &Path) -> Result<Config> {
        let text = format!(
            "location = {location:?}\ndatabase_url = {database_url:?}\ntoken_file = {:?}\n",
            token_file.display().to_string()
        );
        Figment::new()
            .merge(Toml::string(&text))
            .extract()
            .map_err(figment_error)
    }

    pub fn from_figment(fig: Figment) -> Result<Config> {
        let c: Config = fig.extract().map_err(figment_error)?;
        c.validate()?;
        Ok(c)
    }

    /// Checks every value; the error names the key.
    pub fn validate(&self) -> Result<()> {
        let loc_ok = !self.location.is_empty()
            && self.location.len() <= 32
            && self
                .location
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if !loc_ok {
            return Err(Error::config(
                "location",
                format!("{:?} must match [a-z0-9_-]{{1,32}}", self.location),
            ));
        }
        self.backend()?;
        if self.listen_addr().is_err() {
            return Err(Error::config(
                "listen",
                format!(
                    "{:?} is not a socket address like 0.0.0.0:7070",
                    self.listen
                ),
            ));
        }
        self.tokens()?;
        let tz_ok = !self.time_zone.is_empty()
            && self.time_zone.len() <= 64
            && self
                .time_zone
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"/_+-".contains(&b));
        if !tz_ok {
            return Err(Error::config(
                "time_zone",
                format!(
                    "{:?} is not an IANA zone name like Europe/Berlin",
                    self.time_zone
                ),
            ));
        }
        self.catalogue()?;
        if self.tick_interval.is_zero() {
            return Err(Error::config("tick_interval", "must be greater than 0"));
        }
        if self.prune_interval.is_zero() {
            return Err(Error::config("prune_interval", "must be greater than 0"));
        }
        if self.max_limit == 0 || self.max_limit > schemas::wire::MAX_LIMIT {
            return Err(Error::config(
                "max_limit",
                format!(
                    "{} must be between 1 and {}",
                    self.max_limit,
                    schemas::wire::MAX_LIMIT
                ),
            ));
        }
        if self.max_wait > Duration::from_secs(u64::from(schemas::wire::MAX_WAIT_SECONDS)) {
            return Err(Error::config(
                "max_wait",
                format!("must be at most {}s", schemas::wire::MAX_WAIT_SECONDS),
            ));
        }
        if self.files_rescan_interval.is_zero() {
            return Err(Error::config(
                "files_rescan_interval",
                "must be greater than 0",
            ));
        }
        if let Err(e) = crate::files::scan::Ignore::new(&self.files_ignore) {
            return Err(Error::config("files_ignore", e));
        }
        if !matches!(self.log_format.as_str(), "text" | "json") {
            return Err(Error::config(
                "log_format",
                format!("{:?} must be \"text\" or \"json\"", self.log_format),
            ));
        }
        self.tls()?;
        self.check_limits()?;
        Ok(())
    }

    pub fn backend(&self) -> Result<Backend> {
        if self.database_url.starts_with("sqlite:") {
            Ok(Backend::Sqlite)
        } else if self.database_url.starts_with("postgres://")
            || self.database_url.starts_with("postgresql://")
        {
            Ok(Backend::Postgres)
        } else {
            Err(Error::config(
                "database_url",
                "must start with sqlite:// or postgres:// (the value is not shown: it may hold a password)",
            ))
        }
    }

    pub fn listen_addr(&self) -> Result<SocketAddr> {
        self.listen
            .parse()
            .map_err(|_| Error::config("listen", "not a socket address"))
    }

    pub fn tokens(&self) -> Result<schemas::secret::Tokens> {
        schemas::secret::Tokens::from_file(&self.token_file)
            .map_err(|e| Error::config("token_file", e.to_string()))
    }

    pub fn catalogue(&self) -> Result<schemas::Catalogue> {
        schemas::Catalogue::load(self.catalogue_file.as_deref())
            .map_err(|e| Error::config("catalogue_file", e.to_string()))
    }

    /// A printable summary (no secrets: the database URL's password is hidden).
    pub fn summary(&self) -> String {
        format!(
            "location={} backend={} database={} listen={} time_zone={} retention={} prune_interval={} tick_interval={} max_limit={} max_wait={}",
            self.location,
            self.backend().map(|b| b.name()).unwrap_or("?"),
            redact_url(&self.database_url),
            self.listen,
            self.time_zone,
            humantime::format_duration(self.retention),
            humantime::format_duration(self.prune_interval),
            humantime::format_duration(self.tick_interval),
            self.max_limit,
            humantime::format_duration(self.max_wait),
        )
    }
}

/// Hides the password of a `scheme://user:password@host/...` URL.
pub fn redact_url(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        if let Some((creds, host)) = rest.split_once('@') {
            let user = creds.split(':').next().unwrap_or("");
            return format!("{scheme}://{user}:***@{host}");
        }
    }
    url.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use figment::providers::Serialized;

    fn token_file(dir: &Path) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join("token");
        std::fs::write(&p, "test-token-0123456789\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p
    }

    fn base(dir: &Path) -> Figment {
        Figment::new().merge(Toml::string(&format!(
            "location = \"b01\"\ndatabase_url = \"sqlite:///tmp/x.db\"\ntoken_file = \"{}\"\n",
            token_file(dir).display()
        )))
    }

    #[test]
    fn defaults_apply() {
        let d = tempfile::tempdir().unwrap();
        let c = Config::from_figment(base(d.path())).unwrap();
        assert_eq!(c.listen, "0.0.0.0:7070");
        assert_eq!(c.retention, Duration::from_secs(86400));
        assert_eq!(c.max_limit, 50_000);
        assert_eq!(c.backend().unwrap(), Backend::Sqlite);
        assert_eq!(c.files_rescan_interval, Duration::from_secs(300));
        assert_eq!(c.files_settle, Duration::from_secs(2));
        assert_eq!(c.files_ignore, [".*", "*.tmp", "*.part", "*~"]);
        let c = Config::from_figment(
            base(d.path())
                .merge(Serialized::default("files_settle", "500ms"))
                .merge(Serialized::default("files_ignore", vec!["*.bak"])),
        )
        .unwrap();
        assert_eq!(c.files_settle, Duration::from_millis(500));
        assert_eq!(c.files_ignore, ["*.bak"]);
    }

    #[test]
    fn errors_name_the_key() {
        let d = tempfile::tempdir().unwrap();
        for (k, v, key) in [
            ("location", "B 01", "location"),
            ("listen", "nowhere", "listen"),
            ("max_limit", "0", "max_limit"),
            ("log_format", "xml", "log_format"),
            ("database_url", "mysql://x", "database_url"),
            ("max_wait", "10m", "max_wait"),
        ] {
            let e = Config::from_figment(base(d.path()).merge(Serialized::default(k, v)))
                .unwrap_err()
                .to_string();
            assert!(e.contains(&format!("`{key}`")), "{k}: {e}");
        }
        let e =
            Config::from_figment(base(d.path()).merge(Serialized::default("retention", "soon")))
                .unwrap_err()
                .to_string();
        assert!(e.contains("retention"), "{e}");
        let e = Config::from_figment(
            base(d.path()).merge(Serialized::default("files_ignore", vec!["[unclosed"])),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("`files_ignore`") && e.contains("[unclosed"),
            "{e}"
        );
        let e = Config::from_figment(
            base(d.path()).merge(Serialized::default("files_rescan_interval", "0s")),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("`files_rescan_interval`"), "{e}");
        let e = Config::from_figment(base(d.path()).merge(Serialized::default("bogus", 1)))
            .unwrap_err()
            .to_string();
        assert!(e.contains("bogus"), "{e}");
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail's signature
    fn environment_overrides_the_file() {
        let d = tempfile::tempdir().unwrap();
        let token = token_file(d.path());
        figment::Jail::expect_with(|jail| {
            let file = jail.directory().join("c.toml");
            std::fs::write(
                &file,
                format!(
                    "location = \"b01\"\ndatabase_url = \"sqlite:///tmp/x.db\"\ntoken_file = \"{}\"\nmax_limit = 100\n",
                    token.display()
                ),
            )
            .unwrap();
            jail.set_env("BRANCH_MAX_LIMIT", "200");
            jail.set_env("BRANCH_LISTEN", "127.0.0.1:9999");
            jail.set_env("BRANCH_LISTENER_CONFIG", file.display().to_string());
            let c = Config::load(&file).unwrap();
            assert_eq!((c.max_limit, c.listen.as_str()), (200, "127.0.0.1:9999"));
            jail.set_env("BRANCH_MAX_LIMIT", "0");
            let e = Config::load(&file).unwrap_err().to_string();
            assert!(e.contains("`max_limit`"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn password_is_redacted() {
        assert_eq!(
            redact_url("postgres://u:secret@h/db"),
            "postgres://u:***@h/db"
        );
    }
}
