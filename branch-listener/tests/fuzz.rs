//! Fuzzing (proptest) of what the listener parses from outside: the query of
//! `/v1/changes` (`parse_params`), cursors, and the configuration file (random TOML).
//! Every input ends in a value or a clear error naming the parameter or key, never a
//! panic. 128 cases per property in the suite; `PROPTEST_CASES=N` for longer runs
//! (`tests/fuzz.sh`).

use branch_listener::http::parse_params;
use branch_listener::Config;
use figment::providers::{Format, Toml};
use figment::Figment;
use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, TestRunner};
use std::collections::HashMap;
use std::time::Duration;

fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A configuration for `parse_params` (which reads only the limits).
fn config() -> Config {
    Config {
        listen: "127.0.0.1:0".into(),
        max_limit: 1000,
        max_wait: Duration::from_secs(30),
        rate_limit_per_second: 0,
        max_concurrent_requests: 8,
        ..Config::with_defaults(
            "b01",
            "sqlite:///tmp/fuzz.db",
            std::path::Path::new("/nonexistent/token"),
        )
        .expect("defaults")
    }
}

/// Query values: numbers of every size and sign, floats, garbage, cursor-like text.
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|f| f.to_string()),
        Just("NaN".to_string()),
        Just("inf".to_string()),
        Just("-0".to_string()),
        "[0-9]{20,400}",
        "\\PC{0,60}",
        (any::<u128>(), any::<i64>(), any::<u128>()).prop_map(|(a, t, b)| format!(
            "{}:{t}:{}",
            uuid::Uuid::from_u128(a),
            uuid::Uuid::from_u128(b)
        )),
        "[0-9a-f-]{0,40}:[-0-9]{0,25}:[0-9a-f-]{0,40}(:[a-z]{0,3})?",
    ]
}

#[test]
fn query_parsing_never_panics_and_bounds_its_values() {
    let cfg = config();
    let mut runner = TestRunner::new(RunnerConfig::with_cases(cases(128)));
    let keys = prop::sample::select(vec!["after", "limit", "wait", "other", ""]);
    let q = prop::collection::hash_map(keys.prop_map(str::to_string), value(), 0..4);
    runner
        .run(&q, |q: HashMap<String, String>| {
            match parse_params(&q, &cfg) {
                Ok(p) => {
                    prop_assert!(p.limit >= 1 && p.limit <= cfg.max_limit);
                    prop_assert!(p.wait <= cfg.max_wait);
                }
                Err(e) => {
                    let m = e.to_string();
                    prop_assert!(
                        m.starts_with("after:")
                            || m.starts_with("limit:")
                            || m.starts_with("wait:"),
                        "{}",
                        m
                    );
                    prop_assert!(m.len() < 300, "{}", m);
                }
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn cursor_parsing_round_trips_or_refuses() {
    let mut runner = TestRunner::new(RunnerConfig::with_cases(cases(256)));
    runner
        .run(&value(), |s| {
            if let Ok(c) = s.parse::<schemas::Cursor>() {
                prop_assert_eq!(c.to_string().parse::<schemas::Cursor>().unwrap(), c);
            }
            Ok(())
        })
        .unwrap();
}

/// Random TOML documents: known keys with values of every type, unknown keys, tables.
pub fn toml_doc(keys: Vec<&'static str>) -> impl Strategy<Value = String> {
    let v = prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        any::<bool>().prop_map(|b| b.to_string()),
        "\\PC{0,30}".prop_map(|s| toml::Value::String(s).to_string()),
        Just("\"1s\"".to_string()),
        Just("\"0s\"".to_string()),
        Just("\"99999999999999999999h\"".to_string()),
        Just("[1, \"a\", true]".to_string()),
        Just("{ a = 1 }".to_string()),
        Just("1979-05-27T07:32:00Z".to_string()),
        "[0-9]{20,40}",
    ];
    let key = prop_oneof![
        4 => prop::sample::select(keys).prop_map(str::to_string),
        1 => "[a-z_]{1,12}",
    ];
    prop::collection::vec((key, v), 0..12).prop_map(|kv| {
        kv.into_iter()
            .map(|(k, v)| format!("{k} = {v}\n"))
            .collect::<String>()
    })
}

#[test]
fn config_loading_never_panics() {
    let keys = vec![
        "location",
        "database_url",
        "listen",
        "token_file",
        "time_zone",
        "catalogue_file",
        "files_dir",
        "retention",
        "prune_interval",
        "tick_interval",
        "max_limit",
        "max_wait",
        "log_format",
        "tls_cert_file",
        "tls_key_file",
        "rate_limit_per_second",
        "rate_limit_burst",
        "max_concurrent_requests",
    ];
    let mut runner = TestRunner::new(RunnerConfig::with_cases(cases(128)));
    runner
        .run(&toml_doc(keys), |doc| {
            // Garbage TOML, wrong types, missing and unknown keys: an error naming a key.
            if let Err(e) = Config::from_figment(Figment::from(Toml::string(&doc))) {
                prop_assert!(e.to_string().starts_with("config key `"), "{}", e);
            }
            Ok(())
        })
        .unwrap();
}
