//! Benchmark: what the capture triggers add to the branch's own write transactions.
//!
//! Workload (issue "Branch capture"): 100,000 INSERTs then 100,000 UPDATEs of
//! `products`, one statement per row, in client-driven transactions of 100 rows.
//! Variants, each on a fresh database, interleaved over the repetitions:
//! - PostgreSQL: no trigger; the *floor* (a minimal AFTER ROW trigger writing table, op,
//!   pk and `row_to_json(NEW)` to a log table, as measured by the peers); the pull-area
//!   triggers exactly as `branch-listener install` creates them.
//! - SQLite (WAL, synchronous=NORMAL): no trigger; the pull-area triggers.
//!
//! Prints medians with min–max and the ratio to "no trigger". Reproduce with:
//!   cargo run --release -p tests --bin bench-capture -- [--rows 100000] [--reps 3]

use anyhow::{Context, Result};
use clap::Parser;
use schemas::sql::{postgres as pgsql, sqlite as litesql};
use schemas::Catalogue;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use sqlx::{Connection, Executor, PgConnection, SqliteConnection};
use std::time::{Duration, Instant};
use tests::bench::median_min_max as median;
use tests::bench::{met, Summary};

#[derive(Parser)]
struct Args {
    /// Rows inserted (and then updated).
    #[arg(long, default_value_t = 100_000)]
    rows: i64,
    /// Rows per transaction.
    #[arg(long, default_value_t = 100)]
    txn: i64,
    /// Repetitions per variant (the median is reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Only one backend: `postgres` or `sqlite`.
    #[arg(long)]
    only: Option<String>,
    /// How the writes are driven: `client` (one statement per row from the client, the
    /// issue's measure), `server` (no client round trips: a PL/pgSQL loop committing
    /// every `txn` rows; on SQLite one multi-row statement per transaction) or `both`.
    #[arg(long, default_value = "both")]
    mode: String,
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Variant {
    None,
    Floor,
    PullArea,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::None => "no trigger",
            Variant::Floor => "minimal row-to-JSON trigger (floor)",
            Variant::PullArea => "pull-area triggers",
        }
    }
}

const FLOOR_SQL: &[&str] = &[
    "CREATE TABLE floor_log (id bigserial PRIMARY KEY, tbl text, op text, pk jsonb, row_data jsonb)",
    "CREATE FUNCTION floor_capture() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
       INSERT INTO floor_log (tbl, op, pk, row_data) VALUES \
       (TG_TABLE_NAME, TG_OP, jsonb_build_object('product_id', NEW.product_id), row_to_json(NEW)::jsonb); \
       RETURN NULL; END $$",
    "CREATE TRIGGER floor_capture AFTER INSERT OR UPDATE ON products FOR EACH ROW EXECUTE FUNCTION floor_capture()",
];

const INSERT: &str = "INSERT INTO products (product_id, sku, name, description, category, unit_price, currency, updated_at) \
                      VALUES ($1, $2, $3, $4, $5, $6::text::numeric, 'EUR', $7)";
const UPDATE_PG: &str =
    "UPDATE products SET unit_price = unit_price + 1, updated_at = $2 WHERE product_id = $1";
const INSERT_LITE: &str = "INSERT INTO products (product_id, sku, name, description, category, unit_price, currency, updated_at) \
                           VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'EUR', ?7)";
const UPDATE_LITE: &str =
    "UPDATE products SET unit_price = unit_price + 1, updated_at = ?2 WHERE product_id = ?1";

struct Timing {
    insert: Duration,
    update: Duration,
}

async fn run_pg(args: &Args, v: Variant, server: bool) -> Result<Timing> {
    let url = tests::pg::fresh_database("bench_capture").await?;
    let mut c = PgConnection::connect(&url).await?;
    let cat = Catalogue::product_management();
    let products = cat.table("products").expect("products");
    for s in pgsql::create_demo_schema(&cat) {
        c.execute(s.as_str()).await?;
    }
    match v {
        Variant::None => {}
        Variant::Floor => {
            for s in FLOOR_SQL {
                c.execute(*s).await?;
            }
        }
        Variant::PullArea => {
            for s in pgsql::create_pull_area()
                .into_iter()
                .chain(pgsql::create_capture(products))
            {
                c.execute(s.as_str()).await?;
            }
        }
    }
    if server {
        let t = run_pg_server(&mut c, args).await?;
        c.close().await?;
        tests::pg::drop_database(&url).await?;
        return Ok(t);
    }
    let now = chrono::Utc::now();
    let price = "19.99";
    let t0 = Instant::now();
    for start in (0..args.rows).step_by(args.txn as usize) {
        let mut tx = c.begin().await?;
        for id in start..(start + args.txn).min(args.rows) {
            sqlx::query(INSERT)
                .bind(id)
                .bind(format!("SKU-{id:08}"))
                .bind(format!("Product {id}"))
                .bind("A sturdy product for everyday use")
                .bind("hardware")
                .bind(price)
                .bind(now)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
    }
    let insert = t0.elapsed();
    let t1 = Instant::now();
    for start in (0..args.rows).step_by(args.txn as usize) {
        let mut tx = c.begin().await?;
        for id in start..(start + args.txn).min(args.rows) {
            sqlx::query(UPDATE_PG)
                .bind(id)
                .bind(now)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
    }
    let update = t1.elapsed();
    c.close().await?;
    tests::pg::drop_database(&url).await?;
    Ok(Timing { insert, update })
}

async fn run_sqlite(args: &Args, v: Variant, server: bool) -> Result<Timing> {
    let dir = tempfile::tempdir()?;
    let opts = SqliteConnectOptions::new()
        .filename(dir.path().join("bench.db"))
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal);
    let mut c = SqliteConnection::connect_with(&opts).await?;
    let cat = Catalogue::product_management();
    let products = cat.table("products").expect("products");
    for s in litesql::create_demo_schema(&cat) {
        c.execute(s.as_str()).await?;
    }
    if v == Variant::PullArea {
        for s in litesql::create_pull_area()
            .into_iter()
            .chain(litesql::create_triggers(products))
        {
            c.execute(s.as_str()).await?;
        }
    }
    if server {
        return run_sqlite_server(&mut c, args).await;
    }
    let now = "2026-11-24 08:00:00";
    let t0 = Instant::now();
    for start in (0..args.rows).step_by(args.txn as usize) {
        let mut tx = c.begin().await?;
        for id in start..(start + args.txn).min(args.rows) {
            sqlx::query(INSERT_LITE)
                .bind(id)
                .bind(format!("SKU-{id:08}"))
                .bind(format!("Product {id}"))
                .bind("A sturdy product for everyday use")
                .bind("hardware")
                .bind("19.99")
                .bind(now)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
    }
    let insert = t0.elapsed();
    let t1 = Instant::now();
    for start in (0..args.rows).step_by(args.txn as usize) {
        let mut tx = c.begin().await?;
        for id in start..(start + args.txn).min(args.rows) {
            sqlx::query(UPDATE_LITE)
                .bind(id)
                .bind(now)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
    }
    let update = t1.elapsed();
    Ok(Timing { insert, update })
}

/// PostgreSQL, server side: the same rows from a DO block that commits every `txn` rows.
async fn run_pg_server(c: &mut PgConnection, args: &Args) -> Result<Timing> {
    let ins = format!(
        "DO $$ BEGIN FOR i IN 0..{n} LOOP \
           INSERT INTO products (product_id, sku, name, description, category, unit_price, currency, updated_at) \
           VALUES (i, 'SKU-' || lpad(i::text, 8, '0'), 'Product ' || i, 'A sturdy product for everyday use', \
                   'hardware', 19.99, 'EUR', now()); \
           IF i % {t} = {t1} THEN COMMIT; END IF; \
         END LOOP; END $$",
        n = args.rows - 1,
        t = args.txn,
        t1 = args.txn - 1
    );
    let upd = format!(
        "DO $$ BEGIN FOR i IN 0..{n} LOOP \
           UPDATE products SET unit_price = unit_price + 1, updated_at = now() WHERE product_id = i; \
           IF i % {t} = {t1} THEN COMMIT; END IF; \
         END LOOP; END $$",
        n = args.rows - 1,
        t = args.txn,
        t1 = args.txn - 1
    );
    let t0 = Instant::now();
    c.execute(ins.as_str()).await?;
    let insert = t0.elapsed();
    let t1 = Instant::now();
    c.execute(upd.as_str()).await?;
    Ok(Timing {
        insert,
        update: t1.elapsed(),
    })
}

/// SQLite, server side: one multi-row statement per transaction of `txn` rows.
async fn run_sqlite_server(c: &mut SqliteConnection, args: &Args) -> Result<Timing> {
    let ins = "INSERT INTO products (product_id, sku, name, description, category, unit_price, currency, updated_at) \
               WITH RECURSIVE s(i) AS (SELECT ?1 UNION ALL SELECT i + 1 FROM s WHERE i < ?2) \
               SELECT i, printf('SKU-%08d', i), 'Product ' || i, 'A sturdy product for everyday use', \
                      'hardware', 19.99, 'EUR', '2026-11-24 08:00:00' FROM s";
    let upd =
        "UPDATE products SET unit_price = unit_price + 1, updated_at = '2026-11-24 08:00:01' \
               WHERE product_id BETWEEN ?1 AND ?2";
    let mut timings = [Duration::ZERO; 2];
    for (k, sql) in [ins, upd].into_iter().enumerate() {
        let t0 = Instant::now();
        for start in (0..args.rows).step_by(args.txn as usize) {
            let end = (start + args.txn).min(args.rows) - 1;
            let mut tx = c.begin().await?;
            sqlx::query(sql)
                .bind(start)
                .bind(end)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
        }
        timings[k] = t0.elapsed();
    }
    Ok(Timing {
        insert: timings[0],
        update: timings[1],
    })
}

/// Prints the rows of one backend and mode; returns each variant's ratio to "no trigger".
fn report(
    backend: &str,
    driven: &str,
    variants: &[Variant],
    results: &[(Variant, Timing)],
) -> Vec<(Variant, f64)> {
    let mut ratios = Vec::new();
    let total = |v: Variant| -> Vec<f64> {
        results
            .iter()
            .filter(|(x, _)| *x == v)
            .map(|(_, t)| (t.insert + t.update).as_secs_f64())
            .collect()
    };
    let (base, _, _) = median(total(Variant::None));
    for &v in variants {
        let tot = total(v);
        let ins: Vec<f64> = results
            .iter()
            .filter(|(x, _)| *x == v)
            .map(|(_, t)| t.insert.as_secs_f64())
            .collect();
        let upd: Vec<f64> = results
            .iter()
            .filter(|(x, _)| *x == v)
            .map(|(_, t)| t.update.as_secs_f64())
            .collect();
        let (m, lo, hi) = median(tot);
        println!(
            "| {backend} | {driven} | {} | {:.2} | {:.2} | {m:.2} ({lo:.2}–{hi:.2}) | {:.2}× |",
            v.name(),
            median(ins).0,
            median(upd).0,
            m / base
        );
        ratios.push((v, m / base));
    }
    ratios
}

/// The summary line of the trigger cost (client-driven, the measure).
fn summarize(backend: &str, ratios: &[(Variant, f64)], limit: f64) {
    let ratio = |v| ratios.iter().find(|(x, _)| *x == v).map(|(_, r)| *r);
    let Some(ours) = ratio(Variant::PullArea) else {
        return;
    };
    let peer = ratio(Variant::Floor);
    Summary {
        figure: format!("trigger cost on {backend} branch transactions (× no trigger)"),
        ours: format!("{ours:.2}×"),
        peer: peer
            .map(|p| format!("{p:.2}× (minimal row-to-JSON trigger)"))
            .unwrap_or_else(|| "—".into()),
        ratio: peer
            .map(|p| format!("{:.2}×", ours / p))
            .unwrap_or_else(|| "—".into()),
        target: format!("≤ {limit:.1}×"),
        met: met(ours <= limit),
    }
    .print();
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    println!(
        "bench-capture: {} inserts then {} updates, {} rows per transaction, {} repetitions",
        args.rows, args.rows, args.txn, args.reps
    );
    println!("| branch DB | driven by | variant | inserts s | updates s | total s, median (min–max) | vs no trigger |");
    println!("|---|---|---|---|---|---|---|");
    let modes: &[bool] = match args.mode.as_str() {
        "client" => &[false],
        "server" => &[true],
        _ => &[false, true],
    };
    let mut summaries = Vec::new();
    for &server in modes {
        let driven = if server { "server" } else { "client" };
        if args.only.as_deref() != Some("sqlite") {
            let variants = [Variant::None, Variant::Floor, Variant::PullArea];
            let mut results = Vec::new();
            for _ in 0..args.reps {
                for v in variants {
                    let t = run_pg(&args, v, server)
                        .await
                        .with_context(|| format!("postgres {v:?}"))?;
                    results.push((v, t));
                }
            }
            let r = report("PostgreSQL", driven, &variants, &results);
            if !server {
                summaries.push(("PostgreSQL", r, 1.4));
            }
        }
        if args.only.as_deref() != Some("postgres") {
            let variants = [Variant::None, Variant::PullArea];
            let mut results = Vec::new();
            for _ in 0..args.reps {
                for v in variants {
                    let t = run_sqlite(&args, v, server)
                        .await
                        .with_context(|| format!("sqlite {v:?}"))?;
                    results.push((v, t));
                }
            }
            let r = report("SQLite", driven, &variants, &results);
            if !server {
                summaries.push(("SQLite", r, 1.5));
            }
        }
    }
    for (backend, ratios, limit) in &summaries {
        summarize(backend, ratios, *limit);
    }
    println!(
        "reproduce: cargo run --release -p tests --bin bench-capture -- --rows {} --txn {} --reps {} --mode {}",
        args.rows, args.txn, args.reps, args.mode
    );
    Ok(())
}
