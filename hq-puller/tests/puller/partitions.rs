//! The per-location partitions of the mirror tables (`hq_puller::partitions`).

use super::hq;
use hq_puller::partitions;
use schemas::sql::hq as sql;

async fn exists(pool: &sqlx::PgPool, table: &schemas::catalogue::Table, loc: &str) -> bool {
    let mut c = pool.acquire().await.unwrap();
    partitions::exists(&mut c, table, loc).await.unwrap()
}

async fn insert(pool: &sqlx::PgPool, loc: &str, id: i64) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO hq.products (location_id, product_id, sku, _seq) VALUES ($1, $2, 'x', 0)",
    )
    .bind(loc)
    .bind(id)
    .execute(pool)
    .await
    .map(|_| ())
}

/// A location without a cursor has no partition (its initial load makes it); one that
/// streams gets its empty partitions at start-up (`migrate`, `pull`, `run`); rows of a
/// location without a partition are refused, not lost elsewhere.
#[tokio::test]
async fn streaming_locations_get_their_partitions_at_start_up() {
    let hq = hq(
        &[("b01", "http://127.0.0.1:9"), ("b02", "http://127.0.0.1:9")],
        "",
    )
    .await;
    let pool = hq.pool();
    let cat = &hq.settings.catalogue;
    let products = cat.table("products").unwrap();
    for t in &cat.tables {
        assert!(!exists(pool, t, "b01").await, "{}", t.name);
        let mut c = pool.acquire().await.unwrap();
        assert!(partitions::loads_apart(&mut c, t, "b01").await.unwrap());
    }
    let e = insert(pool, "b01", 1).await.unwrap_err().to_string();
    assert!(e.contains("no partition"), "{e}");
    sqlx::query("UPDATE sync.locations SET cursor = 'set' WHERE id = 'b01'")
        .execute(pool)
        .await
        .unwrap();
    hq_puller::migrate(&hq.app).await.unwrap();
    for t in &cat.tables {
        assert!(exists(pool, t, "b01").await, "{}", t.name);
        assert!(!exists(pool, t, "b02").await, "no cursor, no partition");
        let mut c = pool.acquire().await.unwrap();
        assert!(!partitions::loads_apart(&mut c, t, "b01").await.unwrap());
    }
    insert(pool, "b01", 1).await.unwrap();
    // Idempotent: the partition and its row stay.
    partitions::ensure(pool, cat, "b01").await.unwrap();
    hq_puller::migrate(&hq.app).await.unwrap();
    let n: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {}",
        sql::partition(products, "b01")
    ))
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(n, 1);
}

/// A filled load table becomes the location's partition with its key; a key held twice
/// fails the attach naming the way out, and so does a partition that exists already.
#[tokio::test]
async fn load_tables_attach_with_their_key_or_fail_naming_the_problem() {
    let hq = hq(&[("b01", "http://127.0.0.1:9")], "").await;
    let pool = hq.pool();
    let products = hq.settings.catalogue.table("products").unwrap();
    let load = sql::load_table(products, "b01");
    for s in sql::create_load_table(products, "b01") {
        sqlx::query(&s).execute(pool).await.unwrap();
    }
    for id in [1, 2, 2] {
        sqlx::query(&format!(
            "INSERT INTO {load} (location_id, product_id, sku, _seq) VALUES ('b01', $1, 'x', 0)"
        ))
        .bind(id)
        .execute(pool)
        .await
        .unwrap();
    }
    let mut tx = pool.begin().await.unwrap();
    let e = partitions::attach(&mut tx, products, "b01")
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("hq-puller resync b01"), "{e}");
    drop(tx);
    sqlx::query(&format!(
        "DELETE FROM {load} WHERE ctid = (SELECT max(ctid) FROM {load})"
    ))
    .execute(pool)
    .await
    .unwrap();
    let mut tx = pool.begin().await.unwrap();
    partitions::attach(&mut tx, products, "b01").await.unwrap();
    tx.commit().await.unwrap();
    assert!(exists(pool, products, "b01").await);
    let ids: Vec<i64> = sqlx::query_scalar(
        "SELECT product_id FROM hq.products WHERE location_id = 'b01' ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(ids, vec![1, 2]);
    let e = insert(pool, "b01", 2).await.unwrap_err().to_string();
    assert!(e.contains("duplicate key"), "the key came along: {e}");
    // The load table became the partition: it is no longer in hq_load.
    let gone: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
        .bind(&load)
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(gone, None);
    for s in sql::create_load_table(products, "b01") {
        sqlx::query(&s).execute(pool).await.unwrap();
    }
    let mut tx = pool.begin().await.unwrap();
    let e = partitions::attach(&mut tx, products, "b01")
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("exists already"), "{e}");
}

/// Mirror tables made before partitioning (plain tables) are left as they are: a load
/// goes straight into them and no partition is made.
#[tokio::test]
async fn plain_mirror_tables_of_older_versions_load_directly() {
    let hq = hq(&[("b01", "http://127.0.0.1:9")], "").await;
    let pool = hq.pool();
    let cat = &hq.settings.catalogue;
    let movements = cat.table("stock_movements").unwrap();
    let ddl = sql::create_mirror_tables(cat)
        .into_iter()
        .find(|s| s.starts_with("CREATE TABLE IF NOT EXISTS hq.\"stock_movements\""))
        .unwrap()
        .replace(" PARTITION BY LIST (location_id)", "");
    sqlx::query("DROP TABLE hq.stock_movements CASCADE")
        .execute(pool)
        .await
        .unwrap();
    sqlx::query(&ddl).execute(pool).await.unwrap();
    let mut c = pool.acquire().await.unwrap();
    assert!(!partitions::partitioned(&mut c, movements).await.unwrap());
    assert!(!partitions::loads_apart(&mut c, movements, "b01")
        .await
        .unwrap());
    drop(c);
    partitions::ensure(pool, cat, "b01").await.unwrap();
    assert!(!exists(pool, movements, "b01").await);
    assert!(exists(pool, cat.table("products").unwrap(), "b01").await);
}

/// A streaming location whose partition is gone (HQ's database lost its creation in a
/// crash) fails its batch transiently, gets the partition again, and the retry applies.
#[tokio::test]
async fn a_lost_partition_is_made_again_and_the_batch_retried() {
    use super::fake::{ch, Branch, Fake};
    let product = |id: i64| {
        ch(
            id,
            "products",
            "I",
            &super::pk(id),
            Some(&super::product(id, "10.00", "one")),
        )
    };
    let (fake, base) = Fake::start(vec![Branch::new("b01").window(vec![product(1)])]).await;
    let hq = hq(&[("b01", &base)], "").await;
    let pool = hq.pool();
    let products = hq.settings.catalogue.table("products").unwrap();
    let first = &super::pull(&hq, &["b01"]).await[0];
    assert!(first.error.is_none(), "{first:?}");
    // Streaming now; the partition is lost, then a change arrives.
    sqlx::query(&format!("DROP TABLE {}", sql::partition(products, "b01")))
        .execute(pool)
        .await
        .unwrap();
    fake.with("b01", |b| b.push_window(vec![product(2)]));
    // As the service's scheduler runs it (no start-up step in between).
    let failed = &hq_puller::pull::drain(&hq.app, "b01", None).await.unwrap();
    let error = failed.error.clone().unwrap_or_default();
    assert!(error.contains("partition is missing"), "{failed:?}");
    assert_eq!(failed.error_kind, Some(hq_puller::ErrorKind::Transient));
    assert!(exists(pool, products, "b01").await, "made again");
    let retried = &hq_puller::pull::drain(&hq.app, "b01", None).await.unwrap();
    assert!(retried.error.is_none(), "{retried:?}");
    let ids: Vec<i64> = sqlx::query_scalar(
        "SELECT product_id FROM hq.products_live WHERE location_id = 'b01' ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(
        ids,
        vec![2],
        "the lost partition's row is gone with it; the new one applies"
    );
}
