//! Initial load, resync and verify across real processes (issue 6).
//!
//! - a branch that already holds rows when the system is installed is loaded by snapshot
//!   pages while the workload keeps writing, then streams from the snapshot's start:
//!   HQ equals the branch (oracle and `hq-puller verify`), SQLite and PostgreSQL;
//! - verify names a changed, a missing and an extra row (HQ tampered directly), exits 1,
//!   and 0 once a resync repaired HQ;
//! - a branch restored from an older backup and a branch database replaced by another
//!   location's are detected (`needs_resync` with the reason), nothing is merged, and
//!   `hq-puller resync` makes HQ equal again while a reader never sees a half-switched
//!   location;
//! - `kill -9` of hq-puller during an initial load: the load resumes from its last page;
//! - a page whose commit HQ's database lost after acknowledging it is loaded again.

use super::*;
use tests::process::binary;

/// Runs `hq-puller ARGS --config ...` to its end: (exit code, stdout, stderr).
async fn hq_exec(hq: &Hq, args: &[&str]) -> Result<(i32, String, String)> {
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(binary("hq-puller")?)
            .args(args)
            .arg("--config")
            .arg(&hq.config)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("hq-puller did not finish within 120 s")??;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    ))
}

/// Sets HQ's `snapshot_page_rows` (small pages: a load spans many pages).
fn set_page_rows(hq: &Hq, rows: u32) -> Result<()> {
    let text = std::fs::read_to_string(&hq.config)?;
    std::fs::write(&hq.config, format!("snapshot_page_rows = {rows}\n{text}"))?;
    Ok(())
}

/// Branches whose databases hold `products` products (about 3 rows each) BEFORE the
/// pull area is installed; listeners serving; HQ migrated but not started.
async fn preloaded(
    sqlite: usize,
    postgres: usize,
    products: u64,
    zones: &[&str],
    page_rows: u32,
) -> Result<World> {
    let dir = tempfile::tempdir()?;
    let mut branches = Vec::new();
    let mut sims = Vec::new();
    for i in 0..sqlite + postgres {
        let location = format!("b{:02}", i + 1);
        let url = if i < sqlite {
            format!(
                "sqlite://{}",
                dir.path().join(format!("{location}.db")).display()
            )
        } else {
            tests::pg::fresh_database(&format!("branch_{location}")).await?
        };
        let opts = BranchOptions {
            time_zone: zones[i % zones.len()].to_string(),
            ..BranchOptions::default()
        };
        let b = BranchNode::new(dir.path(), &location, &url, &opts)?;
        // The application's data first (no capture yet), then install.
        let sim = Branch::open(i, &url, Some(b.files_dir.clone()), 3).await?;
        workload::seed(&sim, products, 42, &Counters::default()).await?;
        b.install(true).await?;
        sims.push(Arc::new(sim));
        branches.push(b);
    }
    futures::future::try_join_all(branches.iter_mut().map(|b| b.start())).await?;
    let hq_url = tests::pg::fresh_database("hq").await?;
    let refs: Vec<&BranchNode> = branches.iter().collect();
    let hq = Hq::new(dir.path(), &hq_url, &HqOptions::default(), &refs).await?;
    set_page_rows(&hq, page_rows)?;
    hq.migrate().await?;
    Ok(World {
        branches,
        sims,
        hq,
        _dir: TestDir(Some(dir)),
    })
}

async fn live_count(hq: &Hq, table: &str, location: &str) -> Result<i64> {
    Ok(sqlx::query_scalar(&format!(
        "SELECT count(*) FROM hq.\"{table}_live\" WHERE location_id = $1"
    ))
    .bind(location)
    .fetch_one(&hq.pool)
    .await?)
}

async fn verify_equal(hq: &Hq) -> Result<()> {
    let (code, out, err) = hq_exec(hq, &["verify", "--all", "--settle", "30s"]).await?;
    if code != 0 {
        bail!("verify --all exited {code}:\n{out}\n{err}");
    }
    assert!(out.contains("locations equal"), "{out}");
    Ok(())
}

/// A SQLite branch (Berlin time) and a PostgreSQL branch with about 15,000 rows each
/// from before the install, loaded in pages of 1,000 rows while two writers per branch
/// keep changing them: HQ ends equal (oracle, and verify exits 0), rows changed after
/// the snapshot carry their sequence, and the load was recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_load_of_populated_branches_under_writers_ends_equal() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let mut w = preloaded(1, 1, 5_000, &["Europe/Berlin", "UTC"], 1_000).await?;
    let before: Vec<i64> = {
        let mut v = Vec::new();
        for b in &w.branches {
            let db = tests::db::Db::connect(&b.database_url, 1).await?;
            v.push(
                db.fetch_opt_i64("SELECT count(*) FROM products", &[])
                    .await?
                    .unwrap_or(0),
            );
            db.close().await;
        }
        v
    };
    assert!(before.iter().all(|n| *n == 5_000), "{before:?}");
    let writers = start_writers_with(
        &w.sims,
        150.0,
        Until::Duration(Duration::from_secs(600)),
        11,
        2,
    );
    w.hq.start()?;
    let hq = &w.hq;
    wait_for("both loads to finish", Duration::from_secs(120), || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM sync.locations WHERE cursor IS NOT NULL AND snapshot_cursor IS NOT NULL",
        )
        .fetch_one(&hq.pool)
        .await?;
        Ok((n == 2).then_some(()))
    })
    .await
    .with_context(|| w.hq.log_tail(30))?;
    let summary = writers.finish().await?;
    assert!(summary.transactions > 20, "{summary:?}");
    w.wait_caught_up(Duration::from_secs(120)).await?;
    for b in w.refs() {
        let r = w.hq.compare(b).await?;
        assert!(r.is_equal(), "{r}");
        assert!(live_count(&w.hq, "products", &b.location).await? >= 5_000);
    }
    w.assert_newest_changes_applied().await?;
    let loads: i64 = sqlx::query_scalar("SELECT count(*) FROM sync.loads")
        .fetch_one(&w.hq.pool)
        .await?;
    assert_eq!(loads, 0, "finished loads leave no progress row");
    verify_equal(&w.hq).await?;
    w.shutdown().await
}

/// verify on a caught-up SQLite branch whose HQ copy was tampered with: a changed price,
/// a deleted inventory row, an extra stock movement. It names each key and column and
/// exits 1 (text and `--json`); `resync` repairs HQ (the extra row is removed) and
/// verify exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_names_changed_missing_and_extra_rows_and_resync_repairs() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let mut w = world(Layout {
        sqlite: 1,
        postgres: 0,
        products: 300,
        zones: vec!["America/New_York"],
        hq: HqOptions::default(),
    })
    .await?;
    w.wait_caught_up(Duration::from_secs(60)).await?;
    verify_equal(&w.hq).await?;
    let (p1, p2): (i64, i64) = sqlx::query_as(
        "SELECT min(product_id), max(product_id) FROM hq.products_live WHERE location_id = 'b01'",
    )
    .fetch_one(&w.hq.pool)
    .await?;
    for s in [
        format!("UPDATE hq.products SET unit_price = unit_price + 0.01 WHERE location_id = 'b01' AND product_id = {p1}"),
        format!("DELETE FROM hq.inventory WHERE location_id = 'b01' AND product_id = {p2}"),
        "INSERT INTO hq.stock_movements (location_id, movement_id, product_id, quantity_delta, reason, moved_at, _seq) \
         VALUES ('b01', 999999, 1, 1, 'x', now(), 1)".to_string(),
    ] {
        sqlx::query(&s).execute(&w.hq.pool).await?;
    }
    // Chunks of 100 rows: the differences sit in a few chunks among many equal ones.
    let (code, out, err) = hq_exec(
        &w.hq,
        &["verify", "b01", "--settle", "5s", "--chunk-rows", "100"],
    )
    .await?;
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(
        out.contains(&format!("changed product_id={p1}: unit_price")),
        "{out}"
    );
    assert!(
        out.contains(&format!("missing at HQ: product_id={p2}")),
        "{out}"
    );
    assert!(out.contains("extra at HQ: movement_id=999999"), "{out}");
    assert!(out.contains("0 of 1 locations equal"), "{out}");

    let (code, out, _) = hq_exec(&w.hq, &["verify", "b01", "--json", "--settle", "5s"]).await?;
    assert_eq!(code, 1);
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let tables = v[0]["tables"].as_array().context("tables")?;
    let t = |n: &str| tables.iter().find(|t| t["table"] == n).cloned().unwrap();
    assert_eq!(v[0]["equal"], false);
    assert_eq!(t("products")["changed"].as_array().unwrap().len(), 1);
    assert_eq!(
        t("inventory")["missing_at_hq"],
        serde_json::json!([format!("product_id={p2}")])
    );
    assert_eq!(
        t("stock_movements")["extra_at_hq"],
        serde_json::json!(["movement_id=999999"])
    );
    assert!(t("product_images")["changed"]
        .as_array()
        .unwrap()
        .is_empty());

    let (code, out, err) = hq_exec(&w.hq, &["resync", "b01"]).await?;
    assert_eq!(code, 0, "{out}\n{err}");
    let extra: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM hq.stock_movements WHERE location_id = 'b01' AND movement_id = 999999",
    )
    .fetch_one(&w.hq.pool)
    .await?;
    assert_eq!(extra, 0, "resync removes rows absent at the branch");
    verify_equal(&w.hq).await?;
    w.shutdown().await
}

/// Replaces a stopped branch's SQLite database file by `from` (WAL files removed).
fn replace_db(b: &BranchNode, from: &std::path::Path) -> Result<()> {
    let path = b
        .database_url
        .strip_prefix("sqlite://")
        .context("a SQLite branch")?;
    for ext in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{path}{ext}"));
    }
    std::fs::copy(from, path)?;
    Ok(())
}

/// b01 is restored from an older backup, b02's database is replaced by a copy of b01's:
/// both end in `needs_resync` with the reason (status and `sync.runs`), their cursors
/// and rows stay as they were (nothing merged); `resync` of each ends equal, and a reader
/// polling counts during b01's resync only ever sees the old or the new location.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restored_and_foreign_branch_databases_are_detected_and_resynced() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let mut w = world(Layout {
        sqlite: 2,
        postgres: 0,
        products: 300,
        zones: vec!["UTC", "Europe/Paris"],
        hq: HqOptions::default(),
    })
    .await?;
    w.wait_caught_up(Duration::from_secs(60)).await?;
    let backup = w._dir.0.as_ref().unwrap().path().join("b01-backup.db");
    w.sims[0]
        .db
        .batch(&[format!("VACUUM INTO '{}'", backup.display())])
        .await?;
    // Life goes on after the backup: new products, deletes, price changes.
    let writers = start_writers_with(&w.sims, 200.0, Until::Ops(300), 5, 1);
    writers.wait().await?;
    w.wait_caught_up(Duration::from_secs(60)).await?;
    let cursors = (w.hq.cursor("b01").await?, w.hq.cursor("b02").await?);
    let counts = (
        live_count(&w.hq, "products", "b01").await?,
        live_count(&w.hq, "products", "b02").await?,
    );

    for s in &w.sims {
        s.db.close().await;
    }
    for b in &mut w.branches {
        b.stop().await?;
    }
    replace_db(&w.branches[0], &backup)?;
    replace_db(&w.branches[1], &backup)?;
    for b in &mut w.branches {
        b.start().await?;
    }
    let hq = &w.hq;
    wait_for(
        "both locations to need a resync",
        Duration::from_secs(60),
        || async {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM sync.locations WHERE state = 'needs_resync'",
            )
            .fetch_one(&hq.pool)
            .await?;
            Ok((n == 2).then_some(()))
        },
    )
    .await
    .with_context(|| w.hq.log_tail(30))?;
    let status = w.hq.status_json().await?;
    let reason = |id: &str| -> String {
        status
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["id"] == id)
            .map(|l| l["paused_reason"].as_str().unwrap_or("").to_string())
            .unwrap_or_default()
    };
    assert!(reason("b01").contains("restored or replaced"), "{status}");
    assert!(reason("b02").contains("instance mismatch"), "{status}");
    for id in ["b01", "b02"] {
        let (outcome, error): (String, Option<String>) = sqlx::query_as(
            "SELECT outcome, error FROM sync.runs WHERE location_id = $1 AND outcome <> 'running' \
             ORDER BY run_id DESC LIMIT 1",
        )
        .bind(id)
        .fetch_one(&w.hq.pool)
        .await?;
        assert_eq!(outcome, "needs_resync");
        assert!(error.unwrap_or_default().contains("mismatch"));
    }
    // Nothing merged.
    assert_eq!(
        (w.hq.cursor("b01").await?, w.hq.cursor("b02").await?),
        cursors
    );
    assert_eq!(
        (
            live_count(&w.hq, "products", "b01").await?,
            live_count(&w.hq, "products", "b02").await?
        ),
        counts
    );
    assert!(!w.hq.compare(&w.branches[0]).await?.is_equal());

    // Resync b01 while a reader polls its counts (one statement, one snapshot).
    let old: (i64, i64) = (
        live_count(&w.hq, "products", "b01").await?,
        live_count(&w.hq, "inventory", "b01").await?,
    );
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let pool = w.hq.pool.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut seen = std::collections::BTreeSet::new();
            while !stop.load(Ordering::Relaxed) {
                let pair: (i64, i64) = sqlx::query_as(
                    "SELECT (SELECT count(*) FROM hq.products_live WHERE location_id = 'b01'), \
                            (SELECT count(*) FROM hq.inventory_live WHERE location_id = 'b01')",
                )
                .fetch_one(&pool)
                .await?;
                seen.insert(pair);
            }
            anyhow::Ok(seen)
        })
    };
    let (code, out, err) = hq_exec(&w.hq, &["resync", "b01"]).await?;
    assert_eq!(code, 0, "{out}\n{err}");
    stop.store(true, Ordering::Relaxed);
    let seen = reader.await??;
    let branch = tests::db::Db::connect(&w.branches[0].database_url, 1).await?;
    let p = branch
        .fetch_opt_i64("SELECT count(*) FROM products", &[])
        .await?
        .unwrap_or(0);
    let i = branch
        .fetch_opt_i64("SELECT count(*) FROM inventory", &[])
        .await?
        .unwrap_or(0);
    branch.close().await;
    assert!(
        seen.iter().all(|s| *s == old || *s == (p, i)),
        "a reader saw a half-resynced location: {seen:?} (before {old:?}, after {:?})",
        (p, i)
    );
    assert!(seen.contains(&(p, i)));

    let (code, out, err) = hq_exec(&w.hq, &["resync", "b02"]).await?;
    assert_eq!(code, 0, "{out}\n{err}");
    w.wait_caught_up(Duration::from_secs(60)).await?;
    verify_equal(&w.hq).await?;
    let runs: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM sync.runs WHERE outcome = 'ok' AND cursor_after IS NOT NULL \
         AND location_id IN ('b01', 'b02') AND changes > 0 AND batches = 0",
    )
    .fetch_one(&w.hq.pool)
    .await?;
    assert!(runs >= 2, "each resync is recorded in sync.runs");
    w.shutdown().await
}

/// hq-puller is killed with SIGKILL in the middle of an initial load (pages of 500 rows):
/// the progress row survives, the restarted puller resumes from it (not from scratch)
/// and HQ ends equal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_initial_load_resumes_and_ends_equal() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let mut w = preloaded(1, 0, 8_000, &["UTC"], 500).await?;
    w.hq.start()?;
    let hq = &w.hq;
    wait_for(
        "the load to pass 3,000 rows",
        Duration::from_secs(60),
        || async {
            let n: Option<i64> =
                sqlx::query_scalar("SELECT rows_loaded FROM sync.loads WHERE location_id = 'b01'")
                    .fetch_optional(&hq.pool)
                    .await?;
            Ok(n.filter(|n| *n >= 3_000).map(|_| ()))
        },
    )
    .await?;
    w.hq.kill9()?;
    let (state, loaded): (String, Option<i64>) = sqlx::query_as(
        "SELECT l.state, (SELECT rows_loaded FROM sync.loads WHERE location_id = l.id) \
         FROM sync.locations l WHERE l.id = 'b01'",
    )
    .fetch_one(&w.hq.pool)
    .await?;
    assert_eq!(state, "loading");
    let loaded = loaded.context("the load finished before the kill: no progress row")?;
    assert!(loaded >= 3_000);
    w.hq.start()?;
    w.wait_caught_up(Duration::from_secs(90)).await?;
    assert!(
        w.hq.log_tail(400).contains("resuming initial load"),
        "{}",
        w.hq.log_tail(40)
    );
    verify_equal(&w.hq).await?;
    w.shutdown().await
}

/// HQ's database loses the commit of the first `products` page after acknowledging it
/// (what a crash does to a server with `synchronous_commit = off`: a suffix of the
/// acknowledged commits is gone). Simulated by a trigger on `sync.loads` that, in that
/// page's transaction, removes the page's rows and keeps the old progress. The next
/// page's compare-and-set on the progress finds the old position, the load resumes from
/// what is stored, and the lost page is loaded again: HQ ends equal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_page_whose_commit_hq_lost_is_loaded_again() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let mut w = preloaded(1, 0, 2_000, &["UTC"], 500).await?;
    for stmt in [
        "CREATE TABLE public.lost_once (at timestamptz NOT NULL DEFAULT now())",
        "CREATE FUNCTION public.lose_first_products_page() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN \
           IF OLD.table_name IS NULL AND NEW.table_name = 'products' \
              AND NOT EXISTS (SELECT 1 FROM public.lost_once) THEN \
             INSERT INTO public.lost_once DEFAULT VALUES; \
             EXECUTE format('DELETE FROM hq_load.%I', 'products@' || NEW.location_id); \
             RETURN OLD; \
           END IF; \
           RETURN NEW; \
         END $$",
        "CREATE TRIGGER lose_first_products_page BEFORE UPDATE ON sync.loads \
         FOR EACH ROW EXECUTE FUNCTION public.lose_first_products_page()",
    ] {
        sqlx::query(stmt).execute(&w.hq.pool).await?;
    }
    w.hq.start()?;
    w.wait_caught_up(Duration::from_secs(90)).await?;
    let lost: i64 = sqlx::query_scalar("SELECT count(*) FROM public.lost_once")
        .fetch_one(&w.hq.pool)
        .await?;
    assert_eq!(lost, 1, "the trigger did not fire: the test lost its fault");
    assert!(
        w.hq.log_tail(400)
            .contains("is not where this process left it"),
        "{}",
        w.hq.log_tail(40)
    );
    for b in w.refs() {
        let r = w.hq.compare(b).await?;
        assert!(r.is_equal(), "{r}");
    }
    assert_eq!(live_count(&w.hq, "products", "b01").await?, 2_000);
    verify_equal(&w.hq).await?;
    w.shutdown().await
}

/// `auto_resync = true`: a branch restored from an older backup is detected and the
/// service resyncs it by itself; HQ ends equal to the restored branch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_resync_repairs_a_restored_branch_without_an_operator() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let mut w = world(Layout {
        sqlite: 1,
        postgres: 0,
        products: 200,
        zones: vec!["UTC"],
        hq: HqOptions::default(),
    })
    .await?;
    w.wait_caught_up(Duration::from_secs(60)).await?;
    w.hq.stop().await?;
    // The last `[[locations]]` table is b01's.
    let text = std::fs::read_to_string(&w.hq.config)?;
    std::fs::write(&w.hq.config, format!("{text}auto_resync = true\n"))?;
    w.hq.start()?;
    let backup = w._dir.0.as_ref().unwrap().path().join("b01-backup.db");
    w.sims[0]
        .db
        .batch(&[format!("VACUUM INTO '{}'", backup.display())])
        .await?;
    start_writers_with(&w.sims, 200.0, Until::Ops(200), 9, 1)
        .wait()
        .await?;
    w.wait_caught_up(Duration::from_secs(60)).await?;
    w.sims[0].db.close().await;
    w.branches[0].stop().await?;
    replace_db(&w.branches[0], &backup)?;
    w.branches[0].start().await?;
    let hq = &w.hq;
    // The reset is recorded (a `needs_resync` run), then the service's own resync run
    // (no batches, the snapshot's rows) switches the location back to `ok`.
    wait_for("the automatic resync", Duration::from_secs(60), || async {
        let done: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM sync.locations l WHERE l.id = 'b01' AND l.state = 'ok' \
             AND EXISTS (SELECT 1 FROM sync.runs r WHERE r.location_id = 'b01' AND r.outcome = 'ok' \
                 AND r.batches = 0 AND r.changes > 0 AND r.run_id > \
                 (SELECT max(run_id) FROM sync.runs WHERE location_id = 'b01' AND outcome = 'needs_resync'))",
        )
        .fetch_one(&hq.pool)
        .await?;
        Ok((done == 1).then_some(()))
    })
    .await
    .with_context(|| w.hq.log_tail(30))?;
    w.wait_caught_up(Duration::from_secs(60)).await?;
    verify_equal(&w.hq).await?;
    w.shutdown().await
}
