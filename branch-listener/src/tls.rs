//! HTTPS for the listener: a rustls server configuration read from PEM files
//! (`tls_cert_file`, `tls_key_file`), and [`TlsListener`], an axum listener that
//! completes TLS handshakes in tasks of their own so that a slow or silent client never
//! holds up the accept loop.

use crate::error::{Error, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// A client must finish its TLS handshake within this time.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once (a flood of half-open connections is bounded).
pub const MAX_HANDSHAKES: usize = 128;

/// Reads the certificate chain and private key (PEM) into a server configuration
/// (TLS 1.2 and 1.3, ring). The error names the config key and the file.
pub fn server_config(cert_file: &Path, key_file: &Path) -> Result<Arc<rustls::ServerConfig>> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
        .and_then(|it| it.collect::<std::result::Result<Vec<_>, _>>())
        .map_err(|e| {
            Error::config(
                "tls_cert_file",
                format!("{}: not a PEM certificate file: {e}", cert_file.display()),
            )
        })?;
    if certs.is_empty() {
        return Err(Error::config(
            "tls_cert_file",
            format!("{}: holds no certificate", cert_file.display()),
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| {
        Error::config(
            "tls_key_file",
            format!("{}: no PEM private key found: {e}", key_file.display()),
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::config("tls_cert_file", format!("TLS set-up: {e}")))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            Error::config(
                "tls_key_file",
                format!("the key does not fit the certificate or is unusable: {e}"),
            )
        })?;
    Ok(Arc::new(config))
}

/// Accepts TCP connections and hands axum only those that completed a TLS handshake.
pub struct TlsListener {
    accepted: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    /// Starts the accept loop; it stops at `shutdown` (or when this listener is dropped).
    pub fn new(
        tcp: TcpListener,
        config: Arc<rustls::ServerConfig>,
        shutdown: CancellationToken,
    ) -> std::io::Result<TlsListener> {
        let local = tcp.local_addr()?;
        let (tx, accepted) = mpsc::channel(64);
        tokio::spawn(accept_loop(tcp, TlsAcceptor::from(config), tx, shutdown));
        Ok(TlsListener { accepted, local })
    }
}

async fn accept_loop(
    tcp: TcpListener,
    acceptor: TlsAcceptor,
    tx: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
    shutdown: CancellationToken,
) {
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tx.closed() => return,
            p = handshakes.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tx.closed() => return,
            r = tcp.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        crate::serve::no_delay(&stream);
        let acceptor = acceptor.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => {
                    let _ = tx.send((tls, peer)).await;
                }
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                }
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        });
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.accepted.recv().await {
            Some(x) => x,
            // The accept loop ended (shutdown): nothing more comes; axum's graceful
            // shutdown ends the server.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

impl crate::config::Config {
    /// The HTTPS configuration, when `tls_cert_file` and `tls_key_file` are set (both or
    /// neither).
    pub fn tls(&self) -> Result<Option<Arc<rustls::ServerConfig>>> {
        match (&self.tls_cert_file, &self.tls_key_file) {
            (None, None) => Ok(None),
            (Some(cert), Some(key)) => server_config(cert, key).map(Some),
            (Some(_), None) => Err(Error::config(
                "tls_key_file",
                "must be set together with tls_cert_file",
            )),
            (None, Some(_)) => Err(Error::config(
                "tls_cert_file",
                "must be set together with tls_key_file",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn make_ca(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/make-test-ca.sh");
        let st = std::process::Command::new("bash")
            .arg(script)
            .arg(dir)
            .arg("127.0.0.1")
            .output()
            .unwrap();
        assert!(
            st.status.success(),
            "{}",
            String::from_utf8_lossy(&st.stderr)
        );
        (dir.join("127.0.0.1.pem"), dir.join("127.0.0.1.key"))
    }

    #[tokio::test]
    async fn tls_connections_are_accepted_without_nagle() {
        let d = tempfile::tempdir().unwrap();
        let (cert, key) = make_ca(d.path());
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let mut listener =
            TlsListener::new(tcp, server_config(&cert, &key).unwrap(), shutdown.clone()).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(d.path().join("ca.pem")).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let client = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let connect = async {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
            tokio_rustls::TlsConnector::from(Arc::new(client))
                .connect(name, tcp)
                .await
                .unwrap()
        };
        // The handshake needs both ends at once.
        let (client, (accepted, peer)) =
            tokio::join!(connect, axum::serve::Listener::accept(&mut listener));
        assert_eq!(peer, client.get_ref().0.local_addr().unwrap());
        assert!(accepted.get_ref().0.nodelay().unwrap());
        shutdown.cancel();
    }

    #[test]
    fn pem_files_load_and_errors_name_the_key() {
        let d = tempfile::tempdir().unwrap();
        let (cert, key) = make_ca(d.path());
        assert!(server_config(&cert, &key).is_ok());
        let junk = d.path().join("junk.pem");
        std::fs::write(&junk, "not pem\n").unwrap();
        let e = server_config(&junk, &key).unwrap_err().to_string();
        assert!(
            e.contains("`tls_cert_file`") && e.contains("no certificate"),
            "{e}"
        );
        let e = server_config(&cert, &junk).unwrap_err().to_string();
        assert!(e.contains("`tls_key_file`"), "{e}");
        // The CA's key does not fit the server certificate.
        let e = server_config(&cert, &d.path().join("ca.key"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not fit"), "{e}");
        let e = server_config(&d.path().join("missing.pem"), &key)
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.pem"), "{e}");
    }
}

#[cfg(test)]
mod config_tests {
    use crate::Config;
    use figment::providers::{Format, Toml};
    use figment::Figment;

    #[test]
    fn cert_and_key_go_together() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let token = d.path().join("token");
        std::fs::write(&token, "test-token-0123456789\n").unwrap();
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
        let base = format!(
            "location = \"b01\"\ndatabase_url = \"sqlite:///tmp/x.db\"\ntoken_file = {:?}\n",
            token.display().to_string()
        );
        for (extra, key) in [
            ("tls_cert_file = \"/x.pem\"\n", "`tls_key_file`"),
            ("tls_key_file = \"/x.key\"\n", "`tls_cert_file`"),
            (
                "tls_cert_file = \"/nope.pem\"\ntls_key_file = \"/nope.key\"\n",
                "`tls_cert_file`",
            ),
            (
                "rate_limit_per_second = 5\nrate_limit_burst = 0\n",
                "`rate_limit_burst`",
            ),
            ("max_concurrent_requests = 0\n", "`max_concurrent_requests`"),
        ] {
            let e = Config::from_figment(Figment::from(Toml::string(&format!("{base}{extra}"))))
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{extra}: {e}");
        }
        assert!(Config::from_figment(Figment::from(Toml::string(&base)))
            .unwrap()
            .tls()
            .unwrap()
            .is_none());
    }
}
