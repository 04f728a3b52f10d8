//! The file index in the branch database (SQLite `_pull_files`, PostgreSQL `pull.files`):
//! the current state of `files_dir`. Writing it fires the capture triggers, so each
//! changed row becomes a `_files` event in the change log, in the same transaction.

use crate::db::Db;
use crate::error::Result;
use chrono::{DateTime, Utc};
use schemas::files::mtime_text;
use schemas::sql::sqlite as sq;
use std::collections::HashMap;

/// One indexed file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub size: i64,
    pub sha256: String,
    pub mtime: DateTime<Utc>,
}

/// Rows written per transaction (a scan of many new files makes several windows).
const CHUNK: usize = 500;

/// The whole index.
pub async fn load(db: &Db) -> Result<HashMap<String, Entry>> {
    Ok(match db {
        Db::Sqlite { pool, .. } => {
            let rows: Vec<(String, i64, String, String)> = sqlx::query_as(&format!(
                "SELECT path, size, sha256, mtime FROM {}",
                sq::FILES
            ))
            .fetch_all(pool)
            .await?;
            rows.into_iter()
                .map(|(p, size, sha256, m)| {
                    // An unparsable mtime compares unequal: the file is re-hashed.
                    let mtime = DateTime::parse_from_rfc3339(&m)
                        .map(|t| t.with_timezone(&Utc))
                        .unwrap_or_default();
                    (
                        p,
                        Entry {
                            size,
                            sha256,
                            mtime,
                        },
                    )
                })
                .collect()
        }
        Db::Postgres(pool) => {
            let rows: Vec<(String, i64, String, DateTime<Utc>)> =
                sqlx::query_as("SELECT path, size, sha256, mtime FROM pull.files")
                    .fetch_all(pool)
                    .await?;
            rows.into_iter()
                .map(|(p, size, sha256, mtime)| {
                    (
                        p,
                        Entry {
                            size,
                            sha256,
                            mtime,
                        },
                    )
                })
                .collect()
        }
    })
}

/// Writes upserts and deletes, [`CHUNK`] rows per transaction.
pub async fn write(db: &Db, upserts: &[(String, Entry)], deletes: &[String]) -> Result<()> {
    enum W<'a> {
        Up(&'a str, &'a Entry),
        Del(&'a str),
    }
    let all: Vec<W> = deletes
        .iter()
        .map(|p| W::Del(p))
        .chain(upserts.iter().map(|(p, e)| W::Up(p, e)))
        .collect();
    for chunk in all.chunks(CHUNK) {
        match db {
            Db::Sqlite { pool, .. } => {
                let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
                for w in chunk {
                    match w {
                        W::Up(p, e) => {
                            sqlx::query(&format!(
                                "INSERT INTO {} (path, size, sha256, mtime) VALUES (?1, ?2, ?3, ?4) \
                                 ON CONFLICT (path) DO UPDATE SET size = excluded.size, \
                                 sha256 = excluded.sha256, mtime = excluded.mtime",
                                sq::FILES
                            ))
                            .bind(p)
                            .bind(e.size)
                            .bind(&e.sha256)
                            .bind(mtime_text(&e.mtime))
                            .execute(&mut *tx)
                            .await?;
                        }
                        W::Del(p) => {
                            sqlx::query(&format!("DELETE FROM {} WHERE path = ?1", sq::FILES))
                                .bind(p)
                                .execute(&mut *tx)
                                .await?;
                        }
                    }
                }
                tx.commit().await?;
            }
            Db::Postgres(pool) => {
                let mut tx = pool.begin().await?;
                for w in chunk {
                    match w {
                        W::Up(p, e) => {
                            sqlx::query(
                                "INSERT INTO pull.files (path, size, sha256, mtime) VALUES ($1, $2, $3, $4) \
                                 ON CONFLICT (path) DO UPDATE SET size = excluded.size, \
                                 sha256 = excluded.sha256, mtime = excluded.mtime",
                            )
                            .bind(p)
                            .bind(e.size)
                            .bind(&e.sha256)
                            .bind(e.mtime)
                            .execute(&mut *tx)
                            .await?;
                        }
                        W::Del(p) => {
                            sqlx::query("DELETE FROM pull.files WHERE path = $1")
                                .bind(p)
                                .execute(&mut *tx)
                                .await?;
                        }
                    }
                }
                tx.commit().await?;
            }
        }
    }
    Ok(())
}

/// The indexed files with this content: (path, size).
pub async fn by_sha256(db: &Db, sha256: &str) -> Result<Vec<(String, i64)>> {
    Ok(match db {
        Db::Sqlite { pool, .. } => {
            sqlx::query_as(&format!(
                "SELECT path, size FROM {} WHERE sha256 = ?1 ORDER BY path",
                sq::FILES
            ))
            .bind(sha256)
            .fetch_all(pool)
            .await?
        }
        Db::Postgres(pool) => {
            sqlx::query_as("SELECT path, size FROM pull.files WHERE sha256 = $1 ORDER BY path")
                .bind(sha256)
                .fetch_all(pool)
                .await?
        }
    })
}
