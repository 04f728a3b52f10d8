//! End-to-end tests: real `branch-listener` and `hq-puller` processes, real HTTP, a real
//! PostgreSQL for HQ (and one PostgreSQL branch), real SQLite branch files, and the
//! product-management workload writing while HQ pulls on its cron schedule. The oracle
//! (`tests::compare`) checks at the end that HQ holds exactly what every branch holds.
//!
//! The binaries must be built first (`cargo build --workspace --bins`; `tests/run.sh`
//! does it). The tests run one at a time (they share two CPU cores with everything else).

use anyhow::{bail, Context, Result};
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tests::fleet::{BranchNode, BranchOptions, Hq, HqOptions};
use tests::process::wait_for;
use tests::workload::{self, Branch, Counters, Mix, RunOptions, Summary, Until};
use tokio::sync::Mutex;

/// One end-to-end test at a time.
static SERIAL: Mutex<()> = Mutex::const_new(());

/// A test installation: branches with listeners, HQ with hq-puller, the workload's
/// handles on the branch databases.
struct World {
    branches: Vec<BranchNode>,
    sims: Vec<Arc<Branch>>,
    hq: Hq,
    /// Dropped last: the processes above are killed before their folder goes.
    _dir: TestDir,
}

/// The test's folder (configs, logs, SQLite files); kept when `E2E_KEEP=1` is set.
struct TestDir(Option<tempfile::TempDir>);

impl Drop for TestDir {
    fn drop(&mut self) {
        if let Some(d) = self.0.take() {
            if std::env::var_os("E2E_KEEP").is_some_and(|v| v == "1") {
                eprintln!("e2e: kept {}", d.keep().display());
            }
        }
    }
}

/// Which databases the branches use.
struct Layout {
    sqlite: usize,
    postgres: usize,
    products: u64,
    zones: Vec<&'static str>,
    hq: HqOptions,
}

async fn world(layout: Layout) -> Result<World> {
    let dir = tempfile::tempdir()?;
    let total = layout.sqlite + layout.postgres;
    let mut branches = Vec::with_capacity(total);
    for i in 0..total {
        let location = format!("b{:02}", i + 1);
        let url = if i < layout.sqlite {
            format!(
                "sqlite://{}",
                dir.path().join(format!("{location}.db")).display()
            )
        } else {
            tests::pg::fresh_database(&format!("branch_{location}")).await?
        };
        let opts = BranchOptions {
            time_zone: layout
                .zones
                .get(i % layout.zones.len().max(1))
                .unwrap_or(&"UTC")
                .to_string(),
            ..BranchOptions::default()
        };
        branches.push(BranchNode::new(dir.path(), &location, &url, &opts)?);
    }
    // Install (with the demo schema), then seed through the capture triggers, then serve.
    futures::future::try_join_all(branches.iter().map(|b| b.install(true))).await?;
    let mut sims = Vec::with_capacity(total);
    for (i, b) in branches.iter().enumerate() {
        let sim = Branch::open(i, &b.database_url, Some(b.files_dir.clone()), 3).await?;
        workload::seed(&sim, layout.products, 42, &Counters::default()).await?;
        sims.push(Arc::new(sim));
    }
    futures::future::try_join_all(branches.iter_mut().map(|b| b.start())).await?;
    let hq_url = tests::pg::fresh_database("hq").await?;
    let refs: Vec<&BranchNode> = branches.iter().collect();
    let mut hq = Hq::new(dir.path(), &hq_url, &layout.hq, &refs).await?;
    hq.migrate().await?;
    hq.start()?;
    Ok(World {
        branches,
        sims,
        hq,
        _dir: TestDir(Some(dir)),
    })
}

/// The workload running in the background until stopped.
struct Writers {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Result<Summary>>,
}

fn start_writers(sims: &[Arc<Branch>], rate: f64, until: Until, seed: u64) -> Writers {
    start_writers_with(sims, rate, until, seed, 1)
}

/// The workload with `concurrency` writers per branch (concurrent transactions commit
/// out of sequence order on PostgreSQL branches).
fn start_writers_with(
    sims: &[Arc<Branch>],
    rate: f64,
    until: Until,
    seed: u64,
    concurrency: usize,
) -> Writers {
    let stop = Arc::new(AtomicBool::new(false));
    let opts = RunOptions {
        rate: Some(rate),
        until,
        concurrency,
        seed,
        mix: Mix::default(),
    };
    let sims = sims.to_vec();
    let s = stop.clone();
    let task =
        tokio::spawn(
            async move { workload::run(&sims, &opts, Arc::new(Counters::default()), s).await },
        );
    Writers { stop, task }
}

impl Writers {
    /// Stops the workload now and returns its summary.
    async fn finish(self) -> Result<Summary> {
        self.stop.store(true, Ordering::Relaxed);
        self.wait().await
    }

    /// Waits until the workload ends by itself (its duration or operation count).
    async fn wait(self) -> Result<Summary> {
        let s = self.task.await??;
        if s.errors > 0 {
            bail!("the workload had {} failed operations: {s:?}", s.errors);
        }
        Ok(s)
    }
}

impl World {
    fn refs(&self) -> Vec<&BranchNode> {
        self.branches.iter().collect()
    }

    async fn wait_caught_up(&mut self, timeout: Duration) -> Result<()> {
        let refs: Vec<&BranchNode> = self.branches.iter().collect();
        self.hq.wait_caught_up(&refs, timeout).await
    }

    /// Every key ever changed at a SQLite branch carries, at HQ, the sequence of its
    /// newest change (live rows and tombstones alike): no older change won, no change
    /// was lost, deletes stayed deleted.
    async fn assert_newest_changes_applied(&self) -> Result<()> {
        let cat = schemas::Catalogue::product_management();
        for b in &self.branches {
            if !b.database_url.starts_with("sqlite:") {
                continue;
            }
            let mut c =
                <sqlx::SqliteConnection as sqlx::Connection>::connect(&b.database_url).await?;
            let rows: Vec<(String, String, i64)> =
                sqlx::query_as("SELECT tbl, pk, max(seq) FROM _pull_changes GROUP BY tbl, pk")
                    .fetch_all(&mut c)
                    .await?;
            let mut newest: HashMap<(String, i64), i64> = HashMap::new();
            // File events: the newest per path is what sync.files records.
            let mut newest_files: HashMap<String, i64> = HashMap::new();
            for (tbl, pk, seq) in rows {
                if tbl == schemas::files::FILES_TABLE {
                    let k: schemas::files::FileKey = serde_json::from_str(&pk)?;
                    newest_files.insert(k.path, seq);
                    continue;
                }
                let t = cat.table(&tbl).context("unknown table in the pull area")?;
                let v: serde_json::Value = serde_json::from_str(&pk)?;
                let id = v[&t.primary_key[0]].as_i64().context("integer key")?;
                newest.insert((tbl, id), seq);
            }
            // Keys whose newest change precedes the initial load's snapshot (T0) were
            // loaded from it (`_seq = 0`, deleted ones absent): the oracle covers them.
            let t0: Option<String> =
                sqlx::query_scalar("SELECT snapshot_cursor FROM sync.locations WHERE id = $1")
                    .bind(&b.location)
                    .fetch_one(&self.hq.pool)
                    .await?;
            let base: i64 = match t0 {
                Some(t0) => {
                    let t0: schemas::Cursor = t0.parse()?;
                    sqlx::query_scalar("SELECT head_seq FROM _pull_ticks WHERE tick_id = ?1")
                        .bind(t0.tick)
                        .fetch_optional(&mut c)
                        .await?
                        .unwrap_or(0)
                }
                None => 0,
            };
            newest.retain(|_, s| *s > base);
            let mut at_hq: HashMap<(String, i64), i64> = HashMap::new();
            for t in &cat.tables {
                let rows: Vec<(i64, i64)> = sqlx::query_as(&format!(
                    "SELECT \"{}\", _seq FROM hq.\"{}\" WHERE location_id = $1",
                    t.primary_key[0], t.name
                ))
                .bind(&b.location)
                .fetch_all(&self.hq.pool)
                .await?;
                for (id, seq) in rows.into_iter().filter(|(_, s)| *s > 0) {
                    at_hq.insert((t.name.clone(), id), seq);
                }
            }
            let wrong: Vec<String> = newest
                .iter()
                .filter(|(k, s)| at_hq.get(*k) != Some(*s))
                .take(10)
                .map(|(k, s)| format!("{}:{} branch seq {s}, HQ {:?}", k.0, k.1, at_hq.get(k)))
                .collect();
            if !wrong.is_empty() || newest.len() != at_hq.len() {
                bail!(
                    "{}: {} keys changed at the branch, {} at HQ; wrong sequences: {wrong:?}",
                    b.location,
                    newest.len(),
                    at_hq.len()
                );
            }
            // The watcher may index a file after HQ caught up: only events up to HQ's
            // cursor are expected at HQ.
            let cursor = self.hq.cursor(&b.location).await?.context("HQ cursor")?;
            let head_seq: i64 =
                sqlx::query_scalar("SELECT head_seq FROM _pull_ticks WHERE tick_id = ?1")
                    .bind(cursor.tick)
                    .fetch_one(&mut c)
                    .await?;
            // A path with an event after HQ's cursor is still in flight: HQ holds one of its
            // earlier versions (or none); leave it out on both sides.
            let in_flight: std::collections::HashSet<String> = newest_files
                .iter()
                .filter(|(_, s)| **s > head_seq)
                .map(|(p, _)| p.clone())
                .collect();
            newest_files.retain(|_, s| *s <= head_seq);
            // Paths whose newest event precedes T0 came with the snapshot's `_files`
            // pages: recorded with `_seq = 0` when indexed at the branch, absent if deleted.
            let indexed: std::collections::HashSet<String> =
                sqlx::query_scalar("SELECT path FROM _pull_files")
                    .fetch_all(&mut c)
                    .await?
                    .into_iter()
                    .collect();
            newest_files.retain(|p, s| *s > base || indexed.contains(p));
            for (_, s) in newest_files.iter_mut().filter(|(_, s)| **s <= base) {
                *s = 0;
            }
            let files_at_hq: HashMap<String, i64> =
                sqlx::query_as("SELECT path, _seq FROM sync.files WHERE location_id = $1")
                    .bind(&b.location)
                    .fetch_all(&self.hq.pool)
                    .await?
                    .into_iter()
                    .filter(|(p, _)| !in_flight.contains(p))
                    .collect();
            if files_at_hq != newest_files {
                let wrong: Vec<String> = newest_files
                    .iter()
                    .filter(|(p, s)| files_at_hq.get(*p) != Some(*s))
                    .take(10)
                    .map(|(p, s)| format!("{p}: branch seq {s}, HQ {:?}", files_at_hq.get(p)))
                    .collect();
                bail!(
                    "{}: {} paths changed at the branch, {} in sync.files; wrong: {wrong:?}",
                    b.location,
                    newest_files.len(),
                    files_at_hq.len()
                );
            }
        }
        Ok(())
    }

    async fn shutdown(mut self) -> Result<()> {
        self.hq.stop().await?;
        for b in &mut self.branches {
            b.stop().await?;
        }
        Ok(())
    }
}

/// Sum of `sync.locations.applied_changes` (grows while hq-puller applies).
async fn applied(hq: &Hq) -> Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT COALESCE(sum(applied_changes), 0)::bigint FROM sync.locations")
            .fetch_one(&hq.pool)
            .await?,
    )
}

fn tick_of(c: &Option<schemas::Cursor>) -> i64 {
    c.map(|c| c.tick).unwrap_or(0)
}

/// 2 SQLite branches (in different zones) and 1 PostgreSQL branch, HQ pulling every
/// second while the workload writes for 10 s: afterwards HQ equals every branch, row by
/// row, and `hq-puller status --json` reports every location.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_sqlite_and_postgres_branches_converge() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let mut w = world(Layout {
        sqlite: 2,
        postgres: 1,
        products: 200,
        zones: vec!["Europe/Berlin", "America/New_York", "UTC"],
        hq: HqOptions::default(),
    })
    .await?;
    let writers = start_writers_with(
        &w.sims,
        60.0,
        Until::Duration(Duration::from_secs(10)),
        1,
        3,
    );
    let summary = writers.wait().await?;
    assert!(summary.transactions > 200, "{summary:?}");
    w.wait_caught_up(Duration::from_secs(90)).await?;
    for b in w.refs() {
        let r = w.hq.compare(b).await?;
        assert!(r.is_equal(), "{r}");
        assert!(r.total_rows() > 0);
    }
    w.assert_newest_changes_applied().await?;
    let status = w.hq.status_json().await?;
    let rows = status.as_array().context("status --json is an array")?;
    assert_eq!(rows.len(), w.branches.len(), "{status}");
    for b in w.refs() {
        let row = rows
            .iter()
            .find(|r| r["id"] == b.location.as_str())
            .with_context(|| format!("status --json lacks {}: {status}", b.location))?;
        assert_eq!(row["state"], "ok", "{row}");
        assert!(row["applied_changes"].as_i64().unwrap_or(0) > 0, "{row}");
    }
    w.shutdown().await
}

/// THE end-to-end test of the issue: 46 SQLite branches writing concurrently while
/// hq-puller runs on its schedule; at the end HQ equals every branch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_six_branches_write_while_hq_pulls_on_schedule() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let mut w = world(Layout {
        sqlite: 46,
        postgres: 0,
        products: 40,
        zones: vec![
            "UTC",
            "Europe/Berlin",
            "Europe/Lisbon",
            "Asia/Tokyo",
            "America/Chicago",
        ],
        hq: HqOptions {
            schedule: "*/2 * * * * *".into(),
            ..HqOptions::default()
        },
    })
    .await?;
    let writers = start_writers(&w.sims, 120.0, Until::Duration(Duration::from_secs(20)), 46);
    // While they write, HQ makes progress for many locations (not only at the end).
    let hq = &w.hq;
    wait_for(
        "HQ to apply changes of at least 40 locations while branches write",
        Duration::from_secs(60),
        || async {
            let n: i64 =
                sqlx::query_scalar("SELECT count(*) FROM sync.locations WHERE applied_changes > 0")
                    .fetch_one(&hq.pool)
                    .await?;
            Ok((n >= 40).then_some(()))
        },
    )
    .await?;
    let summary = writers.wait().await?;
    assert!(summary.transactions > 500, "{summary:?}");
    w.wait_caught_up(Duration::from_secs(180)).await?;
    w.assert_newest_changes_applied().await?;
    w.shutdown().await
}

/// hq-puller is killed with SIGKILL at random points while it applies, 20 times, while
/// the branches keep writing; after the last restart HQ catches up and equals every
/// branch exactly: every key carries its newest change, nothing lost or doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_hq_puller_during_apply_loses_and_duplicates_nothing() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let mut w = world(Layout {
        sqlite: 3,
        postgres: 1,
        products: 300,
        zones: vec!["UTC", "Europe/Paris"],
        hq: HqOptions {
            // Small batches: a run applies many HQ transactions, so kills land mid-run.
            batch_limit: 40,
            ..HqOptions::default()
        },
    })
    .await?;
    let writers = start_writers_with(
        &w.sims,
        80.0,
        Until::Duration(Duration::from_secs(600)),
        7,
        2,
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut kills = 0;
    while kills < 20 {
        // Half the kills land while a run is open (its `sync.runs` row says `running`),
        // half after a batch was applied (`applied_changes` grew), each after a random
        // extra delay.
        let before = applied(&w.hq).await?;
        let last_run: i64 = sqlx::query_scalar("SELECT COALESCE(max(run_id), 0) FROM sync.runs")
            .fetch_one(&w.hq.pool)
            .await?;
        let hq = &w.hq;
        let (what, extra_ms) = if kills % 2 == 0 {
            ("hq-puller to open a run", 30)
        } else {
            ("hq-puller to apply changes", 400)
        };
        wait_for(what, Duration::from_secs(60), || async {
            Ok(if kills % 2 == 0 {
                let n: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM sync.runs WHERE run_id > $1 AND outcome = 'running'",
                )
                .bind(last_run)
                .fetch_one(&hq.pool)
                .await?;
                (n > 0).then_some(())
            } else {
                (applied(hq).await? > before).then_some(())
            })
        })
        .await
        .with_context(|| format!("after {kills} kills\n{}", w.hq.log_tail(40)))?;
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..extra_ms))).await;
        w.hq.kill9()?;
        kills += 1;
        // Stay down a little so a backlog builds: the next incarnation then applies
        // many small batches, and the next kill lands inside a run.
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..1500))).await;
        w.hq.start()?;
    }
    writers.finish().await?;
    w.wait_caught_up(Duration::from_secs(120)).await?;
    for b in w.refs() {
        let r = w.hq.compare(b).await?;
        assert!(r.is_equal(), "{r}");
    }
    w.assert_newest_changes_applied().await?;
    // The kills did land inside runs (which later incarnations marked interrupted).
    let interrupted: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM sync.runs WHERE outcome IN ('interrupted', 'running')",
    )
    .fetch_one(&w.hq.pool)
    .await?;
    assert!(interrupted > 0, "no kill landed inside a run");
    w.shutdown().await
}

/// One listener killed and one hanging (SIGSTOP): the other branches keep being applied
/// on schedule; the dead one is reported failing; after both come back, HQ catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_or_hanging_listener_delays_only_its_own_location() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let mut w = world(Layout {
        sqlite: 4,
        postgres: 0,
        products: 100,
        zones: vec!["UTC"],
        hq: HqOptions {
            request_timeout: "3s".into(),
            ..HqOptions::default()
        },
    })
    .await?;
    let writers = start_writers(&w.sims, 40.0, Until::Duration(Duration::from_secs(600)), 3);
    // b03 dies, b04 hangs.
    w.branches[2].kill9()?;
    w.branches[3].proc.as_ref().context("b04 runs")?.pause()?;
    // The healthy ones keep advancing: three new ticks applied each.
    let mut marks = Vec::new();
    for b in &w.branches[..2] {
        marks.push(tick_of(&w.hq.cursor(&b.location).await?));
    }
    for (b, mark) in w.branches[..2].iter().zip(&marks) {
        let hq = &w.hq;
        wait_for(
            &format!(
                "HQ to keep applying {} while b03 is down and b04 hangs",
                b.location
            ),
            Duration::from_secs(60),
            || async { Ok((tick_of(&hq.cursor(&b.location).await?) >= mark + 3).then_some(())) },
        )
        .await?;
    }
    let hq = &w.hq;
    wait_for(
        "HQ to report b03 failing",
        Duration::from_secs(60),
        || async {
            Ok(match hq.location_state("b03").await? {
                Some((state, Some(_err))) if state == "failing" => Some(()),
                _ => None,
            })
        },
    )
    .await?;
    // Both come back; the workload stops; everything converges.
    w.branches[3].proc.as_ref().context("b04 runs")?.resume()?;
    w.branches[2].start().await?;
    writers.finish().await?;
    w.wait_caught_up(Duration::from_secs(120)).await?;
    w.assert_newest_changes_applied().await?;
    let state = w.hq.location_state("b03").await?;
    assert_eq!(state.map(|s| s.0).as_deref(), Some("ok"));
    w.shutdown().await
}

/// A PostgreSQL branch transaction that stays open while others commit around it is
/// neither skipped nor applied early: HQ keeps applying the other transactions, does
/// not show the open one, and has it right after it commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_open_postgres_transaction_is_applied_after_it_commits() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let mut w = world(Layout {
        sqlite: 0,
        postgres: 1,
        products: 50,
        zones: vec!["UTC"],
        hq: HqOptions::default(),
    })
    .await?;
    let writers = start_writers_with(
        &w.sims,
        40.0,
        Until::Duration(Duration::from_secs(600)),
        5,
        3,
    );
    // Transaction A: opened now (its xid is older than what follows), committed later.
    let mut a =
        <sqlx::PgConnection as sqlx::Connection>::connect(&w.branches[0].database_url).await?;
    sqlx::query("BEGIN").execute(&mut a).await?;
    sqlx::query(
        "INSERT INTO products (product_id, sku, name, description, category, unit_price, currency, updated_at) \
         VALUES (90000001, 'SKU-LONG-1', 'Long transaction', NULL, '', 12.30, 'EUR', now())",
    )
    .execute(&mut a)
    .await?;
    let mark = tick_of(&w.hq.cursor("b01").await?);
    let hq = &w.hq;
    wait_for(
        "HQ to apply three more windows of other transactions while A is open",
        Duration::from_secs(60),
        || async { Ok((tick_of(&hq.cursor("b01").await?) >= mark + 3).then_some(())) },
    )
    .await?;
    let early: i64 =
        sqlx::query_scalar("SELECT count(*) FROM hq.products WHERE product_id = 90000001")
            .fetch_one(&w.hq.pool)
            .await?;
    assert_eq!(early, 0, "an uncommitted branch transaction reached HQ");
    sqlx::query("COMMIT").execute(&mut a).await?;
    writers.finish().await?;
    w.wait_caught_up(Duration::from_secs(90)).await?;
    let (price, description, category): (String, Option<String>, Option<String>) = sqlx::query_as(
        "SELECT unit_price::text, description, category FROM hq.products_live WHERE product_id = 90000001",
    )
    .fetch_one(&w.hq.pool)
    .await?;
    assert_eq!(price, "12.30");
    assert_eq!(description, None);
    assert_eq!(category.as_deref(), Some(""));
    w.shutdown().await
}

/// Initial load, resync and verify (issue 6).
mod load;
