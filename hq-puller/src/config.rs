//! Configuration: a TOML file plus `HQ_*` environment overrides (nested keys with `__`),
//! unknown keys refused, then [`Config::validate`] turns it into [`Settings`]: cron
//! expressions parsed, URLs parsed, token files read (owner-only), ids checked.

use crate::error::{Error, Result};
use chrono::{DateTime, Utc};
use figment::providers::{Env, Format, Toml};
use figment::Figment;
use schemas::secret::Tokens;
use schemas::Catalogue;
use serde::Deserialize;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The file as written by the operator.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Central PostgreSQL.
    pub database_url: String,
    /// Default cron expression (with a seconds field) of every location.
    #[serde(default = "default_schedule")]
    pub schedule: String,
    /// Global cap on pulls running at once.
    #[serde(default = "default_max_concurrent")]
    pub max_concurrent_pulls: usize,
    /// Where file content is stored (files feature).
    #[serde(default)]
    pub files_dir: Option<PathBuf>,
    /// Extra tables, the same file the branches use.
    #[serde(default)]
    pub catalogue_file: Option<PathBuf>,
    /// A run drains until caught up or this budget ends.
    #[serde(default = "default_run_budget", with = "humantime_serde")]
    pub run_budget: Duration,
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    #[serde(default = "default_batch_limit")]
    pub batch_limit: u32,
    /// Serves `/metrics` when set.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    #[serde(default)]
    pub log_format: LogFormat,
    #[serde(default)]
    pub locations: Vec<LocationConfig>,
    /// What a file deleted at a branch becomes at HQ (default for every location).
    #[serde(default)]
    pub file_delete: crate::files::FileDelete,
    /// Rows per snapshot page of initial loads and resyncs.
    #[serde(default = "default_snapshot_page_rows")]
    pub snapshot_page_rows: u32,
    /// PEM file of the private CA(s) that signed the listeners' certificates; when set,
    /// only these CAs are trusted (not the public web roots). Per location: `ca_file`.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Allows `http://` listener URLs (token and data unencrypted; warned at start).
    #[serde(default)]
    pub allow_plain_http: bool,
    /// Largest listener response accepted (bytes, decompressed).
    #[serde(default = "crate::transport::default_max_response_bytes")]
    pub max_response_bytes: u64,
    /// Serves the read-only dashboard and `/api/status` when set (loopback only unless
    /// `admin_allow_remote`).
    #[serde(default)]
    pub admin_listen: Option<SocketAddr>,
    #[serde(default)]
    pub admin_allow_remote: bool,
    /// When the file store is swept of content no file refers to (cron with seconds;
    /// "" = never). See `crate::files::gc`.
    #[serde(default = "default_files_gc_schedule")]
    pub files_gc_schedule: String,
    /// Unreferenced objects and download leftovers younger than this are kept.
    #[serde(default = "default_files_gc_min_age", with = "humantime_serde")]
    pub files_gc_min_age: Duration,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Pulled by a cron job.
    #[default]
    Schedule,
    /// A long-poll kept open, applied as changes arrive.
    Stream,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocationConfig {
    /// Must equal the branch's `location`.
    pub id: String,
    #[serde(default)]
    pub name: String,
    pub url: String,
    pub token_file: PathBuf,
    #[serde(default)]
    pub schedule: Option<String>,
    #[serde(default = "default_true")]
    pub enabled: bool,
    #[serde(default)]
    pub mode: Mode,
    #[serde(default)]
    pub batch_limit: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    pub request_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub connect_timeout: Option<Duration>,
    #[serde(default)]
    pub file_delete: Option<crate::files::FileDelete>,
    /// Resync automatically (snapshot reload) when the branch needs it.
    #[serde(default)]
    pub auto_resync: bool,
    /// Overrides the global `ca_file` for this location.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Overrides the global `allow_plain_http` for this location.
    #[serde(default)]
    pub allow_plain_http: Option<bool>,
}

fn default_schedule() -> String {
    "*/10 * * * * *".into()
}
fn default_max_concurrent() -> usize {
    8
}
fn default_run_budget() -> Duration {
    Duration::from_secs(60)
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_batch_limit() -> u32 {
    5000
}
fn default_files_gc_schedule() -> String {
    "0 30 3 * * *".into()
}
fn default_files_gc_min_age() -> Duration {
    Duration::from_secs(24 * 3600)
}
/// Rows per snapshot page: larger pages cost fewer round trips and commits (a 1,000,000-
/// row load took 2.7 s in pages of 20,000 and 2.3 s in pages of 50,000, repeated runs
/// against the test cluster; `tests/bench/notes/load.md`); a page is held about four times over per loading location (two inserting,
/// one fetched ahead, one being fetched).
fn default_snapshot_page_rows() -> u32 {
    50_000
}
fn default_true() -> bool {
    true
}

/// A validated location.
#[derive(Debug, Clone)]
pub struct Location {
    pub id: String,
    pub name: String,
    /// Base URL of the listener (a path prefix is kept).
    pub url: url::Url,
    pub tokens: Tokens,
    pub schedule: String,
    pub cron: croner::Cron,
    pub enabled: bool,
    pub mode: Mode,
    pub batch_limit: u32,
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    pub file_delete: crate::files::FileDelete,
    /// `needs_resync` triggers a resync at once instead of waiting for an operator.
    pub auto_resync: bool,
    /// TLS trust, plain-HTTP permission, response size cap (see [`crate::transport`]).
    pub transport: crate::transport::Transport,
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub database_url: String,
    pub max_concurrent_pulls: usize,
    pub files_dir: Option<PathBuf>,
    pub catalogue: Catalogue,
    pub run_budget: Duration,
    pub metrics_listen: Option<SocketAddr>,
    pub log_format: LogFormat,
    pub locations: Vec<Location>,
    pub snapshot_page_rows: u32,
    pub admin_listen: Option<SocketAddr>,
    /// When the file store is swept (`None`: never, only `hq-puller gc-files`).
    pub files_gc_schedule: Option<String>,
    /// What the sweep keeps: anything younger.
    pub files_gc_min_age: Duration,
}

impl Settings {
    pub fn location(&self, id: &str) -> Option<&Location> {
        self.locations.iter().find(|l| l.id == id)
    }
}

/// Parses a cron expression exactly as tokio-cron-scheduler does (seconds required).
pub fn parse_cron(expr: &str) -> std::result::Result<croner::Cron, String> {
    croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Required)
        .dom_and_dow(true)
        .build()
        .parse(expr)
        .map_err(|e| e.to_string())
}

/// The next `n` fire times of a cron expression after `from`.
pub fn next_fires(cron: &croner::Cron, from: DateTime<Utc>, n: usize) -> Vec<DateTime<Utc>> {
    let mut out = Vec::new();
    let mut t = from;
    while out.len() < n {
        match cron.find_next_occurrence(&t, false) {
            Ok(next) => {
                out.push(next);
                t = next;
            }
            Err(_) => break,
        }
    }
    out
}

/// Location ids: `[a-z0-9_-]{1,32}`, as on the branch.
pub fn valid_location_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 32
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

impl Config {
    /// Reads the file and the `HQ_*` environment (`HQ_PULLER_CONFIG` names the file and is
    /// not a key).
    pub fn load(path: &Path) -> Result<Config> {
        if !path.exists() {
            return Err(Error::Config(format!(
                "config file {} does not exist",
                path.display()
            )));
        }
        Figment::new()
            .merge(Toml::file(path))
            .merge(Env::prefixed("HQ_").ignore(&["puller_config"]).split("__"))
            .extract()
            .map_err(|e| {
                Error::Config(format!(
                    "config {}: {}",
                    path.display(),
                    e.to_string().replace('\n', "; ")
                ))
            })
    }

    /// Checks everything and resolves per-location defaults. All problems are reported
    /// at once, one per line.
    pub fn validate(&self) -> Result<Settings> {
        let mut problems = Vec::new();
        if !(self.database_url.starts_with("postgres://")
            || self.database_url.starts_with("postgresql://"))
        {
            problems.push("database_url: expected a postgres:// URL".to_string());
        }
        if self.max_concurrent_pulls == 0 {
            problems.push("max_concurrent_pulls: must be at least 1".into());
        }
        if self.batch_limit == 0 {
            problems.push("batch_limit: must be at least 1".into());
        }
        if !(1..=schemas::wire::MAX_SNAPSHOT_LIMIT).contains(&self.snapshot_page_rows) {
            problems.push(format!(
                "snapshot_page_rows: must be between 1 and {}",
                schemas::wire::MAX_SNAPSHOT_LIMIT
            ));
        }
        if self.run_budget.is_zero() {
            problems.push("run_budget: must be more than 0s".into());
        }
        if let Err(e) = parse_cron(&self.schedule) {
            problems.push(format!(
                "schedule: invalid cron expression {:?} (6 fields, seconds first): {e}",
                self.schedule
            ));
        }
        let catalogue = match Catalogue::load(self.catalogue_file.as_deref()) {
            Ok(c) => Some(c),
            Err(e) => {
                problems.push(format!("catalogue_file: {e}"));
                None
            }
        };
        let mut seen = HashSet::new();
        let mut locations = Vec::new();
        for (i, l) in self.locations.iter().enumerate() {
            let at = format!("locations[{i}] (id {:?})", l.id);
            if !valid_location_id(&l.id) {
                problems.push(format!("{at}: id must match [a-z0-9_-]{{1,32}}"));
            }
            if !seen.insert(l.id.clone()) {
                problems.push(format!("{at}: duplicate location id {:?}", l.id));
            }
            let url = match url::Url::parse(&l.url) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Some(u),
                Ok(_) => {
                    problems.push(format!(
                        "{at}: url {:?} must be http(s)://host[:port]",
                        l.url
                    ));
                    None
                }
                Err(e) => {
                    problems.push(format!("{at}: url {:?}: {e}", l.url));
                    None
                }
            };
            let schedule = l.schedule.clone().unwrap_or_else(|| self.schedule.clone());
            let cron = match parse_cron(&schedule) {
                Ok(c) => Some(c),
                Err(e) => {
                    problems.push(format!(
                        "{at}: schedule: invalid cron expression {schedule:?} (6 fields, seconds first): {e}"
                    ));
                    None
                }
            };
            let tokens = match Tokens::from_file(&l.token_file) {
                Ok(t) => Some(t),
                Err(e) => {
                    problems.push(format!("{at}: token_file: {e}"));
                    None
                }
            };
            let transport = match crate::transport::Transport::resolve(self, l, url.as_ref()) {
                Ok(t) => Some(t),
                Err(e) => {
                    problems.push(format!("{at}: {e}"));
                    None
                }
            };
            let batch_limit = l.batch_limit.unwrap_or(self.batch_limit);
            if batch_limit == 0 {
                problems.push(format!("{at}: batch_limit: must be at least 1"));
            }
            if let (Some(url), Some(cron), Some(tokens), Some(transport)) =
                (url, cron, tokens, transport)
            {
                locations.push(Location {
                    id: l.id.clone(),
                    name: l.name.clone(),
                    url,
                    tokens,
                    schedule,
                    cron,
                    enabled: l.enabled,
                    mode: l.mode,
                    batch_limit,
                    request_timeout: l.request_timeout.unwrap_or(self.request_timeout),
                    connect_timeout: l.connect_timeout.unwrap_or(self.connect_timeout),
                    file_delete: l.file_delete.unwrap_or(self.file_delete),
                    auto_resync: l.auto_resync,
                    transport,
                });
            }
        }
        if self.max_response_bytes < 1024 {
            problems.push("max_response_bytes: must be at least 1024".into());
        }
        problems.extend(crate::dashboard::check_listen(
            self.admin_listen,
            self.admin_allow_remote,
        ));
        let gc_schedule = self.files_gc_schedule.trim();
        if !gc_schedule.is_empty() {
            if let Err(e) = parse_cron(gc_schedule) {
                problems.push(format!(
                    "files_gc_schedule: invalid cron expression {gc_schedule:?} (6 fields, seconds first; \"\" = never): {e}"
                ));
            }
        }
        if !problems.is_empty() {
            return Err(Error::Config(problems.join("\n")));
        }
        Ok(Settings {
            database_url: self.database_url.clone(),
            max_concurrent_pulls: self.max_concurrent_pulls,
            files_dir: self.files_dir.clone(),
            catalogue: catalogue.expect("no problems means the catalogue loaded"),
            run_budget: self.run_budget,
            metrics_listen: self.metrics_listen,
            log_format: self.log_format,
            locations,
            snapshot_page_rows: self.snapshot_page_rows,
            admin_listen: self.admin_listen,
            files_gc_schedule: (!gc_schedule.is_empty()).then(|| gc_schedule.to_string()),
            files_gc_min_age: self.files_gc_min_age,
        })
    }
}

/// Loads and validates in one step.
pub fn load(path: &Path) -> Result<Settings> {
    Config::load(path)?.validate()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cron_needs_seconds_and_lists_next_fires() {
        assert!(parse_cron("*/5 * * * *").is_err());
        assert!(parse_cron("not cron").is_err());
        let c = parse_cron("*/5 * * * * *").unwrap();
        let t0 = DateTime::parse_from_rfc3339("2026-01-01T00:00:01Z")
            .unwrap()
            .with_timezone(&Utc);
        let f = next_fires(&c, t0, 3);
        assert_eq!(f.len(), 3);
        assert_eq!(f[0].to_rfc3339(), "2026-01-01T00:00:05+00:00");
        assert_eq!(f[2].to_rfc3339(), "2026-01-01T00:00:15+00:00");
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail closure signature
    fn env_overrides_and_unknown_keys() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "c.toml",
                "database_url = \"postgres://x@h/db\"\nbatch_limit = 5\n",
            )?;
            jail.set_env("HQ_BATCH_LIMIT", "7");
            jail.set_env("HQ_PULLER_CONFIG", "c.toml");
            let c = Config::load(Path::new("c.toml")).map_err(|e| e.to_string())?;
            assert_eq!(c.batch_limit, 7);
            jail.set_env("HQ_COLOUR", "red");
            let e = Config::load(Path::new("c.toml")).unwrap_err().to_string();
            assert!(e.contains("colour"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn location_ids() {
        assert!(valid_location_id("b01"));
        assert!(valid_location_id("berlin-mitte_2"));
        assert!(!valid_location_id("B01"));
        assert!(!valid_location_id(""));
        assert!(!valid_location_id(&"x".repeat(33)));
    }
}
