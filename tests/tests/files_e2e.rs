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

/// Runs `hq-puller ARGS --config ...` to its end: (exit code, stdout, stderr).
async fn hq_exec(hq: &Hq, args: &[&str]) -> Result<(i32, String, String)> {
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(tests::process::binary("hq-puller")?)
            .args(args)
            .arg("--config")
            .arg(&hq.config)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await??;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    ))
}

/// Polls `what` until it holds (deadline 60 s).
async fn poll<F, Fut>(what: &str, mut f: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    while !f().await? {
        if Instant::now() >= deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// Files already in the folder (issue 6): a SQLite branch whose files and rows exist
/// BEFORE its listener first starts (indexed by its first scan, before HQ's snapshot
/// start T0, so only the snapshot can bring them) is loaded by HQ with an empty cursor:
/// every file at HQ with the right sha256 and recorded with `_seq` 0 (snapshot), the rows
/// live; `verify` says equal, names a path HQ lost from `sync.files`; after the branch is
/// restored from a backup (database and folder), `resync` reconciles the file set: the
/// lost record is back and the file only HQ had is archived (`file_delete` default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_in_the_folder_are_loaded_verified_and_resynced() -> Result<()> {
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
    for p in 1..=3 {
        sqlx::query(
            "INSERT INTO products (product_id, sku, name, unit_price, currency) VALUES (?1, ?2, 'p', 1.50, 'EUR')",
        )
        .bind(p)
        .bind(format!("sku-{p}"))
        .execute(&app)
        .await?;
    }
    let files = b.files_dir.clone();
    let content: [(&str, &[u8]); 3] = [
        ("a.jpg", b"a before the listener"),
        ("sub dir/b ü.jpg", b"b before the listener"),
        ("c.jpg", b"c before the listener"),
    ];
    for (i, (p, c)) in content.iter().enumerate() {
        write(&files, p, c)?;
        image(&app, i as i64 + 1, i as i64 + 1, p).await?;
    }
    b.start().await?;
    poll("the listener's first scan", || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM _pull_files")
            .fetch_one(&app)
            .await?;
        Ok(n == 3)
    })
    .await?;
    let hq_url = tests::pg::fresh_database("hqfsnap").await?;
    let mut hq = Hq::new(dir.path(), &hq_url, &HqOptions::default(), &[&b]).await?;
    hq.migrate().await?;
    assert!(
        hq.cursor("b01").await?.is_none(),
        "empty cursor: initial load"
    );
    hq.start()?;
    let hq_files = dir.path().join("hq-files");
    wait_for_hq(&mut hq, &b, &hq_files, &content, &[]).await?;
    let by_snapshot: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM sync.files WHERE location_id = 'b01' AND _seq = 0 AND state = 'stored'",
    )
    .fetch_one(&hq.pool)
    .await?;
    assert_eq!(by_snapshot, 3, "the files came with the snapshot");

    let (code, out, err) = hq_exec(&hq, &["verify", "b01", "--settle", "10s"]).await?;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("_files"), "verify compares the files: {out}");

    // A backup of the branch (database and folder), then life goes on: a new file.
    let backup = dir.path().join("b01-backup.db");
    sqlx::query(&format!("VACUUM INTO '{}'", backup.display()))
        .execute(&app)
        .await?;
    write(&files, "late.jpg", b"after the backup")?;
    image(&app, 4, 3, "late.jpg").await?;
    let late: &[u8] = b"after the backup";
    let mut now_live = content.to_vec();
    now_live.push(("late.jpg", late));
    wait_for_hq(&mut hq, &b, &hq_files, &now_live, &[]).await?;

    // HQ loses a record: verify names the path.
    sqlx::query("DELETE FROM sync.files WHERE location_id = 'b01' AND path = 'c.jpg'")
        .execute(&hq.pool)
        .await?;
    let (code, out, err) = hq_exec(&hq, &["verify", "b01", "--settle", "3s"]).await?;
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(
        out.lines()
            .any(|l| l.contains("missing at HQ") && l.contains("c.jpg")),
        "{out}"
    );

    // The branch is restored from the backup: late.jpg exists only at HQ now.
    app.close().await;
    b.stop().await?;
    let path = url.strip_prefix("sqlite://").unwrap();
    for ext in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{path}{ext}"));
    }
    std::fs::copy(&backup, path)?;
    std::fs::remove_file(files.join("late.jpg"))?;
    b.start().await?;
    let pool = hq.pool.clone();
    poll("the restore to be detected", || async {
        let s: String = sqlx::query_scalar("SELECT state FROM sync.locations WHERE id = 'b01'")
            .fetch_one(&pool)
            .await?;
        Ok(s == "needs_resync")
    })
    .await?;
    let (code, out, err) = hq_exec(&hq, &["resync", "b01"]).await?;
    assert_eq!(code, 0, "{out}\n{err}");
    check(&hq, &hq_files, &content, &["late.jpg"]).await?;
    let (state, archived_as): (String, Option<String>) = sqlx::query_as(
        "SELECT state, archived_as FROM sync.files WHERE location_id = 'b01' AND path = 'late.jpg'",
    )
    .fetch_one(&hq.pool)
    .await?;
    assert_eq!(state, "deleted");
    let archived_as = archived_as.expect("late.jpg archived");
    assert!(
        hq_files.join(&archived_as).is_file() && archived_as.starts_with(".archive/b01/late.jpg."),
        "{archived_as}"
    );
    let (code, out, err) = hq_exec(&hq, &["verify", "b01", "--settle", "10s"]).await?;
    assert_eq!(code, 0, "{out}\n{err}");
    hq.stop().await?;
    b.stop().await?;
    Ok(())
}
