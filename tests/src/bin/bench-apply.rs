//! Benchmark: HQ catch-up of a change backlog, against its peers in the same run.
//!
//! Workload W (PEERS.md), scaled to `--changes` row changes: inserts, then updates of
//! those rows, then deletes (ratio 200 : 200 : 20), in branch transactions of 100 rows.
//! - **ours**: W split over `--locations` SQLite branches with the pull-area triggers
//!   (`branch-listener install --with-demo-schema`), 46 real `branch-listener`
//!   processes, then `hq-puller pull --all` timed from start to caught up. Peak RSS of
//!   hq-puller is sampled from /proc while it runs; idle RSS from `hq-puller run` with
//!   every location caught up.
//! - **logical replication**: W in one PostgreSQL database published to another
//!   database of the same cluster; the subscription is enabled once the backlog exists
//!   and timed until it has confirmed the source's WAL position.
//! - **Bucardo**: W in one PostgreSQL database replicated by a Bucardo sync to another
//!   database of the same cluster (it copies identical tables; it cannot merge several
//!   sources into one table, so it gets W from one source). The backlog is built with
//!   the sync's autokick off (its triggers record every change, nothing runs); the
//!   sync is then kicked and timed until the target equals the source. Reported
//!   next to logical replication, which stays what the target is judged against; "n/a
//!   (reason)" when Bucardo is not installed or cannot be started.
//! - **COPY** (the floor): the W end state's rows plus the deleted ones (as many rows as
//!   ours applies after collapsing) COPYed into a table shaped like `hq.products`.
//!
//! Reproduce: cargo run --release -p tests --bin bench-apply -- [--changes 1000000] [--locations 46] [--reps 3]

use anyhow::{bail, Context, Result};
use clap::Parser;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use sqlx::{Connection, Executor, PgConnection, SqliteConnection};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tests::bench::median_min_max as median;
use tests::bench::Summary;
use tests::process::{free_port, write_private};

#[derive(Parser, Clone)]
struct Args {
    /// Total row changes in the backlog.
    #[arg(long, default_value_t = 1_000_000)]
    changes: u64,
    /// Branch locations the backlog is spread over.
    #[arg(long, default_value_t = 46)]
    locations: usize,
    /// Repetitions (medians reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Folder with the release binaries (default: next to this executable).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Skip the peers (logical replication, Bucardo, COPY).
    #[arg(long)]
    no_peers: bool,
    /// hq-puller's `batch_limit` (changes per batch; larger batches collapse more).
    #[arg(long, default_value_t = 20_000)]
    batch_limit: u32,
    /// hq-puller's `max_concurrent_pulls`.
    #[arg(long, default_value_t = 8)]
    max_concurrent: u32,
    /// Measure only the peers (logical replication, Bucardo, COPY).
    #[arg(long)]
    peers_only: bool,
    /// How long the idle service runs before its RSS is read, seconds.
    #[arg(long, default_value_t = 25)]
    idle_seconds: u64,
}

/// W's shape for `changes` row changes: (inserts, updates, deletes).
fn shape(changes: u64) -> (u64, u64, u64) {
    let unit = changes / 420;
    let ins = unit * 200;
    let del = unit * 20;
    (ins, changes - ins - del, del)
}

fn bin_dir(args: &Args) -> PathBuf {
    args.bin_dir.clone().unwrap_or_else(tests::process::bin_dir)
}

fn sqlite_opts(path: &Path) -> SqliteConnectOptions {
    SqliteConnectOptions::new()
        .filename(path)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(Duration::from_secs(10))
}

/// Runs W's share `(ins, upd, del)` on one SQLite branch, 100 rows per transaction.
async fn sqlite_workload(db: &Path, (ins, upd, del): (u64, u64, u64)) -> Result<()> {
    let mut c = SqliteConnection::connect_with(&sqlite_opts(db)).await?;
    let ins_sql = "INSERT INTO products (product_id, sku, name, description, category, unit_price, currency, updated_at) \
                   WITH RECURSIVE s(i) AS (SELECT ?1 UNION ALL SELECT i + 1 FROM s WHERE i < ?2) \
                   SELECT i, printf('SKU-%08d', i), 'Product ' || i, 'A sturdy product for everyday use', \
                          'hardware', 19.99, 'EUR', '2026-11-24 08:00:00' FROM s";
    let upd_sql =
        "UPDATE products SET unit_price = unit_price + 1, updated_at = '2026-11-24 08:00:01' \
                   WHERE product_id BETWEEN ?1 AND ?2";
    let del_sql = "DELETE FROM products WHERE product_id BETWEEN ?1 AND ?2";
    for (sql, n) in [(ins_sql, ins), (upd_sql, upd), (del_sql, del)] {
        // Updates wrap around the inserted rows when there are more updates than rows.
        let mut done = 0u64;
        while done < n {
            let k = 100.min(n - done);
            let start = (done % ins.max(1)) as i64;
            let end = (start + k as i64 - 1).min(ins as i64 - 1);
            let mut tx = c.begin().await?;
            sqlx::query(sql)
                .bind(start)
                .bind(end)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            done += (end - start + 1) as u64;
        }
    }
    Ok(())
}

struct Branches {
    _dir: tempfile::TempDir,
    listeners: Vec<Child>,
    hq_config: PathBuf,
    /// Each branch database and its share of W `(inserts, updates, deletes)`, written
    /// once HQ has loaded the (empty) branches, so that W reaches HQ as changes.
    backlog: Vec<(PathBuf, (u64, u64, u64))>,
}

impl Drop for Branches {
    fn drop(&mut self) {
        for c in &mut self.listeners {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

async fn wait_healthy(port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let url = format!("http://127.0.0.1:{port}/healthz");
    while Instant::now() < deadline {
        if let Ok(r) = reqwest::get(&url).await {
            if r.status().is_success() {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("listener on port {port} not healthy within 30 s")
}

/// Creates the branches with their backlog, starts their listeners, writes the HQ config.
async fn prepare_ours(args: &Args, hq_url: &str) -> Result<Branches> {
    let bins = bin_dir(args);
    let dir = tempfile::tempdir()?;
    let (ins, upd, del) = shape(args.changes);
    let n = args.locations as u64;
    let token = "bench-token-0123456789abcdef";
    let mut listeners = Vec::new();
    let mut hq = format!(
        "database_url = \"{hq_url}\"\nschedule = \"0 0 0 1 1 *\"\nmax_concurrent_pulls = {}\n\
         files_dir = \"{}\"\nbatch_limit = {}\nrun_budget = \"1h\"\nallow_plain_http = true\n",
        args.max_concurrent,
        dir.path().join("hq-files").display(),
        args.batch_limit
    );
    let hq_token = dir.path().join("hq-token");
    write_private(&hq_token, token)?;
    let mut ports = Vec::new();
    let mut backlog = Vec::new();
    for i in 0..args.locations {
        let loc = format!("b{:02}", i + 1);
        let db = dir.path().join(format!("{loc}.db"));
        let cfg = dir.path().join(format!("{loc}.toml"));
        let tok = dir.path().join(format!("{loc}.token"));
        write_private(&tok, token)?;
        let port = free_port()?;
        std::fs::write(
            &cfg,
            format!(
                "location = \"{loc}\"\ndatabase_url = \"sqlite://{}\"\nlisten = \"127.0.0.1:{port}\"\n\
                 token_file = \"{}\"\nretention = \"24h\"\nrate_limit_per_second = 0\n",
                db.display(),
                tok.display()
            ),
        )?;
        let st = Command::new(bins.join("branch-listener"))
            .args(["install", "--config"])
            .arg(&cfg)
            .arg("--with-demo-schema")
            .stdout(Stdio::null())
            .status()
            .context("running branch-listener install")?;
        if !st.success() {
            bail!("branch-listener install failed for {loc}");
        }
        // Share of W for this branch (the remainder goes to the first branches).
        let share = |x: u64| x / n + u64::from((i as u64) < x % n);
        backlog.push((db.clone(), (share(ins), share(upd), share(del))));
        let child = Command::new(bins.join("branch-listener"))
            .args(["serve", "--config"])
            .arg(&cfg)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        listeners.push(child);
        ports.push(port);
        hq.push_str(&format!(
            "\n[[locations]]\nid = \"{loc}\"\nname = \"{loc}\"\nurl = \"http://127.0.0.1:{port}\"\ntoken_file = \"{}\"\n",
            hq_token.display()
        ));
    }
    for p in ports {
        wait_healthy(p).await?;
    }
    let hq_config = dir.path().join("hq.toml");
    std::fs::write(&hq_config, hq)?;
    Ok(Branches {
        _dir: dir,
        listeners,
        hq_config,
        backlog,
    })
}

use tests::bench::{peak_rss_kib, rss_kib};

struct Ours {
    seconds: f64,
    peak_rss_mib: f64,
    idle_rss_mib: f64,
}

async fn run_ours(args: &Args) -> Result<Ours> {
    let hq_url = tests::pg::fresh_database("bench_apply_hq").await?;
    let r = run_ours_on(args, &hq_url).await;
    tests::bench::drop_database(&hq_url).await;
    r
}

async fn run_ours_on(args: &Args, hq_url: &str) -> Result<Ours> {
    let b = prepare_ours(args, hq_url).await?;
    let puller = bin_dir(args).join("hq-puller");
    let st = Command::new(&puller)
        .args(["migrate", "--config"])
        .arg(&b.hq_config)
        .stdout(Stdio::null())
        .status()?;
    if !st.success() {
        bail!("hq-puller migrate failed");
    }
    // The initial loads of the empty branches first (untimed): then every location has
    // a cursor and W, written now, reaches HQ as a change backlog, not as snapshot rows.
    let st = Command::new(&puller)
        .args(["pull", "--all", "--config"])
        .arg(&b.hq_config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .status()?;
    if !st.success() {
        bail!("hq-puller pull --all (initial loads of the empty branches) failed");
    }
    for (db, share) in &b.backlog {
        sqlite_workload(db, *share).await?;
    }
    let t0 = Instant::now();
    let mut child = Command::new(&puller)
        .args(["pull", "--all", "--config"])
        .arg(&b.hq_config)
        .env(
            "RUST_LOG",
            std::env::var("BENCH_APPLY_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::null())
        .spawn()?;
    let pid = child.id();
    let mut peak = 0u64;
    let status = loop {
        if let Some(kib) = peak_rss_kib(pid) {
            peak = peak.max(kib);
        }
        if let Some(st) = child.try_wait()? {
            break st;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let seconds = t0.elapsed().as_secs_f64();
    if !status.success() {
        bail!("hq-puller pull --all failed");
    }
    // Sanity: HQ holds W's end state.
    let mut hq = PgConnection::connect(hq_url).await?;
    let (ins, _, del) = shape(args.changes);
    let live: i64 = sqlx::query_scalar("SELECT count(*) FROM hq.products_live")
        .fetch_one(&mut hq)
        .await?;
    if live as u64 != ins - del {
        bail!("HQ has {live} live products, expected {}", ins - del);
    }
    // Idle: the service with every location caught up, schedule every 10 s.
    let idle_cfg = std::fs::read_to_string(&b.hq_config)?.replace(
        "schedule = \"0 0 0 1 1 *\"",
        "schedule = \"*/10 * * * * *\"",
    );
    let idle_path = b.hq_config.with_file_name("hq-idle.toml");
    std::fs::write(&idle_path, idle_cfg)?;
    let mut svc = Command::new(&puller)
        .args(["run", "--config"])
        .arg(&idle_path)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()?;
    tokio::time::sleep(Duration::from_secs(args.idle_seconds)).await; // measurement window, not synchronization
    let idle = rss_kib(svc.id()).unwrap_or(0);
    let _ = svc.kill();
    let _ = svc.wait();
    Ok(Ours {
        seconds,
        peak_rss_mib: peak as f64 / 1024.0,
        idle_rss_mib: idle as f64 / 1024.0,
    })
}

const PEER_TABLE: &str = "CREATE TABLE products (product_id bigint PRIMARY KEY, sku text, name text, \
     description text, category text, unit_price numeric(12,2), currency text, updated_at timestamptz)";

/// W on the server side of a PostgreSQL database, 100 rows per transaction.
fn pg_workload_sql((ins, upd, del): (u64, u64, u64)) -> Vec<String> {
    vec![
        format!(
            "DO $$ BEGIN FOR i IN 0..{n} LOOP \
               INSERT INTO products VALUES (i, 'SKU-' || lpad(i::text, 8, '0'), 'Product ' || i, \
               'A sturdy product for everyday use', 'hardware', 19.99, 'EUR', now()); \
               IF i % 100 = 99 THEN COMMIT; END IF; END LOOP; END $$",
            n = ins - 1
        ),
        format!(
            "DO $$ BEGIN FOR j IN 0..{n} LOOP \
               UPDATE products SET unit_price = unit_price + 1, updated_at = now() WHERE product_id = j % {ins}; \
               IF j % 100 = 99 THEN COMMIT; END IF; END LOOP; END $$",
            n = upd - 1
        ),
        format!(
            "DO $$ BEGIN FOR i IN 0..{n} LOOP \
               DELETE FROM products WHERE product_id = i; \
               IF i % 100 = 99 THEN COMMIT; END IF; END LOOP; END $$",
            n = del - 1
        ),
    ]
}

async fn run_logical(args: &Args) -> Result<f64> {
    let src_url = tests::pg::fresh_database("bench_lr_src").await?;
    let dst_url = tests::pg::fresh_database("bench_lr_dst").await?;
    let mut lr =
        tests::peers::LogicalReplication::create(&src_url, &dst_url, PEER_TABLE, "products", false)
            .await?;
    for s in pg_workload_sql(shape(args.changes)) {
        lr.src.execute(s.as_str()).await?;
    }
    let target = lr.source_lsn().await?;
    let t0 = Instant::now();
    lr.enable().await?;
    lr.wait_confirmed(&target, Duration::from_secs(1800))
        .await?;
    let secs = t0.elapsed().as_secs_f64();
    let (ins, _, del) = shape(args.changes);
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM products")
        .fetch_one(&mut lr.dst)
        .await?;
    if n as u64 != ins - del {
        bail!(
            "logical replication target has {n} rows, expected {}",
            ins - del
        );
    }
    lr.drop_all().await?;
    tests::bench::drop_database(&src_url).await;
    tests::bench::drop_database(&dst_url).await;
    Ok(secs)
}

/// Bucardo: the backlog recorded by its triggers with the sync's autokick off, then the
/// drain timed from the kick until the target equals the source.
async fn run_bucardo(args: &Args) -> Result<f64> {
    let src_url = tests::pg::fresh_database("bench_buc_src").await?;
    let dst_url = tests::pg::fresh_database("bench_buc_dst").await?;
    let r = run_bucardo_on(args, &src_url, &dst_url).await;
    tests::bench::drop_database(&src_url).await;
    tests::bench::drop_database(&dst_url).await;
    r
}

async fn run_bucardo_on(args: &Args, src_url: &str, dst_url: &str) -> Result<f64> {
    // Without autokick the triggers record the backlog and nothing runs until the kick.
    let mut b =
        tests::peers::Bucardo::create(src_url, dst_url, PEER_TABLE, "products", false).await?;
    for s in pg_workload_sql(shape(args.changes)) {
        b.src.execute(s.as_str()).await?;
    }
    let early: i64 = sqlx::query_scalar("SELECT count(*) FROM products")
        .fetch_one(&mut b.dst)
        .await?;
    if early != 0 {
        bail!("Bucardo replicated {early} rows before the kick: the backlog was not held back");
    }
    let mark = b.mark().await?;
    let t0 = Instant::now();
    b.kick()?;
    b.wait_caught_up(&mark, Duration::from_secs(1800)).await?;
    let secs = t0.elapsed().as_secs_f64();
    let (ins, _, del) = shape(args.changes);
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM products")
        .fetch_one(&mut b.dst)
        .await?;
    if n as u64 != ins - del {
        bail!("Bucardo's target has {n} rows, expected {}", ins - del);
    }
    b.drop_all().await?;
    Ok(secs)
}

/// COPY of as many rows as ours applies after collapsing (one image per key).
async fn run_copy(args: &Args) -> Result<(f64, u64)> {
    let url = tests::pg::fresh_database("bench_copy").await?;
    let mut c = PgConnection::connect(&url).await?;
    c.execute(
        "CREATE TABLE products (location_id text, product_id bigint, sku text, name text, description text, \
         category text, unit_price numeric(12,2), currency text, updated_at timestamptz, _seq bigint, \
         _deleted boolean, _applied_at timestamptz, PRIMARY KEY (location_id, product_id))",
    )
    .await?;
    let (ins, _, _) = shape(args.changes);
    let mut data = String::with_capacity(ins as usize * 120);
    for i in 0..ins {
        data.push_str(&format!(
            "b{:02}\t{i}\tSKU-{i:08}\tProduct {i}\tA sturdy product for everyday use\thardware\t20.99\tEUR\t2026-11-24 08:00:01+00\t{i}\tf\t2026-11-24 08:00:02+00\n",
            i % 46 + 1
        ));
    }
    let t0 = Instant::now();
    let mut copy = c.copy_in_raw("COPY products FROM STDIN").await?;
    copy.send(data.as_bytes()).await?;
    copy.finish().await?;
    let secs = t0.elapsed().as_secs_f64();
    c.close().await?;
    tests::bench::drop_database(&url).await;
    Ok((secs, ins))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let (ins, upd, del) = shape(args.changes);
    println!(
        "bench-apply: backlog of {} changes ({ins} inserts, {upd} updates, {del} deletes; 100-row transactions) over {} locations, {} repetitions",
        ins + upd + del,
        args.locations,
        args.reps
    );
    let total = (ins + upd + del) as f64;
    let mut ours = Vec::new();
    let mut lr = Vec::new();
    let mut copy = Vec::new();
    let mut copy_rows = 0;
    let mut bucardo = Vec::new();
    let mut bucardo_na = tests::peers::Bucardo::unavailable();
    for rep in 0..args.reps {
        if !args.peers_only {
            eprintln!("repetition {}: ours", rep + 1);
            ours.push(run_ours(&args).await.context("ours")?);
        }
        if !args.no_peers {
            eprintln!("repetition {}: logical replication", rep + 1);
            lr.push(run_logical(&args).await.context("logical replication")?);
            if bucardo_na.is_none() {
                eprintln!("repetition {}: Bucardo", rep + 1);
                match run_bucardo(&args).await {
                    Ok(s) => bucardo.push(s),
                    Err(e) => {
                        eprintln!("Bucardo not measured: {e:#}");
                        bucardo_na = Some(tests::bench::short_reason(&e));
                    }
                }
            }
            eprintln!("repetition {}: COPY", rep + 1);
            let (s, n) = run_copy(&args).await.context("COPY")?;
            copy.push(s);
            copy_rows = n;
        }
    }
    println!("| measurement | median | min–max |");
    println!("|---|---|---|");
    let rate = |secs: Vec<f64>, n: f64| {
        let (m, lo, hi) = median(secs);
        (n / m, n / hi, n / lo)
    };
    let mut ours_rate = None;
    let mut lr_rate = None;
    let mut bucardo_peer = String::new();
    if !ours.is_empty() {
        let (m, lo, hi) = rate(ours.iter().map(|o| o.seconds).collect(), total);
        println!("| ours: hq-puller pull --all, changes/s | {m:.0} | {lo:.0}–{hi:.0} |");
        ours_rate = Some(m);
    }
    if !args.no_peers {
        let (m, lo, hi) = rate(lr, total);
        println!("| PostgreSQL logical replication, changes/s | {m:.0} | {lo:.0}–{hi:.0} |");
        lr_rate = Some(m);
        bucardo_peer = match &bucardo_na {
            None => {
                let (m, lo, hi) = rate(bucardo, total);
                println!("| Bucardo (one source database), changes/s | {m:.0} | {lo:.0}–{hi:.0} |");
                format!("{m:.0} (Bucardo)")
            }
            Some(why) => {
                println!("| Bucardo (one source database), changes/s | n/a ({why}) | |");
                format!("n/a (Bucardo: {why})")
            }
        };
        let (m, lo, hi) = rate(copy, copy_rows as f64);
        println!("| COPY of the applied rows (floor), rows/s | {m:.0} | {lo:.0}–{hi:.0} |");
        Summary {
            figure: format!(
                "COPY of the applied rows (floor), rows/s, {} changes",
                ins + upd + del
            ),
            ours: "—".into(),
            peer: format!("{m:.0}"),
            ratio: "—".into(),
            target: "—".into(),
            met: "n/a".into(),
        }
        .print();
    }
    if let Some(o) = ours_rate {
        let (peer, ratio, met) = match lr_rate {
            Some(p) => (
                format!("{p:.0} (logical replication); {bucardo_peer}"),
                format!("{:.2}×", o / p),
                tests::bench::met(o >= p),
            ),
            None => ("not measured".into(), "—".into(), "n/a".into()),
        };
        Summary {
            figure: format!(
                "catch-up of {} changes over {} locations, changes/s",
                ins + upd + del,
                args.locations
            ),
            ours: format!("{o:.0}"),
            peer,
            ratio,
            target: "≥ logical replication".into(),
            met,
        }
        .print();
    }
    if !ours.is_empty() {
        let (m, lo, hi) = median(ours.iter().map(|o| o.peak_rss_mib).collect());
        println!("| hq-puller peak RSS while catching up, MiB | {m:.1} | {lo:.1}–{hi:.1} |");
        let loaded = m;
        let (m, lo, hi) = median(ours.iter().map(|o| o.idle_rss_mib).collect());
        println!(
            "| hq-puller RSS idle ({} locations, 10 s schedule), MiB | {m:.1} | {lo:.1}–{hi:.1} |",
            args.locations
        );
        Summary {
            figure: format!(
                "hq-puller RSS, {} locations idle / loaded, MiB",
                args.locations
            ),
            ours: format!("{m:.1} / {loaded:.1}"),
            peer: "—".into(),
            ratio: "—".into(),
            target: "< 64 / < 256".into(),
            met: tests::bench::met(m < 64.0 && loaded < 256.0),
        }
        .print();
    }
    println!(
        "reproduce: cargo build --release --workspace --bins && target/release/bench-apply --changes {} --locations {} --reps {} --batch-limit {} --max-concurrent {}",
        args.changes, args.locations, args.reps, args.batch_limit, args.max_concurrent
    );
    Ok(())
}
