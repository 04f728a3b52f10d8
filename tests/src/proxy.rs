//! A TCP fault proxy between HQ and a listener, for fault tests and the soak: HQ is
//! configured with the proxy's URL; the proxy forwards to the listener and injects the
//! fault of its current [`Mode`] into the listener → HQ direction (the responses).
//!
//! The mode applies to open (keep-alive) connections too: it is re-read at every chunk
//! of response bytes. Every fault that actually fired is counted by kind
//! ([`FaultProxy::faults`]).

use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Notify;

/// What the proxy does to new connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forward everything.
    Pass,
    /// Stop listening: connections are refused by the kernel.
    Refuse,
    /// Forward this many response bytes, then reset the connection (RST).
    ResetAfter(u64),
    /// Forward this many response bytes, then hold the rest (the connection stays open
    /// and silent: the client's timeout must fire).
    StallAfter(u64),
    /// Forward this many response bytes, then close cleanly (FIN): a truncated body.
    TruncateAfter(u64),
    /// Forward at this many bytes per second.
    Throttle(u64),
    /// Alternate between `Pass` and `Refuse` every `period`.
    Flap(Duration),
}

impl Mode {
    /// The fault's name in counters and reports.
    pub fn kind(&self) -> &'static str {
        match self {
            Mode::Pass => "pass",
            Mode::Refuse => "refuse",
            Mode::ResetAfter(_) => "reset",
            Mode::StallAfter(_) => "stall",
            Mode::TruncateAfter(_) => "truncate",
            Mode::Throttle(_) => "throttle",
            Mode::Flap(_) => "flap",
        }
    }
}

struct Shared {
    mode: Mutex<(Mode, Instant)>,
    changed: Notify,
    faults: Mutex<BTreeMap<&'static str, u64>>,
    connections: Mutex<u64>,
}

impl Shared {
    /// The mode in force now (a flap resolved to its current phase).
    fn effective(&self) -> Mode {
        let (mode, since) = *self.mode.lock().unwrap();
        match mode {
            Mode::Flap(period) => {
                let n = since.elapsed().as_nanos() / period.as_nanos().max(1);
                if n % 2 == 0 {
                    Mode::Pass
                } else {
                    Mode::Refuse
                }
            }
            m => m,
        }
    }

    fn count(&self, kind: &'static str) {
        *self.faults.lock().unwrap().entry(kind).or_default() += 1;
    }
}

/// A running proxy; stopped when dropped.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let s = TcpSocket::new_v4()?;
    s.set_reuseaddr(true)?;
    s.bind(addr)?;
    s.listen(256)
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Result<FaultProxy> {
        let listener = bind("127.0.0.1:0".parse()?).context("binding the fault proxy")?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            mode: Mutex::new((Mode::Pass, Instant::now())),
            changed: Notify::new(),
            faults: Mutex::new(BTreeMap::new()),
            connections: Mutex::new(0),
        });
        let task = tokio::spawn(accept_loop(listener, addr, upstream, shared.clone()));
        Ok(FaultProxy { addr, shared, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>` (or `https://` when the listener serves TLS: the
    /// proxy forwards bytes, the certificate is the listener's).
    pub fn url(&self, https: bool) -> String {
        let scheme = if https { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Switches the mode for new connections.
    pub fn set(&self, mode: Mode) {
        *self.shared.mode.lock().unwrap() = (mode, Instant::now());
        self.shared.changed.notify_waiters();
    }

    pub fn mode(&self) -> Mode {
        self.shared.mode.lock().unwrap().0
    }

    /// Faults that fired, by kind (`refuse` counts refusing periods).
    pub fn faults(&self) -> BTreeMap<&'static str, u64> {
        self.shared.faults.lock().unwrap().clone()
    }

    pub fn fault_count(&self, kind: &str) -> u64 {
        self.faults().get(kind).copied().unwrap_or(0)
    }

    /// Connections forwarded so far.
    pub fn connections(&self) -> u64 {
        *self.shared.connections.lock().unwrap()
    }
}

async fn accept_loop(
    mut listener: tokio::net::TcpListener,
    addr: SocketAddr,
    upstream: SocketAddr,
    shared: Arc<Shared>,
) {
    loop {
        if shared.effective() == Mode::Refuse {
            drop(listener);
            shared.count("refuse");
            while shared.effective() == Mode::Refuse {
                let _ = tokio::time::timeout(Duration::from_millis(20), shared.changed.notified())
                    .await;
            }
            listener = loop {
                match bind(addr) {
                    Ok(l) => break l,
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            };
            continue;
        }
        tokio::select! {
            r = listener.accept() => {
                if let Ok((client, _)) = r {
                    *shared.connections.lock().unwrap() += 1;
                    tokio::spawn(connection(client, upstream, shared.clone()));
                }
            }
            // Re-check the mode now and then (a flap changes phase without a call).
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
}

enum End {
    /// A side closed: close the client cleanly.
    Closed,
    /// Reset the client connection.
    Reset,
}

async fn connection(mut client: TcpStream, upstream: SocketAddr, shared: Arc<Shared>) {
    let Ok(mut up) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let end = {
        let (mut cr, mut cw) = client.split();
        let (mut ur, mut uw) = up.split();
        let request = async {
            let _ = tokio::io::copy(&mut cr, &mut uw).await;
        };
        tokio::select! {
            _ = request => End::Closed,
            e = responses(&mut ur, &mut cw, &shared) => e,
        }
    };
    match end {
        End::Reset => {
            // SO_LINGER 0 makes the close an RST; with a zero timeout it never blocks.
            #[allow(deprecated)]
            let _ = client.set_linger(Some(Duration::ZERO));
            drop(client);
        }
        End::Closed => {
            let _ = client.shutdown().await;
        }
    }
}

/// Copies the listener's bytes to the client, injecting the fault of the mode in force
/// (re-read at every chunk, so that long-lived keep-alive connections get it too; a
/// byte budget counts from the moment its mode took effect on this connection).
async fn responses<R, W>(up: &mut R, client: &mut W, shared: &Shared) -> End
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut current = Mode::Pass;
    let mut sent: u64 = 0;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match up.read(&mut buf).await {
            Ok(0) | Err(_) => return End::Closed,
            Ok(n) => n,
        };
        let mode = shared.effective();
        if mode != current {
            current = mode;
            sent = 0;
        }
        let mut chunk = &buf[..n];
        let budget = match mode {
            Mode::ResetAfter(b) | Mode::StallAfter(b) | Mode::TruncateAfter(b) => Some(b),
            // The link went down under an open connection: cut it.
            Mode::Refuse => Some(0),
            _ => None,
        };
        if let Some(limit) = budget {
            let room = limit.saturating_sub(sent) as usize;
            if chunk.len() > room {
                chunk = &chunk[..room];
                if client.write_all(chunk).await.is_err() {
                    return End::Closed;
                }
                let _ = client.flush().await;
                shared.count(mode.kind());
                return match mode {
                    Mode::ResetAfter(_) | Mode::Refuse => End::Reset,
                    Mode::TruncateAfter(_) => End::Closed,
                    // Hold: the connection stays open and silent until the client
                    // gives up (its timeout) and closes it.
                    _ => std::future::pending().await,
                };
            }
        }
        if let Mode::Throttle(bytes_per_sec) = mode {
            if sent == 0 {
                shared.count("throttle");
            }
            let per_tick = (bytes_per_sec / 20).max(1) as usize;
            for piece in chunk.chunks(per_tick) {
                if client.write_all(piece).await.is_err() {
                    return End::Closed;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        } else if client.write_all(chunk).await.is_err() {
            return End::Closed;
        }
        sent += chunk.len() as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// An upstream that answers every connection with `body` and closes.
    async fn upstream(body: &'static [u8]) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let _ = s.write_all(body).await;
                    let _ = s.shutdown().await;
                });
            }
        });
        addr
    }

    /// Reads a whole answer; a refused connection is retried for a while (the proxy
    /// listens again shortly after leaving `Refuse`).
    async fn fetch(addr: SocketAddr) -> std::io::Result<Vec<u8>> {
        let mut tries = 0;
        let mut s = loop {
            match TcpStream::connect(addr).await {
                Ok(s) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused && tries < 100 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => return Err(e),
            }
        };
        let mut out = Vec::new();
        s.read_to_end(&mut out).await?;
        Ok(out)
    }

    #[tokio::test]
    async fn each_mode_does_what_it_says() {
        let body: &'static [u8] = &[7u8; 10_000];
        let p = FaultProxy::start(upstream(body).await).await.unwrap();
        assert_eq!(fetch(p.addr()).await.unwrap().len(), 10_000);

        p.set(Mode::TruncateAfter(100));
        assert_eq!(fetch(p.addr()).await.unwrap().len(), 100);
        assert_eq!(p.fault_count("truncate"), 1);

        p.set(Mode::ResetAfter(100));
        let e = fetch(p.addr()).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
        assert_eq!(p.fault_count("reset"), 1);

        p.set(Mode::StallAfter(100));
        let r = tokio::time::timeout(Duration::from_millis(300), fetch(p.addr())).await;
        assert!(r.is_err(), "a stalled connection answered");

        p.set(Mode::Refuse);
        let mut refused = false;
        for _ in 0..100 {
            if let Err(e) = TcpStream::connect(p.addr()).await {
                // Refused; or reset, when the SYN was queued before the listener closed.
                assert!(
                    matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::ConnectionReset
                    ),
                    "{e}"
                );
                refused = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(refused, "the proxy kept accepting");

        p.set(Mode::Throttle(20_000));
        let t = Instant::now();
        assert_eq!(fetch(p.addr()).await.unwrap().len(), 10_000);
        assert!(t.elapsed() >= Duration::from_millis(400), "not throttled");

        p.set(Mode::Pass);
        assert_eq!(fetch(p.addr()).await.unwrap().len(), 10_000);
        assert!(p.fault_count("refuse") >= 1 && p.fault_count("throttle") == 1);
    }
}
