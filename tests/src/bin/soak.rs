//! soak: the reliability soak (run by `tests/soak.sh`, not by the suite).
//!
//!     soak [--branches 46] [--duration 10m] [--rate 150] [--products 30]
//!          [--fault-every 3s] [--hq-kills-per-minute 20] [--seed 1] [--tls]
//!
//! 46 SQLite branches (fleet fixtures: real `branch-listener` processes, each behind a
//! fault proxy) write the product-management workload (pm-sim's) while `hq-puller run`
//! pulls every 2 s. Faults are injected at random: network faults through the proxies
//! (refuse, reset, stall, truncate, throttle, flap; each healed after 1–5 s), kill -9 of
//! a listener (restarted after up to 2 s), and kill -9 of hq-puller (restarted after up
//! to 2 s) `--hq-kills-per-minute` times a minute. At the end the faults are healed,
//! the workload stops, HQ catches up, and every location is compared with its branch
//! (the oracle). Lag: the age of the oldest change a branch holds that HQ has not
//! acknowledged (listener `/v1/status`), sampled every 5 s. Prints changes, faults by kind, maximum lag, and "nothing lost";
//! exits 1 on any difference.

use anyhow::Result;
use clap::Parser;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tests::fleet::HqOptions;
use tests::proxy::Mode;
use tests::rig::{Rig, RigOptions};
use tests::workload::parse_duration;

#[derive(Parser)]
#[command(
    name = "soak",
    about = "Reliability soak: 46 branches, random faults, nothing lost"
)]
struct Args {
    #[arg(long, default_value_t = 46)]
    branches: usize,
    /// How long the workload writes while faults are injected.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    duration: Duration,
    /// Workload operations per second, all branches together.
    #[arg(long, default_value_t = 150.0)]
    rate: f64,
    /// Seed products per branch.
    #[arg(long, default_value_t = 30)]
    products: u64,
    /// A network fault or listener kill is injected this often (on average).
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    fault_every: Duration,
    #[arg(long, default_value_t = 20.0)]
    hq_kills_per_minute: f64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// HTTPS between HQ and the listeners (a private CA made by deploy/make-test-ca.sh).
    #[arg(long)]
    tls: bool,
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    let started = Instant::now();
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed);
    eprintln!("soak: starting {} branches and HQ", args.branches);
    let mut rig = Rig::new(RigOptions {
        sqlite: args.branches,
        postgres: 0,
        proxied: args.branches,
        products: args.products,
        hq: HqOptions {
            schedule: "*/2 * * * * *".into(),
            request_timeout: "3s".into(),
            run_budget: "20s".into(),
            batch_limit: 1000,
            ..HqOptions::default()
        },
        tick_interval: "1s".into(),
        hq_database_url: None,
        tls: args.tls,
    })
    .await?;
    eprintln!(
        "soak: set up in {:.0}s; writing for {:?} with faults",
        started.elapsed().as_secs_f64(),
        args.duration
    );
    let writers = rig.start_writers(args.rate, args.seed);
    let mut kills: BTreeMap<&str, u64> = BTreeMap::new();
    // (branch, heal at)
    let mut faulted: Vec<(usize, Instant)> = Vec::new();
    let mut listener_down: Vec<(usize, Instant)> = Vec::new();
    let mut hq_down: Option<Instant> = None;
    let mut max_lag = 0.0f64;
    let step = Duration::from_millis(250);
    // Faults injected (set), by kind; the proxies count those that fired.
    let mut injected: BTreeMap<&str, u64> = BTreeMap::new();
    let mut last_iter = Instant::now();
    let until = Instant::now() + args.duration;
    let mut last_report = Instant::now();
    let mut last_lag_sample = Instant::now();
    let client = reqwest::Client::new();
    while Instant::now() < until {
        tokio::time::sleep(step).await;
        let now = Instant::now();
        // Probabilities from the time that really passed: the rates hold under load.
        let dt = now.duration_since(last_iter).as_secs_f64();
        last_iter = now;
        let p_fault = dt / args.fault_every.as_secs_f64().max(0.001);
        let p_hq_kill = args.hq_kills_per_minute * dt / 60.0;
        // Heal what is due.
        for (i, _) in faulted.iter().filter(|(_, t)| *t <= now) {
            rig.proxies[*i].set(Mode::Pass);
        }
        faulted.retain(|(_, t)| *t > now);
        let mut restarted = Vec::new();
        for (i, _) in listener_down.iter().filter(|(_, t)| *t <= now) {
            rig.branches[*i].start().await?;
            restarted.push(*i);
        }
        listener_down.retain(|(i, _)| !restarted.contains(i));
        if hq_down.is_some_and(|t| t <= now) {
            rig.hq.start()?;
            hq_down = None;
        }
        // Inject.
        if rng.gen_bool(p_fault.min(1.0)) {
            let i = rng.gen_range(0..rig.branches.len());
            let busy =
                faulted.iter().any(|(j, _)| *j == i) || listener_down.iter().any(|(j, _)| *j == i);
            if !busy {
                let heal = now + Duration::from_millis(rng.gen_range(1000..5000));
                let mode = match rng.gen_range(0..7) {
                    0 => Mode::Refuse,
                    1 => Mode::ResetAfter(rng.gen_range(0..4000)),
                    2 => Mode::StallAfter(rng.gen_range(0..2000)),
                    3 => Mode::TruncateAfter(rng.gen_range(0..4000)),
                    4 => Mode::Throttle(rng.gen_range(2_000..32_000)),
                    5 => Mode::Flap(Duration::from_millis(rng.gen_range(300..1500))),
                    _ => Mode::Pass,
                };
                if mode == Mode::Pass {
                    rig.branches[i].kill9()?;
                    *kills.entry("listener_kill9").or_default() += 1;
                    listener_down.push((i, now + Duration::from_millis(rng.gen_range(0..2000))));
                } else {
                    rig.proxies[i].set(mode);
                    *injected.entry(mode.kind()).or_default() += 1;
                    faulted.push((i, heal));
                }
            }
        }
        if hq_down.is_none() && rng.gen_bool(p_hq_kill.min(1.0)) {
            rig.hq.kill9()?;
            *kills.entry("hq_puller_kill9").or_default() += 1;
            hq_down = Some(now + Duration::from_millis(rng.gen_range(0..2000)));
        }
        // Lag: the age of the oldest change HQ has not acknowledged, per branch (its
        // listener's /v1/status), sampled every 5 s.
        if last_lag_sample.elapsed() >= Duration::from_secs(5) {
            last_lag_sample = Instant::now();
            for b in &rig.branches {
                if let Ok(Ok(st)) =
                    tokio::time::timeout(Duration::from_secs(2), b.status(&client)).await
                {
                    max_lag = max_lag.max(st.oldest_unacked_age_seconds.unwrap_or(0.0));
                }
            }
        }
        if last_report.elapsed() >= Duration::from_secs(30) {
            last_report = Instant::now();
            eprintln!(
                "soak: {:.0}s left, faults {:?}, kills {:?}, max lag {max_lag:.1}s",
                until
                    .saturating_duration_since(Instant::now())
                    .as_secs_f64(),
                faults(&rig),
                kills
            );
        }
    }
    // Heal everything, stop writing, catch up, compare.
    for p in &rig.proxies {
        p.set(Mode::Pass);
    }
    for (i, _) in listener_down.drain(..) {
        rig.branches[i].start().await?;
    }
    if hq_down.is_some() {
        rig.hq.start()?;
    }
    let summary = writers.finish().await?;
    eprintln!("soak: workload stopped; waiting for HQ to catch up");
    let catch_up = Instant::now();
    rig.wait_caught_up(Duration::from_secs(900)).await?;
    let rows = rig.assert_equal().await?;
    let changes: i64 =
        sqlx::query_scalar("SELECT COALESCE(sum(applied_changes), 0)::bigint FROM sync.locations")
            .fetch_one(&rig.hq.pool)
            .await?;
    let bad_states: i64 =
        sqlx::query_scalar("SELECT count(*) FROM sync.locations WHERE state <> 'ok'")
            .fetch_one(&rig.hq.pool)
            .await?;
    let interrupted: i64 =
        sqlx::query_scalar("SELECT count(*) FROM sync.runs WHERE outcome = 'interrupted'")
            .fetch_one(&rig.hq.pool)
            .await?;
    let mut all = faults(&rig);
    for (k, v) in &kills {
        all.insert(k.to_string(), *v);
    }
    let total: u64 = all.values().sum();
    let total_injected: u64 = injected.values().sum::<u64>() + kills.values().sum::<u64>();
    println!(
        "soak: {} branches, {:?} of writes with faults, {}",
        rig.branches.len(),
        args.duration,
        if args.tls {
            "HTTPS (private CA)"
        } else {
            "plain HTTP"
        }
    );
    println!(
        "  workload: {} transactions, {:?} ops, {} retries, {} errors",
        summary.transactions, summary.ops, summary.retries, summary.errors
    );
    println!("  changes applied at HQ: {changes}");
    println!("  faults injected: {total_injected}: network {injected:?}, kills {kills:?}");
    println!("  faults that fired (proxy counters + kills): {total} {all:?}");
    println!("  runs interrupted by kill -9 (closed by the next start): {interrupted}");
    println!(
        "  maximum lag (oldest change not yet acknowledged by HQ, sampled every 5 s): {max_lag:.1}s"
    );
    println!(
        "  catch-up after the last fault: {:.1}s",
        catch_up.elapsed().as_secs_f64()
    );
    println!("  locations not ok at the end: {bad_states}");
    println!(
        "  nothing lost: {n}/{n} locations equal to their branch ({rows} rows compared)",
        n = rig.branches.len()
    );
    println!("  total time: {:.0}s", started.elapsed().as_secs_f64());
    rig.shutdown().await?;
    if bad_states > 0 {
        anyhow::bail!("{bad_states} locations not ok at the end");
    }
    Ok(())
}

/// Network faults that fired, summed over the proxies.
fn faults(rig: &Rig) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for p in &rig.proxies {
        for (k, v) in p.faults() {
            *out.entry(k.to_string()).or_default() += v;
        }
    }
    out
}
