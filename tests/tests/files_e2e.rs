//! End-to-end test of the files pull area with real processes: a SQLite branch's files
//! and `product_images` rows replicate to HQ; while the listener is down files are
//! added, changed twice and deleted; after it is back HQ holds the last version of each
//! file, the deleted one is archived, and every `product_images_live` row at HQ has its
//! file stored with the right sha256 (a row whose file never arrives is never live).

use anyhow::{bail, Result};
use sha2::Digest;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions};
use std::path::Path;
use std::str::FromStr;
use std::time::{Duration, Instant};
use tests::fleet::{BranchNode, BranchOptions, Hq, HqOptions};

fn sha(b: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(b))
}

fn write(files: &Path, rel: &str, content: &[u8]) -> Result<()> {
    let p = files.join(rel);
    std::fs::create_dir_all(p.parent().unwrap())?;
    std::fs::write(p, content)?;
    Ok(())
}

async fn image(app: &SqlitePool, id: i64, product: i64, rel: &str) -> Result<()> {
    sqlx::query(
        "INSERT INTO product_images (image_id, product_id, file_path, sha256) VALUES (?1, ?2, ?3, NULL)",
    )
    .bind(id)
    .bind(product)
    .bind(rel)
    .execute(app)
    .await?;
    Ok(())
}

/// What HQ shows for the location, checked against the expectation; `Err` names the
/// first difference (for the polling message).
async fn check(hq: &Hq, hq_files: &Path, want_live: &[(&str, &[u8])], gone: &[&str]) -> Result<()> {
    let live: Vec<String> = sqlx::query_scalar(
        "SELECT file_path FROM hq.product_images_live WHERE location_id = 'b01' ORDER BY file_path",
    )
    .fetch_all(&hq.pool)
    .await?;
    let mut want: Vec<String> = want_live.iter().map(|(p, _)| p.to_string()).collect();
    want.sort();
    if live != want {
        bail!("live images {live:?}, want {want:?}");
    }
    for (path, content) in want_live {
        let at_hq = std::fs::read(hq_files.join("b01").join(path)).unwrap_or_default();
        if sha(&at_hq) != sha(content) {
            bail!("{path}: HQ has {} bytes, not the last version", at_hq.len());
        }
        let recorded: Option<String> = sqlx::query_scalar(
            "SELECT sha256 FROM sync.files WHERE location_id = 'b01' AND path = $1 AND state = 'stored'",
        )
        .bind(path)
        .fetch_optional(&hq.pool)
        .await?
        .flatten();
        if recorded.as_deref() != Some(sha(content).as_str()) {
            bail!("{path}: sync.files has {recorded:?}");
        }
    }
    for path in gone {
        if hq_files.join("b01").join(path).exists() {
            bail!("{path} still at HQ");
        }
    }
    Ok(())
}

async fn wait_for_hq(
    hq: &mut Hq,
    b: &BranchNode,
    hq_files: &Path,
    want_live: &[(&str, &[u8])],
    gone: &[&str],
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        hq.ensure_running()?;
        match check(hq, hq_files, want_live, gone).await {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() >= deadline => bail!(
                "HQ did not converge: {e}\n--- listener ---\n{}\n--- hq-puller ---\n{}",
                b.log_tail(30),
                hq.log_tail(30)
            ),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_branch_files_converge_with_rows() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let url = format!("sqlite://{}", dir.path().join("b01.db").display());
    let mut b = BranchNode::new(
        dir.path(),
        "b01",
        &url,
        &BranchOptions {
            tick_interval: "200ms".into(),
            ..BranchOptions::default()
        },
    )?;
    b.install(true).await?;
    let app = SqlitePoolOptions::new()
        .max_connections(2)
        .connect_with(SqliteConnectOptions::from_str(&url)?.busy_timeout(Duration::from_secs(10)))
        .await?;
    for p in 1..=4 {
        sqlx::query(
            "INSERT INTO products (product_id, sku, name, unit_price, currency) VALUES (?1, ?2, 'p', 1.50, 'EUR')",
        )
        .bind(p)
        .bind(format!("sku-{p}"))
        .execute(&app)
        .await?;
    }
    let files = b.files_dir.clone();
    let (a1, b1, c1) = (
        b"a version 1".as_slice(),
        b"b only version".as_slice(),
        b"c version 1".as_slice(),
    );
    write(&files, "a.jpg", a1)?;
    write(&files, "sub dir/b ü.jpg", b1)?;
    write(&files, "c.jpg", c1)?;
    image(&app, 1, 1, "a.jpg").await?;
    image(&app, 2, 2, "sub dir/b ü.jpg").await?;
    image(&app, 3, 3, "c.jpg").await?;
    b.start().await?;
    let hq_url = tests::pg::fresh_database("hqfiles").await?;
    let mut hq = Hq::new(dir.path(), &hq_url, &HqOptions::default(), &[&b]).await?;
    hq.migrate().await?;
    hq.start()?;
    let hq_files = dir.path().join("hq-files");
    wait_for_hq(
        &mut hq,
        &b,
        &hq_files,
        &[("a.jpg", a1), ("sub dir/b ü.jpg", b1), ("c.jpg", c1)],
        &[],
    )
    .await?;

    // The branch goes offline; files and rows change meanwhile.
    b.stop().await?;
    let (a3, c3, d1) = (
        b"a version 3, the last".as_slice(),
        b"c version 3".as_slice(),
        b"d new while offline".as_slice(),
    );
    write(&files, "a.jpg", b"a version 2")?;
    write(&files, "a.jpg", a3)?;
    write(&files, "c.jpg", b"c version 2 (longer)")?;
    write(&files, "c.jpg", c3)?;
    std::fs::remove_file(files.join("sub dir/b ü.jpg"))?;
    sqlx::query("DELETE FROM product_images WHERE image_id = 2")
        .execute(&app)
        .await?;
    write(&files, "d.jpg", d1)?;
    image(&app, 4, 4, "d.jpg").await?;
    write(&files, "e.jpg", b"short-lived")?;
    std::fs::remove_file(files.join("e.jpg"))?;
    // A row naming a file that never arrives is never live at HQ.
    image(&app, 5, 4, "never.jpg").await?;

    b.start().await?;
    wait_for_hq(
        &mut hq,
        &b,
        &hq_files,
        &[("a.jpg", a3), ("c.jpg", c3), ("d.jpg", d1)],
        &["sub dir/b ü.jpg", "e.jpg", "never.jpg"],
    )
    .await?;
    // The mirror has the row of never.jpg; only the view hides it.
    let mirrored: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM hq.product_images WHERE location_id = 'b01' AND NOT _deleted",
    )
    .fetch_one(&hq.pool)
    .await?;
    assert_eq!(mirrored, 4);
    // Deleted at the branch: archived (the default) with its timestamp.
    let archived: Vec<String> = std::fs::read_dir(hq_files.join(".archive/b01/sub dir"))?
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(archived.len(), 1, "{archived:?}");
    assert!(archived[0].starts_with("b ü.jpg."), "{archived:?}");
    let state: String = sqlx::query_scalar(
        "SELECT state FROM sync.files WHERE location_id = 'b01' AND path = 'sub dir/b ü.jpg'",
    )
    .fetch_one(&hq.pool)
    .await?;
    assert_eq!(state, "deleted");
    hq.stop().await?;
    b.stop().await?;
    Ok(())
}
