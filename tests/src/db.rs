//! One handle over the two branch backends (SQLite and PostgreSQL), for the workload
//! generator and the oracle. Statements are written once with `$N` placeholders (both
//! engines accept them); values are bound from [`Val`], which knows how each engine
//! stores a decimal or a timestamp.

use anyhow::{bail, Context, Result};
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Postgres, Row, Sqlite, Transaction};
use std::str::FromStr;
use std::time::Duration;

/// Which engine a URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn of_url(url: &str) -> Result<Backend> {
        if url.starts_with("sqlite:") {
            Ok(Backend::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Backend::Postgres)
        } else {
            bail!("unsupported database URL {url:?} (expected sqlite://PATH or postgres://...)")
        }
    }
}

/// A pool on a branch database.
#[derive(Clone, Debug)]
pub enum Db {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// A bound value.
#[derive(Debug, Clone)]
pub enum Val {
    Int(i64),
    Text(String),
    OptText(Option<String>),
    OptInt(Option<i64>),
    /// Decimal text; the statement casts it (`CAST($n AS NUMERIC)`), so it never passes
    /// through a float on the client.
    Num(String),
    /// A point in time: zone-less local text on SQLite (`YYYY-MM-DD HH:MM:SS.fff`, read
    /// by the listener in its configured zone), `timestamptz` on PostgreSQL.
    Ts(DateTime<Utc>),
}

/// How SQLite branches store a timestamp (zone-less text, as most applications do).
pub fn sqlite_timestamp(t: &DateTime<Utc>) -> String {
    t.naive_utc().format("%Y-%m-%d %H:%M:%S%.3f").to_string()
}

impl Db {
    /// Opens a pool. SQLite files are created when missing and use WAL mode, so readers
    /// (the listener) never block the application; writers wait up to 10 s for the lock.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Db> {
        Ok(match Backend::of_url(url)? {
            Backend::Sqlite => {
                let opts = SqliteConnectOptions::from_str(url)
                    .with_context(|| format!("parsing {url}"))?
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal)
                    .synchronous(SqliteSynchronous::Normal)
                    .busy_timeout(Duration::from_secs(10))
                    .foreign_keys(true);
                let pool = SqlitePoolOptions::new()
                    .max_connections(max_connections.max(1))
                    .acquire_timeout(Duration::from_secs(30))
                    .connect_with(opts)
                    .await
                    .with_context(|| format!("opening {url}"))?;
                Db::Sqlite(pool)
            }
            Backend::Postgres => {
                let pool = PgPoolOptions::new()
                    .max_connections(max_connections.max(1))
                    .acquire_timeout(Duration::from_secs(30))
                    .connect(url)
                    .await
                    .with_context(|| format!("connecting to {}", redact(url)))?;
                Db::Postgres(pool)
            }
        })
    }

    pub fn backend(&self) -> Backend {
        match self {
            Db::Sqlite(_) => Backend::Sqlite,
            Db::Postgres(_) => Backend::Postgres,
        }
    }

    /// Starts a write transaction. On SQLite `BEGIN IMMEDIATE` takes the write lock at
    /// once, so a transaction that reads before it writes cannot fail with a stale
    /// snapshot half-way.
    pub async fn begin(&self) -> Result<Tx, sqlx::Error> {
        Ok(match self {
            Db::Sqlite(p) => Tx::Sqlite(p.begin_with("BEGIN IMMEDIATE").await?),
            Db::Postgres(p) => Tx::Postgres(p.begin().await?),
        })
    }

    /// Runs statements outside a transaction (DDL).
    pub async fn batch(&self, statements: &[String]) -> Result<()> {
        for s in statements {
            match self {
                Db::Sqlite(p) => sqlx::query(s).execute(p).await.map(|_| ()),
                Db::Postgres(p) => sqlx::query(s).execute(p).await.map(|_| ()),
            }
            .with_context(|| format!("running {s}"))?;
        }
        Ok(())
    }

    pub async fn close(&self) {
        match self {
            Db::Sqlite(p) => p.close().await,
            Db::Postgres(p) => p.close().await,
        }
    }

    pub async fn fetch_opt_i64(&self, sql: &str, vals: &[Val]) -> Result<Option<i64>, sqlx::Error> {
        match self {
            Db::Sqlite(p) => bind_sqlite(sqlx::query(sql), vals)
                .fetch_optional(p)
                .await?
                .map(|r| r.try_get::<Option<i64>, _>(0))
                .transpose()
                .map(Option::flatten),
            Db::Postgres(p) => bind_pg(sqlx::query(sql), vals)
                .fetch_optional(p)
                .await?
                .map(|r| r.try_get::<Option<i64>, _>(0))
                .transpose()
                .map(Option::flatten),
        }
    }
}

/// A URL with its password (if any) hidden, for messages.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (auth, host) = match rest.split_once('@') {
        Some(p) => p,
        None => return url.to_string(),
    };
    match auth.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_string(),
    }
}

/// An open write transaction on either engine.
pub enum Tx {
    Sqlite(Transaction<'static, Sqlite>),
    Postgres(Transaction<'static, Postgres>),
}

type SqliteQuery<'q> = sqlx::query::Query<'q, Sqlite, sqlx::sqlite::SqliteArguments<'q>>;
type PgQuery<'q> = sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>;

fn bind_sqlite<'q>(mut q: SqliteQuery<'q>, vals: &'q [Val]) -> SqliteQuery<'q> {
    for v in vals {
        q = match v {
            Val::Int(i) => q.bind(*i),
            Val::Text(s) | Val::Num(s) => q.bind(s.as_str()),
            Val::OptText(s) => q.bind(s.as_deref()),
            Val::OptInt(i) => q.bind(*i),
            Val::Ts(t) => q.bind(sqlite_timestamp(t)),
        };
    }
    q
}

fn bind_pg<'q>(mut q: PgQuery<'q>, vals: &'q [Val]) -> PgQuery<'q> {
    for v in vals {
        q = match v {
            Val::Int(i) => q.bind(*i),
            Val::Text(s) | Val::Num(s) => q.bind(s.as_str()),
            Val::OptText(s) => q.bind(s.as_deref()),
            Val::OptInt(i) => q.bind(*i),
            Val::Ts(t) => q.bind(*t),
        };
    }
    q
}

impl Tx {
    /// Executes one statement; returns the number of rows it touched.
    pub async fn exec(&mut self, sql: &str, vals: &[Val]) -> Result<u64, sqlx::Error> {
        Ok(match self {
            Tx::Sqlite(t) => bind_sqlite(sqlx::query(sql), vals)
                .execute(&mut **t)
                .await?
                .rows_affected(),
            Tx::Postgres(t) => bind_pg(sqlx::query(sql), vals)
                .execute(&mut **t)
                .await?
                .rows_affected(),
        })
    }

    /// First column of the first row, if any (NULL reads as `None`).
    pub async fn opt_i64(&mut self, sql: &str, vals: &[Val]) -> Result<Option<i64>, sqlx::Error> {
        match self {
            Tx::Sqlite(t) => bind_sqlite(sqlx::query(sql), vals)
                .fetch_optional(&mut **t)
                .await?
                .map(|r| r.try_get::<Option<i64>, _>(0))
                .transpose()
                .map(Option::flatten),
            Tx::Postgres(t) => bind_pg(sqlx::query(sql), vals)
                .fetch_optional(&mut **t)
                .await?
                .map(|r| r.try_get::<Option<i64>, _>(0))
                .transpose()
                .map(Option::flatten),
        }
    }

    /// First column of the first row as text, if any.
    pub async fn opt_text(
        &mut self,
        sql: &str,
        vals: &[Val],
    ) -> Result<Option<String>, sqlx::Error> {
        match self {
            Tx::Sqlite(t) => bind_sqlite(sqlx::query(sql), vals)
                .fetch_optional(&mut **t)
                .await?
                .map(|r| r.try_get::<Option<String>, _>(0))
                .transpose()
                .map(Option::flatten),
            Tx::Postgres(t) => bind_pg(sqlx::query(sql), vals)
                .fetch_optional(&mut **t)
                .await?
                .map(|r| r.try_get::<Option<String>, _>(0))
                .transpose()
                .map(Option::flatten),
        }
    }

    /// Rows of (i64, text) pairs.
    pub async fn pairs(
        &mut self,
        sql: &str,
        vals: &[Val],
    ) -> Result<Vec<(i64, String)>, sqlx::Error> {
        match self {
            Tx::Sqlite(t) => bind_sqlite(sqlx::query(sql), vals)
                .fetch_all(&mut **t)
                .await?
                .iter()
                .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
                .collect(),
            Tx::Postgres(t) => bind_pg(sqlx::query(sql), vals)
                .fetch_all(&mut **t)
                .await?
                .iter()
                .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
                .collect(),
        }
    }

    /// Locks a product row for the rest of the transaction (PostgreSQL: `FOR UPDATE`;
    /// SQLite: `BEGIN IMMEDIATE` already serializes writers). Returns whether it exists.
    pub async fn lock_product(&mut self, product_id: i64) -> Result<bool, sqlx::Error> {
        let sql = match self {
            Tx::Sqlite(_) => "SELECT product_id FROM products WHERE product_id = $1",
            Tx::Postgres(_) => "SELECT product_id FROM products WHERE product_id = $1 FOR UPDATE",
        };
        Ok(self.opt_i64(sql, &[Val::Int(product_id)]).await?.is_some())
    }

    pub async fn commit(self) -> Result<(), sqlx::Error> {
        match self {
            Tx::Sqlite(t) => t.commit().await,
            Tx::Postgres(t) => t.commit().await,
        }
    }

    pub async fn rollback(self) -> Result<(), sqlx::Error> {
        match self {
            Tx::Sqlite(t) => t.rollback().await,
            Tx::Postgres(t) => t.rollback().await,
        }
    }
}

/// Whether an error is transient contention worth retrying: SQLite busy/locked,
/// PostgreSQL serialization failure or deadlock, pool exhaustion.
pub fn is_retryable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::PoolTimedOut => true,
        sqlx::Error::Database(d) => {
            matches!(
                d.code().as_deref(),
                Some("5" | "6" | "261" | "262" | "517" | "40001" | "40P01")
            ) || d.message().contains("database is locked")
        }
        _ => false,
    }
}

/// Whether an error is a unique-key violation (an id another writer already took).
pub fn is_unique_violation(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(d) => {
            matches!(d.code().as_deref(), Some("1555" | "2067" | "23505"))
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backends_and_redaction() {
        assert_eq!(Backend::of_url("sqlite:///x.db").unwrap(), Backend::Sqlite);
        assert_eq!(
            Backend::of_url("postgres://a@b/c").unwrap(),
            Backend::Postgres
        );
        assert!(Backend::of_url("mysql://x").is_err());
        assert_eq!(redact("postgres://u:secret@h/db"), "postgres://u:***@h/db");
    }
}
