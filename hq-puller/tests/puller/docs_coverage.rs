//! Every config key, CLI subcommand and flag, and HTTP endpoint of hq-puller is
//! documented (README.md, deploy/INSTALL.md or docs/*.md). The lists come from the code:
//! serde's field lists of the config structs, clap's `--help`, the routers' `.route`s.

use figment::providers::{Format, Toml};
use figment::Figment;
use hq_puller::config::Config;
use std::path::Path;
use tests::docs::{cli_interface, docs_text, ensure_documented, expected_fields, routes};

fn fields(toml: &str) -> Vec<String> {
    let e = Figment::from(Toml::string(toml))
        .extract::<Config>()
        .expect_err("an unknown key is refused");
    expected_fields(&e.to_string()).unwrap()
}

#[test]
fn every_config_key_flag_and_endpoint_is_documented() {
    let docs = docs_text().unwrap();
    let top = fields("zz_not_a_key = 1");
    assert!(top.contains(&"admin_listen".to_string()), "{top:?}");
    ensure_documented("hq-puller config keys", &top, &docs).unwrap();
    let loc = fields("[[locations]]\nzz_not_a_key = 1");
    assert!(loc.contains(&"token_file".to_string()), "{loc:?}");
    ensure_documented("hq-puller [[locations]] keys", &loc, &docs).unwrap();

    let (subcommands, flags) = cli_interface(Path::new(env!("CARGO_BIN_EXE_hq-puller"))).unwrap();
    assert!(
        subcommands.contains(&"check-config".to_string()),
        "{subcommands:?}"
    );
    assert!(flags.contains("--config"), "{flags:?}");
    let cmds: Vec<String> = subcommands
        .iter()
        .map(|s| format!("hq-puller {s}"))
        .collect();
    for c in &cmds {
        assert!(docs.contains(c.as_str()), "subcommand not documented: {c}");
    }
    let flags: Vec<String> = flags.into_iter().collect();
    ensure_documented("hq-puller flags", &flags, &docs).unwrap();

    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let routes: Vec<String> = routes(&src).unwrap().into_iter().collect();
    for want in ["/", "/api/status", "/metrics"] {
        assert!(routes.contains(&want.to_string()), "{routes:?}");
    }
    ensure_documented("hq-puller endpoints", &routes, &docs).unwrap();
}
