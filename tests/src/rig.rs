//! A fault-test installation: branches (SQLite or PostgreSQL, each with its listener),
//! the first `proxied` of them reached by HQ through a [`FaultProxy`], HQ running
//! `hq-puller run`, and the workload writing in the background. Used by the fault tests
//! (`tests/tests/faults.rs`) and the soak (`soak` binary, `tests/soak.sh`).

use crate::fleet::{BranchNode, BranchOptions, Hq, HqOptions};
use crate::proxy::FaultProxy;
use crate::workload::{self, Branch, Counters, Mix, RunOptions, Summary, Until};
use anyhow::{bail, Result};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct RigOptions {
    pub sqlite: usize,
    pub postgres: usize,
    /// How many branches (the first ones) HQ reaches through a fault proxy.
    pub proxied: usize,
    pub products: u64,
    pub hq: HqOptions,
    /// Branch tick interval.
    pub tick_interval: String,
    /// HQ's database (default: a fresh database of the shared test cluster).
    pub hq_database_url: Option<String>,
    /// Listeners serve HTTPS with certificates of one private CA (`make-test-ca.sh`);
    /// HQ trusts only that CA and plain HTTP is not allowed.
    pub tls: bool,
}

impl Default for RigOptions {
    fn default() -> Self {
        RigOptions {
            sqlite: 1,
            postgres: 0,
            proxied: 1,
            products: 50,
            hq: HqOptions::default(),
            tick_interval: "500ms".into(),
            hq_database_url: None,
            tls: false,
        }
    }
}

pub struct Rig {
    pub branches: Vec<BranchNode>,
    /// `proxies[i]` stands between HQ and `branches[i]` (for `i < proxied`).
    pub proxies: Vec<FaultProxy>,
    pub sims: Vec<Arc<Branch>>,
    pub hq: Hq,
    pub dir: tempfile::TempDir,
}

impl Rig {
    /// Creates, installs, seeds and starts everything; HQ is migrated and running.
    pub async fn new(opts: RigOptions) -> Result<Rig> {
        let dir = tempfile::tempdir()?;
        let total = opts.sqlite + opts.postgres;
        let mut branches = Vec::with_capacity(total);
        let tls = if opts.tls {
            Some(crate::fleet::TlsFiles::make(&dir.path().join("ca"))?)
        } else {
            None
        };
        let mut hq_opts = opts.hq.clone();
        if let Some(t) = &tls {
            hq_opts.extra = format!("ca_file = {:?}\n", t.ca.display().to_string());
        }
        for i in 0..total {
            let location = format!("b{:02}", i + 1);
            let url = if i < opts.sqlite {
                format!(
                    "sqlite://{}",
                    dir.path().join(format!("{location}.db")).display()
                )
            } else {
                crate::pg::fresh_database(&format!("rig_{location}")).await?
            };
            let bo = BranchOptions {
                tick_interval: opts.tick_interval.clone(),
                tls: tls.clone(),
                ..BranchOptions::default()
            };
            branches.push(BranchNode::new(dir.path(), &location, &url, &bo)?);
        }
        futures::future::try_join_all(branches.iter().map(|b| b.install(true))).await?;
        let mut sims = Vec::with_capacity(total);
        for (i, b) in branches.iter().enumerate() {
            let sim = Branch::open(i, &b.database_url, Some(b.files_dir.clone()), 3).await?;
            workload::seed(&sim, opts.products, 42 + i as u64, &Counters::default()).await?;
            sims.push(Arc::new(sim));
        }
        for b in branches.iter_mut() {
            b.start().await?;
        }
        let mut proxies = Vec::new();
        for b in branches.iter_mut().take(opts.proxied) {
            let upstream: SocketAddr = format!("127.0.0.1:{}", b.port).parse()?;
            let p = FaultProxy::start(upstream).await?;
            b.hq_url = Some(p.url(b.tls.is_some()));
            proxies.push(p);
        }
        let hq_url = match &opts.hq_database_url {
            Some(u) => u.clone(),
            None => crate::pg::fresh_database("rig_hq").await?,
        };
        let refs: Vec<&BranchNode> = branches.iter().collect();
        let mut hq = Hq::new(dir.path(), &hq_url, &hq_opts, &refs).await?;
        hq.migrate().await?;
        hq.start()?;
        Ok(Rig {
            branches,
            proxies,
            sims,
            hq,
            dir,
        })
    }

    /// Starts the workload on every branch: `rate` operations per second in total.
    pub fn start_writers(&self, rate: f64, seed: u64) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let opts = RunOptions {
            rate: Some(rate),
            until: Until::Duration(Duration::from_secs(24 * 3600)),
            concurrency: 1,
            seed,
            mix: Mix::default(),
        };
        let sims = self.sims.clone();
        let counters = Arc::new(Counters::default());
        let s = stop.clone();
        let task = tokio::spawn(async move { workload::run(&sims, &opts, counters, s).await });
        Writers { stop, task }
    }

    /// Waits until HQ's cursor reached every listener's head and the oracle finds HQ
    /// equal to every branch.
    pub async fn wait_caught_up(&mut self, timeout: Duration) -> Result<()> {
        let refs: Vec<&BranchNode> = self.branches.iter().collect();
        self.hq.wait_caught_up(&refs, timeout).await
    }

    /// Compares every branch with HQ; returns the rows compared.
    pub async fn assert_equal(&self) -> Result<usize> {
        let mut rows = 0;
        for b in &self.branches {
            let r = self.hq.compare(b).await?;
            if !r.is_equal() {
                bail!("{r}");
            }
            rows += r.total_rows();
        }
        Ok(rows)
    }

    pub async fn shutdown(mut self) -> Result<()> {
        self.hq.stop().await?;
        for b in &mut self.branches {
            b.stop().await?;
        }
        Ok(())
    }
}

/// The workload running in the background until [`Writers::finish`].
pub struct Writers {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Result<Summary>>,
}

impl Writers {
    /// Stops the workload and returns its summary; fails if an operation failed.
    pub async fn finish(self) -> Result<Summary> {
        self.stop.store(true, Ordering::Relaxed);
        let s = self.task.await??;
        if s.errors > 0 {
            bail!("the workload had {} failed operations: {s:?}", s.errors);
        }
        Ok(s)
    }
}
