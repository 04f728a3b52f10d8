//! Benchmark: file replication (branch-listener → hq-puller) against `rsync -a` of the
//! same folder over loopback (an rsync daemon on 127.0.0.1), in the same run.
//!
//! (a) `--files` images of `--min-kb`..`--max-kb` KB (random bytes, seeded);
//! (b) one file of `--big-mib` MiB.
//! Ours: a SQLite branch whose `files_dir` holds the folder; the listener indexes it at
//! start (reported apart: "index"), then `hq-puller pull` is timed from start to exit:
//! download, size + sha256 verification, fsync, content-addressed store, atomic placement
//! and the batch's transaction. rsync: `rsync -a rsync://127.0.0.1:PORT/src/ DST/`
//! timed to exit (rsync does no end-to-end checksum of its own choosing beyond its
//! transfer checksums, and no fsync). Peak RSS (VmHWM) of each process during (b).
//!
//! Fairness: before each side is timed the data set is flushed (`sync`), the page cache
//! dropped and refilled with the source folder only (see [`same_start`]), so neither
//! pays for writing back the generated folder (or the other side's output) and both
//! start from the same memory; `--cold-source` leaves the source on disk. Ours
//! fsyncs every file before its batch commits (invariant 6); rsync's copy is only in
//! the page cache when it exits, so a second figure, "rsync + sync", adds the time of
//! a `sync -f` of the destination's filesystem after it: rsync's copy made durable.
//! The repetitions' folders are deleted when their case ends, not between repetitions
//! (see [`INODE_REUSE_WINDOW`]). The branch's indexing (hashing) is not in our time:
//! the listener indexes the folder while it is generated (files are old enough to be
//! settled); "index s" is the wait after generation. rsync computes its own checksums while it transfers.
//!
//! Needs PostgreSQL (`TEST_PG_URL`, or `tests/pg.sh ensure` is run) and `rsync`.
//! Reproduce: cargo build --release -p branch-listener -p hq-puller -p tests --bins &&
//!   target/release/bench-files [--files 10000 --big-mib 2048 --reps 1] [--cold-source] [--quick]

use anyhow::{bail, Context, Result};
use clap::Parser;
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};
use tests::bench::median_min_max as median;
use tests::process::{free_port, write_private};

#[derive(Parser, Clone)]
struct Args {
    /// Number of images in (a).
    #[arg(long, default_value_t = 10_000)]
    files: usize,
    /// Size of the single file of (b), MiB.
    #[arg(long, default_value_t = 2048)]
    big_mib: u64,
    #[arg(long, default_value_t = 1)]
    reps: usize,
    #[arg(long, default_value_t = 50)]
    min_kb: usize,
    #[arg(long, default_value_t = 500)]
    max_kb: usize,
    /// A short run: 200 images and a 32 MiB file (unless given explicitly).
    #[arg(long)]
    quick: bool,
    /// Folder for the data (default: a temporary folder).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Time both sides reading the data set from disk (page cache dropped and not
    /// refilled) instead of from the page cache.
    #[arg(long)]
    cold_source: bool,
}

const TOKEN: &str = "bench-token-0123456789abcdef";

/// Peak resident set (VmHWM) of a process, KiB.
fn vm_hwm(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Children of `pid` (the rsync daemon forks one per connection).
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) {
                // pid (comm) state ppid ...
                if let Some(rest) = stat.rsplit_once(')').map(|x| x.1) {
                    if rest.split_whitespace().nth(1).and_then(|x| x.parse().ok()) == Some(pid) {
                        out.push(p);
                    }
                }
            }
        }
    }
    out
}

/// What [`timed`] observed of a command.
struct Timed {
    secs: f64,
    /// Peak RSS of the command (KiB).
    peak_kib: u64,
    /// Peak RSS of the children of `watch` (KiB).
    watched_kib: u64,
    /// CPU seconds (user + system) the command used.
    cpu_s: f64,
}

/// Runs `cmd` to its end; returns seconds, its peak RSS, its CPU time and the peak RSS
/// of the children of `watch` observed meanwhile.
fn timed(mut cmd: Command, watch: Option<u32>) -> Result<Timed> {
    let t0 = Instant::now();
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawning")?;
    let pid = child.id();
    let (mut peak, mut other, mut ticks) = (0u64, 0u64, 0u64);
    loop {
        peak = peak.max(vm_hwm(pid).unwrap_or(0));
        // Readable until the child is reaped (a zombie keeps its counts).
        ticks = tests::bench::cpu_ticks(pid).unwrap_or(ticks);
        if let Some(w) = watch {
            for c in children(w) {
                other = other.max(vm_hwm(c).unwrap_or(0));
            }
        }
        if let Some(st) = child.try_wait()? {
            let secs = t0.elapsed().as_secs_f64();
            if !st.success() {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut err);
                }
                bail!("{cmd:?} failed ({st}): {err}");
            }
            return Ok(Timed {
                secs,
                peak_kib: peak,
                watched_kib: other,
                cpu_s: ticks as f64 / tests::bench::clock_ticks_per_second(),
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Writes the data set; returns (files, bytes).
fn generate(src: &Path, images: usize, big_mib: u64, args: &Args) -> Result<(usize, u64)> {
    std::fs::create_dir_all(src)?;
    let old = SystemTime::now() - Duration::from_secs(3600);
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut bytes = 0u64;
    if big_mib > 0 {
        use std::io::Write;
        let p = src.join("big.bin");
        let mut f = std::io::BufWriter::new(std::fs::File::create(&p)?);
        let mut buf = vec![0u8; 1 << 20];
        for _ in 0..big_mib {
            rng.fill(&mut buf[..]);
            f.write_all(&buf)?;
        }
        f.into_inner()?.set_modified(old)?;
        return Ok((1, big_mib << 20));
    }
    for i in 0..images {
        let len = rng.gen_range(args.min_kb * 1024..=args.max_kb * 1024);
        let mut buf = vec![0u8; len];
        rng.fill(&mut buf[..]);
        let p = src.join(format!("images/{:03}/{i}.jpg", i % 100));
        std::fs::create_dir_all(p.parent().unwrap())?;
        std::fs::write(&p, &buf)?;
        std::fs::File::options()
            .write(true)
            .open(&p)?
            .set_modified(old)?;
        bytes += len as u64;
    }
    Ok((images, bytes))
}

/// A child process killed when dropped, so a failing step (a `?` or `bail!`) leaves
/// no listener or rsync daemon behind.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Run {
    index_s: f64,
    ours_s: f64,
    rsync_s: f64,
    /// rsync, then `sync -f` of its destination (rsync's copy durable).
    rsync_durable_s: f64,
    ours_rss: (u64, u64),
    rsync_rss: (u64, u64),
    /// CPU seconds of hq-puller and of the listener during our transfer.
    ours_cpu: (f64, f64),
}

/// Whether `rsync` is installed (the peer; without it only our figures are printed).
fn have_rsync() -> bool {
    Command::new("rsync")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Flushes the filesystem holding `path` (`sync -f`); returns the seconds it took.
fn sync_fs(path: &Path) -> Result<f64> {
    let t0 = Instant::now();
    let st = Command::new("sync").arg("-f").arg(path).status()?;
    if !st.success() {
        bail!("sync -f {} failed", path.display());
    }
    Ok(t0.elapsed().as_secs_f64())
}

/// Puts the machine in the same state before each side's timed run: the filesystem
/// flushed, the page cache dropped (when we may: root) and refilled with the data set
/// only ([`read_through`]; not with `--cold-source`), no bulk deletion in the inode
/// reuse window. Without the drop, whichever side ran when memory happened to be warm
/// won: on this VM (free memory goes back to the host) rsync's own times moved
/// 2.5–11 s between repetitions, ours 6–10 s. Reading the source from the page cache
/// stands for the branch's own disk: sender and receiver are different machines, and
/// here a cold read would share one disk with the receiver's fsyncs.
fn same_start(work: &Path, deleted: Option<Instant>, args: &Args) -> Result<()> {
    sync_fs(work)?;
    if std::fs::write("/proc/sys/vm/drop_caches", "3\n").is_ok() {
        if !args.quick && !args.cold_source {
            read_through(&work.join("src"))?;
        }
    } else if !args.quick {
        static SAID: std::sync::Once = std::sync::Once::new();
        SAID.call_once(|| println!("(page cache not dropped between runs: not root)"));
    }
    settle_deletions(deleted, args);
    Ok(())
}

/// Reads every file under `dir` (into the page cache).
fn read_through(dir: &Path) -> Result<()> {
    use std::io::Read;
    let mut buf = vec![0u8; 1 << 20];
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let p = e.path();
        if e.file_type()?.is_dir() {
            read_through(&p)?;
        } else {
            let mut f = std::fs::File::open(&p)?;
            while f.read(&mut buf)? > 0 {}
        }
    }
    Ok(())
}

fn wait_port(port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("nothing listens on port {port}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn count_files(dir: &Path) -> (usize, u64) {
    let mut n = (0, 0);
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                let (a, b) = count_files(&e.path());
                n.0 += a;
                n.1 += b;
            } else if ft.is_file() {
                n.0 += 1;
                n.1 += e.metadata().map(|m| m.len()).unwrap_or(0);
            }
        }
    }
    n
}

/// Without a journal, ext4 prefers not to reuse an inode freed less than 60 s ago
/// (`recently_deleted`, 360 s while its inode table block is dirty): every inode
/// allocation then scans past all such inodes of its group. Creating 10,000 files right
/// after deleting the previous repetition's 30,000 cost hq-puller 22% of its CPU in
/// `openat` (perf) and made the figures depend on what was deleted before. So the
/// repetitions delete nothing until their case ends, and when the disk forces a deletion
/// the next timed run waits for this window.
const INODE_REUSE_WINDOW: Duration = Duration::from_secs(61);

/// Free bytes on the filesystem holding `path` (`df`).
fn free_bytes(path: &Path) -> Option<u64> {
    let out = Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(path)
        .output()
        .ok()?;
    String::from_utf8(out.stdout)
        .ok()?
        .lines()
        .nth(1)?
        .trim()
        .parse()
        .ok()
}

/// Waits until [`INODE_REUSE_WINDOW`] has passed since our last bulk deletion, if any
/// (not in `--quick`, which asserts no timing).
fn settle_deletions(deleted: Option<Instant>, args: &Args) {
    let Some(deleted) = deleted.filter(|_| !args.quick) else {
        return;
    };
    if let Some(left) = INODE_REUSE_WINDOW.checked_sub(deleted.elapsed()) {
        std::thread::sleep(left);
    }
}

/// One repetition in the new folder `work` (left in place for the caller to delete);
/// `deleted`: when this run last deleted files in bulk.
async fn one(
    work: &Path,
    images: usize,
    big_mib: u64,
    args: &Args,
    deleted: Option<Instant>,
) -> Result<(usize, u64, Run)> {
    let bins = tests::process::bin_dir();
    std::fs::create_dir_all(work)?;
    let src = work.join("src");
    std::fs::create_dir_all(&src)?;

    // --- ours ---
    let tok = work.join("token");
    write_private(&tok, &format!("{TOKEN}\n"))?;
    let port = free_port()?;
    let bcfg = work.join("branch.toml");
    std::fs::write(
        &bcfg,
        format!(
            "location = \"b01\"\ndatabase_url = \"sqlite://{}\"\nlisten = \"127.0.0.1:{port}\"\n\
             token_file = \"{}\"\nfiles_dir = \"{}\"\n",
            work.join("branch.db").display(),
            tok.display(),
            src.display()
        ),
    )?;
    let st = Command::new(bins.join("branch-listener"))
        .args(["install", "--with-demo-schema", "--config"])
        .arg(&bcfg)
        .stdout(Stdio::null())
        .status()?;
    if !st.success() {
        bail!("branch-listener install failed");
    }
    let listener = KillOnDrop(
        Command::new(bins.join("branch-listener"))
            .args(["serve", "--config"])
            .arg(&bcfg)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    wait_port(port)?;
    let hq_url = tests::pg::fresh_database("benchfiles").await?;
    let hq_dir = work.join("hq");
    let hcfg = work.join("hq.toml");
    std::fs::write(
        &hcfg,
        format!(
            "database_url = \"{hq_url}\"\nfiles_dir = \"{}\"\nrun_budget = \"1h\"\n\
             request_timeout = \"60s\"\nallow_plain_http = true\n[[locations]]\nid = \"b01\"\nurl = \"http://127.0.0.1:{port}\"\ntoken_file = \"{}\"\n",
            hq_dir.display(),
            tok.display()
        ),
    )?;
    let st = Command::new(bins.join("hq-puller"))
        .args(["migrate", "--config"])
        .arg(&hcfg)
        .stdout(Stdio::null())
        .status()?;
    if !st.success() {
        bail!("hq-puller migrate failed");
    }
    // HQ's first pull (the initial load of the empty branch) sets the cursor; the files
    // then arrive as events of the stream, the steady state this measures.
    let st = Command::new(bins.join("hq-puller"))
        .args(["pull", "b01", "--config"])
        .arg(&hcfg)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .status()?;
    if !st.success() {
        bail!("the first hq-puller pull failed");
    }
    let (n, bytes) = generate(&src, images, big_mib, args)?;
    let t_index = Instant::now();
    let db = format!("sqlite://{}", work.join("branch.db").display());
    let pool = sqlx::SqlitePool::connect(&db).await?;
    loop {
        let c: i64 = sqlx::query_scalar("SELECT count(*) FROM _pull_files")
            .fetch_one(&pool)
            .await
            .unwrap_or(0);
        if c as usize == n {
            break;
        }
        if t_index.elapsed() > Duration::from_secs(3600) {
            bail!("the listener did not index the folder");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let index_s = t_index.elapsed().as_secs_f64();
    pool.close().await;
    // Neither side pays for writing back the generated folder.
    same_start(work, deleted, args)?;
    let mut cmd = Command::new(bins.join("hq-puller"));
    cmd.args(["pull", "b01", "--config"])
        .arg(&hcfg)
        .env("RUST_LOG", "warn");
    let listener_ticks = tests::bench::cpu_ticks(listener.0.id()).unwrap_or(0);
    let ours = timed(cmd, None)?;
    let (ours_s, hq_rss) = (ours.secs, ours.peak_kib);
    let listener_cpu = tests::bench::cpu_ticks(listener.0.id())
        .unwrap_or(0)
        .saturating_sub(listener_ticks) as f64
        / tests::bench::clock_ticks_per_second();
    let listener_rss = vm_hwm(listener.0.id()).unwrap_or(0);
    drop(listener);
    let got = count_files(&hq_dir.join("b01"));
    if got != (n, bytes) {
        bail!("HQ holds {got:?} (files, bytes), expected {:?}", (n, bytes));
    }
    // HQ's copy stays until the end of the repetition: no deletion before rsync's run.

    // --- rsync daemon on loopback ---
    if !have_rsync() {
        return Ok((
            n,
            bytes,
            Run {
                index_s,
                ours_s,
                rsync_s: f64::NAN,
                rsync_durable_s: f64::NAN,
                ours_rss: (listener_rss, hq_rss),
                rsync_rss: (0, 0),
                ours_cpu: (ours.cpu_s, listener_cpu),
            },
        ));
    }
    let rport = free_port()?;
    let conf = work.join("rsyncd.conf");
    std::fs::write(
        &conf,
        format!(
            "use chroot = no\nuid = root\ngid = root\n[src]\npath = {}\nread only = yes\n",
            src.display()
        ),
    )?;
    let daemon = KillOnDrop(
        Command::new("rsync")
            .args(["--daemon", "--no-detach", "--address=127.0.0.1"])
            .arg(format!("--port={rport}"))
            .arg(format!("--config={}", conf.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting rsync --daemon (apt-get install rsync)")?,
    );
    wait_port(rport)?;
    let dst = work.join("rsync-dst");
    // Nothing of our run is left for rsync's clock to flush.
    same_start(work, deleted, args)?;
    let mut cmd = Command::new("rsync");
    cmd.arg("-a")
        .arg(format!("rsync://127.0.0.1:{rport}/src/"))
        .arg(format!("{}/", dst.display()));
    let theirs = timed(cmd, Some(daemon.0.id()))?;
    let (rsync_s, rsync_client_rss, rsync_daemon_rss) =
        (theirs.secs, theirs.peak_kib, theirs.watched_kib);
    let rsync_durable_s = rsync_s + sync_fs(&dst)?;
    drop(daemon);
    if count_files(&dst) != (n, bytes) {
        bail!("rsync copied {:?}", count_files(&dst));
    }
    Ok((
        n,
        bytes,
        Run {
            index_s,
            ours_s,
            rsync_s,
            rsync_durable_s,
            ours_rss: (listener_rss, hq_rss),
            rsync_rss: (rsync_daemon_rss, rsync_client_rss),
            ours_cpu: (ours.cpu_s, listener_cpu),
        },
    ))
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = Args::parse();
    if args.quick {
        let explicit = |flag: &str| std::env::args().any(|a| a == flag);
        if !explicit("--files") {
            args.files = 200;
        }
        if !explicit("--big-mib") {
            args.big_mib = 32;
        }
    }
    let tmp = tempfile::tempdir()?;
    let base = args.dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    println!(
        "bench-files: (a) {} images of {}–{} KB, (b) one {} MiB file; {} repetition(s); loopback",
        args.files, args.min_kb, args.max_kb, args.big_mib, args.reps
    );
    println!("| case | ours MB/s (min–max) | ours files/s | rsync MB/s | rsync files/s | ours / rsync | rsync + sync MB/s | ours / (rsync + sync) | ours CPU s: hq-puller + listener | branch index s |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    if !have_rsync() {
        println!("(rsync is not installed: only our figures; apt-get install rsync for the peer)");
    }
    let mut rss = None;
    let mut summaries = Vec::new();
    for (case, images, big, target) in [
        ("(a) images", args.files, 0, 1.0),
        ("(b) one big file", 0, args.big_mib, 0.8),
    ] {
        if images == 0 && big == 0 {
            continue;
        }
        let (mut ours, mut theirs, mut index) = (Vec::new(), Vec::new(), Vec::new());
        let mut durable = Vec::new();
        let (mut n, mut bytes) = (0, 0);
        let mut cpu = (Vec::new(), Vec::new());
        // Each repetition in a folder of its own, all deleted when the case ends (so no
        // timed run follows a bulk deletion, see INODE_REUSE_WINDOW), unless the disk
        // cannot hold them: then each is deleted after its repetition.
        let mut deleted = None;
        let mut kept = Vec::new();
        for rep in 0..args.reps {
            let work = base.join(format!("work-{rep}"));
            let (nn, bb, r) = one(&work, images, big, &args, deleted).await?;
            eprintln!(
                "{case} repetition {}: ours {:.2} s (CPU s: hq-puller {:.1}, listener {:.1}), rsync {:.2} s",
                rep + 1,
                r.ours_s,
                r.ours_cpu.0,
                r.ours_cpu.1,
                r.rsync_s
            );
            kept.push(work);
            if free_bytes(&base).is_some_and(|free| free < 4 * bb + (1 << 30)) {
                println!(
                    "(disk nearly full: repetition {} deleted before the next)",
                    rep + 1
                );
                for w in kept.drain(..) {
                    let _ = std::fs::remove_dir_all(w);
                }
                deleted = Some(Instant::now());
            }
            (n, bytes) = (nn, bb);
            cpu.0.push(r.ours_cpu.0);
            cpu.1.push(r.ours_cpu.1);
            ours.push(r.ours_s);
            theirs.push(r.rsync_s);
            durable.push(r.rsync_durable_s);
            index.push(r.index_s);
            if big > 0 {
                rss = Some((r.ours_rss, r.rsync_rss));
            }
        }
        for w in kept {
            let _ = std::fs::remove_dir_all(w);
        }
        let (o, o_lo, o_hi) = median(ours);
        let (t, _, _) = median(theirs);
        let (td, _, _) = median(durable);
        let (ix, _, _) = median(index);
        let (cpu_hq, cpu_branch) = (median(cpu.0).0, median(cpu.1).0);
        let mb = bytes as f64 / 1e6;
        println!(
            "| {case} | {:.0} ({:.0}–{:.0}) | {:.0} | {:.0} | {:.0} | {:.2}× | {:.0} | {:.2}× | {cpu_hq:.1} + {cpu_branch:.1} | {ix:.1} |",
            mb / o,
            mb / o_hi,
            mb / o_lo,
            n as f64 / o,
            mb / t,
            n as f64 / t,
            t / o,
            mb / td,
            td / o
        );
        let what = if big > 0 {
            format!("files (b): one {} MiB file, MB/s vs rsync -a", args.big_mib)
        } else {
            format!("files (a): {n} images, MB/s vs rsync -a")
        };
        summaries.push(tests::bench::Summary {
            figure: what,
            ours: format!("{:.0} MB/s, {:.0} files/s", mb / o, n as f64 / o),
            peer: if t.is_nan() {
                "rsync not installed".into()
            } else {
                format!("{:.0} MB/s, {:.0} files/s", mb / t, n as f64 / t)
            },
            ratio: if t.is_nan() {
                "n/a".into()
            } else {
                format!("{:.2}×", t / o)
            },
            target: format!("≥ {target:.1}× rsync"),
            met: if t.is_nan() || args.quick {
                "n/a".into()
            } else {
                tests::bench::met(t / o >= target)
            },
        });
    }
    if let Some(((l, h), (d, c))) = rss {
        println!();
        println!("Peak RSS during (b): branch-listener {} MiB, hq-puller {} MiB; rsync daemon (sender) {} MiB, rsync client {} MiB",
            l / 1024, h / 1024, d / 1024, c / 1024);
    }
    println!(
        "reproduce: cargo build --release -p branch-listener -p hq-puller -p tests --bins && target/release/bench-files --files {} --big-mib {} --reps {} --min-kb {} --max-kb {}{}",
        args.files, args.big_mib, args.reps, args.min_kb, args.max_kb,
        if args.cold_source { " --cold-source" } else { "" }
    );
    for s in summaries {
        s.print();
    }
    Ok(())
}
