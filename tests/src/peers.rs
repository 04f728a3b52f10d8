//! The peers the benchmarks measure us against, set up the same way by every benchmark.
//!
//! [`LogicalReplication`]: PostgreSQL logical replication (a publication of one table and
//! a subscription to it) between two databases of the throwaway cluster.

use anyhow::{bail, Result};
use sqlx::{Connection, Executor, PgConnection};
use std::time::{Duration, Instant};

/// A publication on `src` and a subscription on `dst` of one table, created by the same
/// DDL on both sides. Both databases are in one cluster, so the replication slot is
/// created apart from `CREATE SUBSCRIPTION` (which would otherwise wait for itself).
pub struct LogicalReplication {
    pub src: PgConnection,
    pub dst: PgConnection,
    tag: String,
    slot: String,
}

impl LogicalReplication {
    /// Creates `ddl` in both databases and publishes `table` from `src_url` to
    /// `dst_url` (no initial copy). With `enabled = false` nothing flows until
    /// [`enable`](Self::enable), e.g. to let a backlog build up first.
    pub async fn create(
        src_url: &str,
        dst_url: &str,
        ddl: &str,
        table: &str,
        enabled: bool,
    ) -> Result<LogicalReplication> {
        let mut src = PgConnection::connect(src_url).await?;
        let mut dst = PgConnection::connect(dst_url).await?;
        let tag = uuid::Uuid::new_v4().simple().to_string()[..10].to_string();
        let slot = format!("bench_{tag}");
        src.execute(ddl).await?;
        dst.execute(ddl).await?;
        src.execute(format!("CREATE PUBLICATION pub_{tag} FOR TABLE {table}").as_str())
            .await?;
        sqlx::query("SELECT pg_create_logical_replication_slot($1, 'pgoutput')")
            .bind(&slot)
            .execute(&mut src)
            .await?;
        let src_db: String = sqlx::query_scalar("SELECT current_database()")
            .fetch_one(&mut src)
            .await?;
        let port: i32 = sqlx::query_scalar("SELECT current_setting('port')::int")
            .fetch_one(&mut src)
            .await?;
        dst.execute(
            format!(
                "CREATE SUBSCRIPTION sub_{tag} CONNECTION 'host=127.0.0.1 port={port} dbname={src_db} user=postgres' \
                 PUBLICATION pub_{tag} WITH (create_slot = false, slot_name = '{slot}', enabled = {enabled}, copy_data = false)"
            )
            .as_str(),
        )
        .await?;
        Ok(LogicalReplication {
            src,
            dst,
            tag,
            slot,
        })
    }

    pub async fn enable(&mut self) -> Result<()> {
        self.dst
            .execute(format!("ALTER SUBSCRIPTION sub_{} ENABLE", self.tag).as_str())
            .await?;
        Ok(())
    }

    /// The source's current WAL position.
    pub async fn source_lsn(&mut self) -> Result<String> {
        Ok(sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
            .fetch_one(&mut self.src)
            .await?)
    }

    /// Waits (polling every 10 ms, at most `timeout`) until the subscription has
    /// confirmed the source's WAL up to `lsn`.
    pub async fn wait_confirmed(&mut self, lsn: &str, timeout: Duration) -> Result<()> {
        let t0 = Instant::now();
        loop {
            let done: bool = sqlx::query_scalar(
                "SELECT coalesce(confirmed_flush_lsn >= $2::pg_lsn, false) FROM pg_replication_slots WHERE slot_name = $1",
            )
            .bind(&self.slot)
            .bind(lsn)
            .fetch_one(&mut self.src)
            .await?;
            if done {
                return Ok(());
            }
            if t0.elapsed() > timeout {
                bail!("logical replication did not confirm {lsn} within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Drops the subscription and its slot (the databases stay).
    pub async fn drop_all(mut self) -> Result<()> {
        let tag = &self.tag;
        self.dst
            .execute(format!("ALTER SUBSCRIPTION sub_{tag} DISABLE").as_str())
            .await?;
        self.dst
            .execute(format!("ALTER SUBSCRIPTION sub_{tag} SET (slot_name = NONE)").as_str())
            .await?;
        self.dst
            .execute(format!("DROP SUBSCRIPTION sub_{tag}").as_str())
            .await?;
        // The walsender may take a moment to let go of the slot.
        let t0 = Instant::now();
        loop {
            match sqlx::query("SELECT pg_drop_replication_slot($1)")
                .bind(&self.slot)
                .execute(&mut self.src)
                .await
            {
                Ok(_) => return Ok(()),
                Err(e) if t0.elapsed() < Duration::from_secs(10) => {
                    tracing::debug!(error = %e, "slot still active");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}
