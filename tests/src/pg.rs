//! The throwaway PostgreSQL cluster of a test run.
//!
//! `TEST_PG_URL` (an admin URL, set by `tests/run.sh`) names a running cluster; when it
//! is unset, `tests/pg.sh ensure` starts one under `target/test-pg` (or reuses the one
//! running there). Each test takes a fresh database of its own, so tests never share
//! state and can run in parallel.

use anyhow::{bail, Context, Result};
use sqlx::{Connection, PgConnection};
use std::path::PathBuf;
use std::sync::OnceLock;

/// The workspace root (the folder holding `tests/pg.sh`).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests crate has a parent folder")
        .to_path_buf()
}

/// Admin URL of the cluster (superuser, database `postgres`).
pub fn admin_url() -> Result<String> {
    static URL: OnceLock<String> = OnceLock::new();
    if let Some(u) = URL.get() {
        return Ok(u.clone());
    }
    let url = match std::env::var("TEST_PG_URL") {
        Ok(u) if !u.is_empty() => u,
        _ => {
            let script = workspace_root().join("tests/pg.sh");
            let out = std::process::Command::new(&script)
                .arg("ensure")
                .output()
                .with_context(|| format!("running {}", script.display()))?;
            if !out.status.success() {
                bail!(
                    "{} ensure failed: {}",
                    script.display(),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            String::from_utf8(out.stdout)?.trim().to_string()
        }
    };
    Ok(URL.get_or_init(|| url).clone())
}

/// Replaces the database name of a PostgreSQL URL.
pub fn with_database(url: &str, db: &str) -> String {
    let (base, _) = url.rsplit_once('/').expect("URL has a path");
    let query = url
        .split_once('?')
        .map(|(_, q)| format!("?{q}"))
        .unwrap_or_default();
    format!("{base}/{db}{query}")
}

/// Creates a new empty database named `<prefix>_<random>` and returns its URL.
pub async fn fresh_database(prefix: &str) -> Result<String> {
    let admin = admin_url()?;
    let name = format!(
        "{}_{}",
        prefix
            .to_ascii_lowercase()
            .replace(|c: char| !c.is_ascii_alphanumeric(), "_"),
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let mut conn = PgConnection::connect(&admin)
        .await
        .with_context(|| format!("connecting to test cluster {admin}"))?;
    sqlx::query(&format!("CREATE DATABASE \"{name}\""))
        .execute(&mut conn)
        .await
        .with_context(|| format!("creating database {name}"))?;
    Ok(with_database(&admin, &name))
}

/// Drops a database made by [`fresh_database`] (closing its connections): benchmarks
/// free their disk as they go.
pub async fn drop_database(url: &str) -> Result<()> {
    let name = url
        .rsplit_once('/')
        .map(|(_, db)| db.split('?').next().unwrap_or(db))
        .filter(|db| !db.is_empty() && *db != "postgres")
        .with_context(|| format!("no database to drop in {url}"))?;
    let mut conn = PgConnection::connect(&admin_url()?).await?;
    sqlx::query(&format!(
        "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
        name.replace('"', "\"\"")
    ))
    .execute(&mut conn)
    .await
    .with_context(|| format!("dropping database {name}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_database_name() {
        assert_eq!(
            with_database("postgres://u@h:1/postgres", "x"),
            "postgres://u@h:1/x"
        );
    }

    #[tokio::test]
    async fn fresh_databases_are_distinct_and_usable() {
        let a = fresh_database("harness").await.unwrap();
        let b = fresh_database("harness").await.unwrap();
        assert_ne!(a, b);
        let mut c = PgConnection::connect(&a).await.unwrap();
        let one: i32 = sqlx::query_scalar("SELECT 1")
            .fetch_one(&mut c)
            .await
            .unwrap();
        assert_eq!(one, 1);
        drop(c);
        drop_database(&a).await.unwrap();
        assert!(PgConnection::connect(&a).await.is_err(), "{a} still exists");
        drop_database(&b).await.unwrap();
    }
}
