//! pm-sim: the product-management workload generator, and the HQ-vs-branch checker.
//!
//!     pm-sim seed   --db URL [--db URL ...] --products N [--files-dir DIR] [--seed S]
//!     pm-sim run    --db URL [--db URL ...] [--rate OPS_PER_S] [--duration 30s | --ops N]
//!                   [--concurrency C] [--seed S] [--mix new=10,price=40,stock=35,delete=5,image=10]
//!                   [--files-dir DIR]
//!     pm-sim verify --hq URL --location L --db URL [--location L --db URL ...]
//!                   [--time-zone ZONE] [--catalogue FILE] [--json]
//!
//! URLs: `sqlite://PATH` or `postgres://...`. With several `--db`, `--files-dir` is
//! either one folder per database (same order) or one parent folder (subfolders 00, 01…).

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tests::workload::{self, Branch, Counters, Mix, RunOptions, Until};

#[derive(Parser)]
#[command(
    name = "pm-sim",
    about = "Product-management workload generator and HQ/branch checker"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Fill branch databases with products (demo schema created when missing).
    Seed(SeedArgs),
    /// Apply a mix of product-management transactions.
    Run(RunArgs),
    /// Compare locations at HQ with their branch databases (exit 1 on any difference).
    Verify(VerifyArgs),
}

#[derive(Args)]
struct Dbs {
    /// Branch database URL (repeat for several branches).
    #[arg(long = "db", required = true)]
    db: Vec<String>,
    /// Folder for image files (one per --db, or one parent folder).
    #[arg(long = "files-dir")]
    files_dir: Vec<PathBuf>,
    /// Seed of the random choices.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Args)]
struct SeedArgs {
    #[command(flatten)]
    dbs: Dbs,
    /// Products per database.
    #[arg(long)]
    products: u64,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    dbs: Dbs,
    /// Operations per second across all databases (default: as fast as possible).
    #[arg(long)]
    rate: Option<f64>,
    /// How long to run (e.g. 30s, 2m); default 30s unless --ops is given.
    #[arg(long, conflicts_with = "ops")]
    duration: Option<String>,
    /// Total operations to run.
    #[arg(long)]
    ops: Option<u64>,
    /// Concurrent workers per database.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Weights of the operation kinds.
    #[arg(long, default_value = "new=10,price=40,stock=35,delete=5,image=10")]
    mix: Mix,
    /// Seconds between progress lines on stderr (0: none).
    #[arg(long, default_value_t = 1.0)]
    progress: f64,
}

#[derive(Args)]
struct VerifyArgs {
    /// HQ database URL.
    #[arg(long)]
    hq: String,
    /// Location id (repeat; paired in order with --db).
    #[arg(long = "location", required = true)]
    location: Vec<String>,
    /// Branch database URL (repeat; paired in order with --location).
    #[arg(long = "db", required = true)]
    db: Vec<String>,
    /// IANA zone of the branches' zone-less timestamps.
    #[arg(long, default_value = "UTC")]
    time_zone: String,
    /// Extra tables (the catalogue file the branches and HQ use).
    #[arg(long)]
    catalogue: Option<PathBuf>,
    /// Print the reports as JSON.
    #[arg(long)]
    json: bool,
}

async fn open(dbs: &Dbs, connections: u32) -> Result<Vec<Arc<Branch>>> {
    let n = dbs.db.len();
    if dbs.files_dir.len() > 1 && dbs.files_dir.len() != n {
        bail!("--files-dir: give one folder, or one per --db ({n})");
    }
    let mut out = Vec::with_capacity(n);
    for (i, url) in dbs.db.iter().enumerate() {
        let fd = workload::files_dir_for(&dbs.files_dir, i, n);
        out.push(Arc::new(Branch::open(i, url, fd, connections).await?));
    }
    Ok(out)
}

fn spawn_progress(
    counters: Arc<Counters>,
    every: f64,
    stop: Arc<AtomicBool>,
) -> Option<tokio::task::JoinHandle<()>> {
    if every <= 0.0 {
        return None;
    }
    Some(tokio::spawn(async move {
        let start = Instant::now();
        let mut last = 0u64;
        let mut tick = tokio::time::interval(Duration::from_secs_f64(every));
        tick.tick().await;
        while !stop.load(Ordering::Relaxed) {
            tick.tick().await;
            let total = counters.total_ops();
            eprintln!(
                "pm-sim: {:>6.1}s  ops {:>8}  ({:>6.1}/s)  retries {}  skipped {}  errors {}",
                start.elapsed().as_secs_f64(),
                total,
                (total - last) as f64 / every,
                counters.retries.load(Ordering::Relaxed),
                counters.skipped.load(Ordering::Relaxed),
                counters.errors.load(Ordering::Relaxed),
            );
            last = total;
        }
    }))
}

async fn seed(a: SeedArgs) -> Result<()> {
    let branches = open(&a.dbs, 1).await?;
    let counters = Counters::default();
    let start = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    let counters = Arc::new(counters);
    for b in &branches {
        let (b, c, products, s) = (b.clone(), counters.clone(), a.products, a.dbs.seed);
        set.spawn(async move { workload::seed(&b, products, s, &c).await });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    let summary = counters.summary(branches.len(), start.elapsed());
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}

async fn run(a: RunArgs) -> Result<()> {
    let until = match (a.ops, a.duration.as_deref()) {
        (Some(n), _) => Until::Ops(n),
        (None, Some(d)) => Until::Duration(workload::parse_duration(d)?),
        (None, None) => Until::Duration(Duration::from_secs(30)),
    };
    if a.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    let branches = open(&a.dbs, a.concurrency as u32 + 1).await?;
    let opts = RunOptions {
        rate: a.rate,
        until,
        concurrency: a.concurrency,
        seed: a.dbs.seed,
        mix: a.mix,
    };
    let counters = Arc::new(Counters::default());
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("pm-sim: interrupted, finishing in-flight transactions");
                stop.store(true, Ordering::Relaxed);
            }
        });
    }
    let done = Arc::new(AtomicBool::new(false));
    let progress = spawn_progress(counters.clone(), a.progress, done.clone());
    let summary = workload::run(&branches, &opts, counters, stop).await?;
    done.store(true, Ordering::Relaxed);
    if let Some(p) = progress {
        p.abort();
    }
    for b in &branches {
        b.db.close().await;
    }
    println!("{}", serde_json::to_string_pretty(&summary)?);
    if summary.errors > 0 {
        bail!("{} operations failed", summary.errors);
    }
    Ok(())
}

async fn verify(a: VerifyArgs) -> Result<()> {
    if a.location.len() != a.db.len() {
        bail!(
            "--location and --db must be given in pairs ({} vs {})",
            a.location.len(),
            a.db.len()
        );
    }
    let catalogue = schemas::Catalogue::load(a.catalogue.as_deref())?;
    let hq = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&a.hq)
        .await
        .with_context(|| format!("connecting to HQ {}", tests::db::redact(&a.hq)))?;
    let mut reports = Vec::new();
    for (loc, db) in a.location.iter().zip(&a.db) {
        let r = tests::compare::compare(&hq, &catalogue, loc, db, &a.time_zone).await?;
        if !a.json {
            print!("{r}");
        }
        reports.push(r);
    }
    let equal = reports.iter().filter(|r| r.is_equal()).count();
    let rows: usize = reports.iter().map(|r| r.total_rows()).sum();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    } else {
        println!(
            "verify: {equal}/{} locations equal ({} tables each, {rows} branch rows compared value by value)",
            reports.len(),
            catalogue.tables.len()
        );
    }
    if equal != reports.len() {
        std::process::exit(1);
    }
    Ok(())
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Seed(a) => seed(a).await,
        Cmd::Run(a) => run(a).await,
        Cmd::Verify(a) => verify(a).await,
    };
    if let Err(e) = r {
        eprintln!("pm-sim: error: {e:#}");
        std::process::exit(1);
    }
}
