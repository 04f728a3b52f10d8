//! Benchmark: initial load of a populated PostgreSQL branch, against `pg_dump | psql`
//! of the same table between the same servers in the same run, and `verify` time.
//!
//! - a branch database (PostgreSQL, demo schema) holding `--rows` products is installed
//!   (`branch-listener install`), served by a real `branch-listener`;
//! - **ours**: `hq-puller pull b01` into a fresh HQ database: snapshot pages (zstd),
//!   applied set-wise, then the stream from T0; timed from start to exit;
//! - **pg_dump | psql**: `pg_dump -t products BRANCH | psql FRESH_DB` (schema and data
//!   via COPY) between the same cluster's databases;
//! - **verify**: `hq-puller verify b01` over the loaded rows (all equal).
//!
//! `--writers W` runs W concurrent writers (price updates, inserts, deletes) on the
//! branch during our load; afterwards HQ catches up and verify must say equal (the
//! 1,000,000-row + 16-writers correctness run: `--rows 1000000 --writers 16 --reps 1`).
//!
//! Reproduce:
//!   cargo build --release -p tests --bin bench-load -p branch-listener -p hq-puller
//!   export TEST_PG_URL=$(tests/pg.sh ensure)
//!   target/release/bench-load [--rows 1000000] [--reps 3] [--writers 0]
//!
//! `BENCH_LOAD_PULLER_LOG` sets hq-puller's `RUST_LOG` (default `warn`; `info` shows the
//! load's progress and rate).

use anyhow::{bail, Context, Result};
use clap::Parser;
use sqlx::{Connection, PgConnection};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tests::bench::median_min_max as median;
use tests::process::{free_port, write_private};

#[derive(Parser, Clone)]
struct Args {
    /// Rows in the branch's products table.
    #[arg(long, default_value_t = 1_000_000)]
    rows: u64,
    /// Repetitions (medians reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Concurrent writers on the branch during our load (0: none).
    #[arg(long, default_value_t = 0)]
    writers: usize,
    /// hq-puller's `snapshot_page_rows`.
    #[arg(long, default_value_t = 50_000)]
    page_rows: u32,
    /// Folder with the release binaries (default: next to this executable).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
}

fn pg_bin(name: &str) -> Result<PathBuf> {
    for entry in std::fs::read_dir("/usr/lib/postgresql")? {
        let p = entry?.path().join("bin").join(name);
        if p.exists() {
            return Ok(p);
        }
    }
    bail!("{name} not found under /usr/lib/postgresql/*/bin")
}

fn db_name(url: &str) -> String {
    url.rsplit('/').next().unwrap_or("").to_string()
}

/// A branch database with `rows` products, installed and served.
struct Branch {
    url: String,
    dir: tempfile::TempDir,
    listener: std::process::Child,
    port: u16,
    token_file: PathBuf,
}

impl Drop for Branch {
    fn drop(&mut self) {
        let _ = self.listener.kill();
        let _ = self.listener.wait();
    }
}

/// The branch database with `rows` products (no pull area yet).
async fn populate_branch(args: &Args) -> Result<String> {
    let url = tests::pg::fresh_database("bench_load_branch").await?;
    let mut c = PgConnection::connect(&url).await?;
    for s in schemas::sql::postgres::create_demo_schema(&schemas::Catalogue::product_management()) {
        sqlx::query(&s).execute(&mut c).await?;
    }
    sqlx::query(
        "INSERT INTO products (product_id, sku, name, description, category, unit_price, currency, updated_at) \
         SELECT i, 'SKU-' || i, 'Product ' || i, CASE WHEN i % 7 = 0 THEN NULL ELSE 'A fine product number ' || i END, \
                'cat-' || (i % 50), round((i % 100000) / 100.0 + 0.99, 2), 'EUR', \
                timestamptz '2026-01-01 00:00:00+00' + make_interval(secs => i) \
         FROM generate_series(1, $1::bigint) AS s(i)",
    )
    .bind(args.rows as i64)
    .execute(&mut c)
    .await?;
    sqlx::query("VACUUM ANALYZE products")
        .execute(&mut c)
        .await?;
    c.close().await?;
    Ok(url)
}

/// Installs the pull area into the branch database and serves it.
async fn install_and_serve(url: String, bins: &Path) -> Result<Branch> {
    let dir = tempfile::tempdir()?;
    let token = "bench-load-token-0123456789abcdef";
    let token_file = dir.path().join("token");
    write_private(&token_file, token)?;
    let port = free_port()?;
    let cfg = dir.path().join("branch.toml");
    std::fs::write(
        &cfg,
        format!(
            "location = \"b01\"\ndatabase_url = \"{url}\"\nlisten = \"127.0.0.1:{port}\"\n\
             token_file = \"{}\"\nretention = \"24h\"\n",
            token_file.display()
        ),
    )?;
    let st = Command::new(bins.join("branch-listener"))
        .args(["install", "--config"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .status()?;
    if !st.success() {
        bail!("branch-listener install failed");
    }
    let listener = Command::new(bins.join("branch-listener"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !tests::process::port_open(([127, 0, 0, 1], port).into()) {
        if Instant::now() > deadline {
            bail!("branch-listener did not start");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(Branch {
        url,
        dir,
        listener,
        port,
        token_file,
    })
}

fn hq_config(b: &Branch, hq_url: &str, page_rows: u32) -> Result<PathBuf> {
    let path = b.dir.path().join(format!("hq-{}.toml", db_name(hq_url)));
    std::fs::write(
        &path,
        format!(
            "database_url = \"{hq_url}\"\nsnapshot_page_rows = {page_rows}\nrun_budget = \"1h\"\nallow_plain_http = true\n\
             request_timeout = \"120s\"\nbatch_limit = 20000\n\
             [[locations]]\nid = \"b01\"\nurl = \"http://127.0.0.1:{}\"\ntoken_file = \"{}\"\n",
            b.port,
            b.token_file.display()
        ),
    )?;
    Ok(path)
}

fn puller(bins: &Path, cfg: &Path, args: &[&str]) -> Result<(bool, String)> {
    let out = Command::new(bins.join("hq-puller"))
        .args(args)
        .arg("--config")
        .arg(cfg)
        .env(
            "RUST_LOG",
            std::env::var("BENCH_LOAD_PULLER_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stderr(Stdio::inherit())
        .output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
    ))
}

/// Writers: each loops price updates (70%), inserts (20%) and deletes (10%).
fn start_writers(
    url: &str,
    n: usize,
    rows: u64,
    stop: Arc<AtomicBool>,
    ops: Arc<AtomicU64>,
) -> Vec<tokio::task::JoinHandle<Result<()>>> {
    (0..n)
        .map(|w| {
            let (url, stop, ops) = (url.to_string(), stop.clone(), ops.clone());
            tokio::spawn(async move {
                let mut c = PgConnection::connect(&url).await?;
                let mut i: u64 = 0;
                let mut next_new = rows as i64 + 1 + (w as i64) * 10_000_000;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let id = ((i * 7919 + w as u64 * 104_729) % rows) as i64 + 1;
                    let r = match i % 10 {
                        0 => {
                            sqlx::query("DELETE FROM products WHERE product_id = $1")
                                .bind(id)
                                .execute(&mut c)
                                .await
                        }
                        1 | 2 => {
                            next_new += 1;
                            sqlx::query(
                                "INSERT INTO products (product_id, sku, name, unit_price, currency) \
                                 VALUES ($1, 'NEW-' || $1, 'new', 1.50, 'EUR')",
                            )
                            .bind(next_new)
                            .execute(&mut c)
                            .await
                        }
                        _ => {
                            sqlx::query(
                                "UPDATE products SET unit_price = unit_price + 0.01, updated_at = now() \
                                 WHERE product_id = $1",
                            )
                            .bind(id)
                            .execute(&mut c)
                            .await
                        }
                    };
                    r.with_context(|| format!("writer {w}"))?;
                    ops.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            })
        })
        .collect()
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let bins = args.bin_dir.clone().unwrap_or_else(tests::process::bin_dir);
    let (pg_dump, psql) = (pg_bin("pg_dump")?, pg_bin("psql")?);
    let mut ours = Vec::new();
    let mut dumps = Vec::new();
    let mut verifies = Vec::new();
    let mut writer_ops = 0;
    for rep in 0..args.reps {
        let branch_url = populate_branch(&args).await?;

        // pg_dump | psql of the same table between the same servers (before the pull
        // area is installed: the dump would carry the capture trigger).
        let target = tests::pg::fresh_database("bench_load_dump").await?;
        let t0 = Instant::now();
        let st = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "'{}' -t public.products '{}' | '{}' -q -v ON_ERROR_STOP=1 '{}' >/dev/null",
                pg_dump.display(),
                branch_url,
                psql.display(),
                target
            ))
            .status()?;
        if !st.success() {
            bail!("pg_dump | psql failed");
        }
        let dump_s = t0.elapsed().as_secs_f64();
        let b = install_and_serve(branch_url, &bins).await?;

        // Ours (with writers when asked).
        let hq_url = tests::pg::fresh_database("bench_load_hq").await?;
        let cfg = hq_config(&b, &hq_url, args.page_rows)?;
        let (ok, _) = puller(&bins, &cfg, &["migrate"])?;
        if !ok {
            bail!("hq-puller migrate failed");
        }
        let stop = Arc::new(AtomicBool::new(false));
        let ops = Arc::new(AtomicU64::new(0));
        let writers = start_writers(&b.url, args.writers, args.rows, stop.clone(), ops.clone());
        let t0 = Instant::now();
        let (ok, out) = puller(&bins, &cfg, &["pull", "b01"])?;
        let load_s = t0.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        for w in writers {
            w.await??;
        }
        if !ok {
            bail!("hq-puller pull failed: {out}");
        }
        writer_ops = ops.load(Ordering::Relaxed);
        if args.writers > 0 {
            // Catch up with what the writers did, then HQ must equal the branch.
            let (ok, out) = puller(&bins, &cfg, &["pull", "b01"])?;
            if !ok {
                bail!("catch-up pull failed: {out}");
            }
        }
        let t0 = Instant::now();
        let (equal, out) = puller(&bins, &cfg, &["verify", "b01", "--settle", "10s"])?;
        let verify_s = t0.elapsed().as_secs_f64();
        if !equal {
            bail!("verify found differences after the load:\n{out}");
        }
        eprintln!(
            "rep {}: ours {load_s:.2} s, pg_dump|psql {dump_s:.2} s, verify {verify_s:.2} s, writer ops {writer_ops}",
            rep + 1
        );
        ours.push(load_s);
        dumps.push(dump_s);
        verifies.push(verify_s);
        let branch_url = b.url.clone();
        drop(b);
        // Freed as we go: disk, and no autovacuum of old databases during the next rep.
        for url in [&target, &hq_url, &branch_url] {
            tests::bench::drop_database(url).await;
        }
    }
    let rows = args.rows as f64;
    let (o, omin, omax) = median(ours);
    let (d, dmin, dmax) = median(dumps);
    let (v, vmin, vmax) = median(verifies);
    println!(
        "\n| {} rows (PostgreSQL branch → HQ, same cluster), {} reps, {} writers | median s | min–max s | rows/s |",
        args.rows, args.reps, args.writers
    );
    println!("|---|---|---|---|");
    println!(
        "| initial load (`hq-puller pull`, pages of {}) | {o:.2} | {omin:.2}–{omax:.2} | {:.0} |",
        args.page_rows,
        rows / o
    );
    println!(
        "| `pg_dump -t products | psql` | {d:.2} | {dmin:.2}–{dmax:.2} | {:.0} |",
        rows / d
    );
    println!(
        "| `hq-puller verify` (all equal) | {v:.2} | {vmin:.2}–{vmax:.2} | {:.0} |",
        rows / v
    );
    tests::bench::Summary {
        figure: format!("initial load of {} rows (rows/s)", args.rows),
        ours: format!("{:.0}", rows / o),
        peer: format!("{:.0} (pg_dump \\| psql)", rows / d),
        ratio: format!("{:.2}×", d / o),
        target: "≥ 1.0× pg_dump \\| psql".into(),
        met: tests::bench::met(o <= d),
    }
    .print();
    tests::bench::Summary {
        figure: format!("verify of {} equal rows (s)", args.rows),
        ours: format!("{v:.2} s ({:.0} rows/s)", rows / v),
        peer: "—".into(),
        ratio: "—".into(),
        target: "report".into(),
        met: "n/a".into(),
    }
    .print();
    if args.writers > 0 {
        println!(
            "\n{} writer operations during the last load; verify: equal after catch-up.",
            writer_ops
        );
    }
    println!(
        "\ncommand: bench-load --rows {} --reps {} --writers {} --page-rows {}",
        args.rows, args.reps, args.writers, args.page_rows
    );
    Ok(())
}
