//! How HQ talks to one listener: which CAs it trusts (`ca_file`, global or per
//! location), whether `http://` is allowed (`allow_plain_http`, global or per location:
//! without it an `http://` URL is a configuration error naming the location), and the
//! cap on a response's size (`max_response_bytes`).

use crate::config::{Config, LocationConfig, Settings};
use std::path::{Path, PathBuf};

/// Default of `max_response_bytes`: 256 MiB.
pub fn default_max_response_bytes() -> u64 {
    256 * 1024 * 1024
}

/// The resolved transport settings of a location.
#[derive(Debug, Clone)]
pub struct Transport {
    /// The CA file in force (location's, else global), for messages.
    pub ca_file: Option<PathBuf>,
    /// Its certificates: when non-empty, the only roots trusted.
    pub ca_certs: Vec<reqwest::Certificate>,
    pub allow_plain_http: bool,
    pub max_response_bytes: u64,
}

impl Default for Transport {
    fn default() -> Self {
        Transport {
            ca_file: None,
            ca_certs: Vec::new(),
            allow_plain_http: false,
            max_response_bytes: default_max_response_bytes(),
        }
    }
}

/// Reads a PEM bundle of CA certificates; the error names the file.
pub fn load_ca_file(path: &Path) -> Result<Vec<reqwest::Certificate>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem)
        .map_err(|e| format!("{}: not a PEM certificate bundle: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{}: holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        ));
    }
    Ok(certs)
}

impl Transport {
    /// Resolves a location's settings against the global ones. `url` is the parsed URL
    /// (None when it did not parse: that problem is reported elsewhere).
    pub fn resolve(
        global: &Config,
        loc: &LocationConfig,
        url: Option<&url::Url>,
    ) -> Result<Transport, String> {
        let allow_plain_http = loc.allow_plain_http.unwrap_or(global.allow_plain_http);
        if let Some(u) = url {
            if u.scheme() == "http" && !allow_plain_http {
                return Err(format!(
                    "url {:?} is plain http: use https:// (with ca_file for a private CA), or set allow_plain_http = true for this location to accept an unencrypted link",
                    loc.url
                ));
            }
        }
        let ca_file = loc.ca_file.clone().or_else(|| global.ca_file.clone());
        let ca_certs = match &ca_file {
            Some(p) => load_ca_file(p).map_err(|e| format!("ca_file: {e}"))?,
            None => Vec::new(),
        };
        Ok(Transport {
            ca_file,
            ca_certs,
            allow_plain_http,
            max_response_bytes: global.max_response_bytes,
        })
    }

    /// Applies the trust settings to a client under construction.
    pub fn configure(&self, mut b: reqwest::ClientBuilder) -> reqwest::ClientBuilder {
        if !self.ca_certs.is_empty() {
            b = b.tls_built_in_root_certs(false);
            for c in &self.ca_certs {
                b = b.add_root_certificate(c.clone());
            }
        }
        b.https_only(!self.allow_plain_http)
    }
}

/// Logs a warning for every enabled location pulled over plain HTTP.
pub fn warn_plain_http(settings: &Settings) {
    for l in settings
        .locations
        .iter()
        .filter(|l| l.enabled && l.url.scheme() == "http")
    {
        tracing::warn!(
            location = %l.id,
            url = %l.url,
            "plain HTTP allowed for this location (allow_plain_http): its token and data travel unencrypted"
        );
    }
}
