//! Request limits of the listener, outermost first: a token bucket per client IP address
//! (`rate_limit_per_second`, `rate_limit_burst`: 429 `rate_limited` with `Retry-After`)
//! for requests without a valid token (HQ's own requests are bounded by the concurrency
//! cap only: a branch with 10,000 new images must not be served at 100 files/s),
//! a cap on the request head (431 above [`MAX_HEADER_BYTES`]), and a cap on requests
//! served at once (`max_concurrent_requests`: further requests wait up to
//! [`QUEUE_WAIT`], then 503). The request time limit, the body limit and GET-only
//! routing live in `http.rs`.

use crate::config::Config;
use crate::error::{Error, Result};
use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use schemas::secret::Tokens;
use schemas::wire::{error_code, ErrorBody, ErrorDetail};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// Largest request head (request line + headers) accepted, in bytes.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// How long a request waits for a free slot when `max_concurrent_requests` are running.
pub const QUEUE_WAIT: Duration = Duration::from_secs(10);
/// Counter of requests refused by a limit, label `reason` (`rate`, `header_size`,
/// `concurrency`).
pub const REJECTED_TOTAL: &str = "branch_listener_rejected_requests_total";
/// Buckets kept before full (idle) ones are forgotten.
const MAX_TRACKED_CLIENTS: usize = 4096;

pub fn default_rate_limit() -> u32 {
    100
}
pub fn default_rate_burst() -> u32 {
    200
}
pub fn default_max_concurrent() -> u32 {
    64
}

impl Config {
    /// Checks the limit keys; the error names the key.
    pub fn check_limits(&self) -> Result<()> {
        if self.rate_limit_per_second > 0 && self.rate_limit_burst == 0 {
            return Err(Error::config(
                "rate_limit_burst",
                "must be at least 1 when rate_limit_per_second is set",
            ));
        }
        if self.max_concurrent_requests == 0 {
            return Err(Error::config(
                "max_concurrent_requests",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

/// The client address of a connection, plain or TLS (see `serve`).
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub SocketAddr);

impl Connected<axum::serve::IncomingStream<'_, tokio::net::TcpListener>> for ClientAddr {
    fn connect_info(s: axum::serve::IncomingStream<'_, tokio::net::TcpListener>) -> Self {
        ClientAddr(*s.remote_addr())
    }
}

impl Connected<axum::serve::IncomingStream<'_, crate::serve::PlainListener>> for ClientAddr {
    fn connect_info(s: axum::serve::IncomingStream<'_, crate::serve::PlainListener>) -> Self {
        ClientAddr(*s.remote_addr())
    }
}

impl Connected<axum::serve::IncomingStream<'_, crate::tls::TlsListener>> for ClientAddr {
    fn connect_info(s: axum::serve::IncomingStream<'_, crate::tls::TlsListener>) -> Self {
        ClientAddr(*s.remote_addr())
    }
}

/// A token bucket per client IP address.
#[derive(Debug)]
pub struct RateLimiter {
    per_second: f64,
    burst: f64,
    buckets: Mutex<HashMap<IpAddr, (f64, Instant)>>,
}

impl RateLimiter {
    pub fn new(per_second: u32, burst: u32) -> RateLimiter {
        RateLimiter {
            per_second: f64::from(per_second),
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a token for `ip` at `now`; `Err(wait)` when the bucket is empty.
    pub fn check(&self, ip: IpAddr, now: Instant) -> std::result::Result<(), Duration> {
        if self.per_second <= 0.0 {
            return Ok(());
        }
        let mut map = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if map.len() >= MAX_TRACKED_CLIENTS && !map.contains_key(&ip) {
            let (rate, burst) = (self.per_second, self.burst);
            map.retain(|_, (tokens, at)| {
                *tokens + now.saturating_duration_since(*at).as_secs_f64() * rate < burst
            });
        }
        let (tokens, at) = map.entry(ip).or_insert((self.burst, now));
        let refill = now.saturating_duration_since(*at).as_secs_f64() * self.per_second;
        *tokens = (*tokens + refill).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) / self.per_second))
        }
    }
}

#[derive(Clone)]
struct Limits {
    rate: Arc<RateLimiter>,
    slots: Arc<Semaphore>,
    tokens: Tokens,
}

/// The bearer token a request presents ("" when none).
pub fn bearer(req: &Request) -> &str {
    req.headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("")
}

/// Wraps the router in the limits of `config`; requests presenting one of `tokens` skip
/// the rate limit.
pub fn wrap<S: Clone + Send + Sync + 'static>(
    router: Router<S>,
    config: &Config,
    tokens: Tokens,
) -> Router<S> {
    let limits = Limits {
        rate: Arc::new(RateLimiter::new(
            config.rate_limit_per_second,
            config.rate_limit_burst,
        )),
        slots: Arc::new(Semaphore::new(config.max_concurrent_requests as usize)),
        tokens,
    };
    router
        .layer(middleware::from_fn_with_state(limits.clone(), concurrency))
        .layer(middleware::from_fn(header_size))
        .layer(middleware::from_fn_with_state(limits, rate))
}

fn refused(status: StatusCode, code: &str, message: String, reason: &'static str) -> Response {
    metrics::counter!(REJECTED_TOTAL, "reason" => reason).increment(1);
    let body = ErrorBody {
        error: ErrorDetail {
            code: code.into(),
            message,
        },
    };
    (status, axum::Json(body)).into_response()
}

async fn rate(State(limits): State<Limits>, req: Request, next: Next) -> Response {
    let presented = bearer(&req);
    if !presented.is_empty() && limits.tokens.accepts(presented) {
        return next.run(req).await;
    }
    // Without connection info (a router driven in-process), all requests share a bucket.
    let ip = req
        .extensions()
        .get::<ConnectInfo<ClientAddr>>()
        .map(|c| c.0 .0.ip())
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    match limits.rate.check(ip, Instant::now()) {
        Ok(()) => next.run(req).await,
        Err(wait) => {
            let secs = wait.as_secs().max(1);
            let mut resp = refused(
                StatusCode::TOO_MANY_REQUESTS,
                error_code::RATE_LIMITED,
                format!("too many requests from {ip}; retry in {secs}s"),
                "rate",
            );
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
            resp
        }
    }
}

async fn header_size(req: Request, next: Next) -> Response {
    let size: usize = req.uri().to_string().len()
        + req
            .headers()
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum::<usize>();
    if size > MAX_HEADER_BYTES {
        return refused(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            error_code::BAD_REQUEST,
            format!("request head of {size} bytes exceeds {MAX_HEADER_BYTES} bytes"),
            "header_size",
        );
    }
    next.run(req).await
}

async fn concurrency(State(limits): State<Limits>, req: Request, next: Next) -> Response {
    match tokio::time::timeout(QUEUE_WAIT, limits.slots.clone().acquire_owned()).await {
        Ok(Ok(_permit)) => next.run(req).await,
        _ => {
            metrics::counter!(REJECTED_TOTAL, "reason" => "concurrency").increment(1);
            Error::Unavailable("too many concurrent requests".into()).into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_bucket_allows_the_burst_then_the_rate() {
        let r = RateLimiter::new(2, 3);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(r.check(ip, t0).is_ok());
        }
        let wait = r.check(ip, t0).unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_millis(500));
        // Another client has its own bucket.
        assert!(r.check(other, t0).is_ok());
        // Half a second later one token is back, not two.
        let t1 = t0 + Duration::from_millis(500);
        assert!(r.check(ip, t1).is_ok());
        assert!(r.check(ip, t1).is_err());
        // Unlimited when the rate is 0.
        let off = RateLimiter::new(0, 1);
        for _ in 0..1000 {
            assert!(off.check(ip, t0).is_ok());
        }
    }
}
