//! Benchmark: listener serving rate and bytes on the wire per change.
//!
//! A SQLite branch with `--products` realistic products receives `--changes` typical
//! changes (price updates, 100 per transaction). A real `branch-listener` serves them
//! through `/v1/changes` (limit `--limit`) with no compression, gzip and zstd; each
//! encoding reads the same backlog from the same cursor. Reported: changes/s and wire
//! bytes per change (the HTTP body as sent, before decompression), and the compressed
//! size relative to the uncompressed JSON.
//!
//! Reproduce: cargo build --release --workspace --bins && target/release/bench-serve [--changes 200000] [--reps 3]

use anyhow::{bail, Result};
use clap::Parser;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use sqlx::{Connection, SqliteConnection};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tests::bench::median_min_max as median;
use tests::bench::Summary;
use tests::process::{free_port, write_private};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 10_000)]
    products: i64,
    #[arg(long, default_value_t = 200_000)]
    changes: i64,
    #[arg(long, default_value_t = 5_000)]
    limit: u32,
    #[arg(long, default_value_t = 3)]
    reps: usize,
}

const TOKEN: &str = "bench-token-0123456789abcdef";

/// Pulls everything after `after` with one encoding; returns (changes, wire bytes, seconds, next).
async fn drain(
    base: &str,
    after: Option<&str>,
    limit: u32,
    encoding: &str,
) -> Result<(u64, u64, f64, String)> {
    let client = reqwest::Client::builder().no_gzip().no_zstd().build()?;
    let mut cursor = after.map(str::to_string);
    let (mut changes, mut bytes) = (0u64, 0u64);
    let t0 = Instant::now();
    loop {
        let mut url = format!("{base}/v1/changes?limit={limit}");
        if let Some(c) = &cursor {
            url.push_str(&format!("&after={c}"));
        }
        let resp = client
            .get(&url)
            .bearer_auth(TOKEN)
            .header("accept-encoding", encoding)
            .send()
            .await?;
        if !resp.status().is_success() {
            bail!("{}: {}", resp.status(), resp.text().await?);
        }
        let wire = resp.bytes().await?;
        bytes += wire.len() as u64;
        let body: Vec<u8> = match encoding {
            "gzip" => {
                use std::io::Read;
                let mut out = Vec::new();
                flate2::read::GzDecoder::new(&wire[..]).read_to_end(&mut out)?;
                out
            }
            "zstd" => zstd::stream::decode_all(&wire[..])?,
            _ => wire.to_vec(),
        };
        let r: schemas::wire::ChangesResponse = serde_json::from_slice(&body)?;
        changes += r.changes.len() as u64;
        cursor = Some(r.next.to_string());
        if !r.more {
            break;
        }
    }
    Ok((
        changes,
        bytes,
        t0.elapsed().as_secs_f64(),
        cursor.unwrap_or_default(),
    ))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let bins = tests::process::bin_dir();
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("branch.db");
    let cfg = dir.path().join("branch.toml");
    let tok = dir.path().join("token");
    write_private(&tok, TOKEN)?;
    let port = free_port()?;
    std::fs::write(
        &cfg,
        format!(
            "location = \"b01\"\ndatabase_url = \"sqlite://{}\"\nlisten = \"127.0.0.1:{port}\"\n\
             token_file = \"{}\"\nmax_limit = 50000\nrate_limit_per_second = 0\n",
            db.display(),
            tok.display()
        ),
    )?;
    let st = Command::new(bins.join("branch-listener"))
        .args(["install", "--with-demo-schema", "--config"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    if !st.success() {
        bail!("install failed");
    }
    let opts = SqliteConnectOptions::new()
        .filename(&db)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal);
    let mut c = SqliteConnection::connect_with(&opts).await?;
    // Realistic products.
    sqlx::query(
        "INSERT INTO products (product_id, sku, name, description, category, unit_price, currency, updated_at) \
         WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < ?1) \
         SELECT i, printf('B01-%06d', i), 'Cordless drill ' || (i % 37) || 'V model ' || hex(randomblob(3)), \
                'Brushless motor, two batteries, case; lot ' || hex(randomblob(6)) || ', year ' || (2020 + i % 6), \
                'power-tools', 49.90 + (i % 500), 'EUR', '2026-11-24 08:00:00' FROM s",
    )
    .bind(args.products)
    .execute(&mut c)
    .await?;
    let mut child = Command::new(bins.join("branch-listener"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while reqwest::get(format!("{base}/healthz")).await.is_err() {
        if Instant::now() > deadline {
            bail!("listener did not start");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Skip past the inserts, then make the typical changes: price updates.
    let (_, _, _, after_inserts) = drain(&base, None, 50_000, "identity").await?;
    let mut done = 0i64;
    while done < args.changes {
        let mut tx = c.begin().await?;
        for k in 0..100.min(args.changes - done) {
            let id = (done + k) % args.products + 1;
            sqlx::query(
                "UPDATE products SET unit_price = round(unit_price * 1.02, 2), updated_at = strftime('%Y-%m-%d %H:%M:%S','now') \
                 WHERE product_id = ?1",
            )
            .bind(id)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        done += 100;
    }
    println!(
        "bench-serve: {} price updates (100 per transaction) of {} products, limit {}, {} repetitions, SQLite branch",
        args.changes, args.products, args.limit, args.reps
    );
    println!("| encoding | changes/s median (min–max) | wire bytes per change | vs uncompressed |");
    println!("|---|---|---|---|");
    let mut identity_bpc = 0.0;
    for enc in ["identity", "gzip", "zstd"] {
        let mut rates = Vec::new();
        let mut bpc = 0.0;
        for _ in 0..args.reps {
            let (n, bytes, secs, _) = drain(&base, Some(&after_inserts), args.limit, enc).await?;
            if n as i64 != args.changes {
                bail!("{enc}: served {n} changes, expected {}", args.changes);
            }
            rates.push(n as f64 / secs);
            bpc = bytes as f64 / n as f64;
        }
        if enc == "identity" {
            identity_bpc = bpc;
        }
        let (m, lo, hi) = median(rates);
        println!(
            "| {enc} | {m:.0} ({lo:.0}–{hi:.0}) | {bpc:.1} | {:.0}% |",
            100.0 * bpc / identity_bpc
        );
        if enc == "zstd" {
            let share = bpc / identity_bpc;
            Summary {
                figure: "wire bytes per price update, zstd (what hq-puller negotiates)".into(),
                ours: format!("{bpc:.1} B ({:.0}% of JSON)", 100.0 * share),
                peer: format!("{identity_bpc:.1} B (uncompressed JSON)"),
                ratio: format!("{share:.2}×"),
                target: "≤ 40% of JSON".into(),
                met: tests::bench::met(share <= 0.40),
            }
            .print();
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    println!(
        "reproduce: cargo build --release --workspace --bins && target/release/bench-serve --products {} --changes {} --limit {} --reps {}",
        args.products, args.changes, args.limit, args.reps
    );
    Ok(())
}
