//! Operating it (issue 8), against real processes: systemd readiness through a fake
//! `NOTIFY_SOCKET`, every documented metric scraped from `/metrics` (and every emitted
//! metric documented), JSON log lines carrying the run and batch fields, the HQ
//! dashboard of a 46-location installation rendered by headless Chromium, and the
//! example alert rules.
//!
//! Chromium: `tests/run.sh` installs it and sets `TESTS_REQUIRE_CHROMIUM=1`, so a
//! Chromium that is missing or cannot run fails the test there. Run outside it without
//! Chromium, the browser part is skipped with a loud message.

use anyhow::{bail, ensure, Context, Result};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tests::fleet::{BranchNode, BranchOptions, Hq};
use tests::process::{binary, free_port, random_token, wait_for, write_private, Proc};
use tokio::net::UnixDatagram;
use tokio::sync::Mutex;

/// One process test at a time (2 shared cores).
static SERIAL: Mutex<()> = Mutex::const_new(());

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn read(rel: &str) -> Result<String> {
    std::fs::read_to_string(root().join(rel)).with_context(|| format!("reading {rel}"))
}

/// Metric names in docs/metrics.md's tables (`| \`name\` | ...`).
fn documented_metrics() -> Result<BTreeSet<String>> {
    let text = read("docs/metrics.md")?;
    let names: BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .filter(|n| n.starts_with("hq_puller_") || n.starts_with("branch_listener_"))
        .map(String::from)
        .collect();
    ensure!(
        names.len() >= 10,
        "docs/metrics.md lists too few metrics: {names:?}"
    );
    Ok(names)
}

/// Metric names defined in the code: every string literal `"hq_puller_…"` /
/// `"branch_listener_…"` in the sources of both binaries.
fn code_metrics() -> Result<BTreeSet<String>> {
    let mut out = BTreeSet::new();
    let dirs = [
        root().join("hq-puller/src"),
        root().join("branch-listener/src"),
    ];
    let dirs: Vec<&Path> = dirs.iter().map(PathBuf::as_path).collect();
    for text in tests::docs::rust_sources(&dirs)? {
        // Every string literal that starts like a metric name (searching for the opening
        // quote, so a quote character elsewhere cannot shift the parity).
        for prefix in ["\"hq_puller_", "\"branch_listener_"] {
            for (i, _) in text.match_indices(prefix) {
                let rest = &text[i + 1..];
                let Some(end) = rest.find('"') else { continue };
                let part = &rest[..end];
                if part.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
                    out.insert(part.to_string());
                }
            }
        }
    }
    Ok(out)
}

/// Metric names a Prometheus text page declares (`# TYPE name kind`).
fn scraped_metrics(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(String::from)
        .collect()
}

/// The documented metrics of one binary are all emitted, and all it emits is documented.
fn check_scrape(text: &str, prefix: &str) -> Result<()> {
    let scraped = scraped_metrics(text);
    let documented: BTreeSet<String> = documented_metrics()?
        .into_iter()
        .filter(|n| n.starts_with(prefix))
        .collect();
    let missing: Vec<_> = documented.difference(&scraped).collect();
    ensure!(
        missing.is_empty(),
        "documented but not emitted by a running {prefix}: {missing:?}\n--- /metrics ---\n{text}"
    );
    let undocumented: Vec<_> = scraped
        .iter()
        .filter(|n| !documented.contains(*n))
        .collect();
    ensure!(
        undocumented.is_empty(),
        "emitted but not in docs/metrics.md: {undocumented:?}"
    );
    Ok(())
}

/// A fake systemd notify socket.
struct Notify {
    sock: UnixDatagram,
    path: PathBuf,
    seen: Vec<String>,
}

impl Notify {
    fn bind(dir: &Path) -> Result<Notify> {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).context("binding the fake NOTIFY_SOCKET")?;
        Ok(Notify {
            sock,
            path,
            seen: Vec::new(),
        })
    }

    fn env(&self) -> String {
        self.path.display().to_string()
    }

    /// Waits for a datagram holding the line `want` (e.g. `READY=1`).
    async fn expect(&mut self, want: &str, timeout: Duration, log: &Path) -> Result<()> {
        if self.seen.iter().any(|m| m.lines().any(|l| l == want)) {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let mut buf = vec![0u8; 4096];
        loop {
            match tokio::time::timeout_at(deadline, self.sock.recv(&mut buf)).await {
                Ok(Ok(n)) => {
                    let msg = String::from_utf8_lossy(&buf[..n]).to_string();
                    let hit = msg.lines().any(|l| l == want);
                    self.seen.push(msg);
                    if hit {
                        return Ok(());
                    }
                }
                Ok(Err(e)) => bail!("reading the notify socket: {e}"),
                Err(_) => bail!(
                    "no {want} on NOTIFY_SOCKET within {timeout:?}; received {:?}\n--- log tail ---\n{}",
                    self.seen,
                    tests::process::log_tail(log, 30)
                ),
            }
        }
    }
}

async fn get_text(client: &reqwest::Client, url: &str, token: Option<&str>) -> Result<String> {
    let mut req = client.get(url).timeout(Duration::from_secs(10));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().await.with_context(|| format!("GET {url}"))?;
    let status = r.status();
    let body = r.text().await?;
    ensure!(status.is_success(), "GET {url}: {status}: {body}");
    Ok(body)
}

/// Log lines of a JSON-format log, parsed (any line that is not JSON is an error).
fn json_lines(log: &Path) -> Result<Vec<serde_json::Value>> {
    let text = std::fs::read_to_string(log)?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| format!("log line is not JSON: {l}")))
        .collect()
}

#[tokio::test]
async fn listener_notifies_systemd_and_serves_every_documented_metric() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir()?;
    let db = format!("sqlite://{}", dir.path().join("b01.db").display());
    let b = BranchNode::new(dir.path(), "b01", &db, &BranchOptions::default())?;
    b.install(true).await?;
    let mut notify = Notify::bind(dir.path())?;
    let cfg = b.config.display().to_string();
    let env = notify.env();
    let mut p = Proc::spawn(
        "branch-listener",
        &binary("branch-listener")?,
        &["--config", cfg.as_str(), "serve"],
        &[
            ("NOTIFY_SOCKET", env.as_str()),
            ("BRANCH_LOG_FORMAT", "json"),
            // systemd's WatchdogSec (WATCHDOG_PID unset: this process is meant).
            ("WATCHDOG_USEC", "400000"),
        ],
        &b.log,
    )?;
    notify
        .expect("READY=1", Duration::from_secs(30), &b.log)
        .await?;
    notify
        .expect("WATCHDOG=1", Duration::from_secs(10), &b.log)
        .await?;
    // READY=1 comes after the port is bound: the first request succeeds at once.
    let client = reqwest::Client::new();
    let status = get_text(&client, &format!("{}/v1/status", b.url()), Some(b.token())).await?;
    ensure!(status.contains("\"location\":\"b01\""), "{status}");
    let text = get_text(&client, &format!("{}/metrics", b.url()), Some(b.token())).await?;
    check_scrape(&text, "branch_listener_")?;
    ensure!(
        text.contains("branch_listener_database_up 1"),
        "database_up should be 1:\n{text}"
    );
    ensure!(
        text.contains("endpoint=\"/v1/status\"") && text.contains("status=\"200\""),
        "requests_total should count the /v1/status request:\n{text}"
    );
    let exit = p.terminate(Duration::from_secs(15)).await?;
    ensure!(
        exit.is_some_and(|s| s.success()),
        "branch-listener did not exit 0 on SIGTERM: {exit:?}"
    );
    notify
        .expect("STOPPING=1", Duration::from_secs(5), &b.log)
        .await?;
    // log_format = json (here from BRANCH_LOG_FORMAT): every line is a JSON object.
    let lines = json_lines(&b.log)?;
    ensure!(
        lines.iter().any(|l| l["message"] == "serving pull area"
            && l["location"] == "b01"
            && l["level"] == "INFO"
            && l["timestamp"].is_string()),
        "no JSON 'serving pull area' line with location: {lines:?}"
    );
    Ok(())
}

/// The chromium binary, or `None` (skip) outside tests/run.sh; an error inside it.
fn chromium() -> Result<Option<PathBuf>> {
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        if let Some(p) = std::env::var_os("PATH").and_then(|path| {
            std::env::split_paths(&path)
                .map(|d| d.join(name))
                .find(|p| p.is_file())
        }) {
            return Ok(Some(p));
        }
    }
    if std::env::var_os("TESTS_REQUIRE_CHROMIUM").is_some_and(|v| v == "1") {
        bail!("chromium is not installed (tests/run.sh installs it: apt-get install chromium)");
    }
    eprintln!(
        "\n!!!!! SKIPPING the headless-Chromium dashboard check: chromium is not installed \
         (apt-get install chromium; tests/run.sh requires it) !!!!!\n"
    );
    Ok(None)
}

/// Runs headless Chromium on `url` with extra arguments; returns stdout.
async fn run_chromium(chrome: &Path, profile: &Path, url: &str, args: &[&str]) -> Result<String> {
    let mut cmd = tokio::process::Command::new(chrome);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--no-first-run",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .args(args)
    .arg(url)
    .stdin(std::process::Stdio::null())
    .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(90), cmd.output())
        .await
        .context("chromium did not finish within 90 s")?
        .context("starting chromium")?;
    ensure!(
        out.status.success(),
        "chromium failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

/// Decodes a PNG: (width, height, share of non-white pixels, distinct colours).
fn png_figures(path: &Path) -> Result<(u32, u32, f64, usize)> {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path)?));
    let mut reader = decoder.read_info()?;
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf)?;
    let channels = info.color_type.samples();
    ensure!(
        channels >= 3,
        "unexpected PNG colour type {:?}",
        info.color_type
    );
    let pixels = buf[..info.buffer_size()].chunks(channels);
    let (mut total, mut inked) = (0usize, 0usize);
    let mut colours = std::collections::HashSet::new();
    for p in pixels {
        total += 1;
        if p[0] < 240 || p[1] < 240 || p[2] < 240 {
            inked += 1;
        }
        if colours.len() < 1000 {
            colours.insert((p[0], p[1], p[2]));
        }
    }
    Ok((
        info.width,
        info.height,
        inked as f64 / total.max(1) as f64,
        colours.len(),
    ))
}

#[tokio::test]
async fn hq_with_46_locations_readiness_metrics_json_logs_and_dashboard() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let chrome = chromium()?;
    let dir = tempfile::tempdir()?;
    // One real SQLite branch with data; 44 more locations whose listeners are down, and
    // b46 disabled.
    let db = format!("sqlite://{}", dir.path().join("b01.db").display());
    let mut b = BranchNode::new(dir.path(), "b01", &db, &BranchOptions::default())?;
    b.install(true).await?;
    let sim = tests::workload::Branch::open(0, &db, None, 2).await?;
    tests::workload::seed(&sim, 20, 7, &tests::workload::Counters::default()).await?;
    b.start().await?;
    let down = format!("http://127.0.0.1:{}", free_port()?);
    let database_url = tests::pg::fresh_database("ops_hq").await?;
    let (metrics_port, admin_port) = (free_port()?, free_port()?);
    let mut text = format!(
        "database_url = {database_url:?}\n\
         schedule = \"* * * * * *\"\n\
         run_budget = \"20s\"\n\
         request_timeout = \"5s\"\n\
         connect_timeout = \"1s\"\n\
         metrics_listen = \"127.0.0.1:{metrics_port}\"\n\
         admin_listen = \"127.0.0.1:{admin_port}\"\n\
         log_format = \"json\"\n\
         allow_plain_http = true\n\
         \n[[locations]]\nid = \"b01\"\nname = \"Berlin\"\nurl = {url:?}\ntoken_file = {tf:?}\n",
        url = b.url(),
        tf = b.hq_token_file.display().to_string(),
    );
    for i in 2..=46 {
        let id = format!("b{i:02}");
        let tf = dir.path().join("hq-tokens").join(&id);
        write_private(&tf, &format!("{}\n", random_token()))?;
        // A name that must be escaped in HTML.
        let name = if i == 2 {
            "Zürich <Hbf> & \"Süd\"".to_string()
        } else {
            format!("Branch {i}")
        };
        text.push_str(&format!(
            "\n[[locations]]\nid = {id:?}\nname = {name:?}\nurl = {down:?}\ntoken_file = {tf:?}\nenabled = {}\n",
            i != 46,
            tf = tf.display().to_string()
        ));
    }
    let config = dir.path().join("hq-puller.toml");
    std::fs::write(&config, text)?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&database_url)
        .await?;
    let mut hq = Hq {
        database_url: database_url.clone(),
        config: config.clone(),
        log: dir.path().join("hq-puller.log"),
        pool: pool.clone(),
        proc: None,
    };
    hq.migrate().await?;
    let mut notify = Notify::bind(dir.path())?;
    let cfg = config.display().to_string();
    let env = notify.env();
    hq.proc = Some(Proc::spawn(
        "hq-puller",
        &binary("hq-puller")?,
        &["--config", cfg.as_str(), "run"],
        &[("NOTIFY_SOCKET", env.as_str())],
        &hq.log,
    )?);
    notify
        .expect("READY=1", Duration::from_secs(60), &hq.log)
        .await?;
    hq.wait_caught_up(&[&b], Duration::from_secs(90)).await?;
    // The seed arrived by the initial load (a snapshot); changes made now arrive in
    // batches through the change stream.
    tests::workload::seed(&sim, 5, 8, &tests::workload::Counters::default()).await?;
    hq.wait_caught_up(&[&b], Duration::from_secs(90)).await?;
    wait_for(
        "every enabled location to have finished a run (and a lag sample)",
        Duration::from_secs(90),
        || async {
            let n: i64 =
                sqlx::query_scalar("SELECT count(DISTINCT location_id) FROM sync.lag_samples")
                    .fetch_one(&pool)
                    .await?;
            Ok((n == 45).then_some(()))
        },
    )
    .await?;

    // /api/status: every location, with its recent runs.
    let client = reqwest::Client::new();
    let admin = format!("http://127.0.0.1:{admin_port}");
    let api: serde_json::Value =
        serde_json::from_str(&get_text(&client, &format!("{admin}/api/status"), None).await?)?;
    let locs = api["locations"].as_array().context("locations array")?;
    ensure!(
        locs.len() == 46,
        "api/status lists {} locations",
        locs.len()
    );
    let b01 = locs.iter().find(|l| l["id"] == "b01").context("b01")?;
    ensure!(b01["state"] == "ok", "b01: {b01}");
    ensure!(
        b01["recent_runs"].as_array().is_some_and(|r| !r.is_empty()),
        "b01 has no recent runs: {b01}"
    );
    let b02 = locs.iter().find(|l| l["id"] == "b02").context("b02")?;
    ensure!(
        b02["state"] == "failing" && b02["last_error"].is_string(),
        "b02 (listener down) should be failing with an error: {b02}"
    );

    // /metrics: every documented hq-puller metric, for every location.
    let m = get_text(
        &client,
        &format!("http://127.0.0.1:{metrics_port}/metrics"),
        None,
    )
    .await?;
    check_scrape(&m, "hq_puller_")?;
    let last_success = |id: &str| {
        m.contains(&format!(
            "hq_puller_last_success_timestamp_seconds{{location=\"{id}\"}}"
        ))
    };
    for id in ["b01", "b45"] {
        ensure!(last_success(id), "no last_success series for {id}");
    }
    // A disabled location has its state but must not look stale to the alerts.
    ensure!(
        !last_success("b46"),
        "disabled b46 has a last_success series"
    );
    ensure!(
        m.contains("hq_puller_location_state{location=\"b46\",state=\"ok\"} 1"),
        "disabled b46 has no state series"
    );
    ensure!(
        m.contains("hq_puller_errors_total{location=\"b02\",kind=\"transient\"}"),
        "no transient error series for b02:\n{m}"
    );

    // JSON logs: a batch line carries the run (location, run_id) and the batch range.
    let lines = json_lines(&hq.log)?;
    let batch = lines
        .iter()
        .find(|l| l["message"] == "batch applied")
        .with_context(|| {
            format!(
                "no 'batch applied' line in the JSON log:\n{}",
                hq.log_tail(30)
            )
        })?;
    let spans = batch["spans"]
        .as_array()
        .context("spans of the batch line")?;
    let run = spans
        .iter()
        .find(|s| s["name"] == "run")
        .context("run span")?;
    ensure!(
        run["location"] == "b01" && run["run_id"].is_u64(),
        "run span: {batch}"
    );
    let bs = spans
        .iter()
        .find(|s| s["name"] == "batch")
        .context("batch span")?;
    ensure!(
        bs["from"].is_u64()
            && bs["to"].as_u64() > bs["from"].as_u64()
            && bs["changes"].as_u64() > Some(0),
        "batch span: {batch}"
    );
    // Every line logged inside a run names its location and run id.
    for l in lines.iter().filter(|l| l["spans"].is_array()) {
        if let Some(r) = l["spans"]
            .as_array()
            .and_then(|s| s.iter().find(|s| s["name"] == "run"))
        {
            ensure!(
                r["location"].is_string() && r["run_id"].is_u64(),
                "run line without location/run_id: {l}"
            );
        }
    }
    ensure!(
        lines
            .iter()
            .any(|l| l["message"] == "pull failed, will retry"
                && l["span"]["name"] == "run"
                && l["span"]["location"] == "b02"),
        "no JSON failure line of b02 inside its run span"
    );

    // Lag history the chart must show: b05 fell 300 s behind an hour ago and recovered.
    sqlx::query(
        "INSERT INTO sync.lag_samples (location_id, at, lag_seconds, backlog, state) \
         SELECT 'b05', now() - make_interval(mins => m), 300 - abs(m - 60) * 5, 0, 'ok' \
         FROM generate_series(1, 119) m",
    )
    .execute(&pool)
    .await?;

    // The page forbids scripts and anything loaded from elsewhere.
    let page = client.get(format!("{admin}/")).send().await?;
    let csp = page
        .headers()
        .get("content-security-policy")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    ensure!(
        csp.contains("default-src 'none'"),
        "dashboard CSP header: {csp:?}"
    );
    ensure!(
        !page.text().await?.contains("<script"),
        "the page has a script"
    );

    // The dashboard in headless Chromium.
    if let Some(chrome) = chrome {
        let profile = dir.path().join("chromium-profile");
        let dom = run_chromium(&chrome, &profile, &format!("{admin}/"), &["--dump-dom"]).await?;
        let rows = dom.matches("<tr class=\"location\"").count();
        ensure!(
            rows == 46,
            "the rendered DOM lists {rows} locations, not 46"
        );
        for id in ["b01", "b23", "b46"] {
            ensure!(
                dom.contains(&format!("data-location=\"{id}\"")),
                "{id} missing in the DOM"
            );
        }
        let chart = dom
            .split("id=\"lag-chart\"")
            .nth(1)
            .and_then(|c| c.split("</svg>").next())
            .context("no lag chart in the DOM")?;
        ensure!(
            chart.contains("<polyline") && chart.contains(">500 s<"),
            "the lag chart does not show b05's 300 s peak (axis up to 500 s): {chart}"
        );
        ensure!(
            dom.contains("Zürich &lt;Hbf&gt; &amp; \"Süd\"") && !dom.contains("<hbf>"),
            "the location name was not escaped as text"
        );
        let shot = dir.path().join("dashboard.png");
        run_chromium(
            &chrome,
            &profile,
            &format!("{admin}/"),
            &[
                "--window-size=1280,2400",
                &format!("--screenshot={}", shot.display()),
            ],
        )
        .await?;
        let (w, h, inked, colours) = png_figures(&shot)?;
        ensure!(
            (w, h) == (1280, 2400),
            "screenshot is {w}x{h}, not 1280x2400"
        );
        ensure!(
            inked > 0.02 && colours > 8,
            "the screenshot looks blank: {:.1}% non-white pixels, {colours} colours",
            inked * 100.0
        );
    }

    // SIGTERM: STOPPING=1, then a clean exit.
    let p = hq.proc.as_mut().expect("started");
    let exit = p.terminate(Duration::from_secs(30)).await?;
    ensure!(
        exit.is_some_and(|s| s.success()),
        "hq-puller did not exit 0 on SIGTERM: {exit:?}\n{}",
        hq.log_tail(20)
    );
    notify
        .expect("STOPPING=1", Duration::from_secs(5), &hq.log)
        .await?;
    b.stop().await?;
    if std::env::var_os("E2E_KEEP").is_some_and(|v| v == "1") {
        eprintln!("ops: kept {}", dir.keep().display());
    }
    Ok(())
}

#[test]
fn every_metric_in_the_code_is_documented_and_vice_versa() -> Result<()> {
    let code = code_metrics()?;
    let docs = documented_metrics()?;
    ensure!(
        code == docs,
        "metrics in code but not in docs/metrics.md: {:?}; in docs but not in code: {:?}",
        code.difference(&docs).collect::<Vec<_>>(),
        docs.difference(&code).collect::<Vec<_>>()
    );
    Ok(())
}

#[test]
fn alert_rules_parse_and_use_documented_metrics() -> Result<()> {
    let text = read("deploy/prometheus/alerts.yml")?;
    let y: serde_yaml::Value = serde_yaml::from_str(&text).context("alerts.yml is not YAML")?;
    let documented = documented_metrics()?;
    let groups = y["groups"].as_sequence().context("groups: a list")?;
    let mut alerts = BTreeSet::new();
    for g in groups {
        ensure!(g["name"].is_string(), "group without a name: {g:?}");
        for r in g["rules"].as_sequence().context("rules: a list")? {
            let name = r["alert"].as_str().context("rule without alert name")?;
            let expr = r["expr"]
                .as_str()
                .with_context(|| format!("{name}: no expr"))?;
            ensure!(
                r["labels"]["severity"].is_string(),
                "{name}: no severity label"
            );
            ensure!(
                r["annotations"]["summary"].is_string(),
                "{name}: no summary annotation"
            );
            if let Some(f) = r["for"].as_str() {
                ensure!(humantime::parse_duration(f).is_ok(), "{name}: bad for: {f}");
            }
            let used: Vec<&str> = expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|t| t.starts_with("hq_puller_") || t.starts_with("branch_listener_"))
                .collect();
            ensure!(!used.is_empty(), "{name}: uses no metric of ours: {expr}");
            for m in used {
                ensure!(
                    documented.contains(m),
                    "{name}: metric {m} is not documented/emitted"
                );
            }
            alerts.insert(name.to_string());
        }
    }
    for want in [
        "ReplicationLocationStale",
        "ReplicationLocationPaused",
        "ReplicationLocationNeedsResync",
        "BranchPullAreaGrowing",
    ] {
        ensure!(alerts.contains(want), "alerts.yml lacks {want}");
    }
    Ok(())
}

/// Ages a file (its inode: every hard link of it) by `secs`.
fn age(path: &Path, secs: u64) -> Result<()> {
    std::fs::File::options()
        .write(true)
        .open(path)?
        .set_modified(std::time::SystemTime::now() - Duration::from_secs(secs))?;
    Ok(())
}

/// The file store's sweep, on the real binary: `gc-files --dry-run` reports and removes
/// nothing; `gc-files` removes the old unreferenced object and an old partial download
/// but keeps the object of a placed file, a young one and the placed file itself; the
/// service sweeps at `files_gc_schedule` by itself; a bad schedule is a config error
/// naming the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_store_sweep_by_command_and_by_schedule() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir()?;
    let url = tests::pg::fresh_database("hq_gc").await?;
    let mut hq = Hq::new(
        dir.path(),
        &url,
        &tests::fleet::HqOptions {
            extra: "allow_plain_http = true\nfiles_gc_schedule = \"* * * * * *\"\nfiles_gc_min_age = \"1h\"\n"
                .into(),
            ..Default::default()
        },
        &[],
    )
    .await?;
    let store = dir.path().join("hq-files");
    let object = |sha: &str, body: &[u8]| -> Result<PathBuf> {
        let p = store.join(".objects").join(&sha[..2]).join(sha);
        std::fs::create_dir_all(p.parent().expect("parent"))?;
        std::fs::write(&p, body)?;
        Ok(p)
    };
    let used = object(&format!("aa{}", "0".repeat(62)), b"placed")?;
    let garbage = object(&format!("bb{}", "1".repeat(62)), b"old version")?;
    let young = object(&format!("cc{}", "2".repeat(62)), b"just downloaded")?;
    let placed = store.join("b01/images/1.jpg");
    std::fs::create_dir_all(placed.parent().expect("parent"))?;
    std::fs::hard_link(&used, &placed)?;
    let part = store
        .join(".tmp")
        .join(format!("dd{}.b01.part", "3".repeat(62)));
    std::fs::create_dir_all(part.parent().expect("parent"))?;
    std::fs::write(&part, b"half")?;
    for p in [&used, &garbage, &part] {
        age(p, 7200)?;
    }

    let out = hq.command(&["gc-files", "--dry-run"]).await?;
    ensure!(
        out.contains("would remove 1 unreferenced objects (11 bytes) and 1 download leftovers (4 bytes); 2 objects in use kept"),
        "{out}"
    );
    ensure!(garbage.exists() && part.exists(), "a dry run removed files");
    let out = hq.command(&["gc-files"]).await?;
    ensure!(out.starts_with("removed 1 unreferenced objects"), "{out}");
    ensure!(!garbage.exists() && !part.exists());
    ensure!(used.exists() && young.exists());
    ensure!(std::fs::read(&placed)? == b"placed");
    // --min-age 0s: the young object goes too.
    let out = hq.command(&["gc-files", "--min-age", "0s"]).await?;
    ensure!(out.starts_with("removed 1 unreferenced objects"), "{out}");
    ensure!(!young.exists() && used.exists());

    // The service sweeps at its schedule (every second here).
    let garbage = object(&format!("ee{}", "4".repeat(62)), b"replaced image")?;
    age(&garbage, 7200)?;
    hq.migrate().await?;
    hq.start()?;
    let log = hq.log.clone();
    wait_for("the scheduled sweep", Duration::from_secs(30), || async {
        Ok(
            (!garbage.exists() && std::fs::read_to_string(&log)?.contains("file store swept"))
                .then_some(()),
        )
    })
    .await
    .with_context(|| hq.log_tail(20))?;
    ensure!(used.exists() && std::fs::read(&placed)? == b"placed");
    hq.stop().await?;

    // A bad schedule: exit 2, the key named.
    let text = std::fs::read_to_string(&hq.config)?;
    std::fs::write(
        &hq.config,
        text.replace(
            "files_gc_schedule = \"* * * * * *\"",
            "files_gc_schedule = \"daily\"",
        ),
    )?;
    let out = tokio::process::Command::new(binary("hq-puller")?)
        .args(["check-config", "--config"])
        .arg(&hq.config)
        .output()
        .await?;
    ensure!(out.status.code() == Some(2), "{out:?}");
    ensure!(
        String::from_utf8_lossy(&out.stderr).contains("files_gc_schedule"),
        "{out:?}"
    );
    Ok(())
}
