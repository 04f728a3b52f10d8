//! Install and uninstall of the pull area and the capture triggers (idempotent).
//!
//! Install records the instance id, the layout version ([`PULL_AREA_VERSION`]) and the
//! catalogue fingerprint in the pull area's metadata. Re-running it with the same
//! catalogue and version changes nothing; a changed catalogue re-creates the triggers
//! (keeping the instance and its history); a newer layout is refused. A new instance id
//! is made only when the pull area is created fresh. Uninstall removes exactly what
//! install added (never the application's tables, demo or not).

use crate::db::Db;
use crate::error::{Error, Result};
use schemas::sql::{postgres as pg, q, sqlite as sq, PULL_AREA_VERSION};
use schemas::Catalogue;
use std::collections::BTreeSet;
use uuid::Uuid;

/// What install did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A fresh pull area with a new instance id.
    Created { instance_id: Uuid },
    /// Already installed with this catalogue and layout: nothing changed.
    Unchanged { instance_id: Uuid },
    /// Triggers re-created for a changed catalogue or layout; instance kept.
    Updated { instance_id: Uuid },
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Created { instance_id } => {
                write!(f, "installed the pull area: new instance {instance_id}")
            }
            Outcome::Unchanged { instance_id } => write!(
                f,
                "already installed (instance {instance_id}, same catalogue and layout): nothing to do"
            ),
            Outcome::Updated { instance_id } => write!(
                f,
                "catalogue or layout changed: capture triggers re-created (instance {instance_id} kept)"
            ),
        }
    }
}

fn missing_table(table: &str) -> Error {
    Error::Install(format!(
        "catalogue table {table:?} does not exist in the branch database (create it, remove it from the catalogue file, or use --with-demo-schema)"
    ))
}

fn check_columns(table: &schemas::Table, present: &BTreeSet<String>) -> Result<()> {
    if present.is_empty() {
        return Err(missing_table(&table.name));
    }
    let missing: Vec<&str> = table
        .column_names()
        .filter(|c| !present.contains(*c))
        .collect();
    if !missing.is_empty() {
        return Err(Error::Install(format!(
            "table {:?} lacks catalogue column(s) {}",
            table.name,
            missing.join(", ")
        )));
    }
    Ok(())
}

fn check_version(version: i64) -> Result<()> {
    if version > PULL_AREA_VERSION {
        return Err(Error::Install(format!(
            "the pull area has layout version {version}, newer than this listener's {PULL_AREA_VERSION}: upgrade the listener"
        )));
    }
    Ok(())
}

pub async fn install(db: &Db, catalogue: &Catalogue, with_demo_schema: bool) -> Result<Outcome> {
    let fingerprint = catalogue.fingerprint();
    let outcome = match db {
        Db::Sqlite { pool, .. } => {
            let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
            if with_demo_schema {
                for s in sq::create_demo_schema(catalogue) {
                    sqlx::query(&s).execute(&mut *tx).await?;
                }
            }
            for t in &catalogue.tables {
                let cols: BTreeSet<String> =
                    sqlx::query_scalar("SELECT name FROM pragma_table_info(?1)")
                        .bind(&t.name)
                        .fetch_all(&mut *tx)
                        .await?
                        .into_iter()
                        .collect();
                check_columns(t, &cols)?;
            }
            let installed: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1)",
            )
            .bind(sq::META)
            .fetch_one(&mut *tx)
            .await?;
            let expected: BTreeSet<String> = catalogue
                .tables
                .iter()
                .map(|t| t.name.as_str())
                .chain([schemas::files::FILES_TABLE])
                .flat_map(|t| ["ins", "upd", "del"].map(|k| format!("_pull_{t}_{k}")))
                .collect();
            let existing = if installed {
                let pairs: Vec<(String, String)> =
                    sqlx::query_as(&format!("SELECT key, value FROM {}", sq::META))
                        .fetch_all(&mut *tx)
                        .await?;
                installed_identity(pairs)
            } else {
                None
            };
            let triggers: BTreeSet<String> = sqlx::query_scalar(sq::LIST_TRIGGERS)
                .fetch_all(&mut *tx)
                .await?
                .into_iter()
                .collect();
            let outcome = match existing {
                Some((instance_id, version, fp)) => {
                    check_version(version)?;
                    if version == PULL_AREA_VERSION && fp == fingerprint && triggers == expected {
                        Outcome::Unchanged { instance_id }
                    } else {
                        for name in &triggers {
                            sqlx::query(&sq::drop_trigger(name))
                                .execute(&mut *tx)
                                .await?;
                        }
                        // An older layout may lack tables (the file index).
                        for s in sq::create_pull_area()
                            .into_iter()
                            .chain(catalogue.tables.iter().flat_map(sq::create_triggers))
                            .chain(sq::create_files_triggers())
                        {
                            sqlx::query(&s).execute(&mut *tx).await?;
                        }
                        for (k, v) in [
                            ("pull_area_version", PULL_AREA_VERSION.to_string()),
                            ("catalogue_fingerprint", fingerprint.clone()),
                        ] {
                            sqlx::query(&format!(
                                "INSERT INTO {} (key, value) VALUES (?1, ?2) \
                                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                                sq::META
                            ))
                            .bind(k)
                            .bind(v)
                            .execute(&mut *tx)
                            .await?;
                        }
                        Outcome::Updated { instance_id }
                    }
                }
                None => {
                    for name in &triggers {
                        sqlx::query(&sq::drop_trigger(name))
                            .execute(&mut *tx)
                            .await?;
                    }
                    for s in sq::drop_pull_area()
                        .into_iter()
                        .chain(sq::create_pull_area())
                    {
                        sqlx::query(&s).execute(&mut *tx).await?;
                    }
                    let instance_id = Uuid::new_v4();
                    let tick: i64 = sqlx::query_scalar(&format!(
                        "INSERT INTO {} (tick_uuid, head_seq) \
                         SELECT ?1, COALESCE((SELECT MAX(seq) FROM {}), 0) RETURNING tick_id",
                        sq::TICKS,
                        sq::CHANGES
                    ))
                    .bind(Uuid::new_v4().to_string())
                    .fetch_one(&mut *tx)
                    .await?;
                    for (k, v) in meta_rows(instance_id, &fingerprint, tick) {
                        sqlx::query(&format!(
                            "INSERT INTO {} (key, value) VALUES (?1, ?2)",
                            sq::META
                        ))
                        .bind(k)
                        .bind(v)
                        .execute(&mut *tx)
                        .await?;
                    }
                    for s in catalogue
                        .tables
                        .iter()
                        .flat_map(sq::create_triggers)
                        .chain(sq::create_files_triggers())
                    {
                        sqlx::query(&s).execute(&mut *tx).await?;
                    }
                    Outcome::Created { instance_id }
                }
            };
            tx.commit().await?;
            outcome
        }
        Db::Postgres(pool) => {
            let mut tx = pool.begin().await?;
            sqlx::query("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
                .execute(&mut *tx)
                .await?;
            if with_demo_schema {
                for s in pg::create_demo_schema(catalogue) {
                    sqlx::query(&s).execute(&mut *tx).await?;
                }
            }
            for t in &catalogue.tables {
                let cols: BTreeSet<String> = sqlx::query_scalar(
                    "SELECT attname::text FROM pg_attribute \
                     WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped",
                )
                .bind(q(&t.name))
                .fetch_all(&mut *tx)
                .await?
                .into_iter()
                .collect();
                check_columns(t, &cols)?;
            }
            let installed: bool = sqlx::query_scalar("SELECT to_regclass('pull.meta') IS NOT NULL")
                .fetch_one(&mut *tx)
                .await?;
            let existing = if installed {
                let pairs: Vec<(String, String)> =
                    sqlx::query_as("SELECT key, value FROM pull.meta")
                        .fetch_all(&mut *tx)
                        .await?;
                installed_identity(pairs)
            } else {
                None
            };
            let captured: BTreeSet<String> = sqlx::query_scalar(pg::LIST_CAPTURED_TABLES)
                .fetch_all(&mut *tx)
                .await?
                .into_iter()
                .collect();
            let expected: BTreeSet<String> =
                catalogue.tables.iter().map(|t| t.name.clone()).collect();
            let capture_stmts: Vec<String> = captured
                .difference(&expected)
                .flat_map(|t| {
                    [
                        format!("DROP TRIGGER IF EXISTS {} ON {}", pg::TRIGGER_NAME, q(t)),
                        format!(
                            "DROP FUNCTION IF EXISTS pull.{}()",
                            q(&format!("capture_{t}"))
                        ),
                    ]
                })
                .chain(catalogue.tables.iter().flat_map(pg::create_capture))
                .collect();
            // An older layout may lack tables (the file index): created idempotently.
            let capture_stmts: Vec<String> = pg::create_pull_area()
                .into_iter()
                .chain(capture_stmts)
                .chain(pg::create_files_capture())
                .collect();
            let outcome = match existing {
                Some((instance_id, version, fp)) => {
                    check_version(version)?;
                    if version == PULL_AREA_VERSION && fp == fingerprint && captured == expected {
                        Outcome::Unchanged { instance_id }
                    } else {
                        for s in &capture_stmts {
                            sqlx::query(s).execute(&mut *tx).await?;
                        }
                        for (k, v) in [
                            ("pull_area_version", PULL_AREA_VERSION.to_string()),
                            ("catalogue_fingerprint", fingerprint.clone()),
                        ] {
                            sqlx::query(
                                "INSERT INTO pull.meta (key, value) VALUES ($1, $2) \
                                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                            )
                            .bind(k)
                            .bind(v)
                            .execute(&mut *tx)
                            .await?;
                        }
                        Outcome::Updated { instance_id }
                    }
                }
                None => {
                    let tables: Vec<String> = captured.iter().cloned().collect();
                    for s in pg::drop_pull_area(&tables)
                        .into_iter()
                        .chain(pg::create_pull_area())
                    {
                        sqlx::query(&s).execute(&mut *tx).await?;
                    }
                    let instance_id = Uuid::new_v4();
                    sqlx::query("SELECT pg_advisory_xact_lock($1)")
                        .bind(pg::TICK_LOCK_KEY)
                        .execute(&mut *tx)
                        .await?;
                    let tick: i64 = sqlx::query_scalar(
                        "INSERT INTO pull.ticks (snap, head_seq) \
                         SELECT pg_current_snapshot(), COALESCE((SELECT max(seq) FROM pull.changes), 0) \
                         RETURNING tick_id",
                    )
                    .fetch_one(&mut *tx)
                    .await?;
                    for (k, v) in meta_rows(instance_id, &fingerprint, tick) {
                        sqlx::query("INSERT INTO pull.meta (key, value) VALUES ($1, $2)")
                            .bind(k)
                            .bind(v)
                            .execute(&mut *tx)
                            .await?;
                    }
                    for s in catalogue
                        .tables
                        .iter()
                        .flat_map(pg::create_capture)
                        .chain(pg::create_files_capture())
                    {
                        sqlx::query(&s).execute(&mut *tx).await?;
                    }
                    Outcome::Created { instance_id }
                }
            };
            tx.commit().await?;
            outcome
        }
    };
    tracing::info!(outcome = %outcome, "install");
    Ok(outcome)
}

fn meta_rows(
    instance_id: Uuid,
    fingerprint: &str,
    install_tick: i64,
) -> Vec<(&'static str, String)> {
    vec![
        ("instance_id", instance_id.to_string()),
        ("pull_area_version", PULL_AREA_VERSION.to_string()),
        ("catalogue_fingerprint", fingerprint.to_string()),
        ("install_tick", install_tick.to_string()),
        ("acked_tick", "0".to_string()),
    ]
}

/// Removes the triggers and the pull area. Returns whether anything was installed.
pub async fn uninstall(db: &Db) -> Result<bool> {
    let found = match db {
        Db::Sqlite { pool, .. } => {
            let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
            let triggers: Vec<String> = sqlx::query_scalar(sq::LIST_TRIGGERS)
                .fetch_all(&mut *tx)
                .await?;
            let tables: i64 = sqlx::query_scalar(&format!(
                "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name IN ('{}', '{}', '{}', '{}')",
                sq::CHANGES,
                sq::TICKS,
                sq::META,
                sq::FILES
            ))
            .fetch_one(&mut *tx)
            .await?;
            for name in &triggers {
                sqlx::query(&sq::drop_trigger(name))
                    .execute(&mut *tx)
                    .await?;
            }
            for s in sq::drop_pull_area() {
                sqlx::query(&s).execute(&mut *tx).await?;
            }
            tx.commit().await?;
            !triggers.is_empty() || tables > 0
        }
        Db::Postgres(pool) => {
            let mut tx = pool.begin().await?;
            let tables: Vec<String> = sqlx::query_scalar(pg::LIST_CAPTURED_TABLES)
                .fetch_all(&mut *tx)
                .await?;
            let schema: bool = sqlx::query_scalar("SELECT to_regnamespace('pull') IS NOT NULL")
                .fetch_one(&mut *tx)
                .await?;
            for s in pg::drop_pull_area(&tables) {
                sqlx::query(&s).execute(&mut *tx).await?;
            }
            tx.commit().await?;
            !tables.is_empty() || schema
        }
    };
    tracing::info!(found, "uninstall");
    Ok(found)
}

/// The identity of an installed pull area from its metadata: instance id, layout
/// version, catalogue fingerprint; `None` when there is no (valid) instance id.
fn installed_identity(pairs: Vec<(String, String)>) -> Option<(Uuid, i64, String)> {
    crate::pull_area::meta_from_pairs(pairs)
        .ok()
        .map(|m| (m.instance_id, m.version, m.fingerprint))
}
