//! Fault tests across real processes (`branch-listener`, `hq-puller`, PostgreSQL): the
//! network between HQ and a listener misbehaves through a fault proxy, a listener is
//! killed mid-response, HQ's PostgreSQL restarts mid-transaction, while the branches
//! keep writing. After each fault heals, the location recovers by itself (state `ok`,
//! no operator action) and, at the end, HQ equals every branch (the oracle): nothing
//! lost, nothing doubled, every key at its newest change.
//!
//! Short timeouts keep the cost low: HQ's request timeout is 2 s, so a stalled link
//! fails a pull within 2 s; the backoff after one failure is 0.5–1 s.

use anyhow::{Context, Result};
use std::time::Duration;
use tests::fleet::{Hq, HqOptions};
use tests::process::wait_for;
use tests::proxy::Mode;
use tests::rig::{Rig, RigOptions};
use tokio::sync::Mutex;

/// One fault test at a time (they share two CPU cores with everything else).
static SERIAL: Mutex<()> = Mutex::const_new(());

fn quick_hq() -> HqOptions {
    HqOptions {
        request_timeout: "2s".into(),
        run_budget: "10s".into(),
        batch_limit: 200,
        ..HqOptions::default()
    }
}

async fn state(hq: &Hq, location: &str) -> Result<(String, String)> {
    let (s, e) = hq
        .location_state(location)
        .await?
        .with_context(|| format!("{location} is not registered at HQ"))?;
    Ok((s, e.unwrap_or_default()))
}

async fn tick(hq: &Hq, location: &str) -> Result<i64> {
    Ok(hq.cursor(location).await?.map(|c| c.tick).unwrap_or(0))
}

/// Waits until the location is `ok` again and its cursor moved past `from`.
async fn recovered(hq: &Hq, location: &str, from: i64, what: &str) -> Result<()> {
    wait_for(
        &format!("{location} to recover by itself after {what}"),
        Duration::from_secs(40),
        || async {
            let (s, _) = state(hq, location).await?;
            Ok((s == "ok" && tick(hq, location).await? > from).then_some(()))
        },
    )
    .await
    .with_context(|| hq.log_tail(30))
}

/// Each network fault in turn on b01's link while both branches write: the fault
/// fires, HQ reports b01 failing with a reason naming the failure, b02 (direct link) is
/// unaffected; after healing b01 recovers by itself; at the end HQ equals both branches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_faults_heal_without_loss() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let mut rig = Rig::new(RigOptions {
        sqlite: 2,
        proxied: 1,
        products: 60,
        hq: quick_hq(),
        ..RigOptions::default()
    })
    .await?;
    let writers = rig.start_writers(30.0, 11);
    let cases: [(Mode, &[&str]); 5] = [
        (Mode::Refuse, &["cannot connect", "connection"]),
        (Mode::ResetAfter(300), &["listener"]),
        (Mode::StallAfter(100), &["timed out"]),
        (Mode::TruncateAfter(300), &["listener"]),
        (Mode::Flap(Duration::from_millis(1500)), &["listener"]),
    ];
    for (mode, needles) in cases {
        let proxy = &rig.proxies[0];
        let kind = if matches!(mode, Mode::Flap(_)) {
            "refuse"
        } else {
            mode.kind()
        };
        let fired_before = proxy.fault_count(kind);
        proxy.set(mode);
        let hq = &rig.hq;
        let err = wait_for(
            &format!("HQ to report b01 failing under {mode:?}"),
            Duration::from_secs(40),
            || async {
                let (s, e) = state(hq, "b01").await?;
                Ok((s == "failing" && proxy.fault_count(kind) > fired_before).then_some(e))
            },
        )
        .await
        .with_context(|| hq.log_tail(30))?;
        assert!(
            needles.iter().any(|n| err.contains(n)),
            "{mode:?}: reason {err:?} names none of {needles:?}"
        );
        proxy.set(Mode::Pass);
        let from = tick(hq, "b01").await?;
        recovered(hq, "b01", from, mode.kind()).await?;
    }
    // A slow link (64 kbit/s): HQ keeps applying through it, nothing fails.
    let proxy = &rig.proxies[0];
    proxy.set(Mode::Throttle(8_000));
    let from = tick(&rig.hq, "b01").await?;
    let hq = &rig.hq;
    wait_for(
        "HQ to keep applying b01 through a 64 kbit/s link",
        Duration::from_secs(40),
        || async {
            Ok(
                (tick(hq, "b01").await? >= from + 2 && proxy.fault_count("throttle") > 0)
                    .then_some(()),
            )
        },
    )
    .await?;
    proxy.set(Mode::Pass);
    let summary = writers.finish().await?;
    assert!(summary.transactions > 50, "{summary:?}");
    rig.wait_caught_up(Duration::from_secs(90)).await?;
    assert!(rig.assert_equal().await? > 0);
    // The directly connected branch never failed.
    let bad: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM sync.runs WHERE location_id = 'b02' AND outcome NOT IN ('ok', 'running')",
    )
    .fetch_one(&rig.hq.pool)
    .await?;
    assert_eq!(bad, 0, "b02 was disturbed by b01's faults");
    assert_eq!(state(&rig.hq, "b01").await?.0, "ok");
    rig.shutdown().await
}

/// The HQ PostgreSQL of this test only: a private cluster (restarting it must not
/// disturb other tests), removed at the end.
struct PrivatePg {
    dir: tempfile::TempDir,
    url: String,
}

impl PrivatePg {
    fn start() -> Result<PrivatePg> {
        let dir = tempfile::tempdir()?;
        let out = std::process::Command::new("bash")
            .arg(tests::pg::workspace_root().join("tests/pg.sh"))
            .arg("ensure")
            .env("TEST_PG_DIR", dir.path())
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "private cluster: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let url = String::from_utf8(out.stdout)?.trim().to_string();
        Ok(PrivatePg { dir, url })
    }

    /// `pg_ctl restart -m immediate`: every open transaction is cut, like a crash; the
    /// server comes back on the same port.
    fn crash_restart(&self) -> Result<()> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")?
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("bin/pg_ctl"))
            .find(|p| p.exists())
            .context("pg_ctl not found")?;
        let data = self.dir.path().join("data");
        let mut cmd = if nix_is_root() {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&bin);
            c
        } else {
            std::process::Command::new(&bin)
        };
        let out = cmd
            .arg("restart")
            .arg("-D")
            .arg(&data)
            .args(["-m", "immediate", "-w", "-t", "60"])
            .arg("-l")
            .arg(self.dir.path().join("server.log"))
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "pg_ctl restart: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }
}

fn nix_is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        let _ = std::process::Command::new("bash")
            .arg(tests::pg::workspace_root().join("tests/pg.sh"))
            .arg("stop")
            .env("TEST_PG_DIR", self.dir.path())
            .output();
    }
}

/// Crashes of HQ's PostgreSQL (immediate restart) while hq-puller has a write
/// transaction open (during the initial catch-up, then after the backlog the downtime
/// built), then kill -9 of the listener while a response is on the wire, with the branch
/// writing throughout: each time HQ recovers by itself and at the end
/// equals the branch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hq_database_crashing_mid_transaction_and_listener_killed_mid_response() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let pg = PrivatePg::start()?;
    let mut rig = Rig::new(RigOptions {
        sqlite: 1,
        proxied: 1,
        products: 200,
        hq: HqOptions {
            batch_limit: 20,
            ..quick_hq()
        },
        hq_database_url: Some(pg.url.clone()),
        ..RigOptions::default()
    })
    .await?;
    let writers = rig.start_writers(40.0, 5);
    // 1. HQ's PostgreSQL crashes while hq-puller has a write transaction open (seen in
    // pg_stat_activity as a backend holding a transaction id).
    let mut hits = 0;
    for round in 0..2 {
        let admin = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(&pg.url)
            .await?;
        // Polled tightly: HQ's transactions last milliseconds.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut caught = false;
        while !caught && std::time::Instant::now() < deadline {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid()",
            )
            .fetch_one(&admin)
            .await?;
            caught = n > 0;
            if !caught {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        admin.close().await;
        hits += usize::from(caught);
        let from = tick(&rig.hq, "b01").await.unwrap_or(0);
        pg.crash_restart()?;
        rig.hq.ensure_running()?;
        recovered(
            &rig.hq,
            "b01",
            from,
            &format!("HQ PostgreSQL crash {round}"),
        )
        .await?;
    }

    // 2. A slow link keeps a response on the wire; the listener dies under it.
    let from = tick(&rig.hq, "b01").await?;
    rig.proxies[0].set(Mode::Throttle(2_000));
    let proxy = &rig.proxies[0];
    wait_for(
        "a response to flow through the slow link",
        Duration::from_secs(30),
        || async { Ok((proxy.fault_count("throttle") > 0).then_some(())) },
    )
    .await
    .with_context(|| {
        format!(
            "{} connections; hq log:\n{}",
            proxy.connections(),
            rig.hq.log_tail(30)
        )
    })?;
    rig.branches[0].kill9()?;
    let hq = &rig.hq;
    wait_for(
        "HQ to report b01 failing after the listener died",
        Duration::from_secs(30),
        || async { Ok((state(hq, "b01").await?.0 == "failing").then_some(())) },
    )
    .await?;
    rig.proxies[0].set(Mode::Pass);
    rig.branches[0].start().await?;
    recovered(&rig.hq, "b01", from, "the listener's kill -9").await?;

    assert!(hits > 0, "no crash landed inside an HQ write transaction");
    writers.finish().await?;
    rig.wait_caught_up(Duration::from_secs(90)).await?;
    assert!(rig.assert_equal().await? > 0);
    rig.shutdown().await
}

/// The same faults over HTTPS (the proxy cuts TLS records): a reset and a truncation
/// mid-stream fail the pull without applying anything, a stall fires the timeout, and
/// the location recovers by itself; HQ equals the branch at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_link_faults_heal_without_loss() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let mut rig = Rig::new(RigOptions {
        sqlite: 1,
        proxied: 1,
        products: 40,
        hq: quick_hq(),
        tls: true,
        ..RigOptions::default()
    })
    .await?;
    assert!(rig.branches[0].url().starts_with("https://"));
    let writers = rig.start_writers(20.0, 3);
    for mode in [
        Mode::ResetAfter(700),
        Mode::TruncateAfter(700),
        Mode::StallAfter(0),
    ] {
        let proxy = &rig.proxies[0];
        let fired_before = proxy.fault_count(mode.kind());
        proxy.set(mode);
        let hq = &rig.hq;
        wait_for(
            &format!("HQ to report b01 failing under {mode:?} over TLS"),
            Duration::from_secs(40),
            || async {
                let (s, _) = state(hq, "b01").await?;
                Ok((s == "failing" && proxy.fault_count(mode.kind()) > fired_before).then_some(()))
            },
        )
        .await
        .with_context(|| hq.log_tail(30))?;
        proxy.set(Mode::Pass);
        let from = tick(hq, "b01").await?;
        recovered(hq, "b01", from, mode.kind()).await?;
    }
    writers.finish().await?;
    rig.wait_caught_up(Duration::from_secs(60)).await?;
    assert!(rig.assert_equal().await? > 0);
    rig.shutdown().await
}
