//! Integration tests of the branch listener against real SQLite files and real
//! PostgreSQL databases (`tests::pg::fresh_database`), through the real HTTP server.

use anyhow::{anyhow, bail, Context, Result};
use branch_listener::db::Db;
use branch_listener::{install, prune, serve, Config};
use schemas::wire::{ChangesResponse, ErrorBody, Op, StatusResponse};
use schemas::{Catalogue, Cursor};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{SqlitePool, SqlitePoolOptions};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "test-token-0123456789abcdef";

#[derive(Clone, Copy, Debug, PartialEq)]
enum Backend {
    Sqlite,
    Pg,
}

/// The application's own connections to the branch database (the writers).
#[derive(Clone)]
enum AppDb {
    Sqlite(SqlitePool),
    Pg(PgPool),
}

impl AppDb {
    async fn exec(&self, sql: &str) -> Result<u64> {
        Ok(match self {
            AppDb::Sqlite(p) => sqlx::query(sql).execute(p).await?.rows_affected(),
            AppDb::Pg(p) => sqlx::query(sql).execute(p).await?.rows_affected(),
        })
    }

    /// Runs `stmts` in one transaction; waits `delay` before committing (or rolling back).
    async fn tx(&self, stmts: &[String], commit: bool, delay: Duration) -> Result<Vec<u64>> {
        let mut out = Vec::new();
        match self {
            AppDb::Sqlite(p) => {
                let mut tx = p.begin_with("BEGIN IMMEDIATE").await?;
                for s in stmts {
                    out.push(sqlx::query(s).execute(&mut *tx).await?.rows_affected());
                }
                tokio::time::sleep(delay).await;
                if commit {
                    tx.commit().await?
                } else {
                    tx.rollback().await?
                }
            }
            AppDb::Pg(p) => {
                let mut tx = p.begin().await?;
                for s in stmts {
                    out.push(sqlx::query(s).execute(&mut *tx).await?.rows_affected());
                }
                tokio::time::sleep(delay).await;
                if commit {
                    tx.commit().await?
                } else {
                    tx.rollback().await?
                }
            }
        }
        Ok(out)
    }

    /// `SELECT key, text` pairs.
    async fn pairs(&self, sql: &str) -> Result<Vec<(i64, Option<String>)>> {
        Ok(match self {
            AppDb::Sqlite(p) => sqlx::query_as(sql).fetch_all(p).await?,
            AppDb::Pg(p) => sqlx::query_as(sql).fetch_all(p).await?,
        })
    }

    async fn strings(&self, sql: &str) -> Result<Vec<String>> {
        Ok(match self {
            AppDb::Sqlite(p) => sqlx::query_scalar(sql).fetch_all(p).await?,
            AppDb::Pg(p) => sqlx::query_scalar(sql).fetch_all(p).await?,
        })
    }
}

struct Branch {
    backend: Backend,
    dir: tempfile::TempDir,
    config: Config,
    db: Db,
    app: AppDb,
    /// PostgreSQL database name (for the unavailability test).
    pg_name: Option<String>,
}

fn write_token(dir: &std::path::Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join("token");
    std::fs::write(&p, format!("{TOKEN}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

/// A fresh branch database, not yet installed.
async fn branch(backend: Backend) -> Result<Branch> {
    let dir = tempfile::tempdir()?;
    let token_file = write_token(dir.path());
    let (url, pg_name) = match backend {
        Backend::Sqlite => (
            format!("sqlite://{}", dir.path().join("pm.db").display()),
            None,
        ),
        Backend::Pg => {
            let url = tests::pg::fresh_database("listener").await?;
            let name = url
                .rsplit('/')
                .next()
                .unwrap()
                .split('?')
                .next()
                .unwrap()
                .to_string();
            (url, Some(name))
        }
    };
    let config = Config {
        listen: "127.0.0.1:0".into(),
        time_zone: "Europe/Berlin".into(),
        prune_interval: Duration::from_secs(3600),
        tick_interval: Duration::from_millis(100),
        max_limit: 1000,
        max_wait: Duration::from_secs(30),
        rate_limit_per_second: 0,
        ..Config::with_defaults("b01", &url, &token_file)?
    };
    let db = Db::connect_lazy(&config, true)?;
    let app = match backend {
        Backend::Sqlite => {
            // Create the file (WAL) through the listener's options, then the app pool.
            let opts = branch_listener::db::sqlite_options(&url, true)?
                .busy_timeout(Duration::from_secs(30));
            AppDb::Sqlite(
                SqlitePoolOptions::new()
                    .max_connections(20)
                    .connect_with(opts)
                    .await?,
            )
        }
        Backend::Pg => AppDb::Pg(
            PgPoolOptions::new()
                .max_connections(24)
                .connect(&url)
                .await?,
        ),
    };
    Ok(Branch {
        backend,
        dir,
        config,
        db,
        app,
        pg_name,
    })
}

/// A branch with the demo schema and the pull area installed.
async fn installed(backend: Backend) -> Result<Branch> {
    let b = branch(backend).await?;
    install::install(&b.db, &Catalogue::product_management(), true).await?;
    Ok(b)
}

struct Server {
    base: String,
    client: reqwest::Client,
    shutdown: CancellationToken,
    handle: tokio::task::JoinHandle<branch_listener::Result<()>>,
}

impl Server {
    async fn start(config: &Config) -> Result<Server> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", listener.local_addr()?);
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(serve::run(config.clone(), listener, shutdown.clone()));
        Ok(Server {
            base,
            client: reqwest::Client::new(),
            shutdown,
            handle,
        })
    }

    async fn get(&self, path: &str, token: Option<&str>) -> Result<(u16, String)> {
        let mut req = self.client.get(format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await?;
        Ok((resp.status().as_u16(), resp.text().await?))
    }

    async fn changes_raw(
        &self,
        after: Option<&Cursor>,
        limit: u32,
        wait: u32,
    ) -> Result<(u16, String)> {
        let mut path = format!("/v1/changes?limit={limit}&wait={wait}");
        if let Some(a) = after {
            path.push_str(&format!("&after={a}"));
        }
        self.get(&path, Some(TOKEN)).await
    }

    async fn changes(
        &self,
        after: Option<&Cursor>,
        limit: u32,
        wait: u32,
    ) -> Result<ChangesResponse> {
        let (status, body) = self.changes_raw(after, limit, wait).await?;
        if status != 200 {
            bail!("GET /v1/changes: {status} {body}");
        }
        Ok(serde_json::from_str(&body)?)
    }

    async fn error(&self, after: Option<&Cursor>) -> Result<(u16, ErrorBody)> {
        let (status, body) = self.changes_raw(after, 100, 0).await?;
        Ok((
            status,
            serde_json::from_str(&body).with_context(|| body.clone())?,
        ))
    }

    async fn stop(self) -> Result<()> {
        self.shutdown.cancel();
        self.handle.await??;
        Ok(())
    }
}

/// Pulls until nothing more is servable; returns the responses.
async fn drain(
    server: &Server,
    after: &mut Option<Cursor>,
    limit: u32,
) -> Result<Vec<ChangesResponse>> {
    let mut out = Vec::new();
    loop {
        let r = server.changes(after.as_ref(), limit, 0).await?;
        *after = Some(r.next);
        let done = r.changes.is_empty() && !r.more;
        out.push(r);
        if done {
            return Ok(out);
        }
    }
}

fn pk_id(c: &schemas::wire::Change) -> i64 {
    let v: serde_json::Value = serde_json::from_str(c.pk.get()).unwrap();
    v.as_object()
        .unwrap()
        .values()
        .next()
        .unwrap()
        .as_i64()
        .unwrap()
}

fn row(c: &schemas::wire::Change) -> serde_json::Value {
    c.row
        .as_ref()
        .map(|r| serde_json::from_str(r.get()).unwrap())
        .unwrap_or(serde_json::Value::Null)
}

/// The raw JSON text of `key`'s value in a JSON object text (numbers exactly as sent).
fn raw_field(json: &str, key: &str) -> String {
    let pat = format!("\"{key}\":");
    let i = json.find(&pat).unwrap_or_else(|| panic!("{key} in {json}")) + pat.len();
    let rest = json[i..].trim_start();
    let end = rest.find([',', '}']).unwrap();
    rest[..end].trim().to_string()
}

fn product(id: i64, desc: &str, price: &str) -> String {
    format!(
        "INSERT INTO products (product_id, sku, name, description, unit_price, currency) \
         VALUES ({id}, 'sku-{id}', 'name {id}', '{desc}', {price}, 'EUR')"
    )
}

fn upsert(id: i64, desc: &str, price: &str) -> String {
    format!(
        "{} ON CONFLICT (product_id) DO UPDATE SET description = excluded.description, unit_price = excluded.unit_price",
        product(id, desc, price)
    )
}

macro_rules! both {
    ($name:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn sqlite() -> anyhow::Result<()> {
                super::$name(super::Backend::Sqlite).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn postgres() -> anyhow::Result<()> {
                super::$name(super::Backend::Pg).await
            }
        }
    };
}

// ---------------------------------------------------------------------------------
// 1. Install / uninstall.

async fn listing(b: &Branch) -> Result<BTreeSet<String>> {
    let rows = match b.backend {
        Backend::Sqlite => {
            b.app
                .strings(
                    "SELECT type || ':' || name || ':' || tbl_name || ':' || COALESCE(sql, '') \
                     FROM sqlite_master WHERE name <> 'sqlite_sequence'",
                )
                .await?
        }
        Backend::Pg => {
            b.app
                .strings(
                    "SELECT 'rel:' || n.nspname || '.' || c.relname || ':' || c.relkind::text FROM pg_class c \
                       JOIN pg_namespace n ON n.oid = c.relnamespace \
                       WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%' \
                     UNION ALL SELECT 'trigger:' || tgname || ':' || tgrelid::regclass::text FROM pg_trigger WHERE NOT tgisinternal \
                     UNION ALL SELECT 'proc:' || n.nspname || '.' || p.proname FROM pg_proc p \
                       JOIN pg_namespace n ON n.oid = p.pronamespace \
                       WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') \
                     UNION ALL SELECT 'schema:' || nspname FROM pg_namespace",
                )
                .await?
        }
    };
    Ok(rows.into_iter().collect())
}

async fn install_is_idempotent_and_uninstall_is_clean(backend: Backend) -> Result<()> {
    let b = branch(backend).await?;
    let cat = Catalogue::product_management();
    // Missing catalogue tables: a clear error naming the table.
    let e = install::install(&b.db, &cat, false)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("\"products\"") && e.contains("does not exist"),
        "{e}"
    );

    for s in match backend {
        Backend::Sqlite => schemas::sql::sqlite::create_demo_schema(&cat),
        Backend::Pg => schemas::sql::postgres::create_demo_schema(&cat),
    } {
        b.app.exec(&s).await?;
    }
    let before = listing(&b).await?;
    let first = install::install(&b.db, &cat, false).await?;
    let install::Outcome::Created { instance_id: id1 } = first else {
        bail!("expected Created, got {first:?}")
    };
    let after_install = listing(&b).await?;
    assert!(
        after_install.len() > before.len() + 4,
        "install added objects"
    );
    assert_eq!(
        install::install(&b.db, &cat, true).await?,
        install::Outcome::Unchanged { instance_id: id1 }
    );
    assert_eq!(
        listing(&b).await?,
        after_install,
        "second install changed nothing"
    );

    // A changed catalogue re-creates the triggers and keeps the instance.
    let mut smaller = cat.clone();
    smaller.tables.retain(|t| t.name != "stock_movements");
    assert_eq!(
        install::install(&b.db, &smaller, false).await?,
        install::Outcome::Updated { instance_id: id1 }
    );
    assert!(listing(&b)
        .await?
        .iter()
        .all(|o| !o.contains("_pull_stock_movements") && !o.contains("capture_stock_movements")));
    assert_eq!(
        install::install(&b.db, &cat, false).await?,
        install::Outcome::Updated { instance_id: id1 }
    );
    assert_eq!(listing(&b).await?, after_install);

    // An old cursor from the first instance.
    let server = Server::start(&b.config).await?;
    let old = server.changes(None, 10, 0).await?.next;
    assert_eq!(old.instance_id, id1);

    assert!(install::uninstall(&b.db).await?);
    assert_eq!(
        listing(&b).await?,
        before,
        "uninstall removes exactly what install added"
    );
    assert!(
        !install::uninstall(&b.db).await?,
        "second uninstall finds nothing"
    );
    // Without the pull area the listener answers 503, not 500.
    let (status, body) = server.error(None).await?;
    assert_eq!((status, body.error.code.as_str()), (503, "unavailable"));

    let install::Outcome::Created { instance_id: id2 } =
        install::install(&b.db, &cat, false).await?
    else {
        bail!("expected a fresh install")
    };
    assert_ne!(id1, id2);
    let (status, body) = server.error(Some(&old)).await?;
    assert_eq!(
        (status, body.error.code.as_str()),
        (409, "instance_mismatch")
    );
    assert!(
        body.error.message.contains(&id1.to_string())
            && body.error.message.contains(&id2.to_string()),
        "{}",
        body.error.message
    );
    server.stop().await
}
both!(install_is_idempotent_and_uninstall_is_clean);

// ---------------------------------------------------------------------------------
// 2. Capture semantics.

async fn capture_semantics(backend: Backend) -> Result<()> {
    let b = installed(backend).await?;
    let server = Server::start(&b.config).await?;
    let mut after = Some(server.changes(None, 100, 0).await?.next);
    type Step = (&'static str, Vec<String>, Vec<(Op, i64)>);
    let steps: Vec<Step> = vec![
        (
            "single insert",
            vec![product(1, "a", "1.50")],
            vec![(Op::Insert, 1)],
        ),
        (
            "multi-row insert",
            vec![format!(
                "INSERT INTO products (product_id, sku, name, unit_price, currency) VALUES \
                 (2, 'sku-2', 'n2', 2, 'EUR'), (3, 'sku-3', 'n3', 3, 'EUR')"
            )],
            vec![(Op::Insert, 2), (Op::Insert, 3)],
        ),
        (
            "single update",
            vec!["UPDATE products SET unit_price = 1.75 WHERE product_id = 1".into()],
            vec![(Op::Update, 1)],
        ),
        (
            "multi-row update",
            vec!["UPDATE products SET category = 'c' WHERE product_id IN (2, 3)".into()],
            vec![(Op::Update, 2), (Op::Update, 3)],
        ),
        (
            "single delete",
            vec!["DELETE FROM products WHERE product_id = 3".into()],
            vec![(Op::Delete, 3)],
        ),
        (
            "upsert inserting",
            vec![upsert(4, "new", "4.00")],
            vec![(Op::Insert, 4)],
        ),
        (
            "upsert updating",
            vec![upsert(1, "upserted", "9.99")],
            vec![(Op::Update, 1)],
        ),
        (
            "primary-key change",
            vec!["UPDATE products SET product_id = 20 WHERE product_id = 2".into()],
            vec![(Op::Delete, 2), (Op::Update, 20)],
        ),
        (
            "multi-row delete",
            vec!["DELETE FROM products WHERE product_id IN (1, 4)".into()],
            vec![(Op::Delete, 1), (Op::Delete, 4)],
        ),
        (
            "several statements in one transaction",
            vec![
                product(5, "t", "5"),
                "UPDATE products SET name = 'x' WHERE product_id = 5".into(),
                "DELETE FROM products WHERE product_id = 5".into(),
            ],
            vec![(Op::Insert, 5), (Op::Update, 5), (Op::Delete, 5)],
        ),
    ];
    for (what, stmts, expected) in steps {
        b.app.tx(&stmts, true, Duration::ZERO).await?;
        let r = server.changes(after.as_ref(), 100, 0).await?;
        after = Some(r.next);
        let mut got: Vec<(Op, i64)> = r.changes.iter().map(|c| (c.op, pk_id(c))).collect();
        let mut want = expected.clone();
        if what == "primary-key change" || what.starts_with("several") {
            assert_eq!(got, want, "{what}: order matters");
        }
        got.sort_by_key(|(op, id)| (*id, op.as_code()));
        want.sort_by_key(|(op, id)| (*id, op.as_code()));
        assert_eq!(got, want, "{what}");
        for c in &r.changes {
            assert_eq!(c.table, "products");
            assert_eq!(
                c.op == Op::Delete,
                c.row.is_none(),
                "{what}: rows for upserts only"
            );
            if c.row.is_some() {
                assert_eq!(row(c)["product_id"].as_i64(), Some(pk_id(c)));
            }
        }
        if what == "upsert updating" {
            assert_eq!(row(&r.changes[0])["description"], "upserted");
        }
    }
    // A rolled-back transaction is never served.
    b.app
        .tx(&[product(6, "rolled back", "6")], false, Duration::ZERO)
        .await?;
    let r = server.changes(after.as_ref(), 100, 0).await?;
    assert!(
        r.changes.is_empty() && !r.more,
        "rolled-back change served: {:?}",
        r.changes
    );
    server.stop().await
}
both!(capture_semantics);

// ---------------------------------------------------------------------------------
// 3. Concurrent writers.

/// What a committed transaction wrote.
#[derive(Default, Debug)]
struct Committed {
    /// Products upserted with the transaction's tag.
    upserts: Vec<i64>,
    /// Products actually deleted.
    deletes: Vec<i64>,
    /// The marker row in stock_movements (reason = tag).
    marker: i64,
}

async fn concurrent_writers(backend: Backend) -> Result<()> {
    use rand::{Rng, SeedableRng};
    const WRITERS: usize = 16;
    const TXNS: usize = 30;
    const KEYS: i64 = 40;
    let b = installed(backend).await?;
    b.app.exec("INSERT INTO products (product_id, sku, name, unit_price, currency) VALUES (999999, 'seed', 'seed', 1, 'EUR')").await?;
    let server = Server::start(&b.config).await?;
    let done = CancellationToken::new();

    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let app = b.app.clone();
        let backend = b.backend;
        writers.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(w as u64 * 7919);
            let mut committed: HashMap<String, Committed> = HashMap::new();
            let mut rolled_back = Vec::new();
            for t in 0..TXNS {
                let tag = format!("w{w}-t{t}");
                let mut keys: Vec<i64> = (0..rng.gen_range(2..6)).map(|_| rng.gen_range(1..=KEYS)).collect();
                keys.sort();
                keys.dedup();
                let mut stmts = Vec::new();
                let mut kinds = Vec::new();
                for &k in &keys {
                    if rng.gen_bool(0.2) {
                        stmts.push(format!("DELETE FROM products WHERE product_id = {k}"));
                        kinds.push((k, true));
                    } else {
                        stmts.push(upsert(k, &tag, &format!("{}.{:02}", rng.gen_range(1..1000), rng.gen_range(0..100))));
                        kinds.push((k, false));
                    }
                }
                let marker = 1_000_000 + (w * 1000 + t) as i64;
                stmts.push(format!(
                    "INSERT INTO stock_movements (movement_id, product_id, quantity_delta, reason, moved_at) \
                     VALUES ({marker}, 999999, 1, '{tag}', '2026-11-24 07:00:00')"
                ));
                let commit = !rng.gen_bool(0.1);
                let max_delay = if backend == Backend::Sqlite { 2 } else { 15 };
                let delay = Duration::from_millis(rng.gen_range(0..=max_delay));
                // A transaction can also fail (PostgreSQL: two concurrent upserts of a new
                // key collide on the non-arbiter UNIQUE(sku), or PostgreSQL picks it as a
                // deadlock victim): then it rolled back, and none of it may be served.
                let result = app.tx(&stmts, commit, delay).await;
                let affected = match result {
                    Ok(a) => a,
                    Err(e)
                        if e.to_string().contains("duplicate key")
                            || e.to_string().contains("deadlock detected") =>
                    {
                        rolled_back.push(tag);
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                if commit {
                    let mut c = Committed { marker, ..Default::default() };
                    for ((k, is_delete), n) in kinds.iter().zip(&affected) {
                        if *is_delete {
                            if *n == 1 {
                                c.deletes.push(*k);
                            }
                        } else {
                            c.upserts.push(*k);
                        }
                    }
                    committed.insert(tag, c);
                } else {
                    rolled_back.push(tag);
                }
                // Think time between transactions lets the reader in between writers.
                tokio::time::sleep(Duration::from_millis(rng.gen_range(0..=3))).await;
            }
            anyhow::Ok((committed, rolled_back))
        }));
    }

    // The reader pulls through HTTP with a small limit while the writers run.
    let reader = {
        let done = done.clone();
        let base = server.base.clone();
        tokio::spawn(async move {
            let s = Server {
                base,
                client: reqwest::Client::new(),
                shutdown: CancellationToken::new(),
                handle: tokio::spawn(async { Ok(()) }),
            };
            let mut after: Option<Cursor> = None;
            let mut responses: Vec<ChangesResponse> = Vec::new();
            loop {
                let finished = done.is_cancelled();
                let r = s
                    .changes(after.as_ref(), 7, if finished { 0 } else { 1 })
                    .await?;
                after = Some(r.next);
                let empty = r.changes.is_empty() && !r.more;
                responses.push(r);
                if finished && empty {
                    return anyhow::Ok(responses);
                }
            }
        })
    };

    let mut committed: HashMap<String, Committed> = HashMap::new();
    let mut rolled_back: Vec<String> = Vec::new();
    for w in writers {
        let (c, r) = w.await??;
        committed.extend(c);
        rolled_back.extend(r);
    }
    done.cancel();
    let responses = reader.await??;
    assert!(!rolled_back.is_empty() && committed.len() > WRITERS * TXNS / 2);
    eprintln!(
        "{backend:?}: {} committed, {} rolled back, {} changes in {} responses",
        committed.len(),
        rolled_back.len(),
        responses.iter().map(|r| r.changes.len()).sum::<usize>(),
        responses.len()
    );

    // Served changes, in served order, with the response each came in.
    let served: Vec<(usize, &schemas::wire::Change)> = responses
        .iter()
        .enumerate()
        .flat_map(|(i, r)| r.changes.iter().map(move |c| (i, c)))
        .collect();
    let seqs: BTreeSet<i64> = served.iter().map(|(_, c)| c.seq).collect();
    assert_eq!(seqs.len(), served.len(), "a change was served twice");

    // Multiset of served vs committed.
    let mut served_tagged: BTreeMap<String, Vec<(String, i64)>> = BTreeMap::new();
    let mut served_deletes: BTreeMap<i64, usize> = BTreeMap::new();
    let mut response_of_tag: HashMap<String, BTreeSet<usize>> = HashMap::new();
    for (i, c) in &served {
        match (c.table.as_str(), c.op) {
            ("products", Op::Delete) => *served_deletes.entry(pk_id(c)).or_default() += 1,
            ("products", _) => {
                let tag = row(c)["description"].as_str().unwrap_or("").to_string();
                if tag.is_empty() {
                    continue; // the seed row
                }
                served_tagged
                    .entry(tag.clone())
                    .or_default()
                    .push(("p".into(), pk_id(c)));
                response_of_tag.entry(tag).or_default().insert(*i);
            }
            ("stock_movements", Op::Insert) => {
                let tag = row(c)["reason"].as_str().unwrap().to_string();
                served_tagged
                    .entry(tag.clone())
                    .or_default()
                    .push(("m".into(), pk_id(c)));
                response_of_tag.entry(tag).or_default().insert(*i);
            }
            other => bail!("unexpected change {other:?}"),
        }
    }
    for tag in &rolled_back {
        assert!(
            !served_tagged.contains_key(tag),
            "rolled-back transaction {tag} was served"
        );
    }
    let mut expected_tagged: BTreeMap<String, Vec<(String, i64)>> = BTreeMap::new();
    let mut expected_deletes: BTreeMap<i64, usize> = BTreeMap::new();
    for (tag, c) in &committed {
        let e = expected_tagged.entry(tag.clone()).or_default();
        e.extend(c.upserts.iter().map(|k| ("p".to_string(), *k)));
        e.push(("m".into(), c.marker));
        for k in &c.deletes {
            *expected_deletes.entry(*k).or_default() += 1;
        }
    }
    for v in served_tagged
        .values_mut()
        .chain(expected_tagged.values_mut())
    {
        v.sort();
    }
    assert_eq!(
        served_tagged.len(),
        expected_tagged.len(),
        "committed transactions lost or invented"
    );
    assert_eq!(
        served_tagged, expected_tagged,
        "served changes differ from the committed ones"
    );
    assert_eq!(
        served_deletes, expected_deletes,
        "served deletes differ from the committed ones"
    );
    for (tag, rs) in &response_of_tag {
        assert_eq!(
            rs.len(),
            1,
            "transaction {tag} was split across responses {rs:?}"
        );
    }

    // Replay in served order, last writer per key, equals the final table.
    let mut replay: BTreeMap<i64, Option<String>> = BTreeMap::new();
    for (_, c) in &served {
        if c.table == "products" {
            if c.op == Op::Delete {
                replay.remove(&pk_id(c));
            } else {
                replay.insert(pk_id(c), row(c)["description"].as_str().map(str::to_string));
            }
        }
    }
    let table: BTreeMap<i64, Option<String>> = b
        .app
        .pairs("SELECT product_id, description FROM products WHERE product_id <> 999999")
        .await?
        .into_iter()
        .collect();
    replay.remove(&999999);
    assert_eq!(
        replay, table,
        "replaying the served changes does not give the final table"
    );
    server.stop().await
}
both!(concurrent_writers);

// ---------------------------------------------------------------------------------
// 4. A transaction larger than `limit` arrives whole.

async fn large_transaction_is_whole(backend: Backend) -> Result<()> {
    let b = installed(backend).await?;
    let server = Server::start(&b.config).await?;
    b.app.exec(&product(1, "before", "1")).await?;
    let big: Vec<String> = (100..600).map(|i| product(i, "big", "2")).collect();
    b.app.tx(&big, true, Duration::ZERO).await?;
    b.app.exec(&product(2, "after", "1")).await?;
    let mut after = None;
    let responses = drain(&server, &mut after, 50).await?;
    let holding: Vec<usize> = responses
        .iter()
        .map(|r| {
            r.changes
                .iter()
                .filter(|c| row(c)["description"] == "big")
                .count()
        })
        .filter(|n| *n > 0)
        .collect();
    assert_eq!(
        holding,
        vec![500],
        "the 500-row transaction must arrive in one response"
    );
    let total: usize = responses.iter().map(|r| r.changes.len()).sum();
    assert_eq!(total, 502);
    server.stop().await
}
both!(large_transaction_is_whole);

// ---------------------------------------------------------------------------------
// 5. Bad input, authentication, unavailability, invalid config.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_clearly() -> Result<()> {
    let b = installed(Backend::Sqlite).await?;
    let server = Server::start(&b.config).await?;
    let (status, body) = server
        .get("/v1/changes?after=not-a-cursor", Some(TOKEN))
        .await?;
    assert_eq!(status, 400);
    let e: ErrorBody = serde_json::from_str(&body)?;
    assert_eq!(e.error.code, "bad_request");
    assert!(
        e.error.message.contains("wrong number of parts"),
        "{}",
        e.error.message
    );
    let (status, body) = server.get("/v1/changes?limit=abc", Some(TOKEN)).await?;
    assert_eq!(status, 400);
    assert!(body.contains("limit"), "{body}");

    let r = server.changes(None, 999_999, 0).await?;
    assert!(r.limit_clamped);
    assert_eq!(r.limit, b.config.max_limit);
    assert!(!server.changes(None, 10, 0).await?.limit_clamped);

    // Missing and wrong token: identical answers, on every protected endpoint.
    for path in ["/v1/changes", "/v1/status", "/metrics"] {
        let missing = server.get(path, None).await?;
        let wrong = server
            .get(path, Some("wrong-token-0123456789abcdef"))
            .await?;
        assert_eq!(missing.0, 401);
        assert_eq!(missing, wrong, "{path}");
    }
    assert_eq!(
        server.get("/healthz", None).await?,
        (200, r#"{"status":"ok"}"#.to_string())
    );

    // A cursor ahead of the branch's head and one whose tick has another uuid.
    let next = server.changes(None, 10, 0).await?.next;
    let ahead = Cursor {
        tick: next.tick + 100,
        ..next
    };
    let (status, e) = server.error(Some(&ahead)).await?;
    assert_eq!((status, e.error.code.as_str()), (409, "lineage_mismatch"));
    assert!(
        e.error.message.contains("ahead of head"),
        "{}",
        e.error.message
    );
    let other = Cursor {
        tick_uuid: uuid::Uuid::new_v4(),
        ..next
    };
    let (status, e) = server.error(Some(&other)).await?;
    assert_eq!((status, e.error.code.as_str()), (409, "lineage_mismatch"));

    // Status and metrics.
    b.app.exec(&product(1, "x", "1")).await?;
    let (status, body) = server.get("/v1/status", Some(TOKEN)).await?;
    assert_eq!(status, 200, "{body}");
    let st: StatusResponse = serde_json::from_str(&body)?;
    assert_eq!(
        (st.backend.as_str(), st.head_seq, st.unacked_changes),
        ("sqlite", 1, 1)
    );
    let (status, text) = server.get("/metrics", Some(TOKEN)).await?;
    assert_eq!(status, 200);
    for m in [
        "branch_listener_pull_area_depth",
        "branch_listener_unacked_changes",
        "branch_listener_oldest_unacked_age_seconds",
        "branch_listener_head_seq",
        "branch_listener_requests_total",
    ] {
        assert!(text.contains(m), "{m} missing from /metrics:\n{text}");
    }
    // Compression when asked for.
    let raw_client = reqwest::Client::builder().no_gzip().no_zstd().build()?;
    let resp = raw_client
        .get(format!("{}/v1/status", server.base))
        .bearer_auth(TOKEN)
        .header("accept-encoding", "gzip")
        .send()
        .await?;
    assert_eq!(
        resp.headers()
            .get("content-encoding")
            .map(|v| v.to_str().unwrap()),
        Some("gzip")
    );
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_database_gives_503_and_recovers() -> Result<()> {
    let b = installed(Backend::Pg).await?;
    let name = b.pg_name.clone().unwrap();
    let server = Server::start(&b.config).await?;
    let first = server.changes(None, 10, 0).await?;
    let admin = PgPool::connect(&tests::pg::admin_url()?).await?;
    if let AppDb::Pg(p) = &b.app {
        p.close().await;
    }
    sqlx::query(&format!(
        "ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS false"
    ))
    .execute(&admin)
    .await?;
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()")
        .bind(&name)
        .execute(&admin)
        .await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = server.changes_raw(Some(&first.next), 10, 0).await?;
        if status == 503 {
            let e: ErrorBody = serde_json::from_str(&body)?;
            assert_eq!(e.error.code, "unavailable");
            assert!(
                !e.error.message.to_lowercase().contains("select"),
                "no SQL text: {body}"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never answered 503: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sqlx::query(&format!("ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS true"))
        .execute(&admin)
        .await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = server.changes_raw(Some(&first.next), 10, 0).await?;
        if status == 200 {
            break;
        }
        assert_eq!(status, 503, "{body}");
        assert!(tokio::time::Instant::now() < deadline, "never recovered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.stop().await
}

#[test]
fn invalid_config_exits_2_naming_the_key() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let token = write_token(dir.path());
    let cases = [
        ("max_limit = 0\n", "max_limit"),
        ("frobnicate = 1\n", "frobnicate"),
        ("retention = \"soon\"\n", "retention"),
        ("listen = \"nowhere\"\n", "listen"),
    ];
    for (extra, key) in cases {
        let path = dir.path().join("config.toml");
        std::fs::write(
            &path,
            format!(
                "location = \"b01\"\ndatabase_url = \"sqlite:///tmp/none.db\"\ntoken_file = \"{}\"\n{extra}",
                token.display()
            ),
        )?;
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_branch-listener"))
            .args(["check-config", "--config"])
            .arg(&path)
            .env_remove("BRANCH_LISTENER_CONFIG")
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{key}: {stderr}");
        assert!(stderr.contains(key), "{key}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    }
    // A valid one passes.
    let path = dir.path().join("ok.toml");
    std::fs::write(
        &path,
        format!(
            "location = \"b01\"\ndatabase_url = \"sqlite:///tmp/none.db\"\ntoken_file = \"{}\"\n",
            token.display()
        ),
    )?;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_branch-listener"))
        .args(["check-config", "--config"])
        .arg(&path)
        .output()?;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

// ---------------------------------------------------------------------------------
// 6. Long-poll.

async fn long_poll_returns_the_change(backend: Backend) -> Result<()> {
    let b = installed(backend).await?;
    let server = std::sync::Arc::new(Server::start(&b.config).await?);
    let start = server.changes(None, 10, 0).await?.next;
    let s = server.clone();
    let poll = tokio::spawn(async move { s.changes(Some(&start), 10, 20).await });
    // Give the request time to start waiting (the assertion holds either way).
    tokio::time::sleep(Duration::from_millis(300)).await;
    b.app.exec(&product(7, "long-poll", "7")).await?;
    let r = poll.await??;
    assert_eq!(r.changes.len(), 1, "{:?}", r.changes);
    assert_eq!(row(&r.changes[0])["description"], "long-poll");
    let server =
        std::sync::Arc::into_inner(server).ok_or_else(|| anyhow!("server still shared"))?;
    server.stop().await
}
both!(long_poll_returns_the_change);

// ---------------------------------------------------------------------------------
// 7. Pruning.

async fn pruning_keeps_unacknowledged_changes(backend: Backend) -> Result<()> {
    let b = installed(backend).await?;
    let server = Server::start(&b.config).await?;
    let c0 = server.changes(None, 10, 0).await?.next;
    b.app.exec(&product(1, "a", "1")).await?;
    let r1 = server.changes(Some(&c0), 10, 0).await?;
    assert_eq!(r1.changes.len(), 1);
    let seq_a = r1.changes[0].seq;
    b.app.exec(&product(2, "b", "1")).await?;
    let r2 = server.changes(Some(&r1.next), 10, 0).await?; // acknowledges r1.next
    assert_eq!(r2.changes.len(), 1);
    let seq_b = r2.changes[0].seq;

    let seqs_sql = match backend {
        Backend::Sqlite => "SELECT seq, tbl FROM _pull_changes ORDER BY seq",
        Backend::Pg => "SELECT seq, tbl FROM pull.changes ORDER BY seq",
    };
    // Nothing is older than a day: nothing pruned.
    assert_eq!(
        prune::prune_once(&b.db, Duration::from_secs(86400)).await?,
        prune::Pruned::default()
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let p = prune::prune_once(&b.db, Duration::ZERO).await?;
        if p.changes > 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never pruned");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left: Vec<i64> = b
        .app
        .pairs(seqs_sql)
        .await?
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(
        left,
        vec![seq_b],
        "acknowledged change {seq_a} pruned, unacknowledged {seq_b} kept"
    );
    // Pruning again never touches the unacknowledged change.
    prune::prune_once(&b.db, Duration::ZERO).await?;
    assert_eq!(b.app.pairs(seqs_sql).await?.len(), 1);

    let (status, e) = server.error(Some(&c0)).await?;
    assert_eq!(
        (status, e.error.code.as_str()),
        (410, "pruned"),
        "{}",
        e.error.message
    );
    let (status, _) = server.error(None).await?;
    assert_eq!(status, 410, "the install tick is gone");
    // The acknowledged cursor still works and still serves the unacknowledged change.
    let again = server.changes(Some(&r1.next), 10, 0).await?;
    assert_eq!(
        again.changes.iter().map(|c| c.seq).collect::<Vec<_>>(),
        vec![seq_b]
    );
    server.stop().await
}
both!(pruning_keeps_unacknowledged_changes);

// ---------------------------------------------------------------------------------
// 8. Data fidelity at the branch side.

async fn edge_values_are_exact(backend: Backend) -> Result<()> {
    let b = installed(backend).await?;
    let server = Server::start(&b.config).await?;
    let unicode = "Grüße ☃ 日本語 🎉 \"quoted\" back\\slash";
    let ts = match backend {
        Backend::Sqlite => "'2026-03-29 02:30:00.123'",
        Backend::Pg => "'2026-03-29 02:30:00.123456+00'",
    };
    b.app
        .tx(
            &[
                format!(
                    "INSERT INTO products (product_id, sku, name, description, category, unit_price, currency, updated_at) \
                     VALUES (9223372036854775807, 'max', '{}', '', NULL, 9999999999.99, 'EUR', {ts})",
                    unicode.replace('\'', "''")
                ),
                "INSERT INTO products (product_id, sku, name, description, unit_price, currency) \
                 VALUES (-9223372036854775808, 'min', 'n', NULL, 0.01, 'EUR')"
                    .into(),
            ],
            true,
            Duration::ZERO,
        )
        .await?;
    let r = server.changes(None, 10, 0).await?;
    assert_eq!(r.changes.len(), 2);
    let big = r.changes[0].row.as_ref().unwrap().get();
    let small = r.changes[1].row.as_ref().unwrap().get();
    assert_eq!(raw_field(big, "product_id"), "9223372036854775807");
    assert_eq!(
        raw_field(r.changes[0].pk.get(), "product_id"),
        "9223372036854775807"
    );
    assert_eq!(raw_field(small, "product_id"), "-9223372036854775808");
    assert_eq!(raw_field(big, "unit_price"), "9999999999.99");
    assert_eq!(raw_field(small, "unit_price"), "0.01");
    let v: serde_json::Value = serde_json::from_str(big)?;
    assert_eq!(v["description"], "", "empty string stays empty");
    assert!(v["category"].is_null(), "NULL stays NULL");
    assert_eq!(v["name"], unicode);
    let s: serde_json::Value = serde_json::from_str(small)?;
    assert!(s["description"].is_null());
    match backend {
        Backend::Sqlite => assert_eq!(v["updated_at"], "2026-03-29 02:30:00.123"),
        Backend::Pg => {
            let t = chrono::DateTime::parse_from_rfc3339(v["updated_at"].as_str().unwrap())?;
            assert_eq!(
                t.with_timezone(&chrono::Utc)
                    .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                "2026-03-29T02:30:00.123456Z"
            );
        }
    }
    // The served JSON round-trips as the wire type says (ts in UTC, protocol fields).
    assert_eq!(r.location, "b01");
    assert_eq!(r.time_zone, "Europe/Berlin");
    assert!(r.changes[0].ts <= chrono::Utc::now());
    let _ = &b.dir;
    server.stop().await
}
both!(edge_values_are_exact);

// ---------------------------------------------------------------------------------
// PostgreSQL: a long open transaction holds back nothing but itself.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_open_transaction_does_not_stall_others() -> Result<()> {
    let b = installed(Backend::Pg).await?;
    let AppDb::Pg(pool) = &b.app else {
        unreachable!()
    };
    let server = Server::start(&b.config).await?;
    let c0 = server.changes(None, 100, 0).await?.next;
    // A writes first and stays open; B writes later and commits first.
    let mut a = pool.begin().await?;
    sqlx::query(&product(1, "A", "1")).execute(&mut *a).await?;
    b.app.exec(&product(2, "B", "2")).await?;
    let r1 = server.changes(Some(&c0), 100, 0).await?;
    let got: Vec<i64> = r1.changes.iter().map(pk_id).collect();
    assert_eq!(got, vec![2], "B is served while A is open");
    let (status, body) = server.get("/v1/status", Some(TOKEN)).await?;
    assert_eq!(status, 200, "{body}");
    let st: StatusResponse = serde_json::from_str(&body)?;
    assert!(
        st.oldest_open_writer.is_some(),
        "A is reported as an open writer: {body}"
    );
    // ... and as the horizon held back in /metrics (polled: the gauge is process-wide and
    // other tests' scrapes may set it meanwhile).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, text) = server.get("/metrics", Some(TOKEN)).await?;
        let age = text
            .lines()
            .find_map(|l| l.strip_prefix("branch_listener_oldest_open_writer_age_seconds "))
            .and_then(|v| v.trim().parse::<f64>().ok());
        if age.is_some_and(|a| a > 0.0) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "oldest_open_writer_age_seconds stays {age:?} while A is open:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    a.commit().await?;
    // A committed after the tick that served B: it arrives in the next window, not lost.
    let r2 = server.changes(Some(&r1.next), 100, 0).await?;
    let got: Vec<i64> = r2.changes.iter().map(pk_id).collect();
    assert_eq!(got, vec![1], "A arrives once it commits");
    let (_, body) = server.get("/v1/status", Some(TOKEN)).await?;
    let st: StatusResponse = serde_json::from_str(&body)?;
    assert!(st.oldest_open_writer.is_none(), "{body}");
    assert_eq!(st.acked_tick, Some(r1.next.tick));
    server.stop().await
}

// ---------------------------------------------------------------------------------
// The binary: install twice, serve, graceful shutdown on SIGTERM, uninstall.

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_installs_serves_and_stops_gracefully() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let token = write_token(dir.path());
    let port = free_port();
    let db_path = dir.path().join("branch.db");
    let config_path = dir.path().join("config.toml");
    std::fs::write(
        &config_path,
        format!(
            "location = \"b02\"\ndatabase_url = \"sqlite://{}\"\ntoken_file = \"{}\"\nlisten = \"127.0.0.1:{port}\"\n",
            db_path.display(),
            token.display()
        ),
    )?;
    let bin = env!("CARGO_BIN_EXE_branch-listener");
    let run = |args: &[&str]| {
        std::process::Command::new(bin)
            .args(args)
            .arg("--config")
            .arg(&config_path)
            .output()
    };
    let out = run(&["install", "--with-demo-schema"])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("new instance"));
    let out = run(&["install"])?;
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("nothing to do"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // As systemd runs it: the config file named by the environment, `serve` implied.
    let log_path = dir.path().join("listener.log");
    let mut child = std::process::Command::new(bin)
        .env("BRANCH_LISTENER_CONFIG", &config_path)
        .env("RUST_LOG", "info,branch_listener=debug")
        .stderr(std::fs::File::create(&log_path)?)
        .spawn()?;
    let server = Server {
        base: format!("http://127.0.0.1:{port}"),
        client: reqwest::Client::new(),
        shutdown: CancellationToken::new(),
        handle: tokio::spawn(async { Ok(()) }),
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while server.get("/healthz", None).await.map(|r| r.0).unwrap_or(0) != 200 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "server never came up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let c0 = server.changes(None, 10, 0).await?.next;
    let server = std::sync::Arc::new(server);
    let s = server.clone();
    let poll = tokio::spawn(async move { s.changes(Some(&c0), 10, 60).await });
    // Wait until the server says the long-poll is waiting.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(&log_path)?.contains("long-poll waiting for changes") {
        assert!(
            std::time::Instant::now() < deadline,
            "the long-poll never started waiting"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()?;
    assert!(kill.success());
    // The long-poll is answered (empty) and the process exits 0, well before the wait ends.
    let r = poll.await??;
    assert!(r.changes.is_empty());
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            bail!("the listener did not stop after SIGTERM");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status.code(), Some(0));

    let out = run(&["uninstall"])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("uninstalled"));
    Ok(())
}

// ---------------------------------------------------------------------------------
// Background tasks: the ticker ticks only when there is something new; the pruner runs
// by itself.

async fn background_ticker_and_pruner(backend: Backend) -> Result<()> {
    let mut b = installed(backend).await?;
    b.config.tick_interval = Duration::from_millis(50);
    b.config.prune_interval = Duration::from_millis(100);
    b.config.retention = Duration::ZERO;
    let (ticks_sql, changes_sql) = match backend {
        Backend::Sqlite => (
            "SELECT tick_id, NULL FROM _pull_ticks",
            "SELECT seq, NULL FROM _pull_changes",
        ),
        Backend::Pg => (
            "SELECT tick_id, NULL::text FROM pull.ticks",
            "SELECT seq, NULL::text FROM pull.changes",
        ),
    };
    let server = Server::start(&b.config).await?;
    let ticks = |app: AppDb| async move { anyhow::Ok(app.pairs(ticks_sql).await?.len()) };
    assert_eq!(ticks(b.app.clone()).await?, 1, "only the install tick");
    // Idle: several tick intervals pass without a tick.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(ticks(b.app.clone()).await?, 1, "no tick while idle");
    b.app.exec(&product(1, "a", "1")).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while ticks(b.app.clone()).await? < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the ticker never ticked"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        ticks(b.app.clone()).await?,
        2,
        "one tick for one change, then idle again"
    );

    // HQ acknowledges the change; the pruner deletes it without being asked.
    let r = server.changes(None, 10, 0).await?;
    assert_eq!(r.changes.len(), 1);
    b.app.exec(&product(2, "b", "1")).await?;
    let r2 = server.changes(Some(&r.next), 10, 0).await?;
    assert_eq!(r2.changes.len(), 1);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left: Vec<i64> = b
            .app
            .pairs(changes_sql)
            .await?
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        if left == vec![r2.changes[0].seq] {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the pruner never pruned: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, text) = server.get("/metrics", Some(TOKEN)).await?;
    for m in [
        "branch_listener_pruned_changes_total",
        "branch_listener_ticks_total",
        "branch_listener_served_changes_total",
    ] {
        assert!(text.contains(m), "{m} missing:\n{text}");
    }
    server.stop().await
}
both!(background_ticker_and_pruner);

// ---------------------------------------------------------------------------------
// SQLite: an application transaction holding the write lock does not fail pulls.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_write_lock_held_by_the_application_does_not_fail_pulls() -> Result<()> {
    let b = installed(Backend::Sqlite).await?;
    let AppDb::Sqlite(pool) = &b.app else {
        unreachable!()
    };
    let server = Server::start(&b.config).await?;
    let c0 = server.changes(None, 10, 0).await?.next;
    b.app.exec(&product(1, "a", "1")).await?;
    let r1 = server.changes(Some(&c0), 10, 0).await?;
    assert_eq!(r1.changes.len(), 1);
    b.app.exec(&product(2, "b", "1")).await?;
    // The application holds the write lock with an uncommitted change.
    let mut long = pool.begin_with("BEGIN IMMEDIATE").await?;
    sqlx::query(&product(3, "c", "1"))
        .execute(&mut *long)
        .await?;
    let (status, body) = server.changes_raw(Some(&r1.next), 10, 0).await?;
    assert_eq!(status, 200, "{body}");
    let r2: ChangesResponse = serde_json::from_str(&body)?;
    assert!(
        r2.changes.iter().all(|c| pk_id(c) == 2),
        "only committed changes: {:?}",
        r2.changes
    );
    long.commit().await?;
    let mut after = Some(r2.next);
    let rest = drain(&server, &mut after, 10).await?;
    let mut got: Vec<i64> = r2
        .changes
        .iter()
        .chain(rest.iter().flat_map(|r| r.changes.iter()))
        .map(pk_id)
        .collect();
    got.sort();
    assert_eq!(got, vec![2, 3], "nothing lost once the lock is released");
    server.stop().await
}

// ---------------------------------------------------------------------------------
// A SQLite branch restored from a backup: HQ's newer cursor is refused, before and after
// new activity on the restored database.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restored_sqlite_database_is_detected() -> Result<()> {
    let b = installed(Backend::Sqlite).await?;
    let db_file = b.dir.path().join("pm.db");
    let backup = b.dir.path().join("backup.db");
    let server = Server::start(&b.config).await?;
    b.app.exec(&product(1, "a", "1")).await?;
    let c1 = server.changes(None, 10, 0).await?.next;
    b.app
        .exec(&format!("VACUUM INTO '{}'", backup.display()))
        .await?;
    b.app.exec(&product(2, "b", "1")).await?;
    let c2 = server.changes(Some(&c1), 10, 0).await?.next;
    assert!(c2.tick > c1.tick);

    // Restore the backup while everything is stopped.
    server.stop().await?;
    if let AppDb::Sqlite(p) = &b.app {
        p.close().await;
    }
    b.db.close().await;
    for ext in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{ext}", db_file.display()));
    }
    std::fs::copy(&backup, &db_file)?;

    let server = Server::start(&b.config).await?;
    let (status, e) = server.error(Some(&c2)).await?;
    assert_eq!((status, e.error.code.as_str()), (409, "lineage_mismatch"));
    assert!(
        e.error.message.contains("ahead of head"),
        "{}",
        e.error.message
    );

    // New activity on the restored database re-creates tick c2.tick with another uuid.
    let opts = branch_listener::db::sqlite_options(&b.config.database_url, false)?;
    let app = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(opts)
        .await?;
    sqlx::query(&product(3, "c", "1")).execute(&app).await?;
    let r = server.changes(Some(&c1), 10, 0).await?;
    assert_eq!(r.next.tick, c2.tick);
    assert_ne!(r.next.tick_uuid, c2.tick_uuid);
    let (status, e) = server.error(Some(&c2)).await?;
    assert_eq!(
        (status, e.error.code.as_str()),
        (409, "lineage_mismatch"),
        "{}",
        e.error.message
    );
    assert!(
        e.error.message.contains("restored or replaced"),
        "{}",
        e.error.message
    );
    server.stop().await
}

/// Requests cut off at random points (HQ killed mid-request, the request time limit)
/// while the application writes must never leave a pooled connection inside a
/// transaction: on SQLite that would hold the write lock (the application could no
/// longer write) or pin an old snapshot. Afterwards the application takes the write
/// lock at once and requests are served.
#[tokio::test]
async fn cancelled_requests_leave_no_transaction_open() -> Result<()> {
    use rand::{Rng, SeedableRng};
    use tower::ServiceExt;
    let b = installed(Backend::Sqlite).await?;
    let app = branch_listener::http::app(serve::state(b.config.clone(), CancellationToken::new())?);
    let request = |uri: String| {
        axum::http::Request::builder()
            .uri(uri)
            .header("authorization", format!("Bearer {TOKEN}"))
            .body(axum::body::Body::empty())
            .unwrap()
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for i in 0..300i64 {
        b.app
            .exec(&format!(
                "INSERT INTO products (product_id, sku, name, unit_price, currency) VALUES ({i}, 'c{i}', 'n', 1, 'EUR')"
            ))
            .await?;
        let cut = Duration::from_micros(rng.gen_range(0..4000));
        let _ = tokio::time::timeout(
            cut,
            app.clone().oneshot(request("/v1/changes?limit=5".into())),
        )
        .await;
    }
    // The application must get the write lock without waiting for a leaked transaction.
    let AppDb::Sqlite(pool) = &b.app else {
        unreachable!("a SQLite branch")
    };
    let mut conn = pool.acquire().await?;
    sqlx::query("PRAGMA busy_timeout = 2000")
        .execute(&mut *conn)
        .await?;
    let began = sqlx::query("BEGIN IMMEDIATE").execute(&mut *conn).await;
    assert!(
        began.is_ok(),
        "the application could not take the write lock: {began:?}"
    );
    sqlx::query("ROLLBACK").execute(&mut *conn).await?;
    drop(conn);
    // And every pooled listener connection still serves: drain everything.
    let mut after: Option<String> = None;
    let mut served = 0usize;
    for _ in 0..200 {
        let uri = match &after {
            Some(c) => format!("/v1/changes?limit=1000&after={c}"),
            None => "/v1/changes?limit=1000".into(),
        };
        let r = app.clone().oneshot(request(uri)).await?;
        assert_eq!(r.status(), 200, "a request failed after the cut-off ones");
        let body = axum::body::to_bytes(r.into_body(), usize::MAX).await?;
        let resp: ChangesResponse = serde_json::from_slice(&body)?;
        served += resp.changes.len();
        after = Some(resp.next.to_string());
        if !resp.more && resp.changes.is_empty() {
            break;
        }
    }
    assert_eq!(served, 300, "every committed change is served once");
    Ok(())
}

// ---------------------------------------------------------------------------------
// Snapshot and checksums (initial load, resync, verify).

async fn get_json<T: serde::de::DeserializeOwned>(server: &Server, path: &str) -> Result<T> {
    let (status, body) = server.get(path, Some(TOKEN)).await?;
    if status != 200 {
        bail!("GET {path}: {status} {body}");
    }
    serde_json::from_str(&body).with_context(|| body.clone())
}

/// A snapshot page as HQ reads it: JSON, or a `COPY` page by its content type.
async fn get_page(server: &Server, path: &str) -> Result<schemas::wire::SnapshotPage> {
    let resp = server
        .client
        .get(format!("{}{path}", server.base))
        .bearer_auth(TOKEN)
        .send()
        .await?;
    let status = resp.status();
    let copy = resp
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with(schemas::wire::COPY_PAGE_CONTENT_TYPE));
    let body = resp.bytes().await?.to_vec();
    if status != 200 {
        bail!("GET {path}: {status} {}", String::from_utf8_lossy(&body));
    }
    if copy {
        schemas::wire::decode_copy_page(body).map_err(|e| anyhow::anyhow!("GET {path}: {e}"))
    } else {
        Ok(serde_json::from_slice(&body)?)
    }
}

/// `/v1/snapshot/start` makes T0 and the stream from it holds only later changes;
/// `/v1/snapshot` pages cover the table in key order with the trigger's exact row
/// images; `/v1/checksums` chunks hash the canonical rows; bad parameters are 400s
/// naming the parameter.
async fn snapshot_pages_and_checksums(backend: Backend) -> Result<()> {
    use schemas::canonical::{canonical_row, RowHasher, Zone};
    use schemas::wire::{ChecksumsResponse, SnapshotPage, SnapshotStart};
    let b = installed(backend).await?;
    for id in 1..=25 {
        let desc = if id % 5 == 0 { "" } else { "d" };
        b.app.exec(&product(id, desc, "19.90")).await?;
    }
    b.app
        .exec("UPDATE products SET description = NULL, updated_at = '2026-03-29 02:30:00' WHERE product_id = 7")
        .await?;
    let server = Server::start(&b.config).await?;
    let mut after = None;
    let stream = drain(&server, &mut after, 1000).await?;
    let images: HashMap<i64, String> = stream
        .iter()
        .flat_map(|r| r.changes.iter())
        .filter(|c| c.table == "products")
        .map(|c| (pk_id(c), c.row.as_ref().unwrap().get().to_string()))
        .collect();

    let start: SnapshotStart = get_json(&server, "/v1/snapshot/start").await?;
    assert_eq!(start.instance_id, start.start.instance_id);
    assert_eq!(start.tables.len(), 5);
    assert_eq!(start.tables.last().map(String::as_str), Some("_files"));
    // Pages of 10: 10 + 10 + 5 rows, in key order, each the trigger's image.
    let mut rows = Vec::new();
    let mut page_after: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut path = "/v1/snapshot?table=products&limit=10".to_string();
        if let Some(a) = &page_after {
            path.push_str(&format!("&after={}", urlencode(a)));
        }
        let p: SnapshotPage = get_json(&server, &path).await?;
        pages += 1;
        assert!(p.head.tick >= start.start.tick);
        rows.extend(p.rows.iter().map(|r| r.get().to_string()));
        match p.next_after {
            Some(a) => page_after = Some(a.get().to_string()),
            None => break,
        }
    }
    assert_eq!((pages, rows.len()), (3, 25));
    let value = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap();
    for (i, r) in rows.iter().enumerate() {
        assert_eq!(raw_field(r, "product_id"), (i + 1).to_string());
        // PostgreSQL: row_to_json's key order and spacing, the trigger's values.
        assert_eq!(
            value(r),
            value(&images[&(i as i64 + 1)]),
            "same JSON as the trigger: {r}"
        );
        if backend == Backend::Pg {
            assert!(r.contains("19.90"), "numerics keep their digits: {r}");
        }
    }
    // format=copy: COPY text on PostgreSQL (the same page, same next key), JSON on
    // SQLite and for _files; other formats are refused.
    let copy = get_page(&server, "/v1/snapshot?table=products&limit=10&format=copy").await?;
    let json = get_page(&server, "/v1/snapshot?table=products&limit=10").await?;
    match backend {
        Backend::Pg => {
            // The next key of a COPY page holds the key values as text; the next page
            // from it is the JSON one's.
            assert_eq!(
                copy.next_after.as_ref().map(|k| k.get()),
                Some(r#"{"product_id":"10"}"#)
            );
            assert_eq!(
                json.next_after.as_ref().map(|k| k.get()),
                Some(r#"{"product_id":10}"#)
            );
            let from_copy = get_page(
                &server,
                "/v1/snapshot?table=products&limit=10&format=copy&after=%7B%22product_id%22%3A%2210%22%7D",
            )
            .await?;
            let from_json = get_page(
                &server,
                "/v1/snapshot?table=products&limit=10&format=copy&after=%7B%22product_id%22%3A10%7D",
            )
            .await?;
            let text = |p: &SnapshotPage| p.copy.as_ref().map(|c| c.text.clone());
            assert_eq!(text(&from_copy), text(&from_json));
            assert!(text(&from_copy).unwrap().starts_with("11\tsku-11\t"));
            let c = copy.copy.as_ref().expect("COPY text on PostgreSQL");
            assert!(copy.rows.is_empty());
            assert_eq!(c.rows, 10);
            assert_eq!(
                c.columns,
                schemas::Catalogue::product_management()
                    .table("products")
                    .unwrap()
                    .column_names()
                    .map(String::from)
                    .collect::<Vec<_>>()
            );
            let lines: Vec<&str> = c.text.lines().collect();
            assert_eq!(lines.len(), 10);
            assert_eq!(lines[0], "1\tsku-1\tname 1\td\t\\N\t19.90\tEUR\t\\N");
            let seventh: Vec<&str> = lines[6].split('\t').collect();
            assert_eq!(seventh[3], "\\N", "{}", lines[6]);
            assert!(
                seventh[7].starts_with("2026-03-29 ") && seventh[7].ends_with("+00"),
                "{}",
                lines[6]
            );
        }
        Backend::Sqlite => {
            assert!(copy.copy.is_none());
            assert_eq!(copy.rows.len(), 10);
            assert_eq!(
                copy.next_after.as_ref().map(|k| k.get()),
                json.next_after.as_ref().map(|k| k.get())
            );
        }
    }
    let files = get_page(&server, "/v1/snapshot?table=_files&format=copy").await?;
    assert!(files.copy.is_none());
    let (status, body) = server
        .get("/v1/snapshot?table=products&format=xml", Some(TOKEN))
        .await?;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("format"), "{body}");
    // The stream after T0 holds only what happened after it.
    b.app.exec(&product(26, "late", "1")).await?;
    let later = server.changes(Some(&start.start), 1000, 0).await?;
    let ids: Vec<i64> = later.changes.iter().map(pk_id).collect();
    assert_eq!(ids, vec![26], "{later:?}");

    // The file index is served as `_files`: keyset by path in byte order, the rows the
    // `_files` trigger's images.
    let index = match backend {
        Backend::Sqlite => "_pull_files",
        Backend::Pg => "pull.files",
    };
    for (path, sha) in [("a b.jpg", "a"), ("B/ü.jpg", "b")] {
        b.app
            .exec(&format!(
                "INSERT INTO {index} (path, size, sha256, mtime) VALUES ('{path}', 3, '{}', '2026-11-24T09:16:44.123456Z')",
                sha.repeat(64)
            ))
            .await?;
    }
    let events = server.changes(Some(&start.start), 1000, 0).await?;
    let file_images: HashMap<String, String> = events
        .changes
        .iter()
        .filter(|c| c.table == "_files")
        .map(|c| {
            let r = c.row.as_ref().unwrap().get().to_string();
            (raw_field(&r, "path"), r)
        })
        .collect();
    assert_eq!(file_images.len(), 2, "{events:?}");
    let p1: SnapshotPage = get_json(&server, "/v1/snapshot?table=_files&limit=1").await?;
    let a = p1
        .next_after
        .as_ref()
        .context("a second page")?
        .get()
        .to_string();
    let p2: SnapshotPage = get_json(
        &server,
        &format!("/v1/snapshot?table=_files&limit=1&after={}", urlencode(&a)),
    )
    .await?;
    let got: Vec<String> = p1
        .rows
        .iter()
        .chain(&p2.rows)
        .map(|r| r.get().to_string())
        .collect();
    assert_eq!(got.len(), 2);
    assert_eq!(raw_field(&got[0], "path"), "\"B/ü.jpg\"", "byte order");
    for r in &got {
        assert_eq!(
            value(r),
            value(&file_images[&raw_field(r, "path")]),
            "same JSON as the trigger"
        );
    }
    let fc: ChecksumsResponse = get_json(&server, "/v1/checksums?table=_files&chunk=10").await?;
    assert_eq!((fc.chunks.len(), fc.chunks[0].rows), (1, 2));

    // Checksums: chunks of 10 over 26 rows.
    let c: ChecksumsResponse =
        get_json(&server, "/v1/checksums?table=products&chunk=10&chunks=2").await?;
    assert_eq!(c.chunks.len(), 2);
    assert!(c.more);
    let c2: ChecksumsResponse = get_json(
        &server,
        &format!(
            "/v1/checksums?table=products&chunk=10&chunks=5&after={}",
            urlencode(c.chunks[1].last_key.get())
        ),
    )
    .await?;
    assert_eq!(c2.chunks.len(), 1);
    assert!(!c2.more);
    assert_eq!(c2.chunks[0].rows, 6);
    let zone = Zone::parse("Europe/Berlin").unwrap();
    let cat = Catalogue::product_management();
    let t = cat.table("products").unwrap();
    let mut h = RowHasher::new();
    for r in &rows[..10] {
        h.add(&canonical_row(t, r, zone)?);
    }
    assert_eq!(c.chunks[0].rows, 10);
    assert_eq!(c.chunks[0].hash, h.finish());
    assert_eq!(raw_field(c.chunks[0].first_key.get(), "product_id"), "1");
    assert_eq!(raw_field(c.chunks[1].last_key.get(), "product_id"), "20");
    // One changed value changes its chunk's hash only.
    b.app
        .exec("UPDATE products SET unit_price = 19.91 WHERE product_id = 15")
        .await?;
    let c3: ChecksumsResponse =
        get_json(&server, "/v1/checksums?table=products&chunk=10&chunks=2").await?;
    assert_eq!(c3.chunks[0].hash, c.chunks[0].hash);
    assert_ne!(c3.chunks[1].hash, c.chunks[1].hash);

    // Bad parameters.
    for (path, names) in [
        ("/v1/snapshot", "table: missing"),
        ("/v1/snapshot?table=_pull_changes", "not a replicated table"),
        ("/v1/snapshot?table=products&after=%5B1%5D", "after:"),
        ("/v1/snapshot?table=products&limit=0", "limit:"),
        ("/v1/checksums?table=products&chunk=x", "chunk:"),
        (
            "/v1/checksums?table=products&chunk=100000&chunks=100",
            "rows per request",
        ),
    ] {
        let (status, body) = server.get(path, Some(TOKEN)).await?;
        assert_eq!(status, 400, "{path}: {body}");
        let e: ErrorBody = serde_json::from_str(&body)?;
        assert!(e.error.message.contains(names), "{path}: {body}");
    }
    let (_, metrics) = server.get("/metrics", Some(TOKEN)).await?;
    assert!(
        metrics.contains("branch_listener_snapshot_rows_total"),
        "{metrics}"
    );
    for path in [
        "/v1/snapshot/start",
        "/v1/snapshot?table=products",
        "/v1/checksums?table=products",
    ] {
        assert_eq!(server.get(path, None).await?.0, 401, "{path}");
    }
    server.stop().await
}
both!(snapshot_pages_and_checksums);

/// A `COPY` text page of several MiB (many chunks streamed while the branch produces
/// them) arrives whole: every line once, in key order, the row count and next key of
/// its last line in the trailer, and the next page continues right after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_copy_pages_stream_whole_with_their_trailer() -> Result<()> {
    let b = installed(Backend::Pg).await?;
    let long = "x".repeat(1000);
    b.app
        .exec(&format!(
            "INSERT INTO products (product_id, sku, name, description, unit_price, currency) \
             SELECT g, 'sku-' || g, 'name ' || g, '{long}', 1.50, 'EUR' FROM generate_series(1, 6000) g"
        ))
        .await?;
    let server = Server::start(&b.config).await?;
    let first = get_page(
        &server,
        "/v1/snapshot?table=products&limit=5000&format=copy",
    )
    .await?;
    let c = first.copy.as_ref().expect("COPY text on PostgreSQL");
    assert!(c.text.len() > 5_000_000, "{} bytes", c.text.len());
    assert_eq!(c.rows, 5000);
    let ids: Vec<i64> = c
        .text
        .lines()
        .map(|l| l.split('\t').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(ids, (1..=5000).collect::<Vec<i64>>());
    assert!(c.text.lines().all(|l| l.contains(&long)));
    let next = first.next_after.as_ref().map(|k| k.get().to_string());
    assert_eq!(next.as_deref(), Some(r#"{"product_id":"5000"}"#));
    let rest = get_page(
        &server,
        &format!(
            "/v1/snapshot?table=products&limit=5000&format=copy&after={}",
            urlencode(&next.unwrap())
        ),
    )
    .await?;
    let c = rest.copy.as_ref().unwrap();
    assert_eq!(c.rows, 1000);
    assert!(c.text.starts_with("5001\t"));
    assert!(rest.next_after.is_none(), "the last page");
    server.stop().await
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

// check-config's database check.

#[tokio::test]
async fn check_config_reports_the_database() -> Result<()> {
    use branch_listener::preflight::{database, DatabaseState};
    let b = branch(Backend::Sqlite).await?;
    assert_eq!(database(&b.config).await?, DatabaseState::NotInstalled);
    install::install(&b.db, &Catalogue::product_management(), true).await?;
    let meta = b.db.meta().await?;
    assert_eq!(
        database(&b.config).await?,
        DatabaseState::Installed {
            instance_id: meta.instance_id
        }
    );
    // A SQLite file that does not exist is not created by the check.
    let mut gone = b.config.clone();
    let missing = b.dir.path().join("nowhere").join("pm.db");
    gone.database_url = format!("sqlite://{}", missing.display());
    let st = database(&gone).await?;
    assert!(!st.reachable(), "{st:?}");
    assert!(
        st.line().starts_with("database: NOT reachable"),
        "{}",
        st.line()
    );
    assert!(!missing.exists());
    // PostgreSQL: the cause is named at once (nothing listens on port 1).
    let mut pg = b.config.clone();
    pg.database_url = "postgres://branch@127.0.0.1:1/pm".into();
    let st = database(&pg).await?;
    assert!(st.line().contains("refused"), "{}", st.line());

    // The command: reported, exit 0; with --require-database, exit 1.
    let path = b.dir.path().join("gone.toml");
    std::fs::write(
        &path,
        format!(
            "location = \"b01\"\ndatabase_url = {:?}\ntoken_file = {:?}\n",
            gone.database_url,
            b.config.token_file.display().to_string()
        ),
    )?;
    let run = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_branch-listener"))
            .args(["check-config", "--config"])
            .arg(&path)
            .args(extra)
            .env_remove("BRANCH_LISTENER_CONFIG")
            .output()
    };
    let out = run(&[])?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("database: NOT reachable"), "{stdout}");
    let out = run(&["--require-database"])?;
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
