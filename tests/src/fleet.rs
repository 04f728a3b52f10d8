//! Branches and HQ as test objects: each branch is a database (SQLite file or
//! PostgreSQL database) plus a `branch-listener` process on a loopback port; HQ is a
//! PostgreSQL database plus `hq-puller`. Configs and token files (mode 0600) are written
//! into a folder of the test, following the documented config contracts.

use crate::compare::{compare, LocationReport};
use crate::process::{binary, free_port, port_open, random_token, run_to_end, write_private, Proc};
use anyhow::{bail, Context, Result};
use schemas::wire::StatusResponse;
use schemas::{Catalogue, Cursor};
use sqlx::postgres::{PgPool, PgPoolOptions};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Settings of a branch beyond its location and database.
#[derive(Debug, Clone)]
pub struct BranchOptions {
    pub time_zone: String,
    pub tick_interval: String,
    /// Serve HTTPS with these files (see `deploy/make-test-ca.sh`).
    pub tls: Option<TlsFiles>,
    /// Extra lines of the listener's config file.
    pub extra: String,
}

/// A listener's certificate and key, and the CA HQ trusts for it.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl TlsFiles {
    /// Runs `deploy/make-test-ca.sh dir 127.0.0.1 localhost`: a CA (kept across calls
    /// with the same `dir`) and a server certificate for the loopback address.
    pub fn make(dir: &Path) -> Result<TlsFiles> {
        let script = crate::pg::workspace_root().join("deploy/make-test-ca.sh");
        let out = std::process::Command::new("bash")
            .arg(&script)
            .arg(dir)
            .args(["127.0.0.1", "localhost"])
            .output()
            .context("running deploy/make-test-ca.sh")?;
        if !out.status.success() {
            bail!(
                "deploy/make-test-ca.sh failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(TlsFiles {
            cert: dir.join("127.0.0.1.pem"),
            key: dir.join("127.0.0.1.key"),
            ca: dir.join("ca.pem"),
        })
    }

    /// A client trusting only this CA.
    pub fn client(&self) -> Result<reqwest::Client> {
        let pem = std::fs::read(&self.ca)?;
        Ok(reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&pem)?)
            .build()?)
    }
}

impl Default for BranchOptions {
    fn default() -> Self {
        BranchOptions {
            time_zone: "UTC".into(),
            tick_interval: "1s".into(),
            tls: None,
            extra: String::new(),
        }
    }
}

/// One branch: its database and its listener.
pub struct BranchNode {
    pub location: String,
    pub database_url: String,
    pub time_zone: String,
    pub port: u16,
    token: String,
    token_file: PathBuf,
    tick_interval: String,
    pub config: PathBuf,
    /// The token file HQ reads for this location (same token, HQ's copy).
    pub hq_token_file: PathBuf,
    pub files_dir: PathBuf,
    pub log: PathBuf,
    pub proc: Option<Proc>,
    pub tls: Option<TlsFiles>,
    extra: String,
    /// The URL HQ is configured with, when not [`BranchNode::url`] (e.g. a fault proxy).
    pub hq_url: Option<String>,
}

impl BranchNode {
    /// Writes the branch's config and token files under `dir/<location>/`.
    pub fn new(
        dir: &Path,
        location: &str,
        database_url: &str,
        opts: &BranchOptions,
    ) -> Result<BranchNode> {
        let home = dir.join(location);
        std::fs::create_dir_all(&home)?;
        let token = random_token();
        let token_file = home.join("token");
        write_private(&token_file, &format!("{token}\n"))?;
        let hq_token_file = dir.join("hq-tokens").join(location);
        write_private(&hq_token_file, &format!("{token}\n"))?;
        let files_dir = home.join("files");
        std::fs::create_dir_all(&files_dir)?;
        let b = BranchNode {
            location: location.to_string(),
            database_url: database_url.to_string(),
            time_zone: opts.time_zone.clone(),
            port: free_port()?,
            token,
            token_file,
            tick_interval: opts.tick_interval.clone(),
            config: home.join("branch-listener.toml"),
            hq_token_file,
            files_dir,
            log: home.join("branch-listener.log"),
            proc: None,
            tls: opts.tls.clone(),
            extra: opts.extra.clone(),
            hq_url: None,
        };
        b.write_config()?;
        Ok(b)
    }

    /// Writes the listener's config file (all documented keys the tests need).
    fn write_config(&self) -> Result<()> {
        let tls = match &self.tls {
            Some(t) => format!(
                "tls_cert_file = {:?}\ntls_key_file = {:?}\n",
                t.cert.display().to_string(),
                t.key.display().to_string()
            ),
            None => String::new(),
        } + &self.extra;
        std::fs::write(
            &self.config,
            format!(
                "location = {loc:?}\n\
                 database_url = {db:?}\n\
                 listen = \"127.0.0.1:{port}\"\n\
                 token_file = {tf:?}\n\
                 time_zone = {tz:?}\n\
                 files_dir = {fd:?}\n\
                 tick_interval = {ti:?}\n\
                 log_format = \"text\"\n{tls}",
                loc = self.location,
                db = self.database_url,
                port = self.port,
                tf = self.token_file.display().to_string(),
                tz = self.time_zone,
                fd = self.files_dir.display().to_string(),
                ti = self.tick_interval,
            ),
        )?;
        Ok(())
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// An HTTP client for this listener (trusting its CA when it serves HTTPS).
    pub fn http_client(&self) -> Result<reqwest::Client> {
        match &self.tls {
            Some(t) => t.client(),
            None => Ok(reqwest::Client::new()),
        }
    }

    fn config_arg(&self) -> String {
        self.config.display().to_string()
    }

    /// `branch-listener install --config FILE [--with-demo-schema]`.
    pub async fn install(&self, with_demo_schema: bool) -> Result<()> {
        let cfg = self.config_arg();
        let mut args = vec!["install", "--config", cfg.as_str()];
        if with_demo_schema {
            args.push("--with-demo-schema");
        }
        run_to_end(
            &binary("branch-listener")?,
            &args,
            &[],
            Duration::from_secs(60),
        )
        .await
        .with_context(|| format!("installing branch {}", self.location))?;
        Ok(())
    }

    /// Starts (or restarts) `branch-listener serve` and waits until it answers as this
    /// branch (`/healthz`, then `/v1/status` with this branch's token and location). On
    /// the first start, a port another process took meanwhile is replaced by a new one.
    pub async fn start(&mut self) -> Result<()> {
        let first = self.proc.is_none();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let cfg = self.config_arg();
            match self.proc.as_mut() {
                Some(p) => p.start()?,
                None => {
                    self.proc = Some(Proc::spawn(
                        &format!("branch-listener {}", self.location),
                        &binary("branch-listener")?,
                        &["--config", cfg.as_str(), "serve"],
                        &[],
                        &self.log,
                    )?)
                }
            }
            match self.wait_healthy(Duration::from_secs(30)).await {
                Ok(()) => return Ok(()),
                Err(e) if first && attempt < 5 && self.log_tail(5).contains("in use") => {
                    eprintln!(
                        "{}: port {} taken, retrying: {e:#}",
                        self.location, self.port
                    );
                    if let Some(p) = self.proc.as_mut() {
                        p.kill9()?;
                    }
                    self.port = free_port()?;
                    self.write_config()?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    pub async fn wait_healthy(&mut self, timeout: Duration) -> Result<()> {
        let client = self.http_client()?;
        let deadline = std::time::Instant::now() + timeout;
        let mut last = String::from("not answering yet");
        loop {
            if let Some(st) = self.proc.as_mut().and_then(Proc::exit_status) {
                bail!(
                    "branch-listener {} exited ({st})\n--- log tail ---\n{}",
                    self.location,
                    self.log_tail(40)
                );
            }
            match self.answers_as_itself(&client).await {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => last = format!("{e:#}"),
            }
            if std::time::Instant::now() >= deadline {
                bail!(
                    "timed out after {timeout:?} waiting for {} to answer /healthz and /v1/status ({last})\n--- {} log tail ---\n{}",
                    self.url(),
                    self.location,
                    self.log_tail(40)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Whether the listener answers `/healthz`, and `/v1/status` as this location with
    /// this branch's token (another process on the port would not know the token).
    async fn answers_as_itself(&self, client: &reqwest::Client) -> Result<bool> {
        let addr: SocketAddr = format!("127.0.0.1:{}", self.port).parse()?;
        if !port_open(addr) {
            return Ok(false);
        }
        let r = client
            .get(format!("{}/healthz", self.url()))
            .timeout(Duration::from_secs(2))
            .send()
            .await?;
        if !r.status().is_success() {
            return Ok(false);
        }
        let s = self.status(client).await?;
        if s.location != self.location {
            bail!("port {} answers as location {}", self.port, s.location);
        }
        Ok(true)
    }

    /// `GET /v1/status` with the branch's token.
    pub async fn status(&self, client: &reqwest::Client) -> Result<StatusResponse> {
        let own;
        let client = if self.tls.is_some() {
            own = self.http_client()?;
            &own
        } else {
            client
        };
        let r = client
            .get(format!("{}/v1/status", self.url()))
            .bearer_auth(&self.token)
            .timeout(Duration::from_secs(5))
            .send()
            .await?;
        if !r.status().is_success() {
            bail!(
                "{}: /v1/status answered {}: {}",
                self.location,
                r.status(),
                r.text().await?
            );
        }
        Ok(r.json().await?)
    }

    pub fn token(&self) -> &str {
        &self.token
    }

    pub fn log_tail(&self, lines: usize) -> String {
        crate::process::log_tail(&self.log, lines)
    }

    pub fn kill9(&mut self) -> Result<()> {
        match self.proc.as_mut() {
            Some(p) => p.kill9(),
            None => Ok(()),
        }
    }

    pub async fn stop(&mut self) -> Result<()> {
        if let Some(p) = self.proc.as_mut() {
            p.terminate(Duration::from_secs(10)).await?;
        }
        Ok(())
    }
}

/// HQ: its database and `hq-puller`.
pub struct Hq {
    pub database_url: String,
    pub config: PathBuf,
    pub log: PathBuf,
    pub pool: PgPool,
    pub proc: Option<Proc>,
}

/// Settings of HQ's config.
#[derive(Debug, Clone)]
pub struct HqOptions {
    pub schedule: String,
    pub max_concurrent_pulls: u32,
    pub run_budget: String,
    pub request_timeout: String,
    pub batch_limit: u32,
    /// Extra top-level TOML lines (default: `allow_plain_http = true`).
    pub extra: String,
    /// Every location's `mode`: `schedule` or `stream`.
    pub mode: String,
}

impl Default for HqOptions {
    fn default() -> Self {
        HqOptions {
            schedule: "* * * * * *".into(),
            max_concurrent_pulls: 8,
            run_budget: "20s".into(),
            request_timeout: "5s".into(),
            batch_limit: 5000,
            extra: "allow_plain_http = true\n".into(),
            mode: "schedule".into(),
        }
    }
}

impl Hq {
    /// Writes HQ's config (one `[[locations]]` entry per branch) into `dir`.
    pub async fn new(
        dir: &Path,
        database_url: &str,
        opts: &HqOptions,
        branches: &[&BranchNode],
    ) -> Result<Hq> {
        let files = dir.join("hq-files");
        std::fs::create_dir_all(&files)?;
        let mut text = format!(
            "database_url = {db:?}\n\
             schedule = {s:?}\n\
             max_concurrent_pulls = {m}\n\
             files_dir = {f:?}\n\
             run_budget = {rb:?}\n\
             request_timeout = {rt:?}\n\
             connect_timeout = \"2s\"\n\
             batch_limit = {bl}\n\
             log_format = \"text\"\n{extra}",
            extra = opts.extra,
            db = database_url,
            s = opts.schedule,
            m = opts.max_concurrent_pulls,
            f = files.display().to_string(),
            rb = opts.run_budget,
            rt = opts.request_timeout,
            bl = opts.batch_limit,
        );
        for b in branches {
            text.push_str(&format!(
                "\n[[locations]]\nid = {id:?}\nname = {name:?}\nurl = {url:?}\ntoken_file = {tf:?}\nmode = {mode:?}\n",
                mode = opts.mode,
                id = b.location,
                name = format!("Branch {}", b.location),
                url = b.hq_url.clone().unwrap_or_else(|| b.url()),
                tf = b.hq_token_file.display().to_string(),
            ));
        }
        let config = dir.join("hq-puller.toml");
        std::fs::write(&config, text)?;
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .connect(database_url)
            .await
            .context("connecting to the HQ database")?;
        Ok(Hq {
            database_url: database_url.to_string(),
            config,
            log: dir.join("hq-puller.log"),
            pool,
            proc: None,
        })
    }

    fn config_arg(&self) -> String {
        self.config.display().to_string()
    }

    /// Runs an `hq-puller` subcommand to completion and returns its stdout.
    pub async fn command(&self, args: &[&str]) -> Result<String> {
        let cfg = self.config_arg();
        let mut v: Vec<&str> = args.to_vec();
        v.extend(["--config", cfg.as_str()]);
        run_to_end(&binary("hq-puller")?, &v, &[], Duration::from_secs(120)).await
    }

    pub async fn migrate(&self) -> Result<()> {
        self.command(&["migrate"]).await.map(|_| ())
    }

    /// `hq-puller status --json`.
    pub async fn status_json(&self) -> Result<serde_json::Value> {
        let out = self.command(&["status", "--json"]).await?;
        serde_json::from_str(&out).with_context(|| format!("parsing status --json output: {out}"))
    }

    /// Starts (or restarts) `hq-puller run`.
    pub fn start(&mut self) -> Result<()> {
        let cfg = self.config_arg();
        match self.proc.as_mut() {
            Some(p) => p.start(),
            None => {
                self.proc = Some(Proc::spawn(
                    "hq-puller",
                    &binary("hq-puller")?,
                    &["--config", cfg.as_str(), "run"],
                    &[],
                    &self.log,
                )?);
                Ok(())
            }
        }
    }

    /// Fails if `hq-puller run` has exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        if let Some(p) = self.proc.as_mut() {
            if let Some(st) = p.exit_status() {
                bail!(
                    "hq-puller exited ({st})\n--- hq-puller log tail ---\n{}",
                    self.log_tail(40)
                );
            }
        }
        Ok(())
    }

    pub fn kill9(&mut self) -> Result<()> {
        match self.proc.as_mut() {
            Some(p) => p.kill9(),
            None => Ok(()),
        }
    }

    pub async fn stop(&mut self) -> Result<()> {
        if let Some(p) = self.proc.as_mut() {
            p.terminate(Duration::from_secs(15)).await?;
        }
        Ok(())
    }

    pub fn log_tail(&self, lines: usize) -> String {
        crate::process::log_tail(&self.log, lines)
    }

    /// HQ's stored cursor for a location (`sync.locations.cursor`).
    pub async fn cursor(&self, location: &str) -> Result<Option<Cursor>> {
        let c: Option<Option<String>> =
            sqlx::query_scalar("SELECT cursor FROM sync.locations WHERE id = $1")
                .bind(location)
                .fetch_optional(&self.pool)
                .await?;
        match c.flatten() {
            Some(s) => Ok(Some(s.parse()?)),
            None => Ok(None),
        }
    }

    /// State and last error of a location (`sync.locations`).
    pub async fn location_state(&self, location: &str) -> Result<Option<(String, Option<String>)>> {
        Ok(
            sqlx::query_as("SELECT state, last_error FROM sync.locations WHERE id = $1")
                .bind(location)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    /// Compares this location at HQ with its branch.
    pub async fn compare(&self, b: &BranchNode) -> Result<LocationReport> {
        compare(
            &self.pool,
            &Catalogue::product_management(),
            &b.location,
            &b.database_url,
            &b.time_zone,
        )
        .await
    }

    /// Waits until HQ holds exactly what each branch holds: HQ's cursor has reached the
    /// listener's newest tick and the oracle finds no difference. Call after the
    /// branches stopped writing. On timeout the error carries the differences and the
    /// log tails.
    pub async fn wait_caught_up(
        &mut self,
        branches: &[&BranchNode],
        timeout: Duration,
    ) -> Result<()> {
        let client = reqwest::Client::new();
        let deadline = std::time::Instant::now() + timeout;
        let mut pending: Vec<&BranchNode> = branches.to_vec();
        let mut last: Vec<String> = Vec::new();
        loop {
            self.ensure_running()?;
            let mut still = Vec::new();
            last.clear();
            for b in pending {
                let head = b.status(&client).await.map(|s| s.head);
                let cursor = self.cursor(&b.location).await;
                match (head, cursor) {
                    (Ok(h), Ok(Some(c))) if c == h => {
                        let r = self.compare(b).await?;
                        if r.is_equal() {
                            continue;
                        }
                        last.push(format!("{r}"));
                    }
                    (h, c) => last.push(format!(
                        "{}: listener head {:?}, HQ cursor {:?}",
                        b.location,
                        h.map(|x| x.to_string()).map_err(|e| e.to_string()),
                        c.map(|x| x.map(|x| x.to_string()))
                            .map_err(|e| e.to_string()),
                    )),
                }
                still.push(b);
            }
            pending = still;
            if pending.is_empty() {
                return Ok(());
            }
            if std::time::Instant::now() >= deadline {
                let mut msg = format!(
                    "HQ did not catch up with {} location(s) within {timeout:?}:\n{}",
                    pending.len(),
                    last.iter().take(5).cloned().collect::<Vec<_>>().join("\n")
                );
                for b in pending.iter().take(3) {
                    let state = self.location_state(&b.location).await.ok().flatten();
                    msg.push_str(&format!(
                        "\n--- {} (HQ state {state:?}) listener log tail ---\n{}",
                        b.location,
                        b.log_tail(20)
                    ));
                }
                msg.push_str(&format!(
                    "\n--- hq-puller log tail ---\n{}",
                    self.log_tail(40)
                ));
                bail!(msg);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}
