//! Integration tests of hq-puller against a real PostgreSQL (tests::pg) and fake
//! listeners (fake.rs).

mod docs_coverage;
mod fake;
mod files;
mod fuzz;
mod partitions;

use fake::{ch, Behaviour, Branch, Fake, TOKEN};
use hq_puller::config::{self, Settings};
use hq_puller::App;
use sqlx::PgPool;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

pub struct Hq {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub settings: Settings,
    pub app: Arc<App>,
}

impl Hq {
    fn pool(&self) -> &PgPool {
        &self.app.pool
    }
}

fn write_token(dir: &Path, name: &str, mode: u32) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, format!("{TOKEN}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    p
}

/// A fresh HQ database, a config with the given locations (id, base url) and extra
/// top-level TOML, migrated.
async fn hq(locations: &[(&str, &str)], extra: &str) -> Hq {
    let l: Vec<(&str, &str, &str)> = locations.iter().map(|(a, b)| (*a, *b, "")).collect();
    hq_with(&l, extra).await
}

/// Like [`hq`], with extra TOML lines per location.
async fn hq_with(locations: &[(&str, &str, &str)], extra: &str) -> Hq {
    let db = tests::pg::fresh_database("hqp").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let token = write_token(dir.path(), "token", 0o600);
    let mut toml = format!("database_url = \"{db}\"\nallow_plain_http = true\n{extra}\n");
    for (id, base, more) in locations {
        toml.push_str(&format!(
            "[[locations]]\nid = \"{id}\"\nname = \"Branch {id}\"\nurl = \"{base}/{id}\"\ntoken_file = \"{}\"\n{more}\n",
            token.display()
        ));
    }
    let config = dir.path().join("config.toml");
    std::fs::write(&config, toml).unwrap();
    let settings = config::load(&config).unwrap();
    let app = App::connect(settings.clone(), CancellationToken::new())
        .await
        .unwrap();
    hq_puller::migrate(&app).await.unwrap();
    Hq {
        dir,
        config,
        settings,
        app,
    }
}

async fn pull(hq: &Hq, ids: &[&str]) -> Vec<hq_puller::pull::RunReport> {
    let ids: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
    hq_puller::pull_once(&hq.app, &ids).await.unwrap()
}

async fn loc_row(pool: &PgPool, id: &str) -> (String, Option<String>, Option<String>) {
    sqlx::query_as("SELECT state, cursor, paused_reason FROM sync.locations WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn cursor_tick(pool: &PgPool, id: &str) -> i64 {
    loc_row(pool, id)
        .await
        .1
        .map(|c| c.parse::<schemas::Cursor>().unwrap().tick)
        .unwrap_or(0)
}

async fn snapshot(pool: &PgPool, table: &str) -> String {
    sqlx::query_scalar::<_, Option<String>>(&format!(
        "SELECT string_agg(x, E'\\n' ORDER BY x) FROM (SELECT (to_jsonb(t) - '_applied_at')::text AS x FROM hq.{table} t) s"
    ))
    .fetch_one(pool)
    .await
    .unwrap()
    .unwrap_or_default()
}

/// Polls `cond` until it holds or `secs` pass.
async fn eventually<F, Fut>(secs: u64, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if cond().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for: {what}");
}

fn product(id: i64, price: &str, name: &str) -> String {
    format!(
        r#"{{"product_id":{id},"sku":"S{id}","name":"{name}","description":null,"category":null,"unit_price":{price},"currency":"EUR","updated_at":null}}"#
    )
}
fn pk(id: i64) -> String {
    format!(r#"{{"product_id":{id}}}"#)
}

// 1 ------------------------------------------------------------------------------------

#[tokio::test]
async fn applies_batches_and_redelivery_changes_nothing() {
    let branch = Branch::new("b01")
        .window(vec![
            ch(
                1,
                "products",
                "I",
                &pk(1),
                Some(&product(1, "10.00", "one")),
            ),
            ch(
                2,
                "products",
                "I",
                &pk(2),
                Some(&product(2, "20.00", "two")),
            ),
            ch(
                3,
                "inventory",
                "I",
                &pk(1),
                Some(
                    r#"{"product_id":1,"quantity_on_hand":7,"reorder_level":2,"updated_at":null}"#,
                ),
            ),
        ])
        .window(vec![
            ch(
                4,
                "products",
                "U",
                &pk(1),
                Some(&product(1, "11.50", "one v2")),
            ),
            ch(5, "products", "D", &pk(2), None),
        ])
        .window(vec![
            ch(
                6,
                "products",
                "I",
                &pk(3),
                Some(&product(3, "1.00", "three")),
            ),
            ch(
                7,
                "products",
                "U",
                &pk(3),
                Some(&product(3, "3.00", "three v2")),
            ),
        ]);
    let (fake, base) = Fake::start(vec![branch]).await;
    let hq = hq(&[("b01", &base)], "").await;

    let r = pull(&hq, &["b01"]).await;
    assert_eq!(r[0].outcome, "ok", "{:?}", r[0]);
    assert_eq!(r[0].totals.batches, 3);
    assert_eq!(r[0].totals.changes, 7);
    assert_eq!(cursor_tick(hq.pool(), "b01").await, 4);

    let live: Vec<(i64, String, String)> = sqlx::query_as(
        "SELECT product_id, name, unit_price::text FROM hq.products_live WHERE location_id = 'b01' ORDER BY product_id",
    )
    .fetch_all(hq.pool())
    .await
    .unwrap();
    assert_eq!(
        live,
        vec![
            (1, "one v2".into(), "11.50".into()),
            (3, "three v2".into(), "3.00".into())
        ]
    );
    let (deleted, seq): (bool, i64) =
        sqlx::query_as("SELECT _deleted, _seq FROM hq.products WHERE product_id = 2")
            .fetch_one(hq.pool())
            .await
            .unwrap();
    assert!(deleted);
    assert_eq!(seq, 5);
    let applied: i64 =
        sqlx::query_scalar("SELECT applied_changes FROM sync.locations WHERE id='b01'")
            .fetch_one(hq.pool())
            .await
            .unwrap();
    assert_eq!(applied, 7);

    let before_p = snapshot(hq.pool(), "products").await;
    let before_i = snapshot(hq.pool(), "inventory").await;

    // Caught up: another pull fetches once and applies nothing.
    let r = pull(&hq, &["b01"]).await;
    assert_eq!((r[0].outcome.as_str(), r[0].totals.batches), ("ok", 0));

    // Redelivery: the batches delivered again (cursor rewound) change nothing; the first
    // one alone (older than everything applied) must not roll rows back.
    sqlx::query("UPDATE sync.locations SET cursor = NULL, instance_id = NULL WHERE id = 'b01'")
        .execute(hq.pool())
        .await
        .unwrap();
    let client = hq.app.client("b01").unwrap();
    let fetched = client.changes(None, 100, None).await.unwrap();
    let expected = hq_puller::validate::Expected {
        location: "b01".into(),
        after: None,
        instance_id: None,
    };
    let apply_first = || async {
        let checked =
            hq_puller::validate::check(&fetched.response, &expected, &hq.settings.catalogue)
                .unwrap();
        hq_puller::apply::apply_batch(
            hq.pool(),
            &hq.settings.catalogue,
            &hq.app.statements,
            "b01",
            &fetched.response,
            &checked,
            &hq_puller::files::Plan::default(),
        )
        .await
        .unwrap()
    };
    assert!(matches!(
        apply_first().await,
        hq_puller::apply::Applied::Committed { rows: 0 }
    ));
    assert_eq!(snapshot(hq.pool(), "products").await, before_p);
    assert_eq!(snapshot(hq.pool(), "inventory").await, before_i);
    assert_eq!(cursor_tick(hq.pool(), "b01").await, 2);
    let r = pull(&hq, &["b01"]).await;
    assert_eq!((r[0].outcome.as_str(), r[0].totals.batches), ("ok", 2));
    assert_eq!(snapshot(hq.pool(), "products").await, before_p);
    assert_eq!(snapshot(hq.pool(), "inventory").await, before_i);
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM hq.products")
        .fetch_one(hq.pool())
        .await
        .unwrap();
    assert_eq!(n, 3);

    // The same batch applied again by a second process: the stored cursor moved on, the
    // apply rolls back and reports it.
    assert_eq!(
        apply_first().await,
        hq_puller::apply::Applied::AlreadyApplied
    );
    assert_eq!(snapshot(hq.pool(), "products").await, before_p);
    assert_eq!(cursor_tick(hq.pool(), "b01").await, 4);
    assert_eq!(fake.requests("b01"), 7);
}

// 2 ------------------------------------------------------------------------------------

#[tokio::test]
async fn stale_changes_never_win_and_tombstones_stay() {
    let branch = Branch::new("b02")
        .window(vec![ch(
            50,
            "products",
            "U",
            &pk(10),
            Some(&product(10, "5.00", "new")),
        )])
        .window(vec![ch(
            40,
            "products",
            "U",
            &pk(10),
            Some(&product(10, "4.00", "stale")),
        )])
        .window(vec![ch(60, "products", "D", &pk(11), None)])
        .window(vec![ch(
            55,
            "products",
            "U",
            &pk(11),
            Some(&product(11, "9.00", "zombie")),
        )])
        .window(vec![
            ch(
                80,
                "products",
                "I",
                &pk(12),
                Some(&product(12, "8.00", "newest")),
            ),
            ch(
                70,
                "products",
                "U",
                &pk(12),
                Some(&product(12, "7.00", "older")),
            ),
        ]);
    let (_fake, base) = Fake::start(vec![branch]).await;
    let hq = hq(&[("b02", &base)], "").await;
    let r = pull(&hq, &["b02"]).await;
    assert_eq!(
        (r[0].outcome.as_str(), r[0].totals.batches),
        ("ok", 5),
        "{:?}",
        r[0]
    );

    type Row = (i64, Option<String>, Option<String>, i64, bool);
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT product_id, name, unit_price::text, _seq, _deleted FROM hq.products ORDER BY product_id",
    )
    .fetch_all(hq.pool())
    .await
    .unwrap();
    assert_eq!(
        rows,
        vec![
            (10, Some("new".into()), Some("5.00".into()), 50, false),
            (11, None, None, 60, true),
            (12, Some("newest".into()), Some("8.00".into()), 80, false),
        ]
    );
    let live: i64 =
        sqlx::query_scalar("SELECT count(*) FROM hq.products_live WHERE product_id = 11")
            .fetch_one(hq.pool())
            .await
            .unwrap();
    assert_eq!(live, 0);
}

// 3 ------------------------------------------------------------------------------------

#[tokio::test]
async fn hostile_batches_pause_only_their_location() {
    let good = || {
        ch(
            1,
            "inventory",
            "I",
            &pk(1),
            Some(r#"{"product_id":1,"quantity_on_hand":1}"#),
        )
    };
    let mk =
        |id: &str, bad: Vec<fake::FakeChange>| Branch::new(id).window(vec![good()]).window(bad);
    let mut tampered_loc = Branch::new("h_loc").window(vec![good()]).window(vec![]);
    tampered_loc.tamper = Some((
        1,
        Arc::new(|r: &mut schemas::wire::ChangesResponse| r.location = "zz".into()),
    ));
    let mut backwards = Branch::new("h_back")
        .window(vec![good()])
        .window(vec![])
        .window(vec![]);
    backwards.tamper = Some((
        1,
        Arc::new(|r: &mut schemas::wire::ChangesResponse| {
            let after = r.after.unwrap();
            r.next = schemas::Cursor {
                tick: after.tick - 1,
                ..after
            };
            r.changes = serde_json::from_str(r#"[{"seq":9,"table":"inventory","op":"D","pk":{"product_id":1},"row":null,"ts":"2026-01-01T00:00:00Z"}]"#).unwrap();
        }),
    ));
    let cases: Vec<(Branch, &str)> = vec![
        (
            mk("h_table", vec![ch(2, "secrets", "D", &pk(1), None)]),
            "unknown table \"secrets\"",
        ),
        (
            mk(
                "h_col",
                vec![ch(
                    2,
                    "inventory",
                    "U",
                    &pk(1),
                    Some(r#"{"product_id":1,"drop_me":1}"#),
                )],
            ),
            "unknown column inventory.drop_me",
        ),
        (
            mk(
                "h_pk",
                vec![ch(2, "inventory", "D", r#"{"sku":"x"}"#, None)],
            ),
            "pk of table inventory",
        ),
        (
            mk(
                "h_dup",
                vec![
                    ch(2, "inventory", "D", &pk(1), None),
                    ch(2, "inventory", "D", &pk(2), None),
                ],
            ),
            "duplicate seq 2",
        ),
        (tampered_loc, "batch is for location \"zz\""),
        (backwards, "cursor goes backwards"),
    ];
    let ids: Vec<String> = cases.iter().map(|(b, _)| b.location.clone()).collect();
    let expect: Vec<&str> = cases.iter().map(|(_, e)| *e).collect();
    let (_bad_fake, bad_base) = Fake::start(cases.into_iter().map(|(b, _)| b).collect()).await;
    let mut healthy = Branch::new("healthy");
    healthy.grow = true;
    let (healthy_fake, good_base) = Fake::start(vec![healthy]).await;
    let mut locs: Vec<(&str, &str)> = ids
        .iter()
        .map(|i| (i.as_str(), bad_base.as_str()))
        .collect();
    locs.push(("healthy", &good_base));
    let hq = hq(&locs, "").await;

    let mut all: Vec<&str> = ids.iter().map(String::as_str).collect();
    all.push("healthy");
    let metrics = hq_puller::metrics::install().unwrap();
    let reports = pull(&hq, &all).await;
    for (i, id) in ids.iter().enumerate() {
        let r = reports.iter().find(|r| &r.location == id).unwrap();
        assert_eq!(r.outcome, "paused", "{id}: {r:?}");
        assert_eq!(
            r.totals.batches, 1,
            "{id}: the good batch before the bad one applied"
        );
        let (state, cursor, reason) = loc_row(hq.pool(), id).await;
        assert_eq!(state, "paused", "{id}");
        let reason = reason.unwrap_or_default();
        assert!(
            reason.contains(expect[i]),
            "{id}: reason {reason:?} lacks {:?}",
            expect[i]
        );
        assert_eq!(
            cursor.unwrap().parse::<schemas::Cursor>().unwrap().tick,
            2,
            "{id}: cursor moved"
        );
        let (outcome, err): (String, Option<String>) = sqlx::query_as(
            "SELECT outcome, error FROM sync.runs WHERE location_id = $1 ORDER BY run_id DESC LIMIT 1",
        )
        .bind(id)
        .fetch_one(hq.pool())
        .await
        .unwrap();
        assert_eq!(outcome, "paused");
        assert!(err.unwrap_or_default().contains(expect[i]), "{id}");
    }
    let h = reports.iter().find(|r| r.location == "healthy").unwrap();
    assert_eq!(h.outcome, "ok");
    let text = metrics.render();
    for needle in [
        "hq_puller_applied_changes_total{location=\"healthy\"}",
        "hq_puller_errors_total{location=\"h_table\",kind=\"permanent\"} 1",
        "hq_puller_location_state{location=\"h_table\",state=\"paused\"} 1",
        "hq_puller_apply_duration_seconds_bucket{location=\"healthy\"",
        "hq_puller_pull_duration_seconds_bucket{location=\"h_pk\"",
    ] {
        assert!(text.contains(needle), "metrics lack {needle}:\n{text}");
    }
    let t1 = cursor_tick(hq.pool(), "healthy").await;
    assert!(t1 >= 2);

    // Second round: paused locations are skipped (no request), the healthy one applies.
    let before = _bad_fake.requests("h_table");
    let reports = pull(&hq, &all).await;
    for id in &ids {
        let r = reports.iter().find(|r| &r.location == id).unwrap();
        assert_eq!(r.outcome, "skipped", "{id}");
        assert_eq!(cursor_tick(hq.pool(), id).await, 2);
    }
    assert_eq!(_bad_fake.requests("h_table"), before);
    assert!(cursor_tick(hq.pool(), "healthy").await > t1);
    assert!(healthy_fake.requests("healthy") >= 2);

    // The operator fixes the branch and resumes: it applies again.
    _bad_fake.with("h_dup", |b| {
        b.tamper = Some((
            1,
            Arc::new(|r: &mut schemas::wire::ChangesResponse| r.changes.truncate(1)),
        ))
    });
    assert_eq!(
        hq_puller::store::resume(hq.pool(), "h_dup").await.unwrap(),
        "paused"
    );
    let r = pull(&hq, &["h_dup"]).await;
    assert_eq!(r[0].outcome, "ok", "{:?}", r[0]);
    assert_eq!(cursor_tick(hq.pool(), "h_dup").await, 3);
}

#[tokio::test]
async fn listener_errors_map_to_states() {
    let cases = [
        (
            "r409i",
            Behaviour::Fail(409, "instance_mismatch"),
            "needs_resync",
            "needs_resync",
            "instance mismatch",
        ),
        (
            "r409l",
            Behaviour::Fail(409, "lineage_mismatch"),
            "needs_resync",
            "needs_resync",
            "lineage mismatch",
        ),
        (
            "r410",
            Behaviour::Fail(410, "pruned"),
            "needs_resync",
            "needs_resync",
            "pruned history",
        ),
        (
            "r401",
            Behaviour::Fail(401, "unauthorized"),
            "paused",
            "paused",
            "token rejected",
        ),
        (
            "r503",
            Behaviour::Fail(503, "unavailable"),
            "failing",
            "failed",
            "HTTP 503",
        ),
    ];
    let branches = cases
        .iter()
        .map(|(id, b, ..)| {
            let mut br = Branch::new(id);
            br.behaviour = *b;
            br
        })
        .collect();
    let (_fake, base) = Fake::start(branches).await;
    // One location whose listener is not even there: transient.
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_base = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let mut locs: Vec<(&str, &str)> = cases.iter().map(|c| (c.0, base.as_str())).collect();
    locs.push(("dead", &dead_base));
    let hq = hq(&locs, "").await;
    let mut ids: Vec<&str> = cases.iter().map(|c| c.0).collect();
    ids.push("dead");
    let reports = pull(&hq, &ids).await;
    for (id, _, state, outcome, needle) in cases.iter().copied().chain([(
        "dead",
        Behaviour::Normal,
        "failing",
        "failed",
        "cannot connect",
    )]) {
        let r = reports.iter().find(|r| r.location == id).unwrap();
        assert_eq!(r.outcome, outcome, "{id}: {r:?}");
        assert!(
            r.error.as_deref().unwrap_or_default().contains(needle),
            "{id}: {r:?}"
        );
        let (st, cursor, reason) = loc_row(hq.pool(), id).await;
        assert_eq!(st, state, "{id}");
        assert_eq!(cursor, None, "{id}");
        assert_eq!(reason.is_some(), state != "failing", "{id}: {reason:?}");
    }
}

// 4 ------------------------------------------------------------------------------------

#[tokio::test]
async fn values_arrive_exactly() {
    let name = r#"Zürich — 東京 🍣 \"quoted\" \\ back"#;
    let p1 = format!(
        r#"{{"product_id":9223372036854775807,"sku":"","name":"{name}","description":null,"category":"","unit_price":9999999999.99,"currency":"EUR","updated_at":"2026-03-01 09:30:00"}}"#
    );
    let p2 = r#"{"product_id":-9223372036854775808,"sku":"min","name":"n","description":"","category":null,"unit_price":0.01,"currency":"JPY","updated_at":"2026-03-01T09:30:00.123456"}"#;
    let mut branch = Branch::new("b04")
        .window(vec![
            ch(1, "products", "I", r#"{"product_id":9223372036854775807}"#, Some(&p1)),
            ch(2, "products", "I", r#"{"product_id":-9223372036854775808}"#, Some(p2)),
            ch(3, "inventory", "I", r#"{"product_id":1}"#, Some(r#"{"product_id":1,"quantity_on_hand":9223372036854775807,"reorder_level":-9223372036854775808,"updated_at":"2026-03-01T09:30:00+01:00"}"#)),
        ])
        .window(vec![ch(4, "products", "U", &pk(5), Some(&product(5, "1.234", "too precise")))]);
    branch.time_zone = "Asia/Tokyo".into();
    let (_fake, base) = Fake::start(vec![branch]).await;
    let hq = hq(&[("b04", &base)], "").await;
    let r = pull(&hq, &["b04"]).await;
    assert_eq!(r[0].outcome, "paused");
    assert_eq!(r[0].totals.batches, 1);

    type Row = (
        String,
        String,
        String,
        Option<String>,
        Option<String>,
        String,
        String,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT product_id::text, sku, name, description, category, unit_price::text, \
           to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US') \
         FROM hq.products ORDER BY product_id",
    )
    .fetch_all(hq.pool())
    .await
    .unwrap();
    assert_eq!(
        rows,
        vec![
            (
                "-9223372036854775808".into(),
                "min".into(),
                "n".into(),
                Some("".into()),
                None,
                "0.01".into(),
                "2026-03-01T00:30:00.123456".into()
            ),
            (
                "9223372036854775807".into(),
                "".into(),
                "Zürich — 東京 🍣 \"quoted\" \\ back".into(),
                None,
                Some("".into()),
                "9999999999.99".into(),
                "2026-03-01T00:30:00.000000".into()
            ),
        ]
    );
    // A timestamp with an offset (PostgreSQL branch) keeps its instant whatever the zone.
    let inv: (String, String, String) = sqlx::query_as(
        "SELECT quantity_on_hand::text, reorder_level::text, \
           to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI') FROM hq.inventory",
    )
    .fetch_one(hq.pool())
    .await
    .unwrap();
    assert_eq!(
        inv,
        (
            "9223372036854775807".into(),
            "-9223372036854775808".into(),
            "2026-03-01 08:30".into()
        )
    );

    // 1.234 does not fit numeric(12,2): paused, column named, nothing rounded.
    let (state, _, reason) = loc_row(hq.pool(), "b04").await;
    assert_eq!(state, "paused");
    let reason = reason.unwrap();
    assert!(
        reason.contains("products.unit_price") && reason.contains("1.234"),
        "{reason}"
    );
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM hq.products WHERE product_id = 5")
        .fetch_one(hq.pool())
        .await
        .unwrap();
    assert_eq!(n, 0);
    assert_eq!(cursor_tick(hq.pool(), "b04").await, 2);
}

#[tokio::test]
async fn a_value_of_the_wrong_type_pauses_naming_the_column() {
    let branch = Branch::new("b4t").window(vec![ch(
        1,
        "inventory",
        "I",
        &pk(1),
        Some(r#"{"product_id":1,"quantity_on_hand":"abc"}"#),
    )]);
    let (_fake, base) = Fake::start(vec![branch]).await;
    let hq = hq(&[("b4t", &base)], "").await;
    let r = pull(&hq, &["b4t"]).await;
    assert_eq!(r[0].outcome, "paused");
    let (state, cursor, reason) = loc_row(hq.pool(), "b4t").await;
    assert_eq!((state.as_str(), cursor), ("paused", None));
    let reason = reason.unwrap();
    assert!(
        reason.contains("column inventory.quantity_on_hand"),
        "{reason}"
    );
    assert!(reason.contains("abc"), "{reason}");
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM hq.inventory")
        .fetch_one(hq.pool())
        .await
        .unwrap();
    assert_eq!(n, 0);
}

// 5 ------------------------------------------------------------------------------------

fn check_config(dir: &Path, toml: &str) -> (i32, String, String) {
    let p = dir.join("c.toml");
    std::fs::write(&p, toml).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hq-puller"))
        .args(["check-config", "--config"])
        .arg(&p)
        .env_remove("HQ_PULLER_CONFIG")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn check_config_names_each_problem() {
    let dir = tempfile::tempdir().unwrap();
    let good = write_token(dir.path(), "good", 0o600);
    let open = write_token(dir.path(), "open", 0o644);
    let loc = |id: &str, extra: &str, token: &Path| {
        format!(
            "[[locations]]\nid = \"{id}\"\nurl = \"http://127.0.0.1:7070\"\ntoken_file = \"{}\"\n{extra}\n",
            token.display()
        )
    };
    // Unreadable even for root: a directory where the token file should be.
    let unreadable = dir.path().join("unreadable");
    std::fs::create_dir(&unreadable).unwrap();
    std::fs::set_permissions(&unreadable, std::fs::Permissions::from_mode(0o700)).unwrap();
    let plain_head =
        "database_url = \"postgres://hq@localhost/hq\"\nschedule = \"*/5 * * * * *\"\n";
    let head = &format!("{plain_head}allow_plain_http = true\n");
    let not_pem = dir.path().join("not-a-ca.pem");
    std::fs::write(&not_pem, "hello\n").unwrap();

    let (code, out, err) = check_config(dir.path(), &format!("{head}{}", loc("b01", "", &good)));
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("b01") && out.matches("T").count() >= 3,
        "{out}"
    );

    let cases = [
        (
            format!("{head}colour = \"red\"\n{}", loc("b01", "", &good)),
            "colour",
        ),
        (
            format!("{head}{}", loc("b01", "sched = \"x\"", &good)),
            "sched",
        ),
        (
            format!("{head}{}{}", loc("b01", "", &good), loc("b01", "", &good)),
            "duplicate location id \"b01\"",
        ),
        (
            format!("{head}{}", loc("b01", "schedule = \"*/5 * * *\"", &good)),
            "invalid cron expression \"*/5 * * *\"",
        ),
        (
            format!("{head}{}", loc("b01", "", &dir.path().join("missing"))),
            "token_file: token file /",
        ),
        (
            format!("{head}{}", loc("b01", "", &unreadable)),
            "unreadable: Is a directory",
        ),
        (format!("{head}{}", loc("b01", "", &open)), "chmod 600"),
        (
            format!(
                "{head}admin_listen = \"0.0.0.0:9465\"\n{}",
                loc("b01", "", &good)
            ),
            "admin_allow_remote = true",
        ),
        (format!("{head}{}", loc("B 01", "", &good)), "id must match"),
        (
            format!("{head}{}", loc("b01", "", &good)).replace("http://127.0.0.1:7070", "ftp://x"),
            "url",
        ),
        // Plain http without allow_plain_http: an error naming the location.
        (
            format!("{plain_head}{}", loc("b01", "", &good)),
            "locations[0] (id \"b01\"): url \"http://127.0.0.1:7070\" is plain http",
        ),
        // A per-location `false` overrides the global `true`.
        (
            format!("{head}{}", loc("b01", "allow_plain_http = false", &good)),
            "is plain http",
        ),
        (
            format!(
                "{plain_head}ca_file = \"{}\"\n{}",
                dir.path().join("nope.pem").display(),
                loc("b01", "", &good)
            )
            .replace("http://", "https://"),
            "ca_file: cannot read",
        ),
        (
            format!(
                "{plain_head}{}",
                loc(
                    "b01",
                    &format!("ca_file = \"{}\"", not_pem.display()),
                    &good
                )
            )
            .replace("http://", "https://"),
            "holds no PEM certificate",
        ),
        (
            format!("{head}max_response_bytes = 10\n{}", loc("b01", "", &good)),
            "max_response_bytes: must be at least 1024",
        ),
    ];
    for (toml, needle) in cases {
        let (code, _, err) = check_config(dir.path(), &toml);
        assert_eq!(code, 2, "{needle}: {err}");
        assert!(err.contains(needle), "stderr lacks {needle:?}: {err}");
    }
}

// 6 ------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_and_a_failing_branch_do_not_stop_a_healthy_one() {
    let mut healthy = Branch::new("ok1");
    healthy.grow = true;
    healthy.delay = Duration::from_millis(1500); // runs outlast the 1 s period: fires overlap
    let mut hang = Branch::new("hang");
    hang.behaviour = Behaviour::Hang;
    let mut e500 = Branch::new("e500");
    e500.behaviour = Behaviour::Fail500;
    let (fake_ok, base_ok) = Fake::start(vec![healthy]).await;
    let (fake_bad, base_bad) = Fake::start(vec![hang, e500]).await;
    let hq = hq(
        &[("ok1", &base_ok), ("hang", &base_bad), ("e500", &base_bad)],
        "schedule = \"* * * * * *\"\nrequest_timeout = \"60s\"\nmax_concurrent_pulls = 2",
    )
    .await;
    let shutdown = CancellationToken::new();
    let svc = tokio::spawn(hq_puller::run(hq.settings.clone(), shutdown.clone()));
    eventually(60, "healthy cursor advanced 3 times", || async {
        cursor_tick(hq.pool(), "ok1").await >= 4
    })
    .await;
    eventually(30, "e500 recorded as failing", || async {
        loc_row(hq.pool(), "e500").await.0 == "failing"
    })
    .await;
    for (f, id) in [(&fake_ok, "ok1"), (&fake_bad, "hang"), (&fake_bad, "e500")] {
        assert_eq!(
            f.counters(id).max_in_flight.load(Ordering::SeqCst),
            1,
            "{id} overlapped"
        );
    }
    assert_eq!(
        fake_bad.requests("hang"),
        1,
        "the hanging run blocks only its own location"
    );
    let err: Option<String> =
        sqlx::query_scalar("SELECT last_error FROM sync.locations WHERE id='e500'")
            .fetch_one(hq.pool())
            .await
            .unwrap();
    assert!(err.unwrap().contains("HTTP 500"));
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(30), svc)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let running: i64 =
        sqlx::query_scalar("SELECT count(*) FROM sync.runs WHERE outcome = 'running'")
            .fetch_one(hq.pool())
            .await
            .unwrap();
    assert_eq!(running, 0);
    let interrupted: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM sync.runs WHERE location_id = 'hang' AND outcome = 'interrupted'",
    )
    .fetch_one(hq.pool())
    .await
    .unwrap();
    assert_eq!(interrupted, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_are_bounded_by_max_concurrent_pulls() {
    let ids: Vec<String> = (1..=6).map(|i| format!("c{i}")).collect();
    let branches = ids
        .iter()
        .map(|i| {
            let mut b = Branch::new(i).window(vec![]).window(vec![]);
            b.delay = Duration::from_millis(200);
            b
        })
        .collect();
    let (fake, base) = Fake::start(branches).await;
    let locs: Vec<(&str, &str)> = ids.iter().map(|i| (i.as_str(), base.as_str())).collect();
    let hq = hq(&locs, "max_concurrent_pulls = 2").await;
    let all: Vec<&str> = ids.iter().map(String::as_str).collect();
    let reports = pull(&hq, &all).await;
    assert!(
        reports
            .iter()
            .all(|r| r.outcome == "ok" && r.totals.batches == 2),
        "{reports:?}"
    );
    assert_eq!(fake.total.requests.load(Ordering::SeqCst), 12);
    let max = fake.total.max_in_flight.load(Ordering::SeqCst);
    assert!((1..=2).contains(&max), "{max} pulls at once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_six_cron_jobs_keep_firing_under_load() {
    let ids: Vec<String> = (1..=46).map(|i| format!("b{i:02}")).collect();
    let (fake, base) = Fake::start(ids.iter().map(|i| Branch::new(i)).collect()).await;
    let locs: Vec<(&str, &str)> = ids.iter().map(|i| (i.as_str(), base.as_str())).collect();
    let hq = hq(&locs, "schedule = \"* * * * * *\"").await;
    // Load the runtime: tasks that hog a worker for 20 ms between yields.
    let stop = CancellationToken::new();
    for _ in 0..4 {
        let stop = stop.clone();
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                let t = Instant::now();
                while t.elapsed() < Duration::from_millis(20) {
                    std::hint::black_box(0u64);
                }
                tokio::task::yield_now().await;
            }
        });
    }
    let shutdown = CancellationToken::new();
    let svc = tokio::spawn(hq_puller::run(hq.settings.clone(), shutdown.clone()));
    eventually(90, "every location fired 3 times", || async {
        ids.iter().all(|i| fake.requests(i) >= 3)
    })
    .await;
    stop.cancel();
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(30), svc)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let fired: i64 =
        sqlx::query_scalar("SELECT count(*) FROM sync.locations WHERE last_fired_at IS NOT NULL")
            .fetch_one(hq.pool())
            .await
            .unwrap();
    assert_eq!(fired, 46);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_mode_long_polls_and_applies() {
    let mut b = Branch::new("st1");
    b.grow = true;
    let (fake, base) = Fake::start(vec![b]).await;
    let port = tests::process::free_port().unwrap();
    let hq = hq_with(
        &[("st1", &base, "mode = \"stream\"")],
        &format!("metrics_listen = \"127.0.0.1:{port}\""),
    )
    .await;
    let shutdown = CancellationToken::new();
    let svc = tokio::spawn(hq_puller::run(hq.settings.clone(), shutdown.clone()));
    eventually(30, "stream location applied 3 batches", || async {
        cursor_tick(hq.pool(), "st1").await >= 4
    })
    .await;
    let c = fake.counters("st1");
    assert!(
        c.waits.load(Ordering::SeqCst) >= 3,
        "long-polls carry wait=25"
    );
    assert_eq!(c.max_in_flight.load(Ordering::SeqCst), 1);
    // The service's /metrics endpoint.
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for needle in [
        "hq_puller_applied_changes_total{location=\"st1\"}",
        "hq_puller_last_success_timestamp_seconds{location=\"st1\"}",
        "hq_puller_backlog_changes{location=\"st1\"}",
        "hq_puller_lag_seconds{location=\"st1\"}",
        "hq_puller_location_state{location=\"st1\",state=\"ok\"} 1",
    ] {
        assert!(text.contains(needle), "/metrics lacks {needle}:\n{text}");
    }
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(30), svc)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

// 7 ------------------------------------------------------------------------------------

#[tokio::test]
async fn sigterm_during_a_run_exits_cleanly_at_a_batch_boundary() {
    let mut b = Branch::new("b07");
    b.grow = true;
    b.endless = true;
    b.delay = Duration::from_millis(200);
    let (_fake, base) = Fake::start(vec![b]).await;
    let hq = hq(
        &[("b07", &base)],
        "schedule = \"* * * * * *\"\nrun_budget = \"1h\"",
    )
    .await;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_hq-puller"))
        .args(["run", "--config"])
        .arg(&hq.config)
        .env_remove("HQ_PULLER_CONFIG")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    eventually(60, "three batches applied", || async {
        cursor_tick(hq.pool(), "b07").await >= 4
    })
    .await;
    let pid = child.id().unwrap();
    let st = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
    let tick = cursor_tick(hq.pool(), "b07").await;
    let (n, max): (i64, Option<i64>) =
        sqlx::query_as("SELECT count(*), max(product_id) FROM hq.inventory")
            .fetch_one(hq.pool())
            .await
            .unwrap();
    // Window k (tick k -> k+1) inserts product k: the cursor names exactly the rows applied.
    assert_eq!(n, tick - 1);
    assert_eq!(max, Some(tick - 1));
    let (outcome, cursor_after): (String, Option<String>) = sqlx::query_as(
        "SELECT outcome, cursor_after FROM sync.runs WHERE location_id='b07' ORDER BY run_id DESC LIMIT 1",
    )
    .fetch_one(hq.pool())
    .await
    .unwrap();
    assert_eq!(outcome, "interrupted");
    assert_eq!(cursor_after, loc_row(hq.pool(), "b07").await.1);
}

// 8 ------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_json_lists_every_location() {
    let mut good = Branch::new("s_ok");
    good.grow = true;
    let bad = Branch::new("s_bad").window(vec![ch(1, "nope", "D", &pk(1), None)]);
    let (_fake, base) = Fake::start(vec![good, bad]).await;
    let hq = hq(&[("s_ok", &base), ("s_bad", &base)], "").await;
    pull(&hq, &["s_ok", "s_bad"]).await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hq-puller"))
        .args(["status", "--json", "--config"])
        .arg(&hq.config)
        .env_remove("HQ_PULLER_CONFIG")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = v.as_array().unwrap();
    assert_eq!(rows.len(), 2);
    let get = |id: &str| rows.iter().find(|r| r["id"] == id).unwrap().clone();
    let ok = get("s_ok");
    assert_eq!(ok["state"], "ok");
    assert!(ok["cursor"].as_str().unwrap().contains(":2:"));
    assert_eq!(ok["backlog"], 0);
    assert!(ok["lag_seconds"].is_number());
    assert!(ok["last_success_at"].is_string());
    assert_eq!(ok["last_run_outcome"], "ok");
    let bad = get("s_bad");
    assert_eq!(bad["state"], "paused");
    assert!(bad["cursor"].is_null());
    assert!(bad["last_error"]
        .as_str()
        .unwrap()
        .contains("unknown table \"nope\""));
    assert!(bad["paused_reason"]
        .as_str()
        .unwrap()
        .contains("unknown table"));
    assert_eq!(bad["last_run_outcome"], "paused");
    // No service ran: the scheduled jobs never fired.
    assert_eq!(bad["job_stalled"], true);
    assert_eq!(bad["mode"], "schedule");

    // The table form names the same.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hq-puller"))
        .args(["status", "--config"])
        .arg(&hq.config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("s_bad") && text.contains("paused") && text.contains("tick 2"),
        "{text}"
    );

    // migrate is idempotent and keeps states and cursors.
    for _ in 0..2 {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_hq-puller"))
            .args(["migrate", "--config"])
            .arg(&hq.config)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(loc_row(hq.pool(), "s_bad").await.0, "paused");
    assert_eq!(cursor_tick(hq.pool(), "s_ok").await, 2);

    // A one-shot pull of everything reports the paused location and exits 1.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hq-puller"))
        .args(["pull", "--all", "--config"])
        .arg(&hq.config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("s_bad: 0 changes in 0 batches, skipped"),
        "{text}"
    );
    assert!(text.contains("s_ok: 1 changes in 1 batches, ok"), "{text}");

    // resume via the CLI
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hq-puller"))
        .args(["resume", "s_bad", "--config"])
        .arg(&hq.config)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(loc_row(hq.pool(), "s_bad").await.0, "ok");
}

#[tokio::test]
async fn check_config_reports_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let token = write_token(dir.path(), "t", 0o600);
    let url = tests::pg::fresh_database("hq_check").await.unwrap();
    let write = |db: &str| {
        let p = dir.path().join("c.toml");
        std::fs::write(
            &p,
            format!(
                "database_url = {db:?}\nallow_plain_http = true\n[[locations]]\nid = \"b01\"\nurl = \"http://127.0.0.1:7070\"\ntoken_file = {:?}\n",
                token.display().to_string()
            ),
        )
        .unwrap();
        p
    };
    let run = |p: &Path, args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_hq-puller"))
            .args(args)
            .arg("--config")
            .arg(p)
            .env_remove("HQ_PULLER_CONFIG")
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).to_string(),
        )
    };
    let good = write(&url);
    let (code, out) = run(&good, &["check-config", "--require-database"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("database: reachable,") && out.contains("migrations pending"),
        "{out}"
    );
    let (code, out) = run(&good, &["migrate"]);
    assert_eq!(code, 0, "{out}");
    let (code, out) = run(&good, &["check-config"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("database: reachable, migrated"), "{out}");
    // Nothing listens on port 1: reported, and an error only when required.
    let bad = write("postgres://hq@127.0.0.1:1/hq");
    let (code, out) = run(&bad, &["check-config"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("database: NOT reachable"), "{out}");
    let (code, _) = run(&bad, &["check-config", "--require-database"]);
    assert_eq!(code, 1);
}
