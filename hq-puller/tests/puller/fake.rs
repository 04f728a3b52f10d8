//! A fake branch-listener: an axum server on 127.0.0.1:0 serving canned change windows per
//! location (path prefix `/<location>`), with knobs for hostile and broken behaviour, and
//! counters of requests and concurrent requests per location.

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use schemas::wire::{Change, ChangesResponse, Op};
use schemas::Cursor;
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use uuid::Uuid;

pub const TOKEN: &str = "test-token-0123456789abcdef";

#[derive(Clone, Debug)]
pub struct FakeChange {
    pub seq: i64,
    pub table: String,
    pub op: Op,
    pub pk: String,
    pub row: Option<String>,
}

pub fn ch(seq: i64, table: &str, op: &str, pk: &str, row: Option<&str>) -> FakeChange {
    FakeChange {
        seq,
        table: table.into(),
        op: Op::from_code(op).unwrap(),
        pk: pk.into(),
        row: row.map(str::to_string),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behaviour {
    Normal,
    /// Never answers.
    Hang,
    /// Answers 500.
    Fail500,
    /// Answers this status with this error code.
    Fail(u16, &'static str),
}

pub type Tamper = Arc<dyn Fn(&mut ChangesResponse) + Send + Sync>;

pub struct Branch {
    pub location: String,
    pub instance: Uuid,
    pub time_zone: String,
    /// ticks[i] is the uuid of tick i+1 (tick 1: install).
    ticks: Vec<Uuid>,
    /// windows[i] = (tick i+1, tick i+2].
    windows: Vec<Vec<FakeChange>>,
    pub behaviour: Behaviour,
    /// When caught up, make a new window with one inventory row (product_id = window no).
    pub grow: bool,
    /// Always answer `more = true` (an endless stream, with `grow`).
    pub endless: bool,
    pub delay: Duration,
    /// Applied to responses serving window index >= `tamper_from`.
    pub tamper: Option<(usize, Tamper)>,
    next_seq: i64,
    /// File contents served by `/v1/files/{sha256}` (others: 404 `file_not_found`).
    pub files: HashMap<String, Vec<u8>>,
    /// Faults injected into the next file responses, one per request.
    pub file_faults: std::collections::VecDeque<FileFault>,
    /// The `Range` header of every file request, in order.
    pub file_ranges: Vec<Option<String>>,
}

/// A broken file response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileFault {
    /// One byte flipped (same size).
    Corrupt,
    /// The body ends early, with a matching Content-Length (a short file).
    Truncate,
    /// The connection is cut after this many bytes of the body.
    Cut(usize),
    /// 429 `rate_limited` with `Retry-After: 1`.
    RateLimited,
}

impl Branch {
    pub fn new(location: &str) -> Branch {
        Branch {
            location: location.into(),
            instance: Uuid::new_v4(),
            time_zone: "UTC".into(),
            ticks: vec![Uuid::new_v4()],
            windows: Vec::new(),
            behaviour: Behaviour::Normal,
            grow: false,
            endless: false,
            delay: Duration::ZERO,
            tamper: None,
            next_seq: 1_000_000,
            files: HashMap::new(),
            file_faults: Default::default(),
            file_ranges: Vec::new(),
        }
    }

    /// Registers content to serve; returns its sha256.
    pub fn add_file(&mut self, content: &[u8]) -> String {
        use sha2::Digest;
        let sha = hex::encode(sha2::Sha256::digest(content));
        self.files.insert(sha.clone(), content.to_vec());
        sha
    }

    pub fn window(mut self, changes: Vec<FakeChange>) -> Branch {
        self.push_window(changes);
        self
    }

    pub fn push_window(&mut self, changes: Vec<FakeChange>) {
        self.windows.push(changes);
        self.ticks.push(Uuid::new_v4());
    }

    /// The cursor of tick `t` (1-based).
    pub fn cursor(&self, t: i64) -> Cursor {
        Cursor {
            instance_id: self.instance,
            tick: t,
            tick_uuid: self.ticks[(t - 1) as usize],
        }
    }

    fn grow_window(&mut self) {
        let n = self.windows.len() as i64 + 1;
        self.next_seq += 1;
        let seq = self.next_seq;
        self.push_window(vec![ch(
            seq,
            "inventory",
            "I",
            &format!(r#"{{"product_id":{n}}}"#),
            Some(&format!(r#"{{"product_id":{n},"quantity_on_hand":{n},"reorder_level":null,"updated_at":null}}"#)),
        )]);
    }

    fn respond(&mut self, after: Option<&str>) -> Response {
        let after: Option<Cursor> = match after.map(str::parse) {
            None => None,
            Some(Ok(c)) => Some(c),
            Some(Err(_)) => {
                return error(StatusCode::BAD_REQUEST, "bad_request", "malformed cursor")
            }
        };
        let t = match &after {
            None => 1,
            Some(c) => {
                if c.instance_id != self.instance {
                    return error(StatusCode::CONFLICT, "instance_mismatch", "other instance");
                }
                if c.tick < 1
                    || c.tick as usize > self.ticks.len()
                    || self.ticks[(c.tick - 1) as usize] != c.tick_uuid
                {
                    return error(StatusCode::CONFLICT, "lineage_mismatch", "unknown tick");
                }
                c.tick
            }
        };
        let w = (t - 1) as usize;
        if w >= self.windows.len() && (self.grow || self.endless) {
            self.grow_window();
        }
        let (changes, next, more) = if w >= self.windows.len() {
            (Vec::new(), self.cursor(t), false)
        } else {
            let changes = self.windows[w]
                .iter()
                .map(|c| Change {
                    seq: c.seq,
                    table: c.table.clone(),
                    op: c.op,
                    pk: RawValue::from_string(c.pk.clone()).unwrap(),
                    row: c.row.clone().map(|r| RawValue::from_string(r).unwrap()),
                    ts: chrono::Utc::now(),
                })
                .collect();
            (
                changes,
                self.cursor(t + 1),
                self.endless || w + 1 < self.windows.len(),
            )
        };
        let backlog: usize = self.windows.iter().skip(w + 1).map(Vec::len).sum();
        let mut resp = ChangesResponse {
            protocol: 1,
            location: self.location.clone(),
            instance_id: self.instance,
            time_zone: self.time_zone.clone(),
            after,
            next,
            more,
            limit: 5000,
            limit_clamped: false,
            backlog: backlog as u64,
            changes,
        };
        if let Some((from, f)) = &self.tamper {
            if w >= *from {
                f(&mut resp);
            }
        }
        (
            [("content-type", "application/json")],
            serde_json::to_string(&resp).unwrap(),
        )
            .into_response()
    }
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        [("content-type", "application/json")],
        format!(r#"{{"error":{{"code":"{code}","message":"{message}"}}}}"#),
    )
        .into_response()
}

#[derive(Default)]
pub struct Counters {
    pub requests: AtomicU64,
    pub in_flight: AtomicU64,
    pub max_in_flight: AtomicU64,
    /// Requests that asked to long-poll with `wait=25`.
    pub waits: AtomicU64,
}

#[derive(Clone, Default)]
pub struct Fake {
    pub branches: Arc<Mutex<HashMap<String, Branch>>>,
    pub counters: Arc<Mutex<HashMap<String, Arc<Counters>>>>,
    /// Over all locations of this server.
    pub total: Arc<Counters>,
}

struct InFlight(Arc<Counters>);
impl InFlight {
    fn enter(c: Arc<Counters>) -> InFlight {
        c.requests.fetch_add(1, Ordering::SeqCst);
        let now = c.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        c.max_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlight(c)
    }
}
impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Fake {
    /// Starts the server; returns it and its base URL.
    pub async fn start(branches: Vec<Branch>) -> (Fake, String) {
        let fake = Fake::default();
        for b in branches {
            fake.add(b);
        }
        let app = axum::Router::new()
            .route("/{loc}/v1/changes", axum::routing::get(handler))
            .route("/{loc}/v1/files/{sha}", axum::routing::get(file_handler))
            .with_state(fake.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (fake, format!("http://{addr}"))
    }

    pub fn add(&self, b: Branch) {
        self.counters
            .lock()
            .unwrap()
            .insert(b.location.clone(), Arc::new(Counters::default()));
        self.branches.lock().unwrap().insert(b.location.clone(), b);
    }

    pub fn with<R>(&self, loc: &str, f: impl FnOnce(&mut Branch) -> R) -> R {
        f(self.branches.lock().unwrap().get_mut(loc).unwrap())
    }

    pub fn counters(&self, loc: &str) -> Arc<Counters> {
        self.counters.lock().unwrap()[loc].clone()
    }

    pub fn requests(&self, loc: &str) -> u64 {
        self.counters(loc).requests.load(Ordering::SeqCst)
    }
}

async fn handler(
    State(fake): State<Fake>,
    Path(loc): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let Some(counters) = fake.counters.lock().unwrap().get(&loc).cloned() else {
        return error(StatusCode::NOT_FOUND, "not_found", "no such branch");
    };
    if q.get("wait").map(String::as_str) == Some("25") {
        counters.waits.fetch_add(1, Ordering::SeqCst);
    }
    let _guard = InFlight::enter(counters);
    let _total = InFlight::enter(fake.total.clone());
    if headers.get("authorization").and_then(|v| v.to_str().ok())
        != Some(&format!("Bearer {TOKEN}"))
    {
        return error(StatusCode::UNAUTHORIZED, "unauthorized", "unauthorized");
    }
    let (behaviour, delay) = fake.with(&loc, |b| (b.behaviour, b.delay));
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    match behaviour {
        Behaviour::Hang => std::future::pending::<Response>().await,
        Behaviour::Fail500 => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", "boom"),
        Behaviour::Fail(status, code) => {
            error(StatusCode::from_u16(status).unwrap(), code, "refused")
        }
        Behaviour::Normal => fake.with(&loc, |b| b.respond(q.get("after").map(String::as_str))),
    }
}

/// `GET /<loc>/v1/files/{sha}`: serves registered content, `Range: bytes=N-`, faults.
async fn file_handler(
    State(fake): State<Fake>,
    Path((loc, sha)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if headers.get("authorization").and_then(|v| v.to_str().ok())
        != Some(&format!("Bearer {TOKEN}"))
    {
        return error(StatusCode::UNAUTHORIZED, "unauthorized", "unauthorized");
    }
    let range = headers
        .get("range")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let (content, fault) = fake.with(&loc, |b| {
        b.file_ranges.push(range.clone());
        (b.files.get(&sha).cloned(), b.file_faults.pop_front())
    });
    if fault == Some(FileFault::RateLimited) {
        let mut r = error(StatusCode::TOO_MANY_REQUESTS, "rate_limited", "slow down");
        r.headers_mut()
            .insert("retry-after", axum::http::HeaderValue::from_static("1"));
        return r;
    }
    let Some(mut content) = content else {
        return error(StatusCode::NOT_FOUND, "file_not_found", "no such file");
    };
    let size = content.len();
    let start = range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse::<usize>().ok())
        .filter(|n| *n < size);
    let mut body = match start {
        Some(n) => content.split_off(n),
        None => content,
    };
    let status = if start.is_some() {
        StatusCode::PARTIAL_CONTENT
    } else {
        StatusCode::OK
    };
    let mut builder = Response::builder().status(status);
    if let Some(n) = start {
        builder = builder.header("content-range", format!("bytes {n}-{}/{size}", size - 1));
    }
    match fault {
        None | Some(FileFault::RateLimited) => builder.body(axum::body::Body::from(body)).unwrap(),
        Some(FileFault::Corrupt) => {
            let i = body.len() / 2;
            body[i] ^= 0xff;
            builder.body(axum::body::Body::from(body)).unwrap()
        }
        Some(FileFault::Truncate) => {
            body.truncate(body.len() / 2);
            builder.body(axum::body::Body::from(body)).unwrap()
        }
        Some(FileFault::Cut(n)) => {
            let len = body.len();
            let head = bytes::Bytes::from(body[..n.min(len)].to_vec());
            // The head goes out, then the connection breaks.
            let stream = futures::stream::unfold(Some(head), |state| async move {
                match state {
                    Some(h) => Some((Ok::<_, std::io::Error>(h), None)),
                    None => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        Some((Err(std::io::Error::other("cut")), None))
                    }
                }
            });
            builder
                .header("content-length", len)
                .body(axum::body::Body::from_stream(stream))
                .unwrap()
        }
    }
}
