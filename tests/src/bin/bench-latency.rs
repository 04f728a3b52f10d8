//! Benchmark: commit at a branch → visible in `hq.products_live`, against PostgreSQL
//! logical replication measured the same way.
//!
//! A branch (SQLite file or PostgreSQL database with the pull-area triggers, a real
//! `branch-listener`) receives a background load of `--load` changes/s (price updates
//! of 1,000 products, two per transaction) while a second connection commits *marker*
//! rows (new products with a known key, `--marker-rate` per second at random
//! intervals). The commit instant is taken right after `COMMIT` returns. HQ
//! (`hq-puller run`) carries an `AFTER INSERT` trigger on `hq.products` that
//! `pg_notify`s a marker's key when its row is committed; this process `LISTEN`s on a
//! dedicated connection and takes the arrival instant when the notification is
//! received. Latency = arrival − commit, one clock (this process). The resolution of
//! the detection (NOTIFY round trip through the server) is measured and printed.
//!
//! Scenarios: stream mode (`mode = "stream"`, long-poll) on a SQLite and a PostgreSQL
//! branch; schedule mode with a 1-second schedule on a SQLite branch; the peer:
//! logical replication of the same table between two databases of the cluster, with
//! the notifying trigger on the subscriber (`ENABLE ALWAYS`), the source's writers
//! committing with `synchronous_commit = on` (the cluster's default is off, which holds
//! WAL back from the walsender for up to `wal_writer_delay`); the second peer: a Bucardo
//! sync of the same table between two databases of the cluster, the notifying trigger
//! on the target (`ENABLE ALWAYS`: Bucardo writes with `session_replication_role =
//! replica`), kicked by its own triggers on each source commit. A peer that cannot be
//! set up (Bucardo not installed, not starting) is reported "n/a (reason)".
//!
//! Reproduce: cargo build --release --workspace --bins &&
//!   target/release/bench-latency [--samples 1000] [--schedule-samples 300] [--reps 3]

use anyhow::{bail, Context, Result};
use clap::Parser;
use sqlx::postgres::PgListener;
use sqlx::{Connection, Executor, PgConnection};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tests::bench::{median_min_max as median, met, quantile, Summary};
use tests::db::{Db, Tx};
use tests::fleet::{BranchNode, BranchOptions, Hq, HqOptions};

#[derive(Parser, Clone)]
struct Args {
    /// Markers measured per stream scenario (after 10 warm-up markers).
    #[arg(long, default_value_t = 1000)]
    samples: usize,
    /// Markers measured in schedule mode.
    #[arg(long, default_value_t = 300)]
    schedule_samples: usize,
    /// Background load at the branch, changes per second (two per transaction).
    #[arg(long, default_value_t = 100)]
    load: u32,
    /// Markers per second in stream mode (schedule mode: a quarter of it).
    #[arg(long, default_value_t = 20.0)]
    marker_rate: f64,
    /// Repetitions (medians of the per-repetition percentiles are reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Scenarios to run (comma-separated): sqlite, postgres, logical, bucardo, schedule.
    #[arg(long, default_value = "sqlite,postgres,logical,bucardo,schedule")]
    only: String,
}

/// Markers are products with keys from here on (the background load stays below).
const MARKER_BASE: i64 = 1_000_000_000;
const PRODUCTS: i64 = 1_000;
const WARM_UP: usize = 10;
const CHANNEL: &str = "bench_marker";

/// The notifying trigger: on HQ's mirror table, or on the subscriber's table.
fn notify_trigger_sql(table: &str, always: bool) -> Vec<String> {
    let mut v = vec![
        format!(
            "CREATE OR REPLACE FUNCTION public.bench_marker_notify() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN PERFORM pg_notify('{CHANNEL}', NEW.product_id::text); RETURN NULL; END $$"
        ),
        format!(
            "CREATE TRIGGER bench_marker_notify AFTER INSERT ON {table} FOR EACH ROW \
             WHEN (NEW.product_id >= {MARKER_BASE}) EXECUTE FUNCTION public.bench_marker_notify()"
        ),
    ];
    if always {
        // Triggers do not fire in a subscription's apply worker unless ALWAYS.
        v.push(format!(
            "ALTER TABLE {table} ENABLE ALWAYS TRIGGER bench_marker_notify"
        ));
    }
    v
}

fn insert_product_sql(id: i64) -> String {
    format!(
        "INSERT INTO products (product_id, sku, name, description, category, unit_price, currency, updated_at) \
         VALUES ({id}, 'SKU-{id:010}', 'Product {id}', 'A sturdy product for everyday use', 'hardware', 19.99, 'EUR', '2026-11-24 08:00:00')"
    )
}

async fn exec(tx: &mut Tx, sql: &str) -> Result<()> {
    tx.exec(sql, &[])
        .await
        .with_context(|| format!("running {sql}"))?;
    Ok(())
}

async fn seed(db: &Db) -> Result<()> {
    let mut tx = db.begin().await?;
    for id in 1..=PRODUCTS {
        exec(&mut tx, &insert_product_sql(id)).await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Price updates of two random products per transaction at `rate` changes/s until
/// `stop`. Returns the transactions committed.
async fn background_load(db: Db, rate: u32, stop: Arc<AtomicBool>) -> Result<u64> {
    if rate == 0 {
        return Ok(0);
    }
    let mut every = tokio::time::interval(Duration::from_secs_f64(2.0 / f64::from(rate)));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        every.tick().await;
        let mut tx = db.begin().await?;
        for _ in 0..2 {
            let id = rand::random::<i64>().rem_euclid(PRODUCTS) + 1;
            exec(
                &mut tx,
                &format!(
                    "UPDATE products SET unit_price = unit_price + 0.01, updated_at = '2026-11-24 08:00:01' WHERE product_id = {id}"
                ),
            )
            .await?;
        }
        tx.commit().await?;
        n += 1;
    }
    Ok(n)
}

/// Arrival instants of markers, keyed by product id, filled by a LISTEN task.
type Arrivals = Arc<Mutex<HashMap<i64, Instant>>>;

async fn listen(url: &str) -> Result<(Arrivals, tokio::task::JoinHandle<()>)> {
    let mut l = PgListener::connect(url).await?;
    l.listen(CHANNEL).await?;
    let arrivals: Arrivals = Arc::default();
    let a = arrivals.clone();
    let task = tokio::spawn(async move {
        while let Ok(n) = l.recv().await {
            let at = Instant::now();
            if let Ok(id) = n.payload().parse::<i64>() {
                a.lock().expect("arrivals").entry(id).or_insert(at);
            }
        }
    });
    Ok((arrivals, task))
}

/// Median NOTIFY round trip (a `SELECT pg_notify` sent → received by the listener), ms:
/// an upper bound of what the detection adds to a sample.
async fn notify_resolution(url: &str) -> Result<f64> {
    let (arrivals, task) = listen(url).await?;
    let mut c = PgConnection::connect(url).await?;
    let mut v = Vec::new();
    for i in 0..100i64 {
        let id = -1 - i;
        let t0 = Instant::now();
        c.execute(format!("SELECT pg_notify('{CHANNEL}', '{id}')").as_str())
            .await?;
        let deadline = t0 + Duration::from_secs(5);
        loop {
            if let Some(at) = arrivals.lock().expect("arrivals").get(&id) {
                v.push(at.saturating_duration_since(t0).as_secs_f64() * 1000.0);
                break;
            }
            if Instant::now() > deadline {
                bail!("NOTIFY not received within 5 s");
            }
            tokio::task::yield_now().await;
        }
    }
    task.abort();
    Ok(quantile(&v, 0.5))
}

/// Latency samples (ms) of one scenario.
struct Samples {
    ms: Vec<f64>,
    /// Markers that arrived before their COMMIT returned to the writer (counted as 0).
    early: usize,
    /// Background transactions per second achieved.
    load_tps: f64,
}

/// Commits `n` markers (after [`WARM_UP`] ones) at random intervals averaging
/// `1/rate` s into `writer` while the background load runs, and measures each one's
/// arrival at `notify_url`.
async fn measure(writer: &Db, notify_url: &str, n: usize, rate: f64, load: u32) -> Result<Samples> {
    let (arrivals, task) = listen(notify_url).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let bg = tokio::spawn(background_load(writer.clone(), load, stop.clone()));
    let result = async {
        let mut commits: Vec<(i64, Instant)> = Vec::with_capacity(n + WARM_UP);
        for i in 0..(n + WARM_UP) as i64 {
            let id = MARKER_BASE + i;
            let mut tx = writer.begin().await?;
            exec(&mut tx, &insert_product_sql(id)).await?;
            tx.commit().await?;
            commits.push((id, Instant::now()));
            if i == 0 {
                // The first marker also waits for HQ to catch up with the seed.
                wait_arrived(&arrivals, &[id], Duration::from_secs(120)).await?;
            }
            let pause = rand::random::<f64>() * 2.0 / rate;
            tokio::time::sleep(Duration::from_secs_f64(pause)).await;
        }
        let ids: Vec<i64> = commits.iter().map(|c| c.0).collect();
        wait_arrived(&arrivals, &ids, Duration::from_secs(30)).await?;
        let got = arrivals.lock().expect("arrivals").clone();
        let mut ms = Vec::with_capacity(n);
        let mut early = 0;
        for (id, committed) in commits.into_iter().skip(WARM_UP) {
            let at = got[&id];
            if at < committed {
                early += 1;
            }
            ms.push(at.saturating_duration_since(committed).as_secs_f64() * 1000.0);
        }
        Ok::<_, anyhow::Error>((ms, early))
    }
    .await;
    stop.store(true, Ordering::SeqCst);
    let load_txns = bg.await??;
    let load_tps = load_txns as f64 / started.elapsed().as_secs_f64();
    task.abort();
    let (ms, early) = result?;
    Ok(Samples {
        ms,
        early,
        load_tps,
    })
}

async fn wait_arrived(arrivals: &Arrivals, ids: &[i64], timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let missing = {
            let a = arrivals.lock().expect("arrivals");
            ids.iter().filter(|id| !a.contains_key(id)).count()
        };
        if missing == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{missing} of {} markers not visible at the target within {timeout:?}",
                ids.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Scenario {
    StreamSqlite,
    StreamPostgres,
    Logical,
    Bucardo,
    ScheduleSqlite,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::StreamSqlite => "ours, stream mode, SQLite branch",
            Scenario::StreamPostgres => "ours, stream mode, PostgreSQL branch",
            Scenario::Logical => "PostgreSQL logical replication",
            Scenario::Bucardo => "Bucardo",
            Scenario::ScheduleSqlite => "ours, schedule mode (every second), SQLite branch",
        }
    }
}

/// One scenario of ours: a branch, its listener, HQ with the notifying trigger.
async fn run_ours(args: &Args, s: Scenario) -> Result<Samples> {
    let dir = tempfile::tempdir()?;
    let branch_url = match s {
        Scenario::StreamPostgres => tests::pg::fresh_database("bench_lat_branch").await?,
        _ => format!("sqlite://{}", dir.path().join("branch.db").display()),
    };
    let mut b = BranchNode::new(dir.path(), "b01", &branch_url, &BranchOptions::default())?;
    b.install(true).await?;
    let writer = Db::connect(&branch_url, 2).await?;
    seed(&writer).await?;
    b.start().await?;
    let hq_url = tests::pg::fresh_database("bench_lat_hq").await?;
    let stream = s != Scenario::ScheduleSqlite;
    let opts = HqOptions {
        schedule: "* * * * * *".into(),
        mode: if stream { "stream" } else { "schedule" }.into(),
        ..HqOptions::default()
    };
    let mut hq = Hq::new(dir.path(), &hq_url, &opts, &[&b]).await?;
    hq.migrate().await?;
    for sql in notify_trigger_sql("hq.products", false) {
        sqlx::query(&sql)
            .execute(&hq.pool)
            .await
            .with_context(|| format!("running {sql}"))?;
    }
    hq.start()?;
    // HQ's initial load of the seed first: rows of a load arrive by ATTACH, which fires
    // no row trigger, so a marker must be a change after it.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let loaded: Option<String> =
            sqlx::query_scalar("SELECT cursor FROM sync.locations WHERE id = 'b01'")
                .fetch_optional(&hq.pool)
                .await?
                .flatten();
        if loaded.is_some() {
            break;
        }
        if Instant::now() > deadline {
            bail!("{}: HQ did not load the branch within 120 s", s.name());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (n, rate) = if stream {
        (args.samples, args.marker_rate)
    } else {
        (args.schedule_samples, args.marker_rate / 4.0)
    };
    let r = measure(&writer, &hq_url, n, rate, args.load).await;
    if r.is_err() {
        let markers: Result<i64, _> = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM hq.products WHERE product_id >= {MARKER_BASE}"
        ))
        .fetch_one(&hq.pool)
        .await;
        let triggers: Result<Vec<String>, _> = sqlx::query_scalar(
            "SELECT tgrelid::regclass::text || ' ' || tgname || ' ' || tgenabled::text FROM pg_trigger WHERE NOT tgisinternal",
        )
        .fetch_all(&hq.pool)
        .await;
        eprintln!("--- markers at HQ: {markers:?}; triggers: {triggers:?}");
        eprintln!(
            "--- hq-puller log tail ---\n{}\n--- branch-listener log tail ---\n{}",
            hq.log_tail(30),
            b.log_tail(30)
        );
    }
    hq.stop().await?;
    b.stop().await?;
    writer.close().await;
    hq.pool.close().await;
    tests::bench::drop_database(&hq_url).await;
    if s == Scenario::StreamPostgres {
        tests::bench::drop_database(&branch_url).await;
    }
    r
}

const PEER_TABLE: &str = "CREATE TABLE products (product_id bigint PRIMARY KEY, sku text, name text, \
     description text, category text, unit_price numeric(12,2), currency text, updated_at timestamptz)";

async fn run_logical(args: &Args) -> Result<Samples> {
    let src_url = tests::pg::fresh_database("bench_lat_lr_src").await?;
    let dst_url = tests::pg::fresh_database("bench_lat_lr_dst").await?;
    let mut lr =
        tests::peers::LogicalReplication::create(&src_url, &dst_url, PEER_TABLE, "products", true)
            .await?;
    for sql in notify_trigger_sql("products", true) {
        lr.dst.execute(sql.as_str()).await?;
    }
    // The cluster runs with synchronous_commit=off (for every system alike), which
    // would hold WAL back from the walsender until the WAL writer's next round
    // (wal_writer_delay, 200 ms): logical replication's own writers commit with it on.
    let writer = Db::connect(
        &format!("{src_url}?options=-c%20synchronous_commit%3Don"),
        2,
    )
    .await?;
    seed(&writer).await?;
    let r = measure(&writer, &dst_url, args.samples, args.marker_rate, args.load).await;
    writer.close().await;
    lr.drop_all().await?;
    tests::bench::drop_database(&src_url).await;
    tests::bench::drop_database(&dst_url).await;
    r
}

async fn run_bucardo(args: &Args) -> Result<Samples> {
    let src_url = tests::pg::fresh_database("bench_lat_buc_src").await?;
    let dst_url = tests::pg::fresh_database("bench_lat_buc_dst").await?;
    let r = run_bucardo_on(args, &src_url, &dst_url).await;
    tests::bench::drop_database(&src_url).await;
    tests::bench::drop_database(&dst_url).await;
    r
}

async fn run_bucardo_on(args: &Args, src_url: &str, dst_url: &str) -> Result<Samples> {
    let mut b =
        tests::peers::Bucardo::create(src_url, dst_url, PEER_TABLE, "products", true).await?;
    for sql in notify_trigger_sql("products", true) {
        b.dst.execute(sql.as_str()).await?;
    }
    let writer = Db::connect(src_url, 2).await?;
    seed(&writer).await?;
    let r = measure(&writer, dst_url, args.samples, args.marker_rate, args.load).await;
    writer.close().await;
    if r.is_err() {
        eprintln!("--- Bucardo log tail ---\n{}", b.log_tail(30));
    }
    b.drop_all().await?;
    r
}

fn percentiles(v: &[f64]) -> (f64, f64, f64, f64) {
    (
        quantile(v, 0.5),
        quantile(v, 0.9),
        quantile(v, 0.99),
        quantile(v, 1.0),
    )
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let wanted: Vec<&str> = args.only.split(',').map(str::trim).collect();
    let mut scenarios = Vec::new();
    for (key, s) in [
        ("sqlite", Scenario::StreamSqlite),
        ("postgres", Scenario::StreamPostgres),
        ("logical", Scenario::Logical),
        ("bucardo", Scenario::Bucardo),
        ("schedule", Scenario::ScheduleSqlite),
    ] {
        if wanted.contains(&key) {
            scenarios.push(s);
        }
    }
    if scenarios.is_empty() {
        bail!(
            "--only {:?}: expected some of sqlite, postgres, logical, bucardo, schedule",
            args.only
        );
    }
    let res_url = tests::pg::fresh_database("bench_lat_res").await?;
    let resolution = notify_resolution(&res_url).await?;
    tests::bench::drop_database(&res_url).await;
    println!(
        "bench-latency: commit at the branch → visible at HQ; {} markers per stream scenario, {} in schedule mode, \
         background load {} changes/s, {} repetitions; detection: LISTEN/NOTIFY from an AFTER INSERT trigger \
         (NOTIFY round trip median {resolution:.3} ms)",
        args.samples, args.schedule_samples, args.load, args.reps
    );
    // Per scenario: its samples per repetition, and why a peer could not be measured.
    let mut results: Vec<(Scenario, Vec<Samples>, Option<String>)> = scenarios
        .iter()
        .map(|&s| {
            let na = (s == Scenario::Bucardo)
                .then(tests::peers::Bucardo::unavailable)
                .flatten();
            (s, Vec::new(), na)
        })
        .collect();
    for rep in 0..args.reps {
        for (s, out, na) in results.iter_mut() {
            if na.is_some() {
                continue;
            }
            eprintln!("repetition {}: {}", rep + 1, s.name());
            let r = match s {
                Scenario::Logical => run_logical(&args).await,
                Scenario::Bucardo => match run_bucardo(&args).await {
                    Ok(r) => Ok(r),
                    Err(e) => {
                        // A peer that cannot be set up is reported, not a failure.
                        eprintln!("Bucardo not measured: {e:#}");
                        *na = Some(tests::bench::short_reason(&e));
                        continue;
                    }
                },
                _ => run_ours(&args, *s).await,
            }
            .with_context(|| s.name())?;
            out.push(r);
        }
    }
    println!("| scenario | samples per rep | p50 ms | p90 ms | p99 ms, median (min–max) | max ms | background txns/s |");
    println!("|---|---|---|---|---|---|---|");
    let mut p50p99: HashMap<&'static str, (f64, f64)> = HashMap::new();
    let mut bucardo_na = None;
    for (s, reps, na) in &results {
        if let Some(why) = na {
            println!("| {} | n/a ({why}) | | | | | |", s.name());
            bucardo_na = Some(why.clone());
            continue;
        }
        let per: Vec<(f64, f64, f64, f64)> = reps.iter().map(|r| percentiles(&r.ms)).collect();
        let (p50, _, _) = median(per.iter().map(|p| p.0).collect());
        let (p90, _, _) = median(per.iter().map(|p| p.1).collect());
        let (p99, lo99, hi99) = median(per.iter().map(|p| p.2).collect());
        let max = per.iter().map(|p| p.3).fold(0.0, f64::max);
        let early: usize = reps.iter().map(|r| r.early).sum();
        let secs_note = if early > 0 {
            format!(" ({early} arrived before COMMIT returned)")
        } else {
            String::new()
        };
        let load: f64 = reps.iter().map(|r| r.load_tps).sum::<f64>() / reps.len() as f64;
        println!(
            "| {}{secs_note} | {} | {p50:.1} | {p90:.1} | {p99:.1} ({lo99:.1}–{hi99:.1}) | {max:.1} | {load:.0} |",
            s.name(),
            reps[0].ms.len(),
        );
        p50p99.insert(s.name(), (p50, p99));
    }
    let lr = p50p99.get(Scenario::Logical.name()).copied();
    let bucardo = match (p50p99.get(Scenario::Bucardo.name()), bucardo_na) {
        (Some((a, b)), _) => format!("; {a:.1} / {b:.1} (Bucardo)"),
        (None, Some(why)) => format!("; n/a (Bucardo: {why})"),
        (None, None) => String::new(),
    };
    for (s, backend) in [
        (Scenario::StreamSqlite, "SQLite"),
        (Scenario::StreamPostgres, "PostgreSQL"),
    ] {
        if let Some(&(p50, p99)) = p50p99.get(s.name()) {
            Summary {
                figure: format!(
                    "commit → visible at HQ, stream mode, {backend} branch, p50 / p99 ms"
                ),
                ours: format!("{p50:.1} / {p99:.1}"),
                peer: lr
                    .map(|(a, b)| format!("{a:.1} / {b:.1} (logical replication){bucardo}"))
                    .unwrap_or_else(|| format!("not measured{bucardo}")),
                ratio: lr
                    .map(|(a, _)| format!("{:.2}× (p50)", p50 / a))
                    .unwrap_or_else(|| "—".into()),
                target: "≤ 20 / ≤ 100".into(),
                met: met(p50 <= 20.0 && p99 <= 100.0),
            }
            .print();
        }
    }
    if let Some(&(_, p99)) = p50p99.get(Scenario::ScheduleSqlite.name()) {
        Summary {
            figure: "commit → visible at HQ, 1-second schedule, SQLite branch, p99 ms".into(),
            ours: format!("{p99:.0}"),
            peer: "—".into(),
            ratio: "—".into(),
            target: "≤ 1200".into(),
            met: met(p99 <= 1200.0),
        }
        .print();
    }
    println!(
        "reproduce: cargo build --release --workspace --bins && target/release/bench-latency --samples {} --schedule-samples {} --load {} --marker-rate {} --reps {} --only {}",
        args.samples, args.schedule_samples, args.load, args.marker_rate, args.reps, args.only
    );
    Ok(())
}
