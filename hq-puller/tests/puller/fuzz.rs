//! Fuzzing (proptest) of what HQ reads from a listener: the batch decoder and validator
//! get malformed JSON, wrong types, huge numbers and strings, deep nesting, unknown
//! tables and columns, SQL-looking identifiers and values. Every input ends in a value
//! or a clear error, never a panic; a sample is applied against a real HQ: a refused
//! batch applies nothing and leaves the cursor where it was.
//!
//! Cases: 64 per property in the suite; `PROPTEST_CASES=N` for longer runs
//! (`tests/fuzz.sh`).

use crate::fake::{Branch, Fake, FakeChange};
use hq_puller::validate::{check, Expected};
use hq_puller::ErrorKind;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, TestRunner};
use schemas::wire::{ChangesResponse, Op};
use schemas::Catalogue;

pub fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Identifiers: the catalogue's own, near misses, and hostile ones.
fn ident() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(vec![
            "products", "inventory", "product_id", "quantity_on_hand", "reorder_level",
            "updated_at", "sku", "description", "price",
        ])
        .prop_map(str::to_string),
        1 => prop::sample::select(vec![
            "products; DROP TABLE hq.products; --",
            "\"inventory\"",
            "Inventory",
            "pg_catalog.pg_class",
            "_seq",
            "_deleted",
            "location_id",
            "",
            "ünïcödé",
            "a\u{0}b",
        ])
        .prop_map(str::to_string),
        1 => "[a-zA-Z_][a-zA-Z0-9_$]{0,70}",
    ]
}

/// A JSON value as raw text: wrong types, huge numbers and strings, nesting.
fn raw_value(max_depth: u32) -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        Just("null".to_string()),
        any::<bool>().prop_map(|b| b.to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| f.to_string()),
        "-?[1-9][0-9]{19,300}",
        Just("1e400".to_string()),
        Just("-0.0000000000000000000000000001".to_string()),
        "[ -~]{0,40}".prop_map(|s| serde_json::to_string(&s).unwrap()),
        (1usize..200_000).prop_map(|n| serde_json::to_string(&"x".repeat(n)).unwrap()),
        Just(r#""'; DELETE FROM sync.locations; --""#.to_string()),
        Just(r#""2026-13-45T99:99:99Z""#.to_string()),
    ];
    leaf.prop_recursive(max_depth, 64, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(","))),
            prop::collection::vec((ident(), inner), 0..4).prop_map(|kv| {
                let parts: Vec<String> = kv
                    .into_iter()
                    .map(|(k, v)| format!("{}:{v}", serde_json::to_string(&k).unwrap()))
                    .collect();
                format!("{{{}}}", parts.join(","))
            }),
        ]
    })
}

/// A JSON object of columns → values, as raw text.
fn raw_object(max_depth: u32) -> impl Strategy<Value = String> {
    prop::collection::vec((ident(), raw_value(max_depth)), 0..6).prop_map(|kv| {
        let parts: Vec<String> = kv
            .into_iter()
            .map(|(k, v)| format!("{}:{v}", serde_json::to_string(&k).unwrap()))
            .collect();
        format!("{{{}}}", parts.join(","))
    })
}

/// A change that is valid JSON for the fake listener (which serves `FakeChange`s).
fn fake_change() -> impl Strategy<Value = FakeChange> {
    (
        -5i64..1_000,
        ident(),
        prop::sample::select(vec![Op::Insert, Op::Update, Op::Delete]),
        prop_oneof![
            raw_object(3),
            any::<i64>().prop_map(|n| format!(r#"{{"product_id":{n}}}"#)),
        ],
        prop::option::of(raw_object(3)),
    )
        .prop_map(|(seq, table, op, pk, row)| FakeChange {
            seq,
            table,
            op,
            pk,
            row,
        })
}

/// A whole response body: a well-formed envelope around hostile changes, or a body
/// corrupted at the byte level (truncated, spliced, deeply nested).
fn body() -> impl Strategy<Value = Vec<u8>> {
    let change = (
        any::<i64>(),
        ident(),
        prop::sample::select(vec!["\"I\"", "\"U\"", "\"D\"", "\"X\"", "1", "null"]),
        raw_value(4),
        raw_value(4),
        prop::sample::select(vec![
            "\"2026-01-01T00:00:00Z\"",
            "\"yesterday\"",
            "1700000000",
            "null",
        ]),
    )
        .prop_map(|(seq, table, op, pk, row, ts)| {
            format!(
                r#"{{"seq":{seq},"table":{},"op":{op},"pk":{pk},"row":{row},"ts":{ts}}}"#,
                serde_json::to_string(&table).unwrap()
            )
        });
    let i = uuid::Uuid::nil();
    let envelope = prop::collection::vec(change, 0..8).prop_map(move |cs| -> Vec<u8> {
        format!(
            r#"{{"protocol":1,"location":"b01","instance_id":"{i}","time_zone":"UTC","after":null,"next":"{i}:2:{i}","more":false,"limit":10,"limit_clamped":false,"backlog":0,"changes":[{}]}}"#,
            cs.join(",")
        )
        .into_bytes()
    }).boxed();
    prop_oneof![
        6 => envelope.clone(),
        1 => (envelope.clone(), any::<prop::sample::Index>()).prop_map(|(b, i)| {
            let cut = i.index(b.len().max(1));
            b[..cut].to_vec()
        }),
        1 => (envelope, any::<prop::sample::Index>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(mut b, i, junk)| {
                let at = i.index(b.len().max(1));
                b.splice(at..at, junk);
                b
            }),
        1 => (1usize..5_000).prop_map(|d| format!("{}{}", "[".repeat(d), "]".repeat(d)).into_bytes()),
        1 => prop::collection::vec(any::<u8>(), 0..256),
    ]
}

fn expected() -> Expected {
    Expected {
        location: "b01".into(),
        ..Default::default()
    }
}

/// Decode + validate never panic; every refusal is a clear, permanent error.
#[test]
fn decoder_and_validator_never_panic() {
    let catalogue = Catalogue::product_management();
    let mut runner = TestRunner::new(Config::with_cases(cases(64)));
    runner
        .run(&body(), |b| {
            match serde_json::from_slice::<ChangesResponse>(&b) {
                Err(e) => prop_assert!(!e.to_string().is_empty()),
                Ok(resp) => {
                    if let Err(e) = check(&resp, &expected(), &catalogue) {
                        let m = e.to_string();
                        prop_assert_eq!(e.kind(), ErrorKind::Permanent, "{}", m);
                        prop_assert!(
                            m.starts_with("listener sent an invalid batch")
                                || m.contains("change seq"),
                            "{}",
                            m
                        );
                        // Messages stay bounded whatever the input's size.
                        prop_assert!(m.len() < 2_000, "{} bytes", m.len());
                    }
                }
            }
            Ok(())
        })
        .unwrap();
}

/// A sample of hostile batches served by fake listeners after one good window: each is
/// refused (location paused, reason recorded) with nothing of it applied and the cursor
/// unmoved, or, when by chance it is valid, applied whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_batches_apply_nothing_and_keep_the_cursor() {
    let n = cases(12).min(200) as usize;
    let mut runner = TestRunner::new(Config::with_cases(n as u32));
    let strategy = prop::collection::vec(fake_change(), 1..6);
    let mut branches = Vec::new();
    for i in 0..n {
        let changes = strategy
            .new_tree(&mut runner)
            .expect("a generated batch")
            .current();
        let good = crate::fake::ch(
            -1_000,
            "inventory",
            "I",
            r#"{"product_id":1}"#,
            Some(r#"{"product_id":1,"quantity_on_hand":1}"#),
        );
        branches.push(
            Branch::new(&format!("fz{i:03}"))
                .window(vec![good])
                .window(changes),
        );
    }
    let ids: Vec<String> = branches.iter().map(|b| b.location.clone()).collect();
    let (_fake, base) = Fake::start(branches).await;
    let locs: Vec<(&str, &str)> = ids.iter().map(|i| (i.as_str(), base.as_str())).collect();
    let hq = crate::hq(&locs, "").await;
    let all: Vec<&str> = ids.iter().map(String::as_str).collect();
    let reports = crate::pull(&hq, &all).await;
    let mut refused = 0;
    for id in &ids {
        let r = reports.iter().find(|r| &r.location == id).unwrap();
        let (state, _, reason) = crate::loc_row(hq.pool(), id).await;
        let tick = crate::cursor_tick(hq.pool(), id).await;
        let rows: i64 = sqlx::query_scalar(
            "SELECT (SELECT count(*) FROM hq.inventory WHERE location_id = $1) + (SELECT count(*) FROM hq.products WHERE location_id = $1)",
        )
        .bind(id)
        .fetch_one(hq.pool())
        .await
        .unwrap();
        if r.outcome == "ok" {
            assert_eq!(tick, 3, "{id}: applied but cursor at {tick}");
        } else {
            refused += 1;
            assert_eq!(r.outcome, "paused", "{id}: {r:?}");
            assert_eq!(state, "paused", "{id}");
            assert!(!reason.unwrap_or_default().is_empty(), "{id}: no reason");
            assert_eq!(tick, 2, "{id}: cursor moved past the refused batch");
            assert_eq!(rows, 1, "{id}: part of a refused batch was applied");
        }
    }
    assert!(
        refused * 2 >= n,
        "only {refused} of {n} hostile batches refused"
    );
}

/// Random TOML for HQ's configuration: known keys (global and per location) with values
/// of every type, unknown keys: a clear error or a valid configuration, never a panic.
#[test]
fn config_loading_never_panics() {
    use figment::providers::{Format, Toml};
    let keys = prop::sample::select(vec![
        "database_url",
        "schedule",
        "max_concurrent_pulls",
        "files_dir",
        "catalogue_file",
        "run_budget",
        "request_timeout",
        "connect_timeout",
        "batch_limit",
        "metrics_listen",
        "log_format",
        "ca_file",
        "allow_plain_http",
        "max_response_bytes",
        "id",
        "url",
        "token_file",
        "mode",
        "enabled",
        "colour",
    ]);
    let value = prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        any::<bool>().prop_map(|b| b.to_string()),
        "[ -~]{0,30}".prop_map(|s| serde_json::to_string(&s).unwrap()),
        Just("\"postgres://hq@localhost/hq\"".to_string()),
        Just("\"http://127.0.0.1:1\"".to_string()),
        Just("\"https://b01.example:7070/x?y#z\"".to_string()),
        Just("\"* * * * * *\"".to_string()),
        Just("\"1s\"".to_string()),
        Just("\"99999999999999999999h\"".to_string()),
        Just("[1, \"a\"]".to_string()),
        "[0-9]{20,40}",
    ];
    let line = (keys, value).prop_map(|(k, v)| format!("{k} = {v}\n"));
    let doc = (
        prop::collection::vec(line.clone(), 0..8),
        prop::collection::vec(prop::collection::vec(line, 0..6), 0..3),
    )
        .prop_map(|(global, locs)| {
            let mut s: String = global.concat();
            for l in locs {
                s.push_str("[[locations]]\n");
                s.push_str(&l.concat());
            }
            s
        });
    let mut runner = TestRunner::new(Config::with_cases(cases(128)));
    runner
        .run(&doc, |doc| {
            match figment::Figment::from(Toml::string(&doc)).extract::<hq_puller::config::Config>()
            {
                Err(e) => prop_assert!(!e.to_string().is_empty()),
                Ok(c) => {
                    if let Err(e) = c.validate() {
                        prop_assert!(!e.to_string().is_empty());
                    }
                }
            }
            Ok(())
        })
        .unwrap();
}

/// A response larger than `max_response_bytes` is cut off while it is read: the
/// location pauses naming the limit, nothing is applied, the cursor stays.
#[tokio::test]
async fn oversized_responses_are_refused() {
    let changes: Vec<FakeChange> = (1..=60)
        .map(|i| {
            crate::fake::ch(
                i,
                "inventory",
                "I",
                &format!(r#"{{"product_id":{i}}}"#),
                Some(&format!(r#"{{"product_id":{i},"quantity_on_hand":{i}}}"#)),
            )
        })
        .collect();
    let (_fake, base) = Fake::start(vec![Branch::new("big").window(changes)]).await;
    let hq = crate::hq(&[("big", &base)], "max_response_bytes = 2048").await;
    let r = crate::pull(&hq, &["big"]).await;
    assert_eq!(r[0].outcome, "paused", "{:?}", r[0]);
    let (state, cursor, reason) = crate::loc_row(hq.pool(), "big").await;
    assert_eq!(state, "paused");
    assert_eq!(cursor, None);
    let reason = reason.unwrap_or_default();
    assert!(
        reason.contains("exceeds max_response_bytes = 2048"),
        "{reason}"
    );
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM hq.inventory")
        .fetch_one(hq.pool())
        .await
        .unwrap();
    assert_eq!(rows, 0);
}
