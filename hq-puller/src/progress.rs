//! Progress of loads, resyncs and verifies: an `indicatif` bar on a terminal, plain
//! periodic log lines (with rows/s) otherwise (systemd journal, tests).

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// How often a progress line is logged when stderr is not a terminal.
const LOG_EVERY: Duration = Duration::from_secs(5);

pub struct Progress {
    bar: Option<ProgressBar>,
    location: String,
    what: &'static str,
    started: Instant,
    last_log: Instant,
    done: u64,
}

impl Progress {
    /// `what`: `load`, `resync` or `verify`.
    pub fn new(location: &str, what: &'static str) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = ProgressBar::new_spinner();
            b.set_style(
                ProgressStyle::with_template(
                    "{spinner} {prefix} {msg} {human_pos} rows ({per_sec}) {elapsed}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            b.set_prefix(format!("{location} {what}"));
            b.enable_steady_tick(Duration::from_millis(200));
            b
        });
        let now = Instant::now();
        Progress {
            bar,
            location: location.into(),
            what,
            started: now,
            last_log: now,
            done: 0,
        }
    }

    /// `n` more rows done, now working on `detail` (e.g. the table).
    pub fn inc(&mut self, n: u64, detail: &str) {
        self.done += n;
        if let Some(b) = &self.bar {
            b.set_message(detail.to_string());
            b.inc(n);
        } else if self.last_log.elapsed() >= LOG_EVERY {
            self.last_log = Instant::now();
            tracing::info!(
                location = %self.location,
                what = self.what,
                table = detail,
                rows = self.done,
                rows_per_s = self.rate() as u64,
                "progress"
            );
        }
    }

    pub fn rows(&self) -> u64 {
        self.done
    }

    pub fn rate(&self) -> f64 {
        self.done as f64 / self.started.elapsed().as_secs_f64().max(1e-3)
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
