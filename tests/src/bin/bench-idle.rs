//! Benchmark: what `hq-puller run` costs with many idle locations on a 10-second
//! schedule.
//!
//! The branches are *fake idle listeners*: this process binds one loopback port per
//! location (the location id must match the port's branch, so one real listener cannot
//! stand in for many) and answers `GET /v1/changes` as an idle branch does: the
//! protocol's `ChangesResponse` with no changes, the first time a cursor to move to,
//! afterwards `next = after` (caught up). 1,000 real `branch-listener` processes would
//! need ~10 GiB; the listener's own idle cost is not what is measured here.
//!
//! hq-puller runs with `--locations` locations (and, for the per-location cost, a
//! baseline with `--baseline` locations); after a warm-up in which every location has
//! been pulled once, its CPU time (`/proc/<pid>/stat` utime + stime) is read over
//! `--seconds`, and its RSS (VmRSS, sampled every second, the maximum) and VmHWM.
//! The requests the fake listeners answered in the window show the schedule fired.
//!
//! Reproduce: cargo build --release --workspace --bins &&
//!   target/release/bench-idle [--locations 1000] [--baseline 10] [--seconds 60] [--reps 3]

use anyhow::{bail, Context, Result};
use axum::extract::{Query, State};
use axum::routing::get;
use axum::{Json, Router};
use clap::Parser;
use schemas::wire::{ChangesResponse, PROTOCOL_VERSION};
use schemas::Cursor;
use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tests::bench::{
    clock_ticks_per_second, cpu_ticks, median_min_max as median, met, peak_rss_kib, rss_kib,
    Summary,
};
use tests::process::{bin_dir, write_private};

#[derive(Parser, Clone)]
struct Args {
    /// Locations of the measured run.
    #[arg(long, default_value_t = 1000)]
    locations: usize,
    /// Locations of the baseline run (0: none); the per-location cost is the difference.
    #[arg(long, default_value_t = 10)]
    baseline: usize,
    /// Measurement window after the warm-up, seconds (at least 60 for the figure).
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// The locations' cron schedule.
    #[arg(long, default_value = "*/10 * * * * *")]
    schedule: String,
    #[arg(long, default_value_t = 3)]
    reps: usize,
}

/// One fake idle branch.
struct Branch {
    location: String,
    instance_id: uuid::Uuid,
    head: Cursor,
    served: Arc<AtomicU64>,
}

async fn changes(
    State(b): State<Arc<Branch>>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<ChangesResponse>, (axum::http::StatusCode, String)> {
    b.served.fetch_add(1, Ordering::Relaxed);
    let after = match q.get("after") {
        Some(a) => Some(
            a.parse::<Cursor>()
                .map_err(|e| (axum::http::StatusCode::BAD_REQUEST, e.to_string()))?,
        ),
        None => None,
    };
    let limit = q.get("limit").and_then(|l| l.parse().ok()).unwrap_or(5000);
    Ok(Json(ChangesResponse {
        protocol: PROTOCOL_VERSION,
        location: b.location.clone(),
        instance_id: b.instance_id,
        time_zone: "UTC".into(),
        after,
        next: b.head,
        more: false,
        limit,
        limit_clamped: false,
        backlog: 0,
        changes: Vec::new(),
    }))
}

/// Starts `n` fake idle branches; returns their (location, port).
async fn fake_branches(n: usize, served: &Arc<AtomicU64>) -> Result<Vec<(String, u16)>> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let instance_id = uuid::Uuid::new_v4();
        let b = Arc::new(Branch {
            location: format!("b{:04}", i + 1),
            instance_id,
            head: Cursor {
                instance_id,
                tick: 1,
                tick_uuid: uuid::Uuid::new_v4(),
            },
            served: served.clone(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        out.push((b.location.clone(), port));
        let app = Router::new()
            .route("/v1/changes", get(changes))
            .route("/healthz", get(|| async { "ok" }))
            .with_state(b);
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
    }
    Ok(out)
}

struct Figures {
    cpu_percent: f64,
    rss_mib: f64,
    hwm_mib: f64,
    requests_per_s: f64,
}

async fn run(args: &Args, n: usize) -> Result<Figures> {
    let dir = tempfile::tempdir()?;
    let served = Arc::new(AtomicU64::new(0));
    let branches = fake_branches(n, &served).await?;
    let hq_url = tests::pg::fresh_database("bench_idle_hq").await?;
    let token = dir.path().join("token");
    write_private(&token, "bench-idle-token-0123456789abcdef\n")?;
    let mut cfg = format!(
        "database_url = \"{hq_url}\"\nschedule = \"{}\"\nfiles_dir = \"{}\"\n# loopback fakes\nallow_plain_http = true\n",
        args.schedule,
        dir.path().join("hq-files").display()
    );
    for (loc, port) in &branches {
        cfg.push_str(&format!(
            "\n[[locations]]\nid = \"{loc}\"\nname = \"{loc}\"\nurl = \"http://127.0.0.1:{port}\"\ntoken_file = \"{}\"\n",
            token.display()
        ));
    }
    let cfg_path = dir.path().join("hq.toml");
    std::fs::write(&cfg_path, cfg)?;
    let puller = bin_dir().join("hq-puller");
    let st = Command::new(&puller)
        .args(["migrate", "--config"])
        .arg(&cfg_path)
        .stdout(Stdio::null())
        .status()
        .with_context(|| format!("running {}", puller.display()))?;
    if !st.success() {
        bail!("hq-puller migrate failed");
    }
    let log = std::fs::File::create(dir.path().join("hq-puller.log"))?;
    let mut child = Command::new(&puller)
        .args(["run", "--config"])
        .arg(&cfg_path)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()?;
    let pid = child.id();
    let result = measure(args, n, pid, &served, &hq_url, dir.path()).await;
    let _ = child.kill();
    let _ = child.wait();
    tests::bench::drop_database(&hq_url).await;
    result
}

async fn measure(
    args: &Args,
    n: usize,
    pid: u32,
    served: &AtomicU64,
    hq_url: &str,
    dir: &Path,
) -> Result<Figures> {
    // Warm-up: every location has been pulled and is caught up (cursor stored).
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(hq_url)
        .await?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let caught: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM sync.locations WHERE cursor IS NOT NULL AND state = 'ok'",
        )
        .fetch_one(&pool)
        .await
        .unwrap_or(0);
        if caught as usize >= n {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "only {caught} of {n} locations caught up within 120 s\n--- hq-puller log ---\n{}",
                tests::process::log_tail(&dir.join("hq-puller.log"), 20)
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    pool.close().await;
    let tck = clock_ticks_per_second();
    let c0 = cpu_ticks(pid).context("reading hq-puller's /proc stat")?;
    let r0 = served.load(Ordering::Relaxed);
    let t0 = Instant::now();
    let mut rss = 0u64;
    let window = Duration::from_secs(args.seconds);
    while t0.elapsed() < window {
        tokio::time::sleep(Duration::from_secs(1)).await; // sampling period, not synchronization
        rss = rss.max(rss_kib(pid).context("hq-puller exited")?);
    }
    let secs = t0.elapsed().as_secs_f64();
    let c1 = cpu_ticks(pid).context("hq-puller exited")?;
    let requests = served.load(Ordering::Relaxed) - r0;
    Ok(Figures {
        cpu_percent: 100.0 * (c1 - c0) as f64 / tck / secs,
        rss_mib: rss as f64 / 1024.0,
        hwm_mib: peak_rss_kib(pid).unwrap_or(0) as f64 / 1024.0,
        requests_per_s: requests as f64 / secs,
    })
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    println!(
        "bench-idle: hq-puller run, {} idle locations (baseline {}), schedule {:?}, {} s window after warm-up, {} repetitions; \
         branches: fake idle listeners in one process (one port per location)",
        args.locations, args.baseline, args.schedule, args.seconds, args.reps
    );
    let mut sizes = vec![args.locations];
    if args.baseline > 0 {
        sizes.push(args.baseline);
    }
    let mut results: Vec<(usize, Vec<Figures>)> = sizes.iter().map(|&n| (n, Vec::new())).collect();
    for rep in 0..args.reps {
        for (n, out) in results.iter_mut() {
            eprintln!("repetition {}: {n} locations", rep + 1);
            out.push(
                run(&args, *n)
                    .await
                    .with_context(|| format!("{n} locations"))?,
            );
        }
    }
    println!("| locations | CPU % of one core, median (min–max) | RSS MiB, median (min–max) | peak RSS (VmHWM) MiB | requests answered/s |");
    println!("|---|---|---|---|---|");
    let mut med = HashMap::new();
    for (n, figs) in &results {
        let (cpu, clo, chi) = median(figs.iter().map(|f| f.cpu_percent).collect());
        let (rss, rlo, rhi) = median(figs.iter().map(|f| f.rss_mib).collect());
        let (hwm, _, _) = median(figs.iter().map(|f| f.hwm_mib).collect());
        let (rps, _, _) = median(figs.iter().map(|f| f.requests_per_s).collect());
        println!(
            "| {n} | {cpu:.2} ({clo:.2}–{chi:.2}) | {rss:.1} ({rlo:.1}–{rhi:.1}) | {hwm:.1} | {rps:.1} |"
        );
        med.insert(*n, (cpu, rss));
    }
    let (cpu, rss) = med[&args.locations];
    let per = med
        .get(&args.baseline)
        .filter(|_| args.baseline > 0)
        .map(|&(bc, br)| {
            let d = (args.locations - args.baseline) as f64;
            ((cpu - bc) / d, (rss - br) * 1024.0 / d)
        });
    if let Some((pc, pr)) = per {
        println!(
            "cost per location (difference to the {}-location baseline): {:.4} % of one core, {pr:.1} KiB RSS",
            args.baseline, pc
        );
    }
    Summary {
        figure: format!(
            "hq-puller, {} idle locations on {:?}: CPU % of one core / RSS MiB",
            args.locations, args.schedule
        ),
        ours: format!("{cpu:.2}% / {rss:.1}"),
        peer: "—".into(),
        ratio: per
            .map(|(pc, pr)| format!("per location {pc:.4}% / {pr:.0} KiB"))
            .unwrap_or_else(|| "—".into()),
        target: "< 5% / < 128".into(),
        met: met(cpu < 5.0 && rss < 128.0),
    }
    .print();
    println!(
        "reproduce: cargo build --release --workspace --bins && target/release/bench-idle --locations {} --baseline {} --seconds {} --reps {}",
        args.locations, args.baseline, args.seconds, args.reps
    );
    Ok(())
}
