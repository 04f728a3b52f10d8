//! Real processes for end-to-end tests: find the built binaries, spawn them with their
//! output in log files, wait for readiness by events (never fixed sleeps), send SIGTERM
//! or SIGKILL, restart, and show the log tail when something fails.

use anyhow::{bail, Context, Result};
use std::fs::OpenOptions;
use std::future::Future;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The folder holding the workspace's built binaries: the profile folder of the running
/// test executable (`target/debug/deps/e2e-…` → `target/debug`), else
/// `$CARGO_TARGET_DIR/debug`, else `target/debug`.
pub fn bin_dir() -> PathBuf {
    if let Ok(exe) = std::env::current_exe() {
        let mut dir = exe.parent().map(Path::to_path_buf);
        if dir.as_ref().is_some_and(|d| d.ends_with("deps")) {
            dir = dir.and_then(|d| d.parent().map(Path::to_path_buf));
        }
        if let Some(d) = dir {
            if d.join("branch-listener").exists() || d.join("hq-puller").exists() {
                return d;
            }
        }
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::pg::workspace_root().join("target"));
    target.join("debug")
}

/// Path of a built binary of the workspace, with a clear error when it is missing.
pub fn binary(name: &str) -> Result<PathBuf> {
    let p = bin_dir().join(name);
    if !p.exists() {
        bail!(
            "binary {} not found: build it first with `cargo build --workspace --bins` \
             (tests/run.sh does)",
            p.display()
        );
    }
    Ok(p)
}

/// A free TCP port on 127.0.0.1 (bound, read, released).
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Writes a file readable only by its owner (mode 0600), e.g. a token file.
pub fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p)?;
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}

/// A random bearer token (32 hex characters).
pub fn random_token() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// Polls `check` until it returns `Some`, or fails after `timeout` naming `what`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    let mut last_err = None;
    loop {
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if Instant::now() >= deadline {
            match last_err {
                Some(e) => {
                    bail!("timed out after {timeout:?} waiting for {what}; last error: {e:#}")
                }
                None => bail!("timed out after {timeout:?} waiting for {what}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether something accepts TCP connections at `addr`.
pub fn port_open(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// A spawned process of the test, its command line kept for restarts, its output in a
/// log file (appended across restarts). Killed with SIGKILL when dropped.
pub struct Proc {
    pub name: String,
    program: PathBuf,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    /// Starts `program args` with `envs`, stdout and stderr appended to `log`.
    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[&str],
        envs: &[(&str, &str)],
        log: &Path,
    ) -> Result<Proc> {
        let mut p = Proc {
            name: name.to_string(),
            program: program.to_path_buf(),
            args: args.iter().map(|s| s.to_string()).collect(),
            envs: envs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            log: log.to_path_buf(),
            child: None,
        };
        p.start()?;
        Ok(p)
    }

    /// (Re)starts the process with its original command line.
    pub fn start(&mut self) -> Result<()> {
        if self.is_running() {
            bail!("{} is already running", self.name);
        }
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening log {}", self.log.display()))?;
        let err = out.try_clone()?;
        let child = Command::new(&self.program)
            .args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("spawning {} ({})", self.name, self.program.display()))?;
        self.child = Some(child);
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is alive (reaps it if it exited).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The exit status if the process has exited.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    fn signal(&self, sig: &str) -> Result<()> {
        if let Some(pid) = self.pid() {
            let st = Command::new("kill")
                .arg(format!("-{sig}"))
                .arg(pid.to_string())
                .stderr(Stdio::null())
                .status()
                .context("running kill")?;
            let _ = st; // the process may have exited already
        }
        Ok(())
    }

    /// SIGKILL, then reap.
    pub fn kill9(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        Ok(())
    }

    /// SIGSTOP: the process hangs (keeps its sockets, answers nothing).
    pub fn pause(&self) -> Result<()> {
        self.signal("STOP")
    }

    /// SIGCONT after [`Proc::pause`].
    pub fn resume(&self) -> Result<()> {
        self.signal("CONT")
    }

    /// SIGTERM and wait up to `grace` for a clean exit; SIGKILL after that. Returns the
    /// exit status of a clean exit, `None` if it had to be killed.
    pub async fn terminate(&mut self, grace: Duration) -> Result<Option<ExitStatus>> {
        if self.child.is_none() {
            return Ok(None);
        }
        self.signal("TERM")?;
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(st) = self.exit_status() {
                self.child = None;
                return Ok(Some(st));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.kill9()?;
        Ok(None)
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log, lines)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.kill9();
    }
}

/// The last `lines` lines of a file (empty if it cannot be read).
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let v: Vec<&str> = text.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

/// Runs a command to completion (e.g. `install`, `migrate`), with a time limit; fails
/// with its output when it exits non-zero.
pub async fn run_to_end(
    program: &Path,
    args: &[&str],
    envs: &[(&str, &str)],
    timeout: Duration,
) -> Result<String> {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(timeout, cmd.output())
        .await
        .with_context(|| {
            format!(
                "{} {} did not finish within {timeout:?}",
                program.display(),
                args.join(" ")
            )
        })?
        .with_context(|| format!("running {}", program.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        bail!(
            "{} {} failed ({}):\n{}\n{}",
            program.display(),
            args.join(" "),
            out.status,
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn spawn_wait_terminate_restart() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("sleep.log");
        let mut p = Proc::spawn(
            "sleeper",
            Path::new("/bin/sh"),
            &["-c", "echo started; exec sleep 30"],
            &[],
            &log,
        )
        .unwrap();
        wait_for("the start line", Duration::from_secs(10), || async {
            Ok(log_tail(&log, 5).contains("started").then_some(()))
        })
        .await
        .unwrap();
        assert!(p.is_running());
        // sleep dies on SIGTERM: a clean (signalled) exit within the grace period.
        p.terminate(Duration::from_secs(5)).await.unwrap();
        assert!(!p.is_running());
        p.start().unwrap();
        assert!(p.is_running());
        wait_for("the second start line", Duration::from_secs(10), || async {
            Ok((log_tail(&log, 10).matches("started").count() == 2).then_some(()))
        })
        .await
        .unwrap();
        p.kill9().unwrap();
        assert!(!p.is_running());
    }

    #[test]
    fn private_files_and_ports() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t/token");
        write_private(&p, "x").unwrap();
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_ne!(free_port().unwrap(), 0);
    }

    #[tokio::test]
    async fn wait_for_times_out_with_the_reason() {
        let e = wait_for::<(), _, _>("nothing", Duration::from_millis(250), || async { Ok(None) })
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("nothing"), "{e}");
    }
}
