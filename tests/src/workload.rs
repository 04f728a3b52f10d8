//! The product-management workload: what a branch's application does to its database.
//!
//! [`seed`] fills a branch with products (each with an inventory row and 0–2 images);
//! [`run`] then applies a mix of real transactions against one or many branches:
//! new products, price changes, stock movements, deletions, new or replaced images.
//! Each worker draws from its own RNG seeded from `(seed, branch, worker)`, so a run
//! with the same seed, concurrency and `--ops` makes the same choices.

use crate::db::{is_retryable, is_unique_violation, Db, Tx, Val};
use anyhow::{bail, Context, Result};
use chrono::Utc;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Kinds of operation, in the order of [`Mix`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    New,
    Price,
    Stock,
    Delete,
    Image,
}

impl OpKind {
    pub const ALL: [OpKind; 5] = [
        OpKind::New,
        OpKind::Price,
        OpKind::Stock,
        OpKind::Delete,
        OpKind::Image,
    ];

    pub fn name(&self) -> &'static str {
        match self {
            OpKind::New => "new",
            OpKind::Price => "price",
            OpKind::Stock => "stock",
            OpKind::Delete => "delete",
            OpKind::Image => "image",
        }
    }

    fn index(&self) -> usize {
        OpKind::ALL.iter().position(|k| k == self).expect("listed")
    }
}

/// Relative weights of the operation kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mix(pub [u32; 5]);

impl Default for Mix {
    fn default() -> Self {
        Mix([10, 40, 35, 5, 10])
    }
}

impl std::str::FromStr for Mix {
    type Err = anyhow::Error;
    /// `new=10,price=40,stock=35,delete=5,image=10` (kinds left out weigh 0).
    fn from_str(s: &str) -> Result<Mix> {
        let mut w = [0u32; 5];
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .with_context(|| format!("mix entry {part:?}: expected kind=weight"))?;
            let kind = OpKind::ALL
                .iter()
                .find(|o| o.name() == k.trim())
                .with_context(|| {
                    format!("mix: unknown kind {k:?} (expected new, price, stock, delete, image)")
                })?;
            w[kind.index()] = v
                .trim()
                .parse()
                .with_context(|| format!("mix entry {part:?}: weight is not a whole number"))?;
        }
        if w.iter().all(|x| *x == 0) {
            bail!("mix: all weights are zero");
        }
        Ok(Mix(w))
    }
}

impl Mix {
    fn draw(&self, rng: &mut StdRng) -> OpKind {
        let total: u32 = self.0.iter().sum();
        let mut x = rng.gen_range(0..total);
        for (i, w) in self.0.iter().enumerate() {
            if x < *w {
                return OpKind::ALL[i];
            }
            x -= w;
        }
        OpKind::Price
    }
}

/// Parses `30s`, `2m`, `1500ms`, `1h` or a plain number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .map(|i| s.split_at(i))
        .unwrap_or((s, "s"));
    let n: f64 = num
        .parse()
        .with_context(|| format!("duration {s:?}: expected e.g. 30s, 2m, 500ms"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" | "" => n,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        _ => bail!("duration {s:?}: unknown unit {unit:?} (ms, s, m, h)"),
    };
    Ok(Duration::from_secs_f64(secs))
}

/// One branch database the workload writes to.
pub struct Branch {
    pub index: usize,
    pub db: Db,
    /// Currency of all this branch's prices.
    pub currency: String,
    /// Where image files go (`images/<product_id>/<image_id>.jpg`), if anywhere.
    pub files_dir: Option<PathBuf>,
    next_product: AtomicI64,
    next_image: AtomicI64,
    next_movement: AtomicI64,
}

const CURRENCIES: [&str; 10] = [
    "EUR", "GBP", "CHF", "PLN", "SEK", "DKK", "CZK", "HUF", "NOK", "USD",
];

impl Branch {
    /// Opens the branch database, creates the demo schema when it is missing, and reads
    /// the next free ids.
    pub async fn open(
        index: usize,
        url: &str,
        files_dir: Option<PathBuf>,
        connections: u32,
    ) -> Result<Branch> {
        let db = Db::connect(url, connections).await?;
        let cat = schemas::Catalogue::product_management();
        let ddl = match db.backend() {
            crate::db::Backend::Sqlite => schemas::sql::sqlite::create_demo_schema(&cat),
            crate::db::Backend::Postgres => schemas::sql::postgres::create_demo_schema(&cat),
        };
        db.batch(&ddl).await?;
        let b = Branch {
            index,
            db,
            currency: CURRENCIES[index % CURRENCIES.len()].to_string(),
            files_dir,
            next_product: AtomicI64::new(1),
            next_image: AtomicI64::new(1),
            next_movement: AtomicI64::new(1),
        };
        b.resync_ids().await?;
        Ok(b)
    }

    /// Sets the id counters past the highest ids in the database (after start-up or
    /// when another writer took an id).
    async fn resync_ids(&self) -> Result<()> {
        for (sql, counter) in [
            ("SELECT MAX(product_id) FROM products", &self.next_product),
            ("SELECT MAX(image_id) FROM product_images", &self.next_image),
            (
                "SELECT MAX(movement_id) FROM stock_movements",
                &self.next_movement,
            ),
        ] {
            let max = self.db.fetch_opt_i64(sql, &[]).await?.unwrap_or(0);
            counter.fetch_max(max + 1, Ordering::SeqCst);
        }
        Ok(())
    }

    fn rel_image_path(product_id: i64, image_id: i64) -> String {
        format!("images/{product_id}/{image_id}.jpg")
    }

    /// Writes a small image file (random bytes) and returns its sha256, or `None` when
    /// the branch has no files folder.
    fn write_image(&self, rel: &str, rng: &mut StdRng) -> Result<Option<String>> {
        let Some(dir) = &self.files_dir else {
            return Ok(None);
        };
        let len = rng.gen_range(1024..6 * 1024);
        let mut bytes = vec![0u8; len];
        rng.fill(&mut bytes[..]);
        // A JPEG start-of-image marker, so the files look like what they stand for.
        bytes[0] = 0xFF;
        bytes[1] = 0xD8;
        let path = dir.join(rel);
        let parent = path.parent().expect("image path has a folder");
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
        let tmp = path.with_extension("jpg.tmp");
        std::fs::write(&tmp, &bytes).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("renaming to {}", path.display()))?;
        Ok(Some(hex::encode(Sha256::digest(&bytes))))
    }

    fn remove_product_files(&self, product_id: i64) {
        if let Some(dir) = &self.files_dir {
            let _ = std::fs::remove_dir_all(dir.join(format!("images/{product_id}")));
        }
    }

    fn image_sha(&self, rel: &str, rng: &mut StdRng) -> Result<Option<String>> {
        match self.write_image(rel, rng)? {
            Some(sha) => Ok(Some(sha)),
            // Without a files folder the row still carries a plausible checksum.
            None => Ok(Some(hex::encode(Sha256::digest(rel.as_bytes())))),
        }
    }
}

const ADJECTIVES: [&str; 16] = [
    "Compact",
    "Deluxe",
    "Classic",
    "Ergonomic",
    "Rustic",
    "Smart",
    "Vintage",
    "Eco",
    "Premium",
    "Portable",
    "Robust",
    "Silent",
    "Nordic",
    "Alpine",
    "Crème",
    "Ölfreie",
];
const NOUNS: [&str; 16] = [
    "Kettle",
    "Desk Lamp",
    "Backpack",
    "Chair",
    "Kaffeemühle",
    "Headphones",
    "Water Bottle",
    "Notebook",
    "Toaster",
    "Umbrella",
    "Blender",
    "Jacket",
    "Drill",
    "Teapot",
    "Skateboard",
    "Bicicleta",
];
const CATEGORIES: [&str; 8] = [
    "kitchen",
    "office",
    "outdoor",
    "audio",
    "furniture",
    "tools",
    "apparel",
    "sports",
];
const PHRASES: [&str; 8] = [
    "Built to last.",
    "Our best seller this season.",
    "Dishwasher safe; 2-year warranty.",
    "Comes in recycled packaging.",
    "Größe: M — Farbe: grün.",
    "Ideal for small spaces.",
    "Includes a \"quick start\" guide; batteries not included.",
    "Limited edition 🎉",
];
const REASONS_OUT: [&str; 3] = ["sale", "damaged", "count correction"];
const REASONS_IN: [&str; 3] = ["delivery", "return", "count correction"];

fn random_price(rng: &mut StdRng) -> String {
    let cents: i64 = match rng.gen_range(0..10) {
        0 => rng.gen_range(50..1_000),
        1..=7 => rng.gen_range(1_000..20_000),
        _ => rng.gen_range(20_000..200_000),
    };
    format!("{}.{:02}", cents / 100, cents % 100)
}

/// Cents of a decimal text as stored by either engine (`19.9`, `19.90`, `20`).
fn parse_cents(s: &str) -> Option<i64> {
    let (int, frac) = s.trim().split_once('.').unwrap_or((s.trim(), ""));
    let int: i64 = int.parse().ok()?;
    let frac = format!("{frac:0<2}");
    let frac: i64 = frac.get(..2)?.parse().ok()?;
    Some(int * 100 + frac)
}

fn random_description(rng: &mut StdRng) -> Option<String> {
    match rng.gen_range(0..20) {
        0 => None,
        1 => Some(String::new()),
        _ => {
            let n = rng.gen_range(1..4);
            let v: Vec<&str> = (0..n)
                .map(|_| PHRASES[rng.gen_range(0..PHRASES.len())])
                .collect();
            Some(v.join(" "))
        }
    }
}

/// Counters shared by the workers of a run; read by the progress printer.
#[derive(Default)]
pub struct Counters {
    ops: [AtomicU64; 5],
    pub transactions: AtomicU64,
    pub skipped: AtomicU64,
    pub retries: AtomicU64,
    pub errors: AtomicU64,
}

impl Counters {
    pub fn total_ops(&self) -> u64 {
        self.ops.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    pub fn summary(&self, databases: usize, elapsed: Duration) -> Summary {
        Summary {
            databases,
            ops: OpKind::ALL
                .iter()
                .map(|k| {
                    (
                        k.name().to_string(),
                        self.ops[k.index()].load(Ordering::Relaxed),
                    )
                })
                .collect(),
            transactions: self.transactions.load(Ordering::Relaxed),
            skipped: self.skipped.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            elapsed_seconds: (elapsed.as_secs_f64() * 100.0).round() / 100.0,
        }
    }
}

/// The final report of `seed` and `run`.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub databases: usize,
    /// Committed operations by kind.
    pub ops: BTreeMap<String, u64>,
    /// Committed transactions.
    pub transactions: u64,
    /// Operations that found their product gone (deleted concurrently) and did nothing.
    pub skipped: u64,
    /// Retries after lock contention (SQLITE_BUSY, serialization failures).
    pub retries: u64,
    /// Operations that failed for good.
    pub errors: u64,
    pub elapsed_seconds: f64,
}

/// Inserts one product with its inventory row and `images` image rows.
async fn insert_product(
    b: &Branch,
    tx: &mut Tx,
    product_id: i64,
    images: usize,
    rng: &mut StdRng,
) -> Result<(), OpError> {
    let now = Utc::now();
    let name = format!(
        "{} {} {}",
        ADJECTIVES[rng.gen_range(0..ADJECTIVES.len())],
        NOUNS[rng.gen_range(0..NOUNS.len())],
        rng.gen_range(100..1000)
    );
    let category = if rng.gen_range(0..20) == 0 {
        None
    } else {
        Some(CATEGORIES[rng.gen_range(0..CATEGORIES.len())].to_string())
    };
    tx.exec(
        "INSERT INTO products (product_id, sku, name, description, category, unit_price, currency, updated_at) \
         VALUES ($1, $2, $3, $4, $5, CAST($6 AS NUMERIC), $7, $8)",
        &[
            Val::Int(product_id),
            Val::Text(format!("SKU-{:02}-{product_id:07}", b.index)),
            Val::Text(name),
            Val::OptText(random_description(rng)),
            Val::OptText(category),
            Val::Num(random_price(rng)),
            Val::Text(b.currency.clone()),
            Val::Ts(now),
        ],
    )
    .await?;
    let reorder = if rng.gen_range(0..10) == 0 {
        None
    } else {
        Some(rng.gen_range(5..50))
    };
    tx.exec(
        "INSERT INTO inventory (product_id, quantity_on_hand, reorder_level, updated_at) VALUES ($1, $2, $3, $4)",
        &[
            Val::Int(product_id),
            Val::Int(rng.gen_range(0..500)),
            Val::OptInt(reorder),
            Val::Ts(now),
        ],
    )
    .await?;
    for _ in 0..images {
        insert_image(b, tx, product_id, rng).await?;
    }
    Ok(())
}

async fn insert_image(
    b: &Branch,
    tx: &mut Tx,
    product_id: i64,
    rng: &mut StdRng,
) -> Result<(), OpError> {
    let image_id = b.next_image.fetch_add(1, Ordering::SeqCst);
    let rel = Branch::rel_image_path(product_id, image_id);
    let sha = b.image_sha(&rel, rng).map_err(OpError::Other)?;
    tx.exec(
        "INSERT INTO product_images (image_id, product_id, file_path, sha256, updated_at) VALUES ($1, $2, $3, $4, $5)",
        &[
            Val::Int(image_id),
            Val::Int(product_id),
            Val::Text(rel),
            Val::OptText(sha),
            Val::Ts(Utc::now()),
        ],
    )
    .await?;
    Ok(())
}

/// Why one attempt of an operation failed: the database (maybe retryable) or the
/// files folder.
#[derive(Debug)]
enum OpError {
    Db(sqlx::Error),
    Other(anyhow::Error),
}

impl std::fmt::Display for OpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpError::Db(e) => write!(f, "{e}"),
            OpError::Other(e) => write!(f, "{e:#}"),
        }
    }
}

impl From<sqlx::Error> for OpError {
    fn from(e: sqlx::Error) -> Self {
        OpError::Db(e)
    }
}

/// Seeds `products` products into a branch, in transactions of up to 500 products.
pub async fn seed(b: &Branch, products: u64, seed: u64, counters: &Counters) -> Result<()> {
    let mut rng =
        StdRng::seed_from_u64(seed ^ (b.index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut left = products;
    while left > 0 {
        let n = left.min(500);
        let mut attempt = 0;
        loop {
            let start = b.next_product.load(Ordering::SeqCst);
            let mut tx = b.db.begin().await.context("starting a seed transaction")?;
            let mut result = Ok(());
            for i in 0..n as i64 {
                let images = rng.gen_range(0..=2);
                if let Err(e) = insert_product(b, &mut tx, start + i, images, &mut rng).await {
                    result = Err(e);
                    break;
                }
            }
            let result = match result {
                Ok(()) => tx.commit().await.map_err(OpError::Db),
                Err(e) => {
                    let _ = tx.rollback().await;
                    Err(e)
                }
            };
            match result {
                Ok(()) => {
                    b.next_product.fetch_max(start + n as i64, Ordering::SeqCst);
                    counters.ops[OpKind::New.index()].fetch_add(n, Ordering::Relaxed);
                    counters.transactions.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Err(OpError::Db(e))
                    if attempt < 20 && (is_retryable(&e) || is_unique_violation(&e)) =>
                {
                    attempt += 1;
                    counters.retries.fetch_add(1, Ordering::Relaxed);
                    b.resync_ids().await?;
                    tokio::time::sleep(Duration::from_millis(20 * attempt)).await;
                }
                Err(e) => bail!("seeding branch {}: {e}", b.index),
            }
        }
        left -= n;
    }
    Ok(())
}

/// A random existing product id, or `None` when the branch has none.
async fn pick_product(b: &Branch, rng: &mut StdRng) -> Result<Option<i64>, sqlx::Error> {
    let hi = b.next_product.load(Ordering::SeqCst).max(2);
    let probe = rng.gen_range(1..hi);
    if let Some(id) =
        b.db.fetch_opt_i64(
            "SELECT product_id FROM products WHERE product_id >= $1 ORDER BY product_id LIMIT 1",
            &[Val::Int(probe)],
        )
        .await?
    {
        return Ok(Some(id));
    }
    b.db.fetch_opt_i64("SELECT MIN(product_id) FROM products", &[])
        .await
}

/// Outcome of one attempt of an operation.
enum Done {
    Committed,
    /// The product vanished (deleted concurrently): nothing to do.
    Skipped,
}

async fn attempt(b: &Branch, kind: OpKind, rng: &mut StdRng) -> Result<Done, OpError> {
    let target = match kind {
        OpKind::New => None,
        _ => match pick_product(b, rng).await? {
            Some(id) => Some(id),
            // An empty branch: create instead.
            None => return Box::pin(attempt(b, OpKind::New, rng)).await,
        },
    };
    let mut tx = b.db.begin().await?;
    let result = apply(b, &mut tx, kind, target, rng).await;
    match result {
        Ok(Done::Committed) => {
            tx.commit().await?;
            if let (OpKind::Delete, Some(id)) = (kind, target) {
                b.remove_product_files(id);
            }
            Ok(Done::Committed)
        }
        Ok(Done::Skipped) => {
            tx.rollback().await?;
            Ok(Done::Skipped)
        }
        Err(e) => {
            let _ = tx.rollback().await;
            Err(e)
        }
    }
}

async fn apply(
    b: &Branch,
    tx: &mut Tx,
    kind: OpKind,
    target: Option<i64>,
    rng: &mut StdRng,
) -> Result<Done, OpError> {
    let now = Utc::now();
    if let Some(id) = target {
        if !tx.lock_product(id).await? {
            return Ok(Done::Skipped);
        }
    }
    match (kind, target) {
        (OpKind::New, _) | (_, None) => {
            let id = b.next_product.fetch_add(1, Ordering::SeqCst);
            insert_product(b, tx, id, 1, rng).await?;
        }
        (OpKind::Price, Some(id)) => {
            let old = tx
                .opt_text(
                    "SELECT CAST(unit_price AS TEXT) FROM products WHERE product_id = $1",
                    &[Val::Int(id)],
                )
                .await?;
            let price = match old.as_deref().and_then(parse_cents) {
                Some(c) => {
                    let pct = rng.gen_range(80..=125);
                    let cents = (c * pct / 100).max(1);
                    format!("{}.{:02}", cents / 100, cents % 100)
                }
                None => random_price(rng),
            };
            tx.exec(
                "UPDATE products SET unit_price = CAST($1 AS NUMERIC), updated_at = $2 WHERE product_id = $3",
                &[Val::Num(price), Val::Ts(now), Val::Int(id)],
            )
            .await?;
        }
        (OpKind::Stock, Some(id)) => {
            let inbound = rng.gen_bool(0.4);
            let (delta, reason) = if inbound {
                (
                    rng.gen_range(1..=40),
                    REASONS_IN[rng.gen_range(0..REASONS_IN.len())],
                )
            } else {
                (
                    -rng.gen_range(1..=5),
                    REASONS_OUT[rng.gen_range(0..REASONS_OUT.len())],
                )
            };
            let n = tx
                .exec(
                    "UPDATE inventory SET quantity_on_hand = quantity_on_hand + $1, updated_at = $2 WHERE product_id = $3",
                    &[Val::Int(delta), Val::Ts(now), Val::Int(id)],
                )
                .await?;
            if n == 0 {
                return Ok(Done::Skipped);
            }
            let movement_id = b.next_movement.fetch_add(1, Ordering::SeqCst);
            tx.exec(
                "INSERT INTO stock_movements (movement_id, product_id, quantity_delta, reason, moved_at) VALUES ($1, $2, $3, $4, $5)",
                &[
                    Val::Int(movement_id),
                    Val::Int(id),
                    Val::Int(delta),
                    Val::Text(reason.to_string()),
                    Val::Ts(now),
                ],
            )
            .await?;
        }
        (OpKind::Delete, Some(id)) => {
            for sql in [
                "DELETE FROM stock_movements WHERE product_id = $1",
                "DELETE FROM product_images WHERE product_id = $1",
                "DELETE FROM inventory WHERE product_id = $1",
                "DELETE FROM products WHERE product_id = $1",
            ] {
                tx.exec(sql, &[Val::Int(id)]).await?;
            }
        }
        (OpKind::Image, Some(id)) => {
            let images = tx
                .pairs(
                    "SELECT image_id, file_path FROM product_images WHERE product_id = $1 ORDER BY image_id",
                    &[Val::Int(id)],
                )
                .await?;
            if images.len() < 2 {
                insert_image(b, tx, id, rng).await?;
            } else {
                // Replace one picture: new content under the same path.
                let (image_id, path) = &images[rng.gen_range(0..images.len())];
                let sha = b.image_sha(path, rng).map_err(OpError::Other)?;
                tx.exec(
                    "UPDATE product_images SET sha256 = $1, updated_at = $2 WHERE image_id = $3",
                    &[Val::OptText(sha), Val::Ts(now), Val::Int(*image_id)],
                )
                .await?;
            }
        }
    }
    Ok(Done::Committed)
}

/// When a run stops.
#[derive(Debug, Clone, Copy)]
pub enum Until {
    Duration(Duration),
    /// Total operations across all workers.
    Ops(u64),
}

#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Total operations per second across all branches (`None`: as fast as possible).
    pub rate: Option<f64>,
    pub until: Until,
    /// Workers per branch.
    pub concurrency: usize,
    pub seed: u64,
    pub mix: Mix,
}

/// Runs the workload against `branches` until `opts.until` or until `stop` is set.
pub async fn run(
    branches: &[Arc<Branch>],
    opts: &RunOptions,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
) -> Result<Summary> {
    let started = Instant::now();
    let workers = branches.len() * opts.concurrency.max(1);
    let mut set = tokio::task::JoinSet::new();
    let mut w = 0usize;
    for b in branches {
        for c in 0..opts.concurrency.max(1) {
            let b = b.clone();
            let counters = counters.clone();
            let stop = stop.clone();
            let opts = opts.clone();
            // Split --ops evenly and deterministically over the workers.
            let quota = match opts.until {
                Until::Ops(n) => {
                    Some(n / workers as u64 + u64::from((w as u64) < n % workers as u64))
                }
                Until::Duration(_) => None,
            };
            let deadline = match opts.until {
                Until::Duration(d) => Some(started + d),
                Until::Ops(_) => None,
            };
            let interval = opts
                .rate
                .map(|r| Duration::from_secs_f64(workers as f64 / r.max(0.001)));
            let seed = opts
                .seed
                .wrapping_mul(1_000_003)
                .wrapping_add((b.index as u64) << 16)
                .wrapping_add(c as u64);
            // Stagger the workers so that a paced run does not fire in bursts.
            let offset = interval.map(|i| i.mul_f64(w as f64 / workers as f64));
            set.spawn(async move {
                let mut rng = StdRng::seed_from_u64(seed);
                let mut next = Instant::now() + offset.unwrap_or_default();
                let mut done = 0u64;
                loop {
                    if stop.load(Ordering::Relaxed)
                        || quota.is_some_and(|q| done >= q)
                        || deadline.is_some_and(|d| Instant::now() >= d)
                    {
                        break;
                    }
                    if let Some(i) = interval {
                        let now = Instant::now();
                        if next > now {
                            tokio::time::sleep(next - now).await;
                        }
                        next += i;
                        if deadline.is_some_and(|d| Instant::now() >= d)
                            || stop.load(Ordering::Relaxed)
                        {
                            break;
                        }
                    }
                    let kind = opts.mix.draw(&mut rng);
                    run_one(&b, kind, &mut rng, &counters).await;
                    done += 1;
                }
            });
            w += 1;
        }
    }
    while let Some(r) = set.join_next().await {
        r.context("a workload worker panicked")?;
    }
    Ok(counters.summary(branches.len(), started.elapsed()))
}

/// One operation with retries on contention; outcomes go to the counters.
async fn run_one(b: &Branch, kind: OpKind, rng: &mut StdRng, counters: &Counters) {
    let mut tries = 0u32;
    loop {
        match attempt(b, kind, rng).await {
            Ok(Done::Committed) => {
                counters.ops[kind.index()].fetch_add(1, Ordering::Relaxed);
                counters.transactions.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Ok(Done::Skipped) => {
                counters.skipped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Err(OpError::Db(e)) if tries < 50 && (is_retryable(&e) || is_unique_violation(&e)) => {
                tries += 1;
                counters.retries.fetch_add(1, Ordering::Relaxed);
                if is_unique_violation(&e) {
                    let _ = b.resync_ids().await;
                }
                let backoff = 5 * u64::from(tries.min(20)) + rng.gen_range(0..10);
                tokio::time::sleep(Duration::from_millis(backoff)).await;
            }
            Err(e) => {
                counters.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(branch = b.index, op = kind.name(), error = %e, "operation failed");
                eprintln!("pm-sim: branch {} {}: {e}", b.index, kind.name());
                return;
            }
        }
    }
}

/// Files folder of a branch, `None` when not given.
pub fn files_dir_for(dirs: &[PathBuf], index: usize, count: usize) -> Option<PathBuf> {
    match dirs.len() {
        0 => None,
        1 if count > 1 => Some(dirs[0].join(format!("{index:02}"))),
        _ => dirs.get(index).cloned(),
    }
}

/// Path of a file inside a branch's files folder.
pub fn file_path(files_dir: &Path, rel: &str) -> PathBuf {
    files_dir.join(rel)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_parses_and_refuses_nonsense() {
        let m: Mix = "new=1,price=2".parse().unwrap();
        assert_eq!(m.0, [1, 2, 0, 0, 0]);
        assert!("nope=1".parse::<Mix>().is_err());
        assert!("new=0".parse::<Mix>().is_err());
        assert!("new".parse::<Mix>().is_err());
    }

    #[test]
    fn durations_and_cents() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert!(parse_duration("3 weeks").is_err());
        assert_eq!(parse_cents("19.9"), Some(1990));
        assert_eq!(parse_cents("19.90"), Some(1990));
        assert_eq!(parse_cents("20"), Some(2000));
        assert_eq!(parse_cents("0.05"), Some(5));
    }

    async fn concurrent_run(url: &str, dir: &Path) -> Summary {
        let files = dir.join("files");
        let b = Arc::new(Branch::open(0, url, Some(files.clone()), 5).await.unwrap());
        let counters = Arc::new(Counters::default());
        seed(&b, 50, 9, &counters).await.unwrap();
        let opts = RunOptions {
            rate: None,
            until: Until::Ops(400),
            concurrency: 4,
            seed: 9,
            mix: "new=10,price=20,stock=30,delete=20,image=20"
                .parse()
                .unwrap(),
        };
        let s = run(
            std::slice::from_ref(&b),
            &opts,
            Arc::new(Counters::default()),
            Arc::new(AtomicBool::new(false)),
        )
        .await
        .unwrap();
        assert_eq!(s.errors, 0, "{s:?}");
        assert_eq!(s.transactions + s.skipped, 400, "{s:?}");
        assert!(s.ops["delete"] > 0 && s.ops["image"] > 0, "{s:?}");
        // Every image row has its file with the recorded checksum; deleted products
        // left no files behind.
        let mut tx = b.db.begin().await.unwrap();
        let rows: Vec<(i64, String)> = tx
            .pairs("SELECT product_id, file_path FROM product_images", &[])
            .await
            .unwrap();
        for (_, path) in &rows {
            assert!(files.join(path).exists(), "{path} missing");
        }
        let products: std::collections::HashSet<i64> = tx
            .pairs("SELECT product_id, sku FROM products", &[])
            .await
            .unwrap()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        tx.rollback().await.unwrap();
        for entry in std::fs::read_dir(files.join("images")).unwrap() {
            let id: i64 = entry
                .unwrap()
                .file_name()
                .to_string_lossy()
                .parse()
                .unwrap();
            assert!(
                products.contains(&id),
                "files of deleted product {id} remain"
            );
        }
        b.db.close().await;
        s
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writers_on_sqlite_retry_instead_of_failing() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("pm.db").display());
        concurrent_run(&url, dir.path()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writers_on_postgres_lock_their_product() {
        let dir = tempfile::tempdir().unwrap();
        let url = crate::pg::fresh_database("workload").await.unwrap();
        concurrent_run(&url, dir.path()).await;
    }

    #[test]
    fn same_seed_same_draws() {
        let m = Mix::default();
        let a: Vec<_> = {
            let mut r = StdRng::seed_from_u64(7);
            (0..50).map(|_| m.draw(&mut r)).collect()
        };
        let b: Vec<_> = {
            let mut r = StdRng::seed_from_u64(7);
            (0..50).map(|_| m.draw(&mut r)).collect()
        };
        assert_eq!(a, b);
    }
}
