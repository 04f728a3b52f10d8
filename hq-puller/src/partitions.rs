//! The per-location partitions of the mirror tables (`schemas::sql::hq`): a location's
//! partition is made by its initial load (the load's table, attached at its end), or
//! empty where rows arrive without one: a location streaming already (start-up), a
//! listener that cannot serve a snapshot, a resync's switch.
//!
//! Mirror tables made before partitioning (plain tables) are left as they are: loads go
//! straight into them, and there is nothing to make.

use crate::error::{Error, Result};
use schemas::catalogue::{Catalogue, Table};
use schemas::sql::hq;
use sqlx::{PgConnection, PgPool};

/// Whether `table`'s mirror table is partitioned by location.
pub async fn partitioned(conn: &mut PgConnection, table: &Table) -> Result<bool> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_class WHERE oid = to_regclass($1) AND relkind = 'p')",
    )
    .bind(hq::mirror_table(table))
    .fetch_one(conn)
    .await?)
}

/// Whether `location`'s partition of `table` exists.
pub async fn exists(conn: &mut PgConnection, table: &Table, location: &str) -> Result<bool> {
    Ok(sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(hq::partition(table, location))
        .fetch_one(conn)
        .await?)
}

/// Whether an initial load of `location` fills a table of its own for `table` (attached
/// at the load's end by [`attach`]), rather than the mirror table: when the mirror table
/// is partitioned and the location has no partition yet. Stable across a resumed load:
/// only the load itself makes that partition.
pub async fn loads_apart(conn: &mut PgConnection, table: &Table, location: &str) -> Result<bool> {
    Ok(partitioned(&mut *conn, table).await? && !exists(&mut *conn, table, location).await?)
}

/// Locks `table`'s mirror table against other partition changes (`SHARE UPDATE
/// EXCLUSIVE`: readers and upserts go on) until the end of the transaction.
async fn lock(tx: &mut PgConnection, table: &Table) -> Result<()> {
    sqlx::query(&format!(
        "LOCK TABLE {} IN SHARE UPDATE EXCLUSIVE MODE",
        hq::mirror_table(table)
    ))
    .execute(tx)
    .await?;
    Ok(())
}

/// Makes `location`'s filled load table of `table` its partition, in the load's last
/// transaction `tx`: builds its key and attaches it.
pub async fn attach(tx: &mut PgConnection, table: &Table, location: &str) -> Result<()> {
    lock(&mut *tx, table).await?;
    if exists(&mut *tx, table, location).await? {
        return Err(Error::permanent(format!(
            "{} exists already: the initial load of {location} in {} cannot become it \
             (drop one of the two, then run the load again)",
            hq::partition(table, location),
            hq::load_table(table, location)
        )));
    }
    for s in hq::attach_load_table(table, location) {
        sqlx::query(&s).execute(&mut *tx).await.map_err(|e| {
            let hint = match &e {
                sqlx::Error::Database(d) if d.code().as_deref() == Some("23505") => {
                    format!(": the load holds a key twice; `hq-puller resync {location}` loads it afresh")
                }
                _ => String::new(),
            };
            Error::permanent(format!(
                "attaching {} as {}: {e}{hint}",
                hq::load_table(table, location),
                hq::partition(table, location)
            ))
        })?;
    }
    Ok(())
}

/// Creates `location`'s empty partition of every catalogue table that lacks one.
pub async fn ensure(pool: &PgPool, catalogue: &Catalogue, location: &str) -> Result<()> {
    for t in &catalogue.tables {
        let mut c = pool.acquire().await?;
        if !loads_apart(&mut c, t, location).await? {
            continue;
        }
        drop(c);
        let mut tx = pool.begin().await?;
        lock(&mut tx, t).await?;
        if exists(&mut tx, t, location).await? {
            continue; // made meanwhile by another process
        }
        // A load table is never left behind by a finished or discarded load, and this
        // runs only where no initial load is in progress: one found here is stale.
        sqlx::query(&format!(
            "DROP TABLE IF EXISTS {}",
            hq::load_table(t, location)
        ))
        .execute(&mut *tx)
        .await?;
        for s in hq::create_load_table(t, location) {
            sqlx::query(&s).execute(&mut *tx).await?;
        }
        attach(&mut tx, t, location).await?;
        tx.commit().await?;
        tracing::info!(location, table = %t.name, partition = %hq::partition(t, location), "partition created");
    }
    Ok(())
}

/// Drops `location`'s load tables (a discarded or superseded initial load).
pub async fn drop_load_tables(
    tx: &mut PgConnection,
    catalogue: &Catalogue,
    location: &str,
) -> Result<()> {
    for t in &catalogue.tables {
        sqlx::query(&format!(
            "DROP TABLE IF EXISTS {}",
            hq::load_table(t, location)
        ))
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

/// Start-up: every location that streams already (its cursor is set) has its partitions.
/// Locations without a cursor get theirs from their initial load.
pub async fn ensure_streaming(pool: &PgPool, catalogue: &Catalogue) -> Result<()> {
    let ids: Vec<String> =
        sqlx::query_scalar("SELECT id FROM sync.locations WHERE cursor IS NOT NULL ORDER BY id")
            .fetch_all(pool)
            .await?;
    if ids.is_empty() {
        return Ok(());
    }
    let mut c = pool.acquire().await?;
    let mut partitioned_tables = Vec::new();
    for t in &catalogue.tables {
        if partitioned(&mut c, t).await? {
            partitioned_tables.push(t.clone());
        }
    }
    drop(c);
    if partitioned_tables.is_empty() {
        return Ok(());
    }
    let have: std::collections::HashSet<String> = sqlx::query_scalar(
        "SELECT relname::text FROM pg_class WHERE relnamespace = 'hq'::regnamespace AND relispartition",
    )
    .fetch_all(pool)
    .await?
    .into_iter()
    .collect();
    for id in ids {
        if partitioned_tables
            .iter()
            .any(|t| !have.contains(&hq::partition_name(t, &id)))
        {
            ensure(pool, catalogue, &id).await?;
        }
    }
    Ok(())
}
