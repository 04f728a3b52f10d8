//! The HTTP API: `GET /v1/changes`, `GET /v1/status`, `GET /healthz`, `GET /metrics`.
//!
//! [`app`] builds the router from an [`AppState`], so handlers are tested without a
//! socket. Every endpoint but `/healthz` needs the bearer token; errors are JSON
//! [`schemas::wire::ErrorBody`] and never carry database text.

use crate::config::Config;
use crate::db::Db;
use crate::error::{Error, Result};
use crate::pull_area::{self, Tick};
use crate::wake::Wake;
use axum::extract::rejection::QueryRejection;
use axum::extract::{MatchedPath, Query, Request, State};
use axum::http::header;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use schemas::secret::Tokens;
use schemas::wire::{self, ChangesResponse, StatusResponse};
use schemas::Cursor;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower_http::compression::{CompressionLayer, CompressionLevel};
use tower_http::limit::RequestBodyLimitLayer;

/// Largest request body accepted (requests carry no body).
const BODY_LIMIT: usize = 16 * 1024;
/// Re-check for changes at least this often while a long-poll waits (a safety net
/// beside the wake-up signal).
const RECHECK: Duration = Duration::from_secs(1);

/// How long a request waits for SQLite's write lock (to tick or to record the
/// acknowledgement) before going on without: it then serves the windows already ticked.
const REQUEST_TICK_PATIENCE: Duration = Duration::from_millis(250);

/// Everything a handler needs.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub db: Db,
    pub tokens: Tokens,
    pub wake: Wake,
    pub metrics: PrometheusHandle,
    /// Cancelled at shutdown: long-polls return at once.
    pub shutdown: CancellationToken,
}

pub fn app(state: AppState) -> Router {
    let timeout = state.config.max_wait + Duration::from_secs(30);
    let protected = Router::new()
        .route("/v1/changes", get(changes))
        .route("/v1/status", get(status))
        .route("/v1/files/{sha256}", get(crate::files::serve::get_file))
        .route("/metrics", get(metrics_text))
        .route("/v1/snapshot/start", get(crate::snapshot::start))
        .route("/v1/snapshot", get(crate::snapshot::page))
        .route("/v1/checksums", get(crate::snapshot::checksums))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    let router = Router::new()
        .route("/healthz", get(healthz))
        .merge(protected)
        .layer(middleware::from_fn_with_state(timeout, time_limit))
        .layer(middleware::from_fn(count_requests))
        // Fastest levels: on replication traffic they keep most of the size gain (zstd:
        // 8% of the JSON at level 3) for a fraction of the listener's CPU.
        .layer(
            CompressionLayer::new()
                .gzip(true)
                .zstd(true)
                .quality(CompressionLevel::Fastest),
        )
        .layer(RequestBodyLimitLayer::new(BODY_LIMIT));
    let tokens = state.tokens.clone();
    crate::limits::wrap(router, &state.config, tokens).with_state(state)
}

async fn auth(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let presented = crate::limits::bearer(&req);
    if presented.is_empty() || !state.tokens.accepts(presented) {
        return Error::Unauthorized.into_response();
    }
    next.run(req).await
}

/// Answers `503 unavailable` (JSON, like every error) when a request takes too long,
/// e.g. a database that accepts connections but never answers.
async fn time_limit(State(limit): State<Duration>, req: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => Error::Unavailable(format!("request took longer than {limit:?}")).into_response(),
    }
}

async fn count_requests(req: Request, next: Next) -> Response {
    let endpoint = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "other".into());
    let resp = next.run(req).await;
    metrics::counter!(
        crate::metrics::REQUESTS_TOTAL,
        "endpoint" => endpoint,
        "status" => resp.status().as_u16().to_string()
    )
    .increment(1);
    resp
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

/// Parsed query of `/v1/changes`.
#[derive(Debug, PartialEq)]
pub struct ChangesParams {
    pub after: Option<Cursor>,
    pub limit: u32,
    pub limit_clamped: bool,
    pub wait: Duration,
}

/// Parses and bounds the query parameters; the error names the parameter.
pub fn parse_params(q: &HashMap<String, String>, config: &Config) -> Result<ChangesParams> {
    let after = match q.get("after").map(String::as_str) {
        None | Some("") => None,
        Some(s) => Some(
            s.parse::<Cursor>()
                .map_err(|e| Error::BadRequest(format!("after: {e}")))?,
        ),
    };
    let max = config.max_limit.min(wire::MAX_LIMIT);
    let (limit, limit_clamped) = match q.get("limit") {
        None => (wire::DEFAULT_LIMIT.min(max), false),
        Some(s) => {
            let n: u64 = s.parse().map_err(|_| {
                Error::BadRequest(format!(
                    "limit: {:?} is not a positive integer",
                    truncate(s)
                ))
            })?;
            if n == 0 {
                return Err(Error::BadRequest("limit: must be at least 1".into()));
            }
            if n > u64::from(max) {
                (max, true)
            } else {
                (n as u32, false)
            }
        }
    };
    let wait = match q.get("wait") {
        None => Duration::ZERO,
        Some(s) => {
            let secs: f64 = s
                .parse()
                .ok()
                .filter(|v: &f64| v.is_finite() && *v >= 0.0)
                .ok_or_else(|| {
                    Error::BadRequest(format!(
                        "wait: {:?} is not a number of seconds >= 0",
                        truncate(s)
                    ))
                })?;
            Duration::from_secs_f64(secs.min(config.max_wait.as_secs_f64()))
        }
    };
    Ok(ChangesParams {
        after,
        limit,
        limit_clamped,
        wait,
    })
}

fn truncate(s: &str) -> String {
    s.chars().take(40).collect()
}

fn cursor(instance_id: uuid::Uuid, t: &Tick) -> Cursor {
    Cursor {
        instance_id,
        tick: t.id,
        tick_uuid: t.uuid,
    }
}

/// Runs a handler's database work in a task of its own. A client that disconnects (HQ
/// killed mid-request) or the request time limit drops the handler's future; had that
/// future held the database work, it could be cut between a `BEGIN` and its
/// `COMMIT`/`ROLLBACK`, and sqlx's deferred rollback can fail ("statements in
/// progress"), leaving the pooled connection inside a transaction: on SQLite holding the
/// write lock (the branch application could no longer write) or an old read snapshot.
/// A detached task always runs to its end; a long-poll in it ends at its deadline or at
/// shutdown.
pub(crate) async fn detached<T: Send + 'static>(
    work: impl std::future::Future<Output = Result<T>> + Send + 'static,
) -> Result<T> {
    tokio::spawn(work)
        .await
        .map_err(|e| Error::Database(format!("request task failed: {e}")))?
}

async fn changes(
    State(state): State<AppState>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Json<ChangesResponse>> {
    let Query(q) = query.map_err(|e| Error::BadRequest(format!("query string: {e}")))?;
    let p = parse_params(&q, &state.config)?;
    detached(serve_changes(state, p)).await.map(Json)
}

#[tracing::instrument(skip_all, fields(location = %state.config.location))]
async fn serve_changes(state: AppState, p: ChangesParams) -> Result<ChangesResponse> {
    let db = &state.db;
    let meta = db.meta().await?;
    let start = match &p.after {
        Some(c) => {
            if c.instance_id != meta.instance_id {
                return Err(Error::InstanceMismatch {
                    ours: meta.instance_id,
                    theirs: c.instance_id,
                });
            }
            match db.tick_by_id(c.tick).await? {
                Some(t) if t.uuid == c.tick_uuid => t,
                Some(t) => {
                    return Err(Error::LineageMismatch(format!(
                        "tick {} exists with uuid {}, the cursor has {}: the branch database was restored or replaced",
                        t.id, t.uuid, c.tick_uuid
                    )))
                }
                None => {
                    let newest = db.newest_tick().await?;
                    if c.tick > newest.id {
                        return Err(Error::LineageMismatch(format!(
                            "cursor ahead of head (tick {} > newest tick {}): the branch database was restored or replaced",
                            c.tick, newest.id
                        )));
                    }
                    return Err(Error::Pruned(format!(
                        "tick {} was pruned from the branch's history: resync needed",
                        c.tick
                    )));
                }
            }
        }
        None => db.tick_by_id(meta.install_tick).await?.ok_or_else(|| {
            Error::Pruned("the start of the pull area was pruned: resync needed".into())
        })?,
    };
    if let Some(c) = &p.after {
        if c.tick > meta.acked_tick {
            // Busy (SQLite: a long application write transaction): the next request
            // acknowledges again, acknowledgements are monotonic.
            tolerate_busy(db.ack(c.tick, REQUEST_TICK_PATIENCE).await, "acknowledge")?;
        }
    }
    let deadline = Instant::now() + p.wait;
    let mut logged_wait = false;
    let (end, changes) = loop {
        let waiter = (!p.wait.is_zero()).then(|| state.wake.subscribe());
        // Busy: serve the windows already ticked (the ticker catches up).
        tolerate_busy(
            db.tick_if_new(REQUEST_TICK_PATIENCE).await.map(|_| ()),
            "tick",
        )?;
        let (end, changes) = db.read_batch(&start, p.limit).await?;
        let now = Instant::now();
        let Some(mut waiter) = waiter else {
            break (end, changes);
        };
        if end.id != start.id || now >= deadline || state.shutdown.is_cancelled() {
            break (end, changes);
        }
        if !logged_wait {
            tracing::debug!(
                after = start.id,
                wait_s = p.wait.as_secs_f64(),
                "long-poll waiting for changes"
            );
            logged_wait = true;
        }
        tokio::select! {
            _ = waiter.rx.changed() => {}
            _ = tokio::time::sleep_until(deadline.min(now + RECHECK)) => {}
            _ = state.shutdown.cancelled() => {}
        }
    };
    let newest = db.newest_tick().await?;
    let n = changes.len();
    metrics::counter!(crate::metrics::SERVED_CHANGES_TOTAL).increment(n as u64);
    tracing::debug!(from = start.id, to = end.id, changes = n, "served batch");
    Ok(ChangesResponse {
        protocol: wire::PROTOCOL_VERSION,
        location: state.config.location.clone(),
        instance_id: meta.instance_id,
        time_zone: state.config.time_zone.clone(),
        after: p.after,
        next: cursor(meta.instance_id, &end),
        more: newest.id > end.id,
        limit: p.limit,
        limit_clamped: p.limit_clamped,
        backlog: pull_area::backlog(&end, &newest),
        changes,
    })
}

/// Ignores a retryable failure of an optional write (a later read fails anyway if the
/// database is really unreachable).
pub(crate) fn tolerate_busy(r: Result<()>, what: &str) -> Result<()> {
    match r {
        Err(e @ Error::Unavailable(_)) => {
            tracing::debug!(error = %e, what, "skipped: branch database busy");
            Ok(())
        }
        other => other,
    }
}

async fn status(State(state): State<AppState>) -> Result<Json<StatusResponse>> {
    let db = state.db.clone();
    let (meta, f) = detached(async move {
        let meta = db.meta().await?;
        let f = db.figures(&meta).await?;
        Ok((meta, f))
    })
    .await?;
    Ok(Json(StatusResponse {
        protocol: wire::PROTOCOL_VERSION,
        location: state.config.location.clone(),
        instance_id: meta.instance_id,
        backend: state.db.backend().name().into(),
        version: env!("CARGO_PKG_VERSION").into(),
        head: cursor(meta.instance_id, &f.newest),
        head_seq: f.head_seq,
        pull_area_depth: f.depth,
        unacked_changes: f.unacked,
        oldest_unacked_age_seconds: f.oldest_unacked_age_seconds,
        acked_tick: (meta.acked_tick > 0).then_some(meta.acked_tick),
        oldest_open_writer: f.oldest_open_writer,
    }))
}

async fn metrics_text(State(state): State<AppState>) -> Response {
    use crate::metrics as m;
    let db = state.db.clone();
    let figures = detached(async move {
        let meta = db.meta().await?;
        db.figures(&meta).await
    });
    match figures.await {
        Ok(f) => {
            metrics::gauge!(m::PULL_AREA_DEPTH).set(f.depth as f64);
            metrics::gauge!(m::UNACKED_CHANGES).set(f.unacked as f64);
            metrics::gauge!(m::OLDEST_UNACKED_AGE_SECONDS)
                .set(f.oldest_unacked_age_seconds.unwrap_or(0.0));
            metrics::gauge!(m::HEAD_SEQ).set(f.head_seq as f64);
            metrics::gauge!(m::OLDEST_OPEN_WRITER_AGE_SECONDS)
                .set(f.oldest_open_writer.map(|w| w.age_seconds).unwrap_or(0.0));
            metrics::gauge!(m::DATABASE_UP).set(1.0);
        }
        Err(e) => {
            metrics::gauge!(m::DATABASE_UP).set(0.0);
            tracing::debug!(error = %e, "metrics: pull-area figures unavailable")
        }
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config {
            location: "b01".into(),
            database_url: "sqlite://x.db".into(),
            listen: "127.0.0.1:0".into(),
            token_file: "/nonexistent".into(),
            time_zone: "UTC".into(),
            catalogue_file: None,
            files_dir: None,
            retention: Duration::from_secs(1),
            prune_interval: Duration::from_secs(1),
            tick_interval: Duration::from_secs(1),
            max_limit: 1000,
            max_wait: Duration::from_secs(30),
            log_format: "text".into(),
            files_rescan_interval: Duration::from_secs(300),
            files_settle: Duration::from_secs(2),
            files_ignore: crate::config::default_files_ignore(),
            tls_cert_file: None,
            tls_key_file: None,
            rate_limit_per_second: 0,
            rate_limit_burst: 1,
            max_concurrent_requests: 64,
        }
    }

    fn q(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// Handlers through `app(state)`, without a socket: a SQLite branch whose file does
    /// not exist answers 503 (not 500), `/healthz` needs no token, the rest does.
    #[tokio::test]
    async fn app_without_a_socket() {
        use tower::ServiceExt;
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "app-test-token-0123456789\n").unwrap();
        std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let mut c = config();
        c.database_url = format!("sqlite://{}/missing/pm.db", dir.path().display());
        c.token_file = token;
        let app = app(crate::serve::state(c, CancellationToken::new()).unwrap());
        let get = |uri: &str, token: Option<&str>| {
            let mut b = axum::http::Request::builder().uri(uri);
            if let Some(t) = token {
                b = b.header("authorization", format!("Bearer {t}"));
            }
            b.body(axum::body::Body::empty()).unwrap()
        };
        let r = app.clone().oneshot(get("/healthz", None)).await.unwrap();
        assert_eq!(r.status(), 200);
        let r = app.clone().oneshot(get("/v1/status", None)).await.unwrap();
        assert_eq!(r.status(), 401);
        let r = app
            .clone()
            .oneshot(get("/v1/changes", Some("app-test-token-0123456789")))
            .await
            .unwrap();
        assert_eq!(r.status(), 503);
        let body = axum::body::to_bytes(r.into_body(), usize::MAX)
            .await
            .unwrap();
        let e: wire::ErrorBody = serde_json::from_slice(&body).unwrap();
        assert_eq!(e.error.code, "unavailable");
        assert!(
            !e.error.message.contains("missing"),
            "no paths or database text: {}",
            e.error.message
        );
    }

    #[test]
    fn limits_are_clamped_and_defaulted() {
        let c = config();
        let p = parse_params(&q(&[]), &c).unwrap();
        assert_eq!((p.limit, p.limit_clamped, p.after), (1000, false, None));
        let p = parse_params(&q(&[("limit", "999999")]), &c).unwrap();
        assert_eq!((p.limit, p.limit_clamped), (1000, true));
        let p = parse_params(&q(&[("limit", "10"), ("wait", "90")]), &c).unwrap();
        assert_eq!((p.limit, p.wait), (10, Duration::from_secs(30)));
    }

    #[test]
    fn bad_parameters_are_named() {
        let c = config();
        for (k, v) in [
            ("limit", "-1"),
            ("limit", "0"),
            ("wait", "soon"),
            ("after", "x:y"),
        ] {
            let e = parse_params(&q(&[(k, v)]), &c).unwrap_err();
            assert!(matches!(e, Error::BadRequest(_)));
            assert!(e.to_string().starts_with(k), "{e}");
        }
        let e = parse_params(&q(&[("after", "x:y")]), &c)
            .unwrap_err()
            .to_string();
        assert!(e.contains("wrong number of parts"), "{e}");
    }
}
