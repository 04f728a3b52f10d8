//! The `serve` command: background tasks (ticker, pruner, wake-up source) and the HTTP
//! server, all stopped by one shutdown token (SIGTERM/SIGINT in `main`, or a test's).

use crate::config::Config;
use crate::db::Db;
use crate::error::{Error, Result};
use crate::http::{app, AppState};
use crate::limits::ClientAddr;
use crate::tls::TlsListener;
use crate::wake::Wake;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Builds the state of a server (the pool is lazy: nothing is connected yet).
pub fn state(config: Config, shutdown: CancellationToken) -> Result<AppState> {
    let db = Db::connect_lazy(&config, false)?;
    let tokens = config.tokens()?;
    Ok(AppState {
        config: Arc::new(config),
        db,
        tokens,
        wake: Wake::new(),
        metrics: crate::metrics::handle(),
        shutdown,
    })
}

/// Turns Nagle's algorithm off on an accepted connection. A response's last bytes are
/// often a small segment written after larger ones (the end of a streamed page, of a
/// file): with Nagle on, the kernel holds it until the peer acknowledges the data before
/// it, and the peer delays that acknowledgement by up to 40 ms. That stall cost every
/// snapshot page about 40 ms (80 instead of 40 ms per page of 50,000 rows).
pub(crate) fn no_delay(stream: &tokio::net::TcpStream) {
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(error = %e, "setting TCP_NODELAY failed");
    }
}

/// The plain-HTTP listener: axum's own for a `TcpListener`, with [`no_delay`] on each
/// accepted connection.
pub struct PlainListener(pub TcpListener);

impl axum::serve::Listener for PlainListener {
    type Io = tokio::net::TcpStream;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (stream, addr) = axum::serve::Listener::accept(&mut self.0).await;
        no_delay(&stream);
        (stream, addr)
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.0.local_addr()
    }
}

/// Serves on `listener` until `shutdown` is cancelled: then stops accepting, ends
/// long-polls (they answer with what they have), waits for in-flight requests and the
/// background tasks, and returns.
pub async fn run(config: Config, listener: TcpListener, shutdown: CancellationToken) -> Result<()> {
    let state = state(config, shutdown.clone())?;
    let cfg = state.config.clone();
    let db = state.db.clone();
    match db.meta().await {
        Ok(m) => {
            tracing::info!(location = %cfg.location, instance_id = %m.instance_id, backend = db.backend().name(), "serving pull area")
        }
        Err(e) => {
            tracing::warn!(location = %cfg.location, error = %e, "branch database not ready; serving 503 until it is")
        }
    }
    let mut tasks = vec![
        tokio::spawn(state.wake.clone().run(db.clone(), shutdown.clone())),
        tokio::spawn(crate::ticker::run(
            db.clone(),
            cfg.tick_interval,
            shutdown.clone(),
        )),
        tokio::spawn(crate::prune::run(
            db.clone(),
            cfg.retention,
            cfg.prune_interval,
            shutdown.clone(),
        )),
    ];
    if cfg.files_dir.is_some() {
        tasks.push(tokio::spawn(crate::files::watch::run(
            cfg.clone(),
            db.clone(),
            shutdown.clone(),
        )));
    }
    let addr = listener
        .local_addr()
        .map_err(|e| Error::Io(e.to_string()))?;
    // TLS keys are read before READY=1: a bad key fails the start, not the first request.
    let tls = cfg.tls()?;
    tracing::info!(%addr, "listening");
    schemas::systemd::notify_ready();
    schemas::systemd::spawn_watchdog();
    let token = shutdown.clone();
    let service = app(state).into_make_service_with_connect_info::<ClientAddr>();
    let served = match tls {
        Some(tls) => {
            tracing::info!(%addr, "serving HTTPS");
            let listener = TlsListener::new(listener, tls, shutdown.clone())
                .map_err(|e| Error::Io(e.to_string()))?;
            axum::serve(listener, service)
                .with_graceful_shutdown(async move {
                    token.cancelled().await;
                    schemas::systemd::notify_stopping();
                })
                .await
        }
        None => {
            tracing::warn!(location = %cfg.location, %addr, "serving plain HTTP: tls_cert_file and tls_key_file are not set; the token and the data travel unencrypted");
            axum::serve(PlainListener(listener), service)
                .with_graceful_shutdown(async move {
                    token.cancelled().await;
                    schemas::systemd::notify_stopping();
                })
                .await
        }
    };
    served.map_err(|e| Error::Io(format!("http server: {e}")))?;
    shutdown.cancel();
    for t in tasks {
        let _ = t.await;
    }
    db.close().await;
    tracing::info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Connections accepted by the plain-HTTP listener have Nagle's algorithm off.
    #[tokio::test]
    async fn plain_connections_are_accepted_without_nagle() {
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let mut listener = PlainListener(tcp);
        assert_eq!(axum::serve::Listener::local_addr(&listener).unwrap(), addr);
        let client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (accepted, peer) = axum::serve::Listener::accept(&mut listener).await;
        assert_eq!(peer, client.local_addr().unwrap());
        assert!(accepted.nodelay().unwrap());
    }
}
