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
