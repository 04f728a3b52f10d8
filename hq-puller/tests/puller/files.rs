//! File events (`_files`) against the fake listener: store, place, archive / mirror,
//! `sync.files`, the `_live` view gate, corrupted / truncated / cut downloads,
//! superseded events, path traversal, and HQ without `files_dir`.

use super::fake::{ch, Branch, Fake, FakeChange, FileFault};
use super::{cursor_tick, hq, hq_with, loc_row, pull};
use sqlx::PgPool;
use std::path::Path;

fn file_ev(seq: i64, path: &str, content: Option<&[u8]>) -> FakeChange {
    use sha2::Digest;
    let pk = serde_json::json!({ "path": path }).to_string();
    match content {
        None => ch(seq, "_files", "D", &pk, None),
        Some(c) => {
            let row = serde_json::json!({
                "path": path,
                "size": c.len(),
                "sha256": hex::encode(sha2::Sha256::digest(c)),
                "mtime": "2026-11-24T09:00:00.123456Z",
            })
            .to_string();
            ch(seq, "_files", "U", &pk, Some(&row))
        }
    }
}

fn image_row(seq: i64, id: i64, path: &str) -> FakeChange {
    ch(
        seq,
        "product_images",
        "I",
        &format!(r#"{{"image_id":{id}}}"#),
        Some(&format!(
            r#"{{"image_id":{id},"product_id":null,"file_path":"{path}","sha256":null,"updated_at":null}}"#
        )),
    )
}

async fn sync_files(pool: &PgPool, loc: &str) -> Vec<(String, String, Option<String>)> {
    sqlx::query_as(
        "SELECT path, state, sha256 FROM sync.files WHERE location_id = $1 ORDER BY path",
    )
    .bind(loc)
    .fetch_all(pool)
    .await
    .unwrap()
}

async fn live_images(pool: &PgPool, loc: &str) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT file_path FROM hq.product_images_live WHERE location_id = $1 ORDER BY file_path",
    )
    .bind(loc)
    .fetch_all(pool)
    .await
    .unwrap()
}

fn count_files(dir: &Path) -> usize {
    if !dir.exists() {
        return 0;
    }
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                count_files(&e.path())
            } else {
                1
            }
        })
        .sum()
}

/// Add, change, delete (archive and mirror), same content under two paths stored once,
/// every event in `sync.files`, and `product_images_live` gated on stored files.
#[tokio::test]
async fn files_are_stored_placed_archived_and_mirrored() {
    let v1: &[u8] = b"image version 1";
    let v2: &[u8] = b"image version 2, longer";
    let mk = |loc: &str| {
        let mut b = Branch::new(loc);
        b.add_file(v1);
        b.add_file(v2);
        b.window(vec![
            file_ev(1, "a.jpg", Some(v1)),
            file_ev(2, "dir/ü b.jpg", Some(v1)),
            image_row(3, 1, "a.jpg"),
            image_row(4, 2, "dir/ü b.jpg"),
            image_row(5, 3, "never-arrives.jpg"),
        ])
        .window(vec![
            file_ev(6, "a.jpg", Some(v2)),
            file_ev(7, "dir/ü b.jpg", None),
        ])
    };
    let (_fake, base) = Fake::start(vec![mk("b01"), mk("b02")]).await;
    let dir = tempfile::tempdir().unwrap();
    let hq = hq_with(
        &[
            ("b01", &base, ""),
            ("b02", &base, "file_delete = \"mirror\""),
        ],
        &format!("files_dir = \"{}\"", dir.path().display()),
    )
    .await;
    let r = pull(&hq, &["b01", "b02"]).await;
    for r in &r {
        assert_eq!(r.outcome, "ok", "{r:?}");
    }
    for loc in ["b01", "b02"] {
        assert_eq!(cursor_tick(hq.pool(), loc).await, 3);
        assert_eq!(
            std::fs::read(dir.path().join(loc).join("a.jpg")).unwrap(),
            v2
        );
        assert!(!dir.path().join(loc).join("dir/ü b.jpg").exists());
        let sha2 = {
            use sha2::Digest;
            hex::encode(sha2::Sha256::digest(v2))
        };
        assert_eq!(
            sync_files(hq.pool(), loc).await,
            vec![
                ("a.jpg".into(), "stored".into(), Some(sha2)),
                ("dir/ü b.jpg".into(), "deleted".into(), None),
            ]
        );
        // Only the row whose file is stored is live.
        assert_eq!(live_images(hq.pool(), loc).await, vec!["a.jpg"]);
    }
    // Archive mode keeps the deleted file with a timestamp; mirror removes it.
    let archived: Vec<String> = std::fs::read_dir(dir.path().join(".archive/b01/dir"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(archived.len(), 1);
    assert!(archived[0].starts_with("ü b.jpg."), "{archived:?}");
    assert_eq!(
        std::fs::read(dir.path().join(".archive/b01/dir").join(&archived[0])).unwrap(),
        v1
    );
    assert!(!dir.path().join(".archive/b02").exists());
    // Each content stored once, whatever the number of paths and locations.
    assert_eq!(count_files(&dir.path().join(".objects")), 2);
    assert_eq!(count_files(&dir.path().join(".tmp")), 0);
}

/// Corrupted and truncated downloads are detected by checksum / size, retried, never
/// stored, and the batch's cursor does not move; a later run stores the file.
#[tokio::test]
async fn corrupted_and_truncated_downloads_are_never_stored() {
    let content: Vec<u8> = (0..50_000u32).map(|i| (i % 253) as u8).collect();
    let mut b = Branch::new("b01");
    b.add_file(&content);
    let b = b.window(vec![
        file_ev(1, "p.jpg", Some(&content)),
        image_row(2, 1, "p.jpg"),
    ]);
    let (fake, base) = Fake::start(vec![b]).await;
    let dir = tempfile::tempdir().unwrap();
    let hq = hq(
        &[("b01", &base)],
        &format!("files_dir = \"{}\"", dir.path().display()),
    )
    .await;
    // Every attempt of this run is broken.
    fake.with("b01", |b| {
        for i in 0..hq_puller::files::download::ATTEMPTS {
            b.file_faults.push_back(if i % 2 == 0 {
                FileFault::Corrupt
            } else {
                FileFault::Truncate
            });
        }
    });
    let r = pull(&hq, &["b01"]).await;
    assert_eq!(r[0].outcome, "failed", "{:?}", r[0]);
    let err = r[0].error.clone().unwrap();
    assert!(
        err.contains("p.jpg") && err.contains("download failed"),
        "{err}"
    );
    assert_eq!(cursor_tick(hq.pool(), "b01").await, 0, "cursor unmoved");
    assert_eq!(loc_row(hq.pool(), "b01").await.0, "failing");
    assert!(!dir.path().join("b01/p.jpg").exists());
    assert_eq!(count_files(&dir.path().join(".objects")), 0, "never stored");
    assert!(sync_files(hq.pool(), "b01").await.is_empty());
    assert!(live_images(hq.pool(), "b01").await.is_empty());
    assert_eq!(
        fake.with("b01", |b| b.file_ranges.len()),
        hq_puller::files::download::ATTEMPTS
    );

    // One more bad answer, then good ones: retried within the run, stored.
    fake.with("b01", |b| b.file_faults.push_back(FileFault::Corrupt));
    let r = pull(&hq, &["b01"]).await;
    assert_eq!(r[0].outcome, "ok", "{:?}", r[0]);
    assert_eq!(cursor_tick(hq.pool(), "b01").await, 2);
    assert_eq!(
        std::fs::read(dir.path().join("b01/p.jpg")).unwrap(),
        content
    );
    assert_eq!(live_images(hq.pool(), "b01").await, vec!["p.jpg"]);
}

/// 429 answers (the listener's rate limit) are waited out and asked again within the
/// run, without using up the download attempts: more 429s than attempts, then the
/// content, and the batch commits.
#[tokio::test]
async fn rate_limited_downloads_wait_and_do_not_fail_the_run() {
    let content: &[u8] = b"an image behind a rate limit";
    let mut b = Branch::new("b01");
    b.add_file(content);
    for _ in 0..hq_puller::files::download::ATTEMPTS + 1 {
        b.file_faults.push_back(FileFault::RateLimited);
    }
    let b = b.window(vec![
        file_ev(1, "r.jpg", Some(content)),
        image_row(2, 1, "r.jpg"),
    ]);
    let (fake, base) = Fake::start(vec![b]).await;
    let dir = tempfile::tempdir().unwrap();
    let hq = hq(
        &[("b01", &base)],
        &format!("files_dir = \"{}\"", dir.path().display()),
    )
    .await;
    let r = pull(&hq, &["b01"]).await;
    assert_eq!(r[0].outcome, "ok", "{:?}", r[0]);
    assert_eq!(
        std::fs::read(dir.path().join("b01/r.jpg")).unwrap(),
        content
    );
    assert_eq!(
        fake.with("b01", |b| b.file_ranges.len()),
        hq_puller::files::download::ATTEMPTS + 2,
        "each 429 asked again, then the content"
    );
    assert_eq!(live_images(hq.pool(), "b01").await, vec!["r.jpg"]);
}

/// A download cut mid-body is resumed with `Range` from the bytes already there: a
/// short file (gathered in memory, written in one call) and a long one (streamed
/// through a writer thread and a hasher thread).
#[tokio::test]
async fn cut_download_resumes_with_range() {
    cut_download_resumes(300_000, 100_000).await;
}

#[tokio::test]
async fn cut_long_download_resumes_with_range() {
    cut_download_resumes(3_000_000, 1_700_000).await;
}

async fn cut_download_resumes(len: u32, cut: u64) {
    let content: Vec<u8> = (0..len).map(|i| (i % 241) as u8).collect();
    let mut b = Branch::new("b01");
    b.add_file(&content);
    b.file_faults.push_back(FileFault::Cut(cut as usize));
    let b = b.window(vec![file_ev(1, "big.jpg", Some(&content))]);
    let (fake, base) = Fake::start(vec![b]).await;
    let dir = tempfile::tempdir().unwrap();
    let hq = hq(
        &[("b01", &base)],
        &format!("files_dir = \"{}\"", dir.path().display()),
    )
    .await;
    let r = pull(&hq, &["b01"]).await;
    assert_eq!(r[0].outcome, "ok", "{:?}", r[0]);
    assert_eq!(
        std::fs::read(dir.path().join("b01/big.jpg")).unwrap(),
        content
    );
    let ranges = fake.with("b01", |b| b.file_ranges.clone());
    assert_eq!(ranges.len(), 2, "{ranges:?}");
    assert_eq!(ranges[0], None);
    let resumed_from: u64 = ranges[1]
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("second request resumes with a range: {ranges:?}"));
    assert!(resumed_from > 0 && resumed_from <= cut, "{resumed_from}");
}

/// The listener no longer has a content (`file_not_found`): the event is recorded as
/// superseded, the batch commits, the row naming the file is not live; the later event
/// for that path fixes it.
#[tokio::test]
async fn superseded_file_events_do_not_fail_the_batch() {
    let newer: &[u8] = b"the newer content";
    let mut b = Branch::new("b01");
    b.add_file(newer);
    let b = b
        .window(vec![
            file_ev(1, "s.jpg", Some(b"content the branch replaced")),
            image_row(2, 1, "s.jpg"),
        ])
        .window(vec![file_ev(3, "s.jpg", Some(newer))]);
    let (_fake, base) = Fake::start(vec![b]).await;
    let dir = tempfile::tempdir().unwrap();
    let hq = hq(
        &[("b01", &base)],
        &format!("files_dir = \"{}\"\nbatch_limit = 1", dir.path().display()),
    )
    .await;
    // Apply the first window only, by hand (into the partitions a pull would make).
    let app = &hq.app;
    hq_puller::partitions::ensure(hq.pool(), &app.settings.catalogue, "b01")
        .await
        .unwrap();
    let client = app.client("b01").unwrap();
    let fetched = client.changes(None, 1, None).await.unwrap();
    let expected = hq_puller::validate::Expected {
        location: "b01".into(),
        after: None,
        instance_id: None,
    };
    let checked =
        hq_puller::validate::check(&fetched.response, &expected, &app.settings.catalogue).unwrap();
    let plan = hq_puller::files::prepare(app, "b01", &checked.files)
        .await
        .unwrap();
    assert!(matches!(
        plan.items[0].action,
        hq_puller::files::Action::Superseded(_)
    ));
    hq_puller::apply::apply_batch(
        hq.pool(),
        &app.settings.catalogue,
        &app.statements,
        "b01",
        &fetched.response,
        &checked,
        &plan,
    )
    .await
    .unwrap();
    assert_eq!(
        sync_files(hq.pool(), "b01").await[0].1,
        "superseded".to_string()
    );
    assert!(live_images(hq.pool(), "b01").await.is_empty());
    assert!(!dir.path().join("b01/s.jpg").exists());
    let r = pull(&hq, &["b01"]).await;
    assert_eq!(r[0].outcome, "ok", "{:?}", r[0]);
    assert_eq!(std::fs::read(dir.path().join("b01/s.jpg")).unwrap(), newer);
    assert_eq!(
        sync_files(hq.pool(), "b01").await[0].1,
        "stored".to_string()
    );
    assert_eq!(live_images(hq.pool(), "b01").await, vec!["s.jpg"]);
}

/// Path traversal in an event pauses the location with a reason naming the path;
/// nothing is written anywhere.
#[tokio::test]
async fn path_traversal_in_an_event_pauses_the_location() {
    let payload: &[u8] = b"owned";
    let mut b = Branch::new("b01");
    b.add_file(payload);
    let b = b.window(vec![
        file_ev(1, "fine.jpg", Some(payload)),
        file_ev(2, "../../etc/evil.jpg", Some(payload)),
    ]);
    let (_fake, base) = Fake::start(vec![b]).await;
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let hq = hq(
        &[("b01", &base)],
        &format!("files_dir = \"{}\"", store.display()),
    )
    .await;
    let r = pull(&hq, &["b01"]).await;
    assert_eq!(r[0].outcome, "paused", "{:?}", r[0]);
    let (state, cursor, reason) = loc_row(hq.pool(), "b01").await;
    assert_eq!((state.as_str(), cursor), ("paused", None));
    let reason = reason.unwrap();
    assert!(
        reason.contains("\"../../etc/evil.jpg\"") && reason.contains("'..'"),
        "{reason}"
    );
    assert_eq!(count_files(dir.path()), 0, "nothing written");
}

/// A `_files` event at an HQ without `files_dir` pauses the location clearly.
#[tokio::test]
async fn file_events_without_files_dir_pause_the_location() {
    let b = Branch::new("b01").window(vec![file_ev(1, "a.jpg", Some(b"x"))]);
    let (_fake, base) = Fake::start(vec![b]).await;
    let hq = hq(&[("b01", &base)], "").await;
    let r = pull(&hq, &["b01"]).await;
    assert_eq!(r[0].outcome, "paused", "{:?}", r[0]);
    let reason = loc_row(hq.pool(), "b01").await.2.unwrap();
    assert!(reason.contains("files_dir is not configured"), "{reason}");
}

/// HQ disk full (and an unwritable object directory) in the file store: the pull fails
/// with a transient error naming the path and the OS error, the location is `failing`
/// (retried: an operator frees space, the service recovers by itself), the cursor does
/// not move, nothing is recorded, placed or left half-written in `.objects`; once the
/// fault is gone the next pull applies the batch.
#[tokio::test]
async fn disk_full_in_the_file_store_is_transient_and_leaves_nothing_behind() {
    use sha2::Digest;
    let content: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let sha = hex::encode(sha2::Sha256::digest(&content));
    let mut b = Branch::new("b01");
    b.add_file(&content);
    let b = b.window(vec![
        file_ev(1, "full.jpg", Some(&content)),
        image_row(2, 1, "full.jpg"),
    ]);
    let (_fake, base) = Fake::start(vec![b]).await;
    let dir = tempfile::tempdir().unwrap();
    let hq = hq(
        &[("b01", &base)],
        &format!("files_dir = \"{}\"", dir.path().display()),
    )
    .await;
    let target = dir.path().join("b01/full.jpg");

    async fn assert_nothing_applied(hq: &super::Hq, target: &Path) {
        assert_eq!(cursor_tick(hq.pool(), "b01").await, 0, "cursor unmoved");
        assert_eq!(loc_row(hq.pool(), "b01").await.0, "failing");
        assert!(sync_files(hq.pool(), "b01").await.is_empty());
        assert!(live_images(hq.pool(), "b01").await.is_empty());
        assert!(!target.exists(), "no file placed");
    }

    // 1. Disk full: the download's partial file is `/dev/full` (every write: ENOSPC).
    let tmp = dir.path().join(".tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let part = tmp.join(format!("{sha}.b01.part"));
    std::os::unix::fs::symlink("/dev/full", &part).unwrap();
    let r = pull(&hq, &["b01"]).await;
    assert_eq!(r[0].outcome, "failed", "{:?}", r[0]);
    let err = r[0].error.clone().unwrap();
    assert!(
        err.contains(&part.display().to_string()) && err.contains("No space left on device"),
        "{err}"
    );
    assert_nothing_applied(&hq, &target).await;
    assert_eq!(count_files(&dir.path().join(".objects")), 0, "no object");

    // 1b. A regular file `.tmp` is in the way of the downloads' folder: named as such.
    std::fs::remove_dir_all(&tmp).unwrap();
    std::fs::write(&tmp, b"").unwrap();
    let r = pull(&hq, &["b01"]).await;
    assert_eq!(r[0].outcome, "failed", "{:?}", r[0]);
    let err = r[0].error.clone().unwrap();
    assert!(
        err.contains(&tmp.display().to_string()) && err.contains("not a directory is in the way"),
        "{err}"
    );
    assert_nothing_applied(&hq, &target).await;
    std::fs::remove_file(&tmp).unwrap();
    std::fs::create_dir(&tmp).unwrap();
    std::os::unix::fs::symlink("/dev/full", &part).unwrap();

    // 2. The object's directory cannot be created (a regular file `.objects/ab` is in
    // the way; works as root): the verified download is never renamed into place.
    std::fs::remove_file(&part).unwrap();
    let objects = dir.path().join(".objects");
    std::fs::create_dir_all(&objects).unwrap();
    let blocker = objects.join(&sha[..2]);
    std::fs::write(&blocker, b"").unwrap();
    let r = pull(&hq, &["b01"]).await;
    assert_eq!(r[0].outcome, "failed", "{:?}", r[0]);
    let err = r[0].error.clone().unwrap();
    assert!(
        err.contains(&blocker.display().to_string())
            && err.contains("not a directory is in the way"),
        "{err}"
    );
    assert_nothing_applied(&hq, &target).await;
    assert_eq!(count_files(&objects), 1, "only the blocker, no object");

    // 3. The fault is gone: the same batch applies.
    std::fs::remove_file(&blocker).unwrap();
    let r = pull(&hq, &["b01"]).await;
    assert_eq!(r[0].outcome, "ok", "{:?}", r[0]);
    assert_eq!(loc_row(hq.pool(), "b01").await.0, "ok");
    assert_eq!(cursor_tick(hq.pool(), "b01").await, 2);
    let placed = std::fs::read(&target).unwrap();
    assert_eq!(hex::encode(sha2::Sha256::digest(&placed)), sha);
    assert_eq!(
        sync_files(hq.pool(), "b01").await,
        vec![("full.jpg".into(), "stored".into(), Some(sha.clone()))]
    );
    assert_eq!(live_images(hq.pool(), "b01").await, vec!["full.jpg"]);
    assert_eq!(count_files(&objects), 1);
    assert_eq!(count_files(&tmp), 0, "no temporaries left");
}
