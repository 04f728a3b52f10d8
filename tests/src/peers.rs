//! The peers the benchmarks measure us against, set up the same way by every benchmark.
//!
//! [`LogicalReplication`]: PostgreSQL logical replication (a publication of one table and
//! a subscription to it) between two databases of the throwaway cluster.
//!
//! [`Bucardo`]: Bucardo 5 (trigger-based, a Perl daemon) replicating one table between
//! two databases of the throwaway cluster, its daemon's files in a temporary folder.

use anyhow::{bail, Context, Result};
use sqlx::{Connection, Executor, PgConnection};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A publication on `src` and a subscription on `dst` of one table, created by the same
/// DDL on both sides. Both databases are in one cluster, so the replication slot is
/// created apart from `CREATE SUBSCRIPTION` (which would otherwise wait for itself).
pub struct LogicalReplication {
    pub src: PgConnection,
    pub dst: PgConnection,
    tag: String,
    slot: String,
}

impl LogicalReplication {
    /// Creates `ddl` in both databases and publishes `table` from `src_url` to
    /// `dst_url` (no initial copy). With `enabled = false` nothing flows until
    /// [`enable`](Self::enable), e.g. to let a backlog build up first.
    pub async fn create(
        src_url: &str,
        dst_url: &str,
        ddl: &str,
        table: &str,
        enabled: bool,
    ) -> Result<LogicalReplication> {
        let mut src = PgConnection::connect(src_url).await?;
        let mut dst = PgConnection::connect(dst_url).await?;
        let tag = uuid::Uuid::new_v4().simple().to_string()[..10].to_string();
        let slot = format!("bench_{tag}");
        src.execute(ddl).await?;
        dst.execute(ddl).await?;
        src.execute(format!("CREATE PUBLICATION pub_{tag} FOR TABLE {table}").as_str())
            .await?;
        sqlx::query("SELECT pg_create_logical_replication_slot($1, 'pgoutput')")
            .bind(&slot)
            .execute(&mut src)
            .await?;
        let src_db: String = sqlx::query_scalar("SELECT current_database()")
            .fetch_one(&mut src)
            .await?;
        let port: i32 = sqlx::query_scalar("SELECT current_setting('port')::int")
            .fetch_one(&mut src)
            .await?;
        dst.execute(
            format!(
                "CREATE SUBSCRIPTION sub_{tag} CONNECTION 'host=127.0.0.1 port={port} dbname={src_db} user=postgres' \
                 PUBLICATION pub_{tag} WITH (create_slot = false, slot_name = '{slot}', enabled = {enabled}, copy_data = false)"
            )
            .as_str(),
        )
        .await?;
        Ok(LogicalReplication {
            src,
            dst,
            tag,
            slot,
        })
    }

    pub async fn enable(&mut self) -> Result<()> {
        self.dst
            .execute(format!("ALTER SUBSCRIPTION sub_{} ENABLE", self.tag).as_str())
            .await?;
        Ok(())
    }

    /// The source's current WAL position.
    pub async fn source_lsn(&mut self) -> Result<String> {
        Ok(sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
            .fetch_one(&mut self.src)
            .await?)
    }

    /// Waits (polling every 10 ms, at most `timeout`) until the subscription has
    /// confirmed the source's WAL up to `lsn`.
    pub async fn wait_confirmed(&mut self, lsn: &str, timeout: Duration) -> Result<()> {
        let t0 = Instant::now();
        loop {
            let done: bool = sqlx::query_scalar(
                "SELECT coalesce(confirmed_flush_lsn >= $2::pg_lsn, false) FROM pg_replication_slots WHERE slot_name = $1",
            )
            .bind(&self.slot)
            .bind(lsn)
            .fetch_one(&mut self.src)
            .await?;
            if done {
                return Ok(());
            }
            if t0.elapsed() > timeout {
                bail!("logical replication did not confirm {lsn} within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Drops the subscription and its slot (the databases stay).
    pub async fn drop_all(mut self) -> Result<()> {
        let tag = &self.tag;
        self.dst
            .execute(format!("ALTER SUBSCRIPTION sub_{tag} DISABLE").as_str())
            .await?;
        self.dst
            .execute(format!("ALTER SUBSCRIPTION sub_{tag} SET (slot_name = NONE)").as_str())
            .await?;
        self.dst
            .execute(format!("DROP SUBSCRIPTION sub_{tag}").as_str())
            .await?;
        // The walsender may take a moment to let go of the slot.
        let t0 = Instant::now();
        loop {
            match sqlx::query("SELECT pg_drop_replication_slot($1)")
                .bind(&self.slot)
                .execute(&mut self.src)
                .await
            {
                Ok(_) => return Ok(()),
                Err(e) if t0.elapsed() < Duration::from_secs(10) => {
                    tracing::debug!(error = %e, "slot still active");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// A Bucardo sync of one table from `src` to `dst` (source → target), registered under
/// names unique to this instance, with its own daemon (pid, log and rc files in a
/// temporary folder). `bucardo install` runs once per cluster (skipped when the
/// `bucardo` database exists). The daemon is stopped and the registration removed by
/// [`drop_all`](Self::drop_all), or by `Drop` when a benchmark fails half-way (an
/// error or a panic): no Bucardo process outlives this value, unless the benchmark
/// process itself is killed (then the daemon exits once the cluster is destroyed; its
/// VAC process may linger). One instance per cluster at a time (every
/// daemon reads every sync of the `bucardo` database).
pub struct Bucardo {
    pub src: PgConnection,
    pub dst: PgConnection,
    /// The `bucardo` database (its `syncrun` table tells when a run has ended).
    meta: PgConnection,
    dir: tempfile::TempDir,
    table: String,
    sync: String,
    dbs: [String; 2],
    relgroup: String,
    /// The daemon was started and not yet stopped.
    running: bool,
}

/// Runs `bucardo` in `dir` (it writes its "reason" files into the current folder)
/// with `args`, failing with its output when it exits non-zero.
fn bucardo_cli(dir: &Path, rc: Option<&Path>, args: &[&str]) -> Result<String> {
    let mut cmd = Command::new("bucardo");
    if let Some(rc) = rc {
        cmd.arg("--bucardorc").arg(rc);
    }
    let out = cmd
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running bucardo {}", args.join(" ")))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!(
            "bucardo {} failed ({}): {}",
            args.join(" "),
            out.status,
            text.trim()
        );
    }
    Ok(text)
}

impl Bucardo {
    /// Why Bucardo cannot be measured on this machine (`None`: the `bucardo` command
    /// is there). A missing peer is reported as "n/a (reason)", never a failure.
    pub fn unavailable() -> Option<String> {
        match Command::new("bucardo")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
        {
            Ok(st) if st.success() => None,
            Ok(st) => Some(format!("bucardo --version: {st}")),
            Err(_) => Some("bucardo not installed".into()),
        }
    }

    /// Creates `ddl` in both databases, installs Bucardo in the cluster if needed,
    /// registers `src_url`'s `table` (in `public`) for a source → target sync to
    /// `dst_url` and starts the daemon; returns once the sync has completed its first
    /// (empty) run, i.e. its triggers record changes and its controller listens.
    /// With `autokick` each source commit starts a run (Bucardo's default); without,
    /// changes are only recorded until [`kick`](Self::kick), e.g. to build a backlog
    /// with the daemon and its controller already up (deactivating and activating the
    /// sync instead lost the first kick after activation now and then).
    pub async fn create(
        src_url: &str,
        dst_url: &str,
        ddl: &str,
        table: &str,
        autokick: bool,
    ) -> Result<Bucardo> {
        if let Some(why) = Self::unavailable() {
            bail!("{why}");
        }
        let mut src = PgConnection::connect(src_url).await?;
        let mut dst = PgConnection::connect(dst_url).await?;
        src.execute(ddl).await?;
        dst.execute(ddl).await?;
        let src_db: String = sqlx::query_scalar("SELECT current_database()")
            .fetch_one(&mut src)
            .await?;
        let dst_db: String = sqlx::query_scalar("SELECT current_database()")
            .fetch_one(&mut dst)
            .await?;
        let port: i32 = sqlx::query_scalar("SELECT current_setting('port')::int")
            .fetch_one(&mut src)
            .await?;
        let dir = tempfile::tempdir()?;
        let piddir = dir.path().join("pid");
        let logdir = dir.path().join("log");
        std::fs::create_dir_all(&piddir)?;
        std::fs::create_dir_all(&logdir)?;
        let admin_url = crate::pg::with_database(src_url, "postgres");
        let mut admin = PgConnection::connect(&admin_url).await?;
        let installed: bool = sqlx::query_scalar(
            "SELECT exists(SELECT 1 FROM pg_database WHERE datname = 'bucardo')",
        )
        .fetch_one(&mut admin)
        .await?;
        admin.close().await?;
        let port_s = port.to_string();
        if !installed {
            bucardo_cli(
                dir.path(),
                None,
                &[
                    "install",
                    "--batch",
                    "--quiet",
                    "--dbhost",
                    "127.0.0.1",
                    "--dbport",
                    &port_s,
                    "--dbuser",
                    "postgres",
                    "--dbname",
                    "postgres",
                    "--pid-dir",
                    &piddir.to_string_lossy(),
                ],
            )
            .context("bucardo install")?;
        }
        let rc = dir.path().join("bucardorc");
        std::fs::write(
            &rc,
            format!(
                "dbhost = 127.0.0.1\ndbport = {port}\ndbuser = bucardo\ndbname = bucardo\n\
                 piddir = {}\nlogdest = {}\n",
                piddir.display(),
                logdir.display(),
            ),
        )?;
        let mut meta = PgConnection::connect(&crate::pg::with_database(src_url, "bucardo")).await?;
        // Leftovers of a benchmark killed half-way (its databases are gone): a sync
        // pointing at them would stop the daemon from starting.
        let old_syncs: Vec<String> = sqlx::query_scalar("SELECT name FROM bucardo.sync")
            .fetch_all(&mut meta)
            .await?;
        for s in &old_syncs {
            bucardo_cli(dir.path(), Some(&rc), &["remove", "sync", s])?;
        }
        let old_dbs: Vec<String> = sqlx::query_scalar("SELECT name FROM bucardo.db")
            .fetch_all(&mut meta)
            .await?;
        for d in &old_dbs {
            bucardo_cli(dir.path(), Some(&rc), &["remove", "db", d, "--force"])?;
        }
        let tag = uuid::Uuid::new_v4().simple().to_string()[..10].to_string();
        let mut b = Bucardo {
            src,
            dst,
            meta,
            dir,
            table: table.to_string(),
            sync: format!("s_{tag}"),
            dbs: [format!("src_{tag}"), format!("dst_{tag}")],
            relgroup: format!("g_{tag}"),
            running: false,
        };
        for (name, db) in [(&b.dbs[0], &src_db), (&b.dbs[1], &dst_db)] {
            b.cli(&[
                "add",
                "db",
                name,
                &format!("dbname={db}"),
                "host=127.0.0.1",
                &format!("port={port}"),
                "user=postgres",
            ])?;
        }
        b.cli(&[
            "add",
            "table",
            &format!("public.{table}"),
            &format!("db={}", b.dbs[0]),
            &format!("relgroup={}", b.relgroup),
        ])?;
        b.cli(&[
            "add",
            "sync",
            &b.sync,
            &format!("relgroup={}", b.relgroup),
            &format!("dbs={}:source,{}:target", b.dbs[0], b.dbs[1]),
            &format!("autokick={}", u8::from(autokick)),
        ])?;
        b.running = true;
        b.cli(&["start", "benchmark"])?;
        // With autokick the daemon runs the sync once at start; without, a kick does
        // (repeated until it is heard: one sent before the controller listens is lost).
        let t0 = Instant::now();
        loop {
            if !autokick {
                b.kick()?;
            }
            match b.wait_runs(1, Duration::from_secs(3)).await {
                Ok(()) => break,
                Err(e) if t0.elapsed() > Duration::from_secs(60) => {
                    return Err(e.context("Bucardo's first (empty) run"))
                }
                Err(_) => {}
            }
        }
        Ok(b)
    }

    fn rc(&self) -> PathBuf {
        self.dir.path().join("bucardorc")
    }

    fn cli(&self, args: &[&str]) -> Result<String> {
        bucardo_cli(self.dir.path(), Some(&self.rc()), args)
    }

    /// The last lines of the daemon's log, for error reports.
    pub fn log_tail(&self, lines: usize) -> String {
        crate::process::log_tail(&self.dir.path().join("log").join("log.bucardo"), lines)
    }

    /// Runs of the sync (started, ended).
    async fn runs(&mut self) -> Result<(i64, i64)> {
        let (started, ended, bad): (i64, i64, Option<String>) = sqlx::query_as(
            "SELECT count(*), count(*) FILTER (WHERE ended IS NOT NULL), \
                    max(status) FILTER (WHERE lastbad) FROM bucardo.syncrun WHERE sync = $1",
        )
        .bind(&self.sync)
        .fetch_one(&mut self.meta)
        .await?;
        if let Some(status) = bad {
            bail!("Bucardo sync {} failed: {status}", self.sync);
        }
        Ok((started, ended))
    }

    /// Waits (polling every 10 ms, at most `timeout`) until `n` runs have ended.
    async fn wait_runs(&mut self, n: i64, timeout: Duration) -> Result<()> {
        let t0 = Instant::now();
        while self.runs().await?.1 < n {
            if t0.elapsed() > timeout {
                bail!(
                    "Bucardo sync {} did not complete {n} run(s) within {timeout:?}; log tail:\n{}",
                    self.sync,
                    self.log_tail(20)
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    /// Asks the sync to run now (returns at once).
    pub fn kick(&self) -> Result<()> {
        self.cli(&["kick", &self.sync]).map(drop)
    }

    /// A fingerprint of the table's content: row count and a sum of row hashes.
    async fn fingerprint(c: &mut PgConnection, table: &str) -> Result<(i64, i64)> {
        Ok(sqlx::query_as(&format!(
            "SELECT count(*), coalesce(sum(hashtext(t::text)::bigint), 0)::bigint FROM {table} t"
        ))
        .fetch_one(c)
        .await?)
    }

    /// Call before [`kick`](Self::kick): the source's fingerprint and the runs so far,
    /// for [`wait_caught_up`](Self::wait_caught_up).
    pub async fn mark(&mut self) -> Result<CatchUpMark> {
        let source = Self::fingerprint(&mut self.src, &self.table).await?;
        let (started, ended) = self.runs().await?;
        Ok(CatchUpMark {
            source,
            started,
            ended,
        })
    }

    /// Waits (at most `timeout`) until the target table equals the source as it was at
    /// `mark`: polls the `bucardo` database every 10 ms for a newly ended run (cheap),
    /// then compares the target's fingerprint (every 10 ms, as the run's end may be
    /// recorded a moment before the target's commit is visible). Should no run start
    /// within 5 s of the kick, kicks again and says so on stderr (the time still counts
    /// from the first kick).
    pub async fn wait_caught_up(&mut self, mark: &CatchUpMark, timeout: Duration) -> Result<()> {
        let t0 = Instant::now();
        let mut kicked = Instant::now();
        loop {
            let (started, ended) = self.runs().await?;
            if ended > mark.ended {
                break;
            }
            if started == mark.started && kicked.elapsed() > Duration::from_secs(5) {
                eprintln!("Bucardo: no run started within 5 s of the kick; kicking again");
                self.kick()?;
                kicked = Instant::now();
            }
            if t0.elapsed() > timeout {
                bail!(
                    "Bucardo sync {} did not complete a run within {timeout:?}; log tail:\n{}",
                    self.sync,
                    self.log_tail(20)
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        loop {
            if Self::fingerprint(&mut self.dst, &self.table).await? == mark.source {
                return Ok(());
            }
            if t0.elapsed() > timeout {
                bail!(
                    "Bucardo's target did not equal the source within {timeout:?}; log tail:\n{}",
                    self.log_tail(20)
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops the daemon (waiting for its processes to exit) and removes the sync and
    /// databases from Bucardo's registry (the databases themselves stay).
    pub async fn drop_all(mut self) -> Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<()> {
        if !self.running {
            return Ok(());
        }
        self.running = false;
        let stopped = self.cli(&["stop", "benchmark done"]);
        // Each process removes its pid file on exit; give them 30 s, then kill.
        let piddir = self.dir.path().join("pid");
        let pidfiles = || -> Vec<PathBuf> {
            std::fs::read_dir(&piddir)
                .map(|d| {
                    d.filter_map(|e| e.ok().map(|e| e.path()))
                        .filter(|p| p.extension().is_some_and(|x| x == "pid"))
                        .collect()
                })
                .unwrap_or_default()
        };
        let t0 = Instant::now();
        while !pidfiles().is_empty() && t0.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut killed = Vec::new();
        for f in pidfiles() {
            if let Some(pid) = std::fs::read_to_string(&f)
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok())
            {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
                killed.push(pid);
            }
        }
        let mut r = stopped.map(drop);
        for s in [
            vec!["remove", "sync", &self.sync],
            vec!["remove", "relgroup", &self.relgroup],
            vec!["remove", "db", &self.dbs[0], &self.dbs[1], "--force"],
        ] {
            if let Err(e) = self.cli(&s) {
                r = r.and(Err(e));
            }
        }
        if !killed.is_empty() {
            r = r.and(Err(anyhow::anyhow!(
                "Bucardo processes {killed:?} did not stop within 30 s and were killed"
            )));
        }
        r
    }
}

impl Drop for Bucardo {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            eprintln!("warning: stopping Bucardo: {e:#}");
        }
    }
}

/// The source's state a Bucardo catch-up is waited for (see [`Bucardo::mark`]).
pub struct CatchUpMark {
    source: (i64, i64),
    started: i64,
    ended: i64,
}
