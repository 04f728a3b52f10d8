//! The files pull area at the branch: the index follows `files_dir` (add, change,
//! delete, rename into place, settling, ignore patterns, refused names), its rows come
//! out of `/v1/changes` as `_files` events, and `GET /v1/files/{sha256}` serves them
//! (full, `Range`, 404 `file_not_found`, bearer auth).

use anyhow::{bail, Result};
use branch_listener::db::Db;
use branch_listener::files::index;
use branch_listener::files::scan::{self, Ignore};
use branch_listener::files::watch::Watcher;
use branch_listener::{install, serve, Config};
use schemas::wire::{ChangesResponse, ErrorBody, Op};
use schemas::Catalogue;
use sha2::Digest;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "test-token-0123456789abcdef";
/// Long enough that nothing settles by time alone during a test.
const LONG_SETTLE: Duration = Duration::from_secs(3600);

struct Branch {
    _dir: tempfile::TempDir,
    files: PathBuf,
    config: Config,
    db: Db,
}

async fn branch(pg: bool) -> Result<Branch> {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir()?;
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n"))?;
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600))?;
    let files = dir.path().join("images");
    std::fs::create_dir(&files)?;
    let database_url = if pg {
        tests::pg::fresh_database("lfiles").await?
    } else {
        format!("sqlite://{}", dir.path().join("pm.db").display())
    };
    let config = Config {
        listen: "127.0.0.1:0".into(),
        files_dir: Some(files.clone()),
        retention: Duration::from_secs(3600),
        prune_interval: Duration::from_secs(3600),
        tick_interval: Duration::from_millis(100),
        max_limit: 1000,
        max_wait: Duration::from_secs(10),
        files_rescan_interval: Duration::from_secs(3600),
        files_settle: LONG_SETTLE,
        rate_limit_per_second: 0,
        ..Config::with_defaults("b01", &database_url, &token_file)?
    };
    let db = Db::connect_lazy(&config, true)?;
    install::install(&db, &Catalogue::product_management(), true).await?;
    Ok(Branch {
        _dir: dir,
        files,
        config,
        db,
    })
}

fn watcher(b: &Branch) -> Watcher {
    Watcher::new(
        b.files.clone(),
        Ignore::new(&b.config.files_ignore).unwrap(),
        b.config.files_settle,
    )
}

fn sha(content: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(content))
}

/// Writes a file whose mtime is an hour old (settled by age).
fn write_old(path: &Path, content: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, content).unwrap();
    let f = std::fs::File::options().write(true).open(path).unwrap();
    f.set_modified(SystemTime::now() - Duration::from_secs(3600))
        .unwrap();
}

async fn indexed(b: &Branch) -> Vec<(String, i64, String)> {
    let mut v: Vec<(String, i64, String)> = index::load(&b.db)
        .await
        .unwrap()
        .into_iter()
        .map(|(p, e)| (p, e.size, e.sha256))
        .collect();
    v.sort();
    v
}

struct Server {
    base: String,
    client: reqwest::Client,
    shutdown: CancellationToken,
    handle: tokio::task::JoinHandle<branch_listener::Result<()>>,
}

impl Server {
    async fn start(config: &Config) -> Result<Server> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", listener.local_addr()?);
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(serve::run(config.clone(), listener, shutdown.clone()));
        Ok(Server {
            base,
            client: reqwest::Client::new(),
            shutdown,
            handle,
        })
    }

    async fn get(
        &self,
        path: &str,
        token: Option<&str>,
        range: Option<&str>,
    ) -> Result<(u16, reqwest::header::HeaderMap, Vec<u8>)> {
        let mut req = self.client.get(format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(r) = range {
            req = req.header("range", r);
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        Ok((status, headers, resp.bytes().await?.to_vec()))
    }

    /// All `_files` events from the start: (op, path, sha256 or None).
    async fn file_events(&self) -> Result<Vec<(Op, String, Option<String>)>> {
        let mut after: Option<String> = None;
        let mut out = Vec::new();
        loop {
            let mut path = "/v1/changes?limit=1000".to_string();
            if let Some(a) = &after {
                path.push_str(&format!("&after={a}"));
            }
            let (status, _, body) = self.get(&path, Some(TOKEN), None).await?;
            if status != 200 {
                bail!("changes: {status} {}", String::from_utf8_lossy(&body));
            }
            let r: ChangesResponse = serde_json::from_slice(&body)?;
            for c in &r.changes {
                assert_eq!(c.table, "_files");
                let pk: serde_json::Value = serde_json::from_str(c.pk.get())?;
                let path = pk["path"].as_str().unwrap().to_string();
                assert_eq!(pk.as_object().unwrap().len(), 1, "pk is exactly path");
                let sha = c.row.as_ref().map(|row| {
                    let row: schemas::files::FileRow = serde_json::from_str(row.get()).unwrap();
                    assert_eq!(row.path, path);
                    row.sha256
                });
                out.push((c.op, path, sha));
            }
            let done = r.changes.is_empty() && !r.more;
            after = Some(r.next.to_string());
            if done {
                return Ok(out);
            }
        }
    }

    async fn stop(self) -> Result<()> {
        self.shutdown.cancel();
        self.handle.await??;
        Ok(())
    }
}

async fn eventually<F, Fut>(secs: u64, what: &str, mut cond: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if cond().await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("timed out waiting for: {what}")
}

/// Add, change and delete become index rows and `_files` events in stream order; an
/// unchanged file writes nothing; unicode and spaces work.
async fn add_change_delete(pg: bool) -> Result<()> {
    let b = branch(pg).await?;
    let mut w = watcher(&b);
    let (a, u) = (b.files.join("a.jpg"), b.files.join("dir ü/日本 photo.png"));
    write_old(&a, b"first");
    write_old(&u, b"unicode");
    let r = w.scan(&b.db).await?;
    assert_eq!((r.upserts, r.deletes, r.pending), (2, 0, 0));
    assert_eq!(
        indexed(&b).await,
        vec![
            ("a.jpg".into(), 5, sha(b"first")),
            ("dir ü/日本 photo.png".into(), 7, sha(b"unicode")),
        ]
    );
    let r = w.scan(&b.db).await?;
    assert_eq!(
        (r.upserts, r.deletes),
        (0, 0),
        "nothing changed: nothing written"
    );
    write_old(&a, b"second!");
    std::fs::remove_file(&u)?;
    let r = w.scan(&b.db).await?;
    assert_eq!((r.upserts, r.deletes), (1, 1));
    assert_eq!(
        indexed(&b).await,
        vec![("a.jpg".into(), 7, sha(b"second!"))]
    );

    let server = Server::start(&b.config).await?;
    let ev = server.file_events().await?;
    assert_eq!(
        ev,
        vec![
            (Op::Insert, "a.jpg".into(), Some(sha(b"first"))),
            (
                Op::Insert,
                "dir ü/日本 photo.png".into(),
                Some(sha(b"unicode"))
            ),
            (Op::Delete, "dir ü/日本 photo.png".into(), None),
            (Op::Update, "a.jpg".into(), Some(sha(b"second!"))),
        ]
    );
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_change_delete_sqlite() -> Result<()> {
    add_change_delete(false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_change_delete_postgres() -> Result<()> {
    add_change_delete(true).await
}

/// A file still being written (fresh mtime, growing) is not indexed until it settles;
/// a file renamed into place is indexed at once; one that changes while hashed is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_complete_files_are_indexed() -> Result<()> {
    let b = branch(false).await?;
    let mut w = watcher(&b);
    let growing = b.files.join("growing.jpg");
    for i in 0..3 {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&growing)?;
        std::io::Write::write_all(&mut f, &vec![i as u8; 1000])?;
        let r = w.scan(&b.db).await?;
        assert_eq!((r.upserts, r.pending), (0, 1), "growing file not indexed");
    }
    assert!(indexed(&b).await.is_empty());
    // Stable for the settle time (its mtime is old now): indexed whole.
    std::fs::File::options()
        .write(true)
        .open(&growing)?
        .set_modified(SystemTime::now() - Duration::from_secs(3600))?;
    let r = w.scan(&b.db).await?;
    assert_eq!((r.upserts, r.pending), (1, 0));
    assert_eq!(indexed(&b).await[0].1, 3000);

    // Renamed into place: complete although its mtime is fresh.
    let tmp = b.files.join("upload.jpg.part");
    std::fs::write(&tmp, b"renamed")?;
    assert_eq!(w.scan(&b.db).await?.pending, 0, "*.part is ignored");
    let fin = b.files.join("upload.jpg");
    std::fs::rename(&tmp, &fin)?;
    w.note_renamed(&fin);
    let r = w.scan(&b.db).await?;
    assert_eq!(r.upserts, 1);
    assert!(indexed(&b)
        .await
        .iter()
        .any(|(p, _, s)| p == "upload.jpg" && *s == sha(b"renamed")));

    // Changed while hashed (the re-stat differs): not indexed.
    let walk = scan::walk(&b.files, &Ignore::new(&[]).unwrap());
    let mut f = walk.files["upload.jpg"].clone();
    f.mtime -= chrono::Duration::seconds(10);
    assert_eq!(scan::hash_if_unchanged(&f)?, None);
    Ok(())
}

/// Ignore patterns, `..`-free names, symlinks out of the folder, non-UTF-8 names: skipped
/// (and reported), never crashing the scan; symlinks inside the folder work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_names_are_refused_and_the_rest_indexed() -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let b = branch(false).await?;
    let mut w = watcher(&b);
    write_old(&b.files.join("ok.jpg"), b"ok");
    for ignored in [
        ".hidden.jpg",
        "x.tmp",
        "y.part",
        "z.jpg~",
        ".cache/inside.jpg",
    ] {
        write_old(&b.files.join(ignored), b"ignored");
    }
    let outside = b._dir.path().join("secret.txt");
    std::fs::write(&outside, b"secret")?;
    std::os::unix::fs::symlink(&outside, b.files.join("escape.jpg"))?;
    std::os::unix::fs::symlink("../secret.txt", b.files.join("relative-escape.jpg"))?;
    std::os::unix::fs::symlink("ok.jpg", b.files.join("alias.jpg"))?;
    std::os::unix::fs::symlink("/nonexistent/x", b.files.join("dangling.jpg"))?;
    let bad = b
        .files
        .join(std::ffi::OsStr::from_bytes(b"bad\xff name.jpg"));
    write_old(&bad, b"latin1");
    write_old(&b.files.join("new\nline.jpg"), b"control");
    let r = w.scan(&b.db).await?;
    let paths: Vec<String> = indexed(&b).await.into_iter().map(|x| x.0).collect();
    assert_eq!(paths, vec!["alias.jpg", "ok.jpg"]);
    assert_eq!(
        r.skipped, 5,
        "escape, relative-escape, dangling, non-UTF-8, control"
    );
    let walk = scan::walk(&b.files, &Ignore::new(&b.config.files_ignore).unwrap());
    let mut reasons: Vec<(&str, String)> = walk
        .skipped
        .iter()
        .map(|s| (s.reason, s.path.clone()))
        .collect();
    reasons.sort();
    assert_eq!(
        reasons,
        vec![
            ("bad_name", "new\nline.jpg".into()),
            ("not_utf8", "bad\u{fffd} name.jpg".into()),
            ("symlink_outside", "dangling.jpg".into()),
            ("symlink_outside", "escape.jpg".into()),
            ("symlink_outside", "relative-escape.jpg".into()),
        ]
    );
    // A files_dir that cannot be read (unmounted, renamed) is not taken for deleted
    // files: the index stays as it is.
    std::fs::rename(&b.files, b._dir.path().join("moved"))?;
    let r = w.scan(&b.db).await?;
    assert_eq!((r.upserts, r.deletes), (0, 0));
    assert_eq!(indexed(&b).await.len(), 2);
    Ok(())
}

/// The served endpoint: full content, ranges, 416, 404 `file_not_found` once the
/// content changed, 400 on a malformed checksum, 401 without the token; and the
/// watcher task of the real server indexes a file renamed into place (notifications).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_endpoint_and_watcher_task() -> Result<()> {
    let b = branch(false).await?;
    let content: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let path = b.files.join("big photo.jpg");
    write_old(&path, &content);
    let server = Server::start(&b.config).await?;
    let h = sha(&content);
    eventually(20, "the start scan indexes the file", || async {
        indexed(&b).await.len() == 1
    })
    .await?;
    let url = format!("/v1/files/{h}");
    let (status, headers, body) = server.get(&url, Some(TOKEN), None).await?;
    assert_eq!(status, 200);
    assert_eq!(body, content);
    assert_eq!(headers["accept-ranges"], "bytes");
    let (status, headers, body) = server.get(&url, Some(TOKEN), Some("bytes=1000-")).await?;
    assert_eq!(status, 206);
    assert_eq!(body, &content[1000..]);
    assert_eq!(headers["content-range"], "bytes 1000-299999/300000");
    let (status, _, body) = server.get(&url, Some(TOKEN), Some("bytes=10-19")).await?;
    assert_eq!((status, body.as_slice()), (206, &content[10..20]));
    let (status, headers, _) = server.get(&url, Some(TOKEN), Some("bytes=300000-")).await?;
    assert_eq!(
        (status, &headers["content-range"]),
        (416, &"bytes */300000".parse()?)
    );
    let (status, _, _) = server.get(&url, None, None).await?;
    assert_eq!(status, 401);
    let (status, _, _) = server
        .get(&url, Some("wrong-token-0123456789"), None)
        .await?;
    assert_eq!(status, 401);
    let (status, _, body) = server.get("/v1/files/xyz", Some(TOKEN), None).await?;
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
    let (status, _, body) = server
        .get(&format!("/v1/files/{}", "0".repeat(64)), Some(TOKEN), None)
        .await?;
    let e: ErrorBody = serde_json::from_slice(&body)?;
    assert_eq!((status, e.error.code.as_str()), (404, "file_not_found"));

    // Changed on disk, not yet re-indexed (settle is long): the size no longer matches
    // the index, so the old checksum is answered 404 (a later event supersedes it).
    std::fs::write(&path, b"short")?;
    let (status, _, body) = server.get(&url, Some(TOKEN), None).await?;
    let e: ErrorBody = serde_json::from_slice(&body)?;
    assert_eq!((status, e.error.code.as_str()), (404, "file_not_found"));

    // Rename into place, seen through notifications by the running watcher.
    let tmp = b.files.join("new.jpg.tmp");
    std::fs::write(&tmp, b"fresh upload")?;
    std::fs::rename(&tmp, b.files.join("new.jpg"))?;
    eventually(20, "the renamed file is indexed", || async {
        indexed(&b).await.iter().any(|(p, _, _)| p == "new.jpg")
    })
    .await?;
    let (status, _, body) = server
        .get(
            &format!("/v1/files/{}", sha(b"fresh upload")),
            Some(TOKEN),
            None,
        )
        .await?;
    assert_eq!((status, body.as_slice()), (200, b"fresh upload".as_slice()));
    server.stop().await
}

/// A file longer than what is read in one piece (1 MiB) is streamed: whole, and by a
/// range starting past the first streamed chunk and ending inside a later one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_files_are_streamed_whole_and_by_range() -> Result<()> {
    let b = branch(false).await?;
    let content: Vec<u8> = (0..(5 * 1024 * 1024 + 7u32))
        .map(|i| (i % 253) as u8)
        .collect();
    write_old(&b.files.join("long.bin"), &content);
    let server = Server::start(&b.config).await?;
    eventually(20, "the start scan indexes the file", || async {
        indexed(&b).await.len() == 1
    })
    .await?;
    let url = format!("/v1/files/{}", sha(&content));
    let (status, headers, body) = server.get(&url, Some(TOKEN), None).await?;
    assert_eq!(status, 200);
    assert_eq!(
        headers["content-length"],
        content.len().to_string().as_str()
    );
    assert!(body == content, "the whole file, byte for byte");
    let (a, z) = (1_500_000, 4_800_000);
    let (status, headers, body) = server
        .get(&url, Some(TOKEN), Some(&format!("bytes={a}-")))
        .await?;
    assert_eq!(status, 206);
    assert!(body == content[a..], "the tail from {a}");
    assert_eq!(
        headers["content-range"],
        format!("bytes {a}-{}/{}", content.len() - 1, content.len()).as_str()
    );
    let (status, _, body) = server
        .get(&url, Some(TOKEN), Some(&format!("bytes=0-{z}")))
        .await?;
    assert_eq!(status, 206);
    assert!(body == content[..=z], "the head to {z}");
    // A short range inside the long file is read in one piece.
    let (status, _, body) = server
        .get(&url, Some(TOKEN), Some("bytes=2000000-2000099"))
        .await?;
    assert_eq!(
        (status, body.as_slice()),
        (206, &content[2_000_000..2_000_100])
    );
    server.stop().await
}

/// A pull area of layout 1 (before the file index) is upgraded by `install`: the index
/// table and its capture appear, the instance and history are kept, file events flow.
async fn older_layout_is_upgraded(pg: bool) -> Result<()> {
    let b = branch(pg).await?;
    let id = b.db.meta().await?.instance_id;
    let downgrade = [
        "DROP TRIGGER IF EXISTS _pull__files_ins",
        "DROP TRIGGER IF EXISTS _pull__files_upd",
        "DROP TRIGGER IF EXISTS _pull__files_del",
        "DROP TABLE _pull_files",
        "UPDATE _pull_meta SET value = '1' WHERE key = 'pull_area_version'",
    ];
    let downgrade_pg = [
        "DROP TABLE pull.files CASCADE",
        "DROP FUNCTION pull.capture__files()",
        "UPDATE pull.meta SET value = '1' WHERE key = 'pull_area_version'",
    ];
    match &b.db {
        Db::Sqlite { pool, .. } => {
            for s in downgrade {
                sqlx::query(s).execute(pool).await?;
            }
        }
        Db::Postgres(pool) => {
            for s in downgrade_pg {
                sqlx::query(s).execute(pool).await?;
            }
        }
    }
    assert!(index::load(&b.db).await.is_err(), "layout 1 has no index");
    assert_eq!(
        install::install(&b.db, &Catalogue::product_management(), false).await?,
        install::Outcome::Updated { instance_id: id }
    );
    assert_eq!(b.db.meta().await?.version, schemas::sql::PULL_AREA_VERSION);
    write_old(&b.files.join("after-upgrade.jpg"), b"x");
    assert_eq!(watcher(&b).scan(&b.db).await?.upserts, 1);
    let server = Server::start(&b.config).await?;
    assert_eq!(
        server.file_events().await?,
        vec![(Op::Insert, "after-upgrade.jpg".into(), Some(sha(b"x")))]
    );
    server.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn older_layout_is_upgraded_sqlite() -> Result<()> {
    older_layout_is_upgraded(false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn older_layout_is_upgraded_postgres() -> Result<()> {
    older_layout_is_upgraded(true).await
}
