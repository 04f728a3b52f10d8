//! The read-only HQ dashboard, served on `admin_listen` (off by default; loopback only
//! unless `admin_allow_remote = true`):
//!
//! - `GET /` — every location with state, lag, backlog, last success, last error,
//!   recent runs and a lag sparkline, plus a chart of the largest lag over time
//!   (`?hours=N`, 1–48, default 6). Self-contained HTML, inline SVG, no JavaScript.
//! - `GET /api/status` — the same data as JSON.
//!
//! Modules: [`data`] (queries), [`samples`] (`sync.lag_samples`), [`html`], [`chart`].

pub mod chart;
pub mod data;
pub mod html;
pub mod samples;

use crate::App;
use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Default and largest chart window.
pub const DEFAULT_HOURS: u32 = 6;
pub const MAX_HOURS: u32 = samples::RETENTION_HOURS as u32;

/// The page needs nothing but its own inline styles.
pub const CSP: &str =
    "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'";

/// Validation of `admin_listen`: a non-loopback address needs `admin_allow_remote`.
pub fn check_listen(addr: Option<SocketAddr>, allow_remote: bool) -> Option<String> {
    match addr {
        Some(a) if !a.ip().is_loopback() && !allow_remote => Some(format!(
            "admin_listen: {a} is not a loopback address; the dashboard has no authentication \
             (set admin_allow_remote = true to serve it there anyway, e.g. behind a proxy)"
        )),
        _ => None,
    }
}

/// The dashboard's routes.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/api/status", get(api_status))
        .with_state(app)
}

/// Binds `addr` and serves until `shutdown`.
pub async fn serve(
    app: Arc<App>,
    addr: SocketAddr,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving the dashboard");
    axum::serve(listener, router(app))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

fn unavailable(e: crate::Error) -> Response {
    tracing::warn!(error = %e, "dashboard: reading the HQ database failed");
    (
        StatusCode::SERVICE_UNAVAILABLE,
        "the HQ database is unavailable; see the hq-puller log\n",
    )
        .into_response()
}

fn hours(q: &HashMap<String, String>) -> u32 {
    q.get("hours")
        .and_then(|h| h.parse::<u32>().ok())
        .unwrap_or(DEFAULT_HOURS)
        .clamp(1, MAX_HOURS)
}

async fn index(State(app): State<Arc<App>>, Query(q): Query<HashMap<String, String>>) -> Response {
    match data::load(&app.pool, &app.settings, hours(&q)).await {
        Ok(snap) => (
            [
                (header::CONTENT_TYPE, "text/html; charset=utf-8"),
                (header::CACHE_CONTROL, "no-store"),
                // Defence in depth beside the escaping: no script, nothing from elsewhere.
                (header::CONTENT_SECURITY_POLICY, CSP),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            ],
            html::page(&snap),
        )
            .into_response(),
        Err(e) => unavailable(e),
    }
}

async fn api_status(State(app): State<Arc<App>>) -> Response {
    match data::load(&app.pool, &app.settings, 1).await {
        Ok(snap) => axum::Json(snap).into_response(),
        Err(e) => unavailable(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_needs_opt_in() {
        let lo: SocketAddr = "127.0.0.1:9000".parse().unwrap();
        let lo6: SocketAddr = "[::1]:9000".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:9000".parse().unwrap();
        assert!(check_listen(None, false).is_none());
        assert!(check_listen(Some(lo), false).is_none());
        assert!(check_listen(Some(lo6), false).is_none());
        let e = check_listen(Some(any), false).unwrap();
        assert!(
            e.contains("admin_listen") && e.contains("admin_allow_remote"),
            "{e}"
        );
        assert!(check_listen(Some(any), true).is_none());
    }

    #[test]
    fn window_is_bounded() {
        let q = |v: &str| HashMap::from([("hours".to_string(), v.to_string())]);
        assert_eq!(hours(&HashMap::new()), DEFAULT_HOURS);
        assert_eq!(hours(&q("0")), 1);
        assert_eq!(hours(&q("9999")), MAX_HOURS);
        assert_eq!(hours(&q("abc")), DEFAULT_HOURS);
        assert_eq!(hours(&q("12")), 12);
    }
}
