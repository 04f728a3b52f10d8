//! Documentation coverage helpers: the public interface (config keys, CLI subcommands and
//! flags, HTTP routes) derived from the code, and the documentation it must appear in.
//! Each binary's tests feed its own interface in (`hq-puller/tests/puller/docs_coverage.rs`,
//! `branch-listener/tests/docs_coverage.rs`).

use crate::pg::workspace_root;
use anyhow::{ensure, Context, Result};
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

/// README.md, every docs/*.md and deploy/INSTALL.md, concatenated.
pub fn docs_text() -> Result<String> {
    let root = workspace_root();
    let mut text = std::fs::read_to_string(root.join("README.md"))?;
    text.push_str(&std::fs::read_to_string(root.join("deploy/INSTALL.md"))?);
    let mut files: Vec<_> = std::fs::read_dir(root.join("docs"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    files.sort();
    for f in files {
        text.push_str(&std::fs::read_to_string(&f)?);
    }
    Ok(text)
}

/// The field names serde expects, from an "unknown field" error's list (serde reports
/// them all: ``unknown field `x`, expected one of `a`, `b` ``).
pub fn expected_fields(error: &str) -> Result<Vec<String>> {
    let list = error
        .split_once("expected")
        .with_context(|| format!("not an unknown-field error: {error}"))?
        .1;
    // serde: ``one of `a`, `b` ``; figment wraps it: `` `one of `a`, `b`` ``.
    let fields: Vec<String> = list
        .split('`')
        .filter(|t| {
            !t.is_empty()
                && t.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        })
        .map(String::from)
        .collect();
    ensure!(!fields.is_empty(), "no field list in: {error}");
    Ok(fields)
}

/// Subcommands and `--flags` of a binary, from its `--help` (clap's own rendering of
/// its `Command`), recursively one level into each subcommand.
pub fn cli_interface(bin: &Path) -> Result<(Vec<String>, BTreeSet<String>)> {
    let help = |args: &[&str]| -> Result<String> {
        let out = Command::new(bin).args(args).output()?;
        ensure!(out.status.success(), "{} {args:?} failed", bin.display());
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    };
    let main = help(&["--help"])?;
    let mut subcommands = Vec::new();
    let mut in_commands = false;
    for line in main.lines() {
        if line.starts_with("Commands:") {
            in_commands = true;
            continue;
        }
        if in_commands {
            match line
                .strip_prefix("  ")
                .and_then(|l| l.split_whitespace().next())
            {
                Some(name) if !line.starts_with("   ") && name != "help" => {
                    subcommands.push(name.to_string());
                }
                Some(_) => {}
                _ if line.trim().is_empty() => in_commands = false,
                _ => {}
            }
        }
    }
    ensure!(!subcommands.is_empty(), "no subcommands in:\n{main}");
    let mut flags = BTreeSet::new();
    let mut texts = vec![main];
    for s in &subcommands {
        texts.push(help(&[s.as_str(), "--help"])?);
    }
    for t in texts {
        for (i, _) in t.match_indices("--") {
            let flag: String = t[i + 2..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            if !flag.is_empty() && flag != "help" && flag != "version" {
                flags.insert(format!("--{flag}"));
            }
        }
    }
    Ok((subcommands, flags))
}

/// The text of every `.rs` file under the folders `dirs` (recursively).
pub fn rust_sources(dirs: &[&Path]) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut stack: Vec<_> = dirs.iter().map(|d| d.to_path_buf()).collect();
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(std::fs::read_to_string(&p)?);
            }
        }
    }
    Ok(out)
}

/// The paths of every `.route("...")` in the `.rs` files under `src`.
pub fn routes(src: &Path) -> Result<BTreeSet<String>> {
    let mut out = BTreeSet::new();
    for text in rust_sources(&[src])? {
        for (i, _) in text.match_indices(".route(") {
            let rest = text[i + 7..].trim_start();
            if let Some(rest) = rest.strip_prefix('"') {
                if let Some(end) = rest.find('"') {
                    out.insert(rest[..end].to_string());
                }
            }
        }
    }
    Ok(out)
}

/// Fails naming every item of `items` that the docs do not mention as `` `item` `` (or,
/// for routes, `` `GET item` ``).
pub fn ensure_documented(what: &str, items: &[String], docs: &str) -> Result<()> {
    let missing: Vec<&String> = items
        .iter()
        .filter(|i| {
            !docs.contains(&format!("`{i}`"))
                && !docs.contains(&format!("`GET {i}`"))
                && !docs.contains(&format!("`{i} "))
                && !docs.contains(&format!("`{i}=`"))
        })
        .collect();
    ensure!(
        missing.is_empty(),
        "{what} not documented in README.md, deploy/INSTALL.md or docs/*.md: {missing:?}"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_lists_and_documentation_checks() {
        let f = expected_fields("unknown field `zz`, expected one of `a`, `b_c`").unwrap();
        assert_eq!(f, ["a", "b_c"]);
        let f = expected_fields("unknown field: found `zz`, expected `one of `a`, `b``").unwrap();
        assert_eq!(f, ["a", "b"]);
        assert!(expected_fields("missing field `a`").is_err());
        let docs = "| `a` | x |\n`GET /x` and `--flag VALUE`";
        assert!(ensure_documented("k", &["a".into(), "/x".into()], docs).is_ok());
        let e = ensure_documented("keys", &["nope".into()], docs).unwrap_err();
        assert!(e.to_string().contains("nope"));
    }
}
