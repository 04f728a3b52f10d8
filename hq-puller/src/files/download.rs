//! Downloading one content into the object store: `.tmp/<sha256>.<location>.part`, resumed with
//! `Range` after a cut, size and sha256 verified while streaming (bounded memory),
//! fsync'ed, then renamed to `.objects/ab/<sha256>` (its directory is fsync'ed before
//! the batch commits, see [`super::place`]).
//! A mismatch deletes the partial file and downloads again from the start, up to
//! [`ATTEMPTS`] times; then the batch fails (transient: retried with backoff), nothing
//! is stored and the cursor does not move.

use super::direct::{Aligned, Sink};
use super::Store;
use crate::client::{describe, http_error, Client};
use crate::error::{Error, Result};
use crate::metrics as m;
use reqwest::StatusCode;
use sha2::{Digest, Sha256};
use std::path::Path;
use std::sync::Arc;

/// Download attempts (cuts and mismatches) per content and batch.
pub const ATTEMPTS: usize = 4;

/// Result of fetching one content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fetched {
    /// In the object store, verified (downloaded now or before).
    Stored,
    /// The listener answered `file_not_found`.
    Superseded,
}

/// One attempt's failure.
enum Attempt {
    /// The connection was cut: resume from what is on disk.
    Cut(String),
    /// Wrong size or checksum: start over.
    Mismatch(String),
    /// 429: the listener's rate limit; wait this long and ask again (not an attempt).
    Throttled(std::time::Duration),
}

/// Write-behind for large files written without `O_DIRECT` (resumed, or where the file
/// system refuses it): every [`WRITE_BEHIND`] bytes written, an `fdatasync`
/// of the file starts in the background (one at a time), so the disk writes while the
/// network delivers and the final fsync waits only for the tail instead of the whole
/// file. The final `sync_all` stays the durability point; a background sync's error
/// fails the attempt like the final one's (the kernel reports a writeback error once
/// per open file, so it must not be dropped).
const WRITE_BEHIND: u64 = 8 * 1024 * 1024;

/// Buffers (1 MiB) queued between the network and a download's writer thread (bounded
/// memory: with the hasher's queue, about 10 MiB per long download).
const WRITER_QUEUE: usize = 4;

/// The background sync of [`WRITE_BEHIND`], if one was started.
type Behind = Option<std::thread::JoinHandle<std::io::Result<()>>>;

/// Waits for the background sync, if any; its error is the file's.
fn join_behind(behind: &mut Behind) -> std::io::Result<()> {
    match behind.take() {
        None => Ok(()),
        Some(h) => h
            .join()
            .map_err(|_| std::io::Error::other("background sync thread panicked"))?,
    }
}

/// A download of at most this many bytes (one aligned buffer) is gathered in memory and
/// written by one blocking call (a typical image); a longer one streams through a writer
/// thread.
const GATHER_MAX: u64 = super::direct::BUFFER as u64;

/// Where an attempt's received bytes go.
enum Receiving {
    /// Copied into one aligned buffer, written once the body is complete.
    Gather(Aligned),
    /// Copied into aligned buffers; each full one is sent to the writer thread (which
    /// has it hashed on a thread of its own), the last one when the body ends. The
    /// HTTP client's read buffer is free again at once, and the buffers are pooled: no
    /// memory is taken fresh per chunk.
    Stream {
        filling: Aligned,
        tx: tokio::sync::mpsc::Sender<Arc<Aligned>>,
        writer: tokio::task::JoinHandle<std::io::Result<(Sha256, u64)>>,
    },
}

/// Downloads in flight across all locations (each location's batch runs up to
/// [`super::DOWNLOAD_CONCURRENCY`]): bounds the memory of gathered downloads to
/// 64 MiB whatever `max_concurrent_pulls` is.
pub const ALL_DOWNLOADS: usize = 64;

static DOWNLOAD_SLOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(ALL_DOWNLOADS);

/// Buffers (1 MiB) queued between a streamed download's writer and its hasher thread.
const HASHER_QUEUE: usize = 4;

/// Opens `part` for an attempt: created (truncated) for direct writes, or, when
/// `resume`, appended to after the bytes already there, which are hashed into `hasher`
/// first. Returns the sink and the bytes already in the file.
fn open_part(part: &Path, resume: bool, hasher: &mut Sha256) -> std::io::Result<(Sink, u64)> {
    if resume {
        let n = schemas::files::hash_into(&mut std::fs::File::open(part)?, hasher)?;
        Ok((Sink::append(part, n)?, n))
    } else {
        Ok((Sink::create(part, create_file)?, 0))
    }
}

/// The blocking half of a gathered download (a typical image): the received bytes,
/// already in one aligned buffer, are hashed, written and fsync'ed. Returns the hash
/// state and the file's length.
fn write_gathered(part: &Path, resume: bool, buf: Aligned) -> std::io::Result<(Sha256, u64)> {
    let mut hasher = Sha256::new();
    let r = (|| -> std::io::Result<u64> {
        let (mut sink, before) = open_part(part, resume, &mut hasher)?;
        hasher.update(buf.bytes());
        let total = before + buf.len() as u64;
        sink.finish(buf.bytes())?;
        sink.file.sync_all()?;
        Ok(total)
    })();
    Ok((hasher, r?))
}

/// The blocking half of a streamed download (a long one): opens `part` (see
/// [`open_part`]), then writes every buffer (full ones but the last) while a thread of
/// its own hashes it (a single large file is then not limited by one core doing both),
/// with write-behind when the writes are ordinary ones, and fsyncs the file. Returns
/// the hash state and the file's length.
fn write_part(
    part: &Path,
    resume: bool,
    bufs: impl Iterator<Item = Arc<Aligned>>,
) -> std::io::Result<(Sha256, u64)> {
    let mut hasher = Sha256::new();
    let (mut sink, mut total) = open_part(part, resume, &mut hasher)?;
    let mut hashing = Hashing::new(hasher);
    let mut mark = total;
    let mut behind: Behind = None;
    let r = (|| -> std::io::Result<()> {
        for buf in bufs {
            hashing.update(&buf);
            total += buf.len() as u64;
            if buf.is_full() {
                sink.write(buf.bytes())?;
            } else {
                // Only the last buffer is not full.
                sink.finish(buf.bytes())?;
            }
            // Direct writes are on the disk when they return: write-behind is for ordinary
            // ones only.
            if !sink.is_direct()
                && total - mark >= WRITE_BEHIND
                && behind.as_ref().is_none_or(|h| h.is_finished())
            {
                join_behind(&mut behind)?;
                let clone = sink.file.try_clone()?;
                behind = Some(std::thread::spawn(move || clone.sync_data()));
                mark = total;
            }
        }
        Ok(())
    })();
    let hashed = hashing.finish();
    // Always joined: its error must not be lost.
    let synced = join_behind(&mut behind);
    r?;
    synced?;
    let hasher = hashed?;
    sink.file.sync_all()?;
    Ok((hasher, total))
}

/// A streamed download's sha256, computed by a thread of its own fed every chunk.
struct Hashing {
    tx: std::sync::mpsc::SyncSender<Arc<Aligned>>,
    thread: std::thread::JoinHandle<Sha256>,
}

impl Hashing {
    /// Continues `hasher` on a thread of its own.
    fn new(mut hasher: Sha256) -> Hashing {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Arc<Aligned>>(HASHER_QUEUE);
        let thread = std::thread::spawn(move || {
            for buf in rx {
                hasher.update(buf.bytes());
            }
            hasher
        });
        Hashing { tx, thread }
    }

    fn update(&mut self, buf: &Arc<Aligned>) {
        // A hasher that died is reported by `finish`.
        let _ = self.tx.send(buf.clone());
    }

    /// The hash of everything given to `update`.
    fn finish(self) -> std::io::Result<Sha256> {
        // The thread ends when its sender is dropped.
        drop(self.tx);
        self.thread
            .join()
            .map_err(|_| std::io::Error::other("hasher thread panicked"))
    }
}

/// 429 answers waited out per content before the batch fails (and backs off).
const THROTTLED_WAITS: usize = 120;

/// The wait a 429 asks for (`Retry-After` in seconds, 1 s when absent), at most 10 s.
fn retry_after(headers: &reqwest::header::HeaderMap) -> std::time::Duration {
    let secs = headers
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(1);
    std::time::Duration::from_secs(secs.clamp(1, 10))
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::transient(format!("file store: {what} {}: {e}", path.display()))
}

/// `create_dir_all` with an error that says what is wrong when something that is not a
/// directory is in the way (the OS only says "File exists").
fn make_dirs(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => std::io::Error::new(
            e.kind(),
            format!("a file that is not a directory is in the way ({e})"),
        ),
        _ => e,
    })
}

/// [`make_dirs`] with the file store's error.
pub fn create_dirs(dir: &Path) -> Result<()> {
    make_dirs(dir).map_err(|e| io_err("creating", dir, e))
}

/// Creates (truncates) `path` opened with the extra open `flags`, making its directory
/// first if it is missing (checked only on failure: no extra system call per file when
/// it exists).
pub(super) fn create_file(path: &Path, flags: i32) -> std::io::Result<std::fs::File> {
    use std::io::ErrorKind::{NotADirectory, NotFound};
    use std::os::unix::fs::OpenOptionsExt;
    let open = || {
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(flags)
            .open(path)
    };
    match open() {
        Err(e) if matches!(e.kind(), NotFound | NotADirectory) => {
            make_dirs(path.parent().expect("a file in a directory"))?;
            open()
        }
        r => r,
    }
}

/// `rename`, making the target's directory first if it is missing (checked only on
/// failure; [`create_dirs`] names what is in the way when that fails).
fn rename_into(from: &Path, to: &Path) -> Result<()> {
    use std::io::ErrorKind::{NotADirectory, NotFound};
    match std::fs::rename(from, to) {
        Err(e) if matches!(e.kind(), NotFound | NotADirectory) && from.exists() => {
            create_dirs(to.parent().expect("a file in a directory"))?;
            std::fs::rename(from, to)
        }
        r => r,
    }
    .map_err(|e| io_err("storing", to, e))
}

/// fsync of a directory (after a rename into it).
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Makes sure the content `sha256` of `size` bytes is in the object store.
pub async fn fetch(
    client: &Client,
    store: &Store,
    location: &str,
    path: &str,
    sha256: &str,
    size: i64,
) -> Result<Fetched> {
    let object = store.object(sha256);
    // Per location: two locations fetching the same content never share a partial file
    // (both then rename identical, verified content onto the same object).
    let part = store.tmp_dir().join(format!("{sha256}.{location}.part"));
    let size = u64::try_from(size).unwrap_or(0);
    // One blocking call for both looks (a typical image makes two in all: this one and
    // the one that writes, verifies and stores it).
    let (o, p) = (object.clone(), part.clone());
    let Some(mut have) = blocking(move || Ok(part_to_resume(&o, &p, size))).await? else {
        return Ok(Fetched::Stored);
    };
    let _slot = DOWNLOAD_SLOTS
        .acquire()
        .await
        .map_err(|e| Error::Other(format!("download slots: {e}")))?;
    let mut last = String::new();
    let mut attempt = 0;
    let mut throttled = 0;
    while attempt < ATTEMPTS {
        attempt += 1;
        if attempt > 1 || throttled > 0 {
            let p = part.clone();
            have = blocking(move || Ok(part_len(&p, size))).await?;
        }
        let target = Target {
            part: &part,
            object: &object,
            sha256,
            size,
            have,
        };
        match attempt_once(client, &target, location, path).await? {
            Ok(None) => {
                // Superseded.
                let _ = tokio::fs::remove_file(&part).await;
                return Ok(Fetched::Superseded);
            }
            Ok(Some(bytes)) => {
                // The object directory is fsync'ed with the placement, before the
                // batch commits (one fsync per directory, not per file).
                metrics::counter!(m::FILES_DOWNLOADED, "location" => location.to_string())
                    .increment(1);
                tracing::debug!(location, path, sha256, bytes, "file content stored");
                return Ok(Fetched::Stored);
            }
            Err(Attempt::Cut(why)) => {
                tracing::info!(location, path, attempt, error = %why, "file download cut; resuming");
                last = why;
            }
            Err(Attempt::Mismatch(why)) => {
                metrics::counter!(m::FILES_CHECKSUM_FAILURES, "location" => location.to_string())
                    .increment(1);
                tracing::warn!(location, path, sha256, attempt, error = %why, "downloaded file failed verification; discarded");
                let _ = tokio::fs::remove_file(&part).await;
                last = why;
            }
            Err(Attempt::Throttled(wait)) if throttled < THROTTLED_WAITS => {
                throttled += 1;
                attempt -= 1;
                metrics::counter!(m::FILES_THROTTLED, "location" => location.to_string())
                    .increment(1);
                tracing::debug!(
                    location,
                    path,
                    wait_ms = wait.as_millis() as u64,
                    "listener rate-limited a file download; waiting"
                );
                tokio::time::sleep(wait).await;
            }
            Err(Attempt::Throttled(_)) => {
                return Err(Error::transient(format!(
                    "file {path:?} of location {location}: the listener rate-limited (HTTP 429) \
                     its download {THROTTLED_WAITS} times in a row; raise its rate_limit_per_second"
                )));
            }
        }
    }
    Err(Error::transient(format!(
        "file {path:?} (sha256 {sha256}) of location {location}: download failed {ATTEMPTS} times, last: {last}"
    )))
}

/// Where one content goes, and what is known of it.
struct Target<'a> {
    part: &'a Path,
    object: &'a Path,
    sha256: &'a str,
    size: u64,
    /// Bytes of `part` already on disk (resumed with `Range`).
    have: u64,
}

/// Runs a blocking file-store call on the blocking pool.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Other(format!("file store task: {e}")))?
}

/// `None` when `object` is already stored with `size` bytes; else the bytes of `part`
/// to resume from (see [`part_len`]).
fn part_to_resume(object: &Path, part: &Path, size: u64) -> Option<u64> {
    match std::fs::metadata(object) {
        Ok(meta) if meta.len() == size => None,
        _ => Some(part_len(part, size)),
    }
}

/// Bytes of `part` to resume from: 0 when missing, or longer than the content (then
/// removed).
fn part_len(part: &Path, size: u64) -> u64 {
    match std::fs::metadata(part) {
        Ok(m) if m.len() <= size => m.len(),
        Ok(_) => {
            let _ = std::fs::remove_file(part);
            0
        }
        Err(_) => 0,
    }
}

/// What one attempt left in `part`.
enum Verdict {
    /// Verified and renamed onto the object: its length.
    Stored(u64),
    /// Wrong size or checksum.
    Mismatch(String),
    /// The download stopped early (kept for a resume).
    Incomplete,
}

/// A [`Target`]'s paths and expectations, owned for a blocking call.
struct Owned {
    part: std::path::PathBuf,
    object: std::path::PathBuf,
    sha256: String,
    size: u64,
}

/// Verifies what was written (`hasher` over `on_disk` bytes) when the download was
/// `complete`, and stores it: renamed onto the object (its directory is fsync'ed with
/// the placement). Blocking.
fn verify_and_store(
    t: &Owned,
    (hasher, on_disk): (Sha256, u64),
    complete: bool,
) -> Result<Verdict> {
    if !complete {
        return Ok(Verdict::Incomplete);
    }
    if on_disk != t.size {
        return Ok(Verdict::Mismatch(format!(
            "size {on_disk} bytes, the event says {}",
            t.size
        )));
    }
    let got = hex::encode(hasher.finalize());
    if got != t.sha256 {
        return Ok(Verdict::Mismatch(format!(
            "sha256 {got}, expected {}",
            t.sha256
        )));
    }
    rename_into(&t.part, &t.object)?;
    Ok(Verdict::Stored(on_disk))
}

/// One request. `Ok(Ok(Some(n)))`: complete, verified and stored; `Ok(Ok(None))`:
/// superseded; `Ok(Err(_))`: retry; `Err(_)`: give up (refused, local I/O).
async fn attempt_once(
    client: &Client,
    target: &Target<'_>,
    location: &str,
    path: &str,
) -> Result<std::result::Result<Option<u64>, Attempt>> {
    let Target {
        part,
        sha256,
        size,
        mut have,
        ..
    } = *target;
    let mut req = client.file_request(sha256)?;
    if have > 0 {
        req = req.header(reqwest::header::RANGE, format!("bytes={have}-"));
    }
    let timeout = client.request_timeout();
    let resp = match tokio::time::timeout(timeout, req.send()).await {
        Err(_) => return Ok(Err(Attempt::Cut("request timed out".into()))),
        // Connection trouble before the headers: retried like a cut.
        Ok(Err(e)) => return Ok(Err(Attempt::Cut(describe(&e)))),
        Ok(Ok(r)) => r,
    };
    let status = resp.status();
    if status == StatusCode::NOT_FOUND || !status.is_success() {
        let headers = resp.headers().clone();
        let body = resp.bytes().await.unwrap_or_default();
        let code = serde_json::from_slice::<schemas::wire::ErrorBody>(&body)
            .map(|b| b.error.code)
            .unwrap_or_default();
        if status == StatusCode::NOT_FOUND && code == schemas::wire::error_code::FILE_NOT_FOUND {
            return Ok(Ok(None));
        }
        if status == StatusCode::TOO_MANY_REQUESTS {
            return Ok(Err(Attempt::Throttled(retry_after(&headers))));
        }
        if status == StatusCode::RANGE_NOT_SATISFIABLE {
            let _ = tokio::fs::remove_file(part).await;
            return Ok(Err(Attempt::Cut(
                "range not satisfiable; starting over".into(),
            )));
        }
        let e = http_error(status, &body);
        return Err(match e {
            Error::Pull { kind, message } => Error::Pull {
                kind,
                message: format!("fetching file {path:?} of location {location}: {message}"),
            },
            other => other,
        });
    }
    let resumed = status == StatusCode::PARTIAL_CONTENT
        && have > 0
        && resp
            .headers()
            .get(reqwest::header::CONTENT_RANGE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with(&format!("bytes {have}-")));
    if !resumed {
        have = 0;
    }
    // A short download is gathered (copied as it arrives into an aligned buffer, so that
    // the HTTP client reuses its own), then written, verified and stored by one blocking
    // call; a long one streams to a writer thread as it arrives.
    let owned = Owned {
        part: part.to_path_buf(),
        object: target.object.to_path_buf(),
        sha256: sha256.to_string(),
        size,
    };
    let mut receiving = if size.saturating_sub(have) <= GATHER_MAX {
        Receiving::Gather(Aligned::take())
    } else {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Arc<Aligned>>(WRITER_QUEUE);
        let p = owned.part.clone();
        let bufs = std::iter::from_fn(move || rx.blocking_recv());
        Receiving::Stream {
            filling: Aligned::take(),
            tx,
            writer: tokio::task::spawn_blocking(move || write_part(&p, resumed, bufs)),
        }
    };
    let mut resp = resp;
    let mut total = have;
    let mut written = 0u64;
    let outcome = loop {
        let chunk = match tokio::time::timeout(timeout, resp.chunk()).await {
            Err(_) => break Some(Attempt::Cut("no data within the request timeout".into())),
            Ok(Err(e)) => break Some(Attempt::Cut(describe(&e))),
            Ok(Ok(None)) => break None,
            Ok(Ok(Some(c))) => c,
        };
        total += chunk.len() as u64;
        if total > size {
            break Some(Attempt::Mismatch(format!(
                "more than the announced {size} bytes"
            )));
        }
        let n = chunk.len() as u64;
        match &mut receiving {
            // Fits: at most `size - have` <= GATHER_MAX bytes arrive (checked above).
            Receiving::Gather(buf) => {
                buf.fill(&chunk);
            }
            Receiving::Stream { filling, tx, .. } => {
                let mut rest = &chunk[..];
                let mut stopped = false;
                while !rest.is_empty() {
                    rest = &rest[filling.fill(rest)..];
                    if filling.is_full() {
                        let full = std::mem::replace(filling, Aligned::take());
                        if tx.send(Arc::new(full)).await.is_err() {
                            stopped = true;
                            break;
                        }
                    }
                }
                if stopped {
                    // The writer stopped: its error is reported below.
                    break None;
                }
            }
        }
        written += n;
    };
    let complete = outcome.is_none();
    // What was received is on disk (and synced) before a cut is resumed.
    let verdict = match receiving {
        Receiving::Gather(buf) => {
            blocking(move || {
                let w = write_gathered(&owned.part, resumed, buf)
                    .map_err(|e| io_err("writing", &owned.part, e))?;
                verify_and_store(&owned, w, complete)
            })
            .await?
        }
        Receiving::Stream {
            filling,
            tx,
            writer,
        } => {
            // What was received is written, also before a resume: the last buffer, then
            // the writer ends when its sender is dropped.
            if !filling.is_empty() {
                let _ = tx.send(Arc::new(filling)).await;
            }
            drop(tx);
            let w = writer
                .await
                .map_err(|e| Error::Other(format!("file writer task: {e}")))?
                .map_err(|e| io_err("writing", part, e))?;
            blocking(move || verify_and_store(&owned, w, complete)).await?
        }
    };
    metrics::counter!(m::FILES_DOWNLOADED_BYTES, "location" => location.to_string())
        .increment(written);
    if let Some(a) = outcome {
        return Ok(Err(a));
    }
    match verdict {
        Verdict::Stored(n) => Ok(Ok(Some(n))),
        Verdict::Mismatch(why) => Ok(Err(Attempt::Mismatch(why))),
        // Not reached: an attempt that ended early has its outcome, returned above.
        Verdict::Incomplete => Ok(Err(Attempt::Cut("the writer stopped".into()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes `data` (in full buffers but the last) to `part` as a streamed download;
    /// returns the sha256 and length the writer reports.
    fn stream(part: &Path, resume: bool, data: &[u8]) -> (String, u64) {
        let bufs = data.chunks(super::super::direct::BUFFER).map(|c| {
            let mut buf = Aligned::take();
            buf.fill(c);
            Arc::new(buf)
        });
        let (h, n) = write_part(part, resume, bufs).unwrap();
        (hex::encode(h.finalize()), n)
    }

    /// The same as a gathered download (`data` fits in one buffer).
    fn gather(part: &Path, resume: bool, data: &[u8]) -> (String, u64) {
        let mut buf = Aligned::take();
        assert_eq!(buf.fill(data), data.len());
        let (h, n) = write_gathered(part, resume, buf).unwrap();
        (hex::encode(h.finalize()), n)
    }

    #[test]
    fn writer_hashes_writes_and_resumes_across_write_behind() {
        let d = tempfile::tempdir().unwrap();
        let part = d.path().join("x.part");
        // Larger than a few WRITE_BEHIND steps, not a multiple of the chunk size.
        let data: Vec<u8> = (0..(3 * WRITE_BEHIND as usize + 12_345))
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        let whole = hex::encode(Sha256::digest(&data));
        assert_eq!(
            stream(&part, false, &data),
            (whole.clone(), data.len() as u64)
        );
        assert_eq!(std::fs::read(&part).unwrap(), data);
        // A cut after 10 MiB + 7 bytes: the resumed attempt hashes the prefix on disk.
        let cut = 10 * 1024 * 1024 + 7;
        std::fs::write(&part, &data[..cut]).unwrap();
        assert_eq!(
            stream(&part, true, &data[cut..]),
            (whole, data.len() as u64)
        );
        assert_eq!(std::fs::read(&part).unwrap(), data);
        // Not resumed: the part file starts over.
        assert_eq!(stream(&part, false, b"abc").1, 3);
    }

    #[test]
    fn gathered_downloads_hash_write_and_resume() {
        let d = tempfile::tempdir().unwrap();
        let part = d.path().join("y.part");
        let data: Vec<u8> = (0..300_001).map(|i| (i * 17 % 241) as u8).collect();
        let whole = hex::encode(Sha256::digest(&data));
        assert_eq!(
            gather(&part, false, &data),
            (whole.clone(), data.len() as u64)
        );
        assert_eq!(std::fs::read(&part).unwrap(), data);
        // Resumed after 4097 bytes: the prefix on disk is hashed, the rest appended.
        std::fs::write(&part, &data[..4097]).unwrap();
        assert_eq!(
            gather(&part, true, &data[4097..]),
            (whole, data.len() as u64)
        );
        assert_eq!(std::fs::read(&part).unwrap(), data);
        // Not resumed: the part file starts over.
        assert_eq!(gather(&part, false, b"abc").1, 3);
        assert_eq!(std::fs::read(&part).unwrap(), b"abc");
    }
}
