//! Every config key, CLI subcommand and flag, and HTTP endpoint of branch-listener is
//! documented (README.md, deploy/INSTALL.md or docs/*.md). The lists come from the code:
//! serde's field list of the config struct, clap's `--help`, the router's `.route`s.

use branch_listener::Config;
use figment::providers::{Format, Toml};
use figment::Figment;
use std::path::Path;
use tests::docs::{cli_interface, docs_text, ensure_documented, expected_fields, routes};

#[test]
fn every_config_key_flag_and_endpoint_is_documented() {
    let docs = docs_text().unwrap();
    let e = Figment::from(Toml::string("zz_not_a_key = 1"))
        .extract::<Config>()
        .expect_err("an unknown key is refused");
    let keys = expected_fields(&e.to_string()).unwrap();
    assert!(keys.contains(&"token_file".to_string()), "{keys:?}");
    ensure_documented("branch-listener config keys", &keys, &docs).unwrap();

    let (subcommands, flags) =
        cli_interface(Path::new(env!("CARGO_BIN_EXE_branch-listener"))).unwrap();
    assert!(
        subcommands.contains(&"install".to_string()),
        "{subcommands:?}"
    );
    assert!(flags.contains("--with-demo-schema"), "{flags:?}");
    for s in &subcommands {
        let c = format!("branch-listener {s}");
        assert!(docs.contains(c.as_str()), "subcommand not documented: {c}");
    }
    let flags: Vec<String> = flags.into_iter().collect();
    ensure_documented("branch-listener flags", &flags, &docs).unwrap();

    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let routes: Vec<String> = routes(&src).unwrap().into_iter().collect();
    assert!(routes.contains(&"/v1/changes".to_string()), "{routes:?}");
    ensure_documented("branch-listener endpoints", &routes, &docs).unwrap();
}
