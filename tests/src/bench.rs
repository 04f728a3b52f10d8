//! Figures of the benchmark binaries (`tests/src/bin/bench-*.rs`), and the summary line
//! each prints for `tests/bench/run.sh`.

use serde::Serialize;

/// Median, minimum and maximum of repeated measurements.
pub fn median_min_max(mut v: Vec<f64>) -> (f64, f64, f64) {
    assert!(!v.is_empty(), "no measurements");
    v.sort_by(|a, b| a.total_cmp(b));
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

/// The `q`-quantile (0..=1, nearest rank) of samples.
pub fn quantile(v: &[f64], q: f64) -> f64 {
    assert!(!v.is_empty(), "no samples");
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let rank = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[rank - 1]
}

/// One row of the summary table of `tests/bench/run.sh`: printed as
/// `BENCH {json}` on its own line (all fields preformatted text).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Summary {
    pub figure: String,
    pub ours: String,
    pub peer: String,
    pub ratio: String,
    pub target: String,
    /// `yes`, `no` or `n/a` (no target, or a `--quick` run).
    pub met: String,
}

impl Summary {
    pub fn line(&self) -> String {
        format!(
            "BENCH {}",
            serde_json::to_string(self).expect("summary serializes")
        )
    }

    pub fn print(&self) {
        println!("{}", self.line());
    }
}

/// Drops a benchmark's database; a failure (e.g. a full disk refusing the checkpoint
/// `DROP DATABASE` asks for) is only reported: the figures are already taken.
pub async fn drop_database(url: &str) {
    if let Err(e) = crate::pg::drop_database(url).await {
        eprintln!("warning: could not drop a benchmark database: {e:#}");
    }
}

/// A peer's failure in one short line for a table cell ("n/a (reason)"): the first
/// line of the error chain, without `|`, at most 80 characters.
pub fn short_reason(e: &anyhow::Error) -> String {
    let text = format!("{e:#}");
    let line = text.lines().next().unwrap_or("").replace('|', "/");
    let mut short: String = line.chars().take(80).collect();
    if line.chars().count() > 80 {
        short.push('…');
    }
    short
}

/// `yes` / `no` for a target check.
pub fn met(ok: bool) -> String {
    if ok { "yes" } else { "no" }.to_string()
}

fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// Resident set size (VmRSS) of a running process in KiB, if readable.
pub fn rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmRSS:")
}

/// Peak resident set size (VmHWM) of a running process in KiB, if readable.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmHWM:")
}

/// CPU time (user + system) a process has used so far, in clock ticks
/// (`/proc/<pid>/stat` fields 14 and 15).
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces: fields count from after its `)`.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Clock ticks per second of `/proc/<pid>/stat` (`getconf CLK_TCK`, 100 on Linux).
pub fn clock_ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_reason_fits_a_table_cell() {
        let e = anyhow::anyhow!("bucardo start failed | exit 1\nlog tail:\nmore");
        assert_eq!(short_reason(&e), "bucardo start failed / exit 1");
        let long = anyhow::anyhow!("{}", "x".repeat(100));
        assert_eq!(short_reason(&long).chars().count(), 81);
    }

    #[test]
    fn median_of_three() {
        assert_eq!(median_min_max(vec![3.0, 1.0, 2.0]), (2.0, 1.0, 3.0));
    }

    #[test]
    fn quantiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), 50.0);
        assert_eq!(quantile(&v, 0.99), 99.0);
        assert_eq!(quantile(&v, 1.0), 100.0);
        assert_eq!(quantile(&[7.0], 0.99), 7.0);
    }

    #[test]
    fn summary_line_is_one_json_object() {
        let s = Summary {
            figure: "latency \"p50\"".into(),
            ours: "1".into(),
            peer: "2".into(),
            ratio: "0.5×".into(),
            target: "≤ 20 ms".into(),
            met: met(true),
        };
        let line = s.line();
        assert!(line.starts_with("BENCH {") && !line.contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&line["BENCH ".len()..]).unwrap();
        assert_eq!(v["figure"], "latency \"p50\"");
        assert_eq!(v["met"], "yes");
    }

    #[test]
    fn own_cpu_time_and_rss_are_readable() {
        let pid = std::process::id();
        assert!(cpu_ticks(pid).is_some());
        let rss = rss_kib(pid).unwrap();
        assert!(rss > 0);
        // The peak read after the current size: the peak only grows, so it is at least
        // that (read in the other order, other threads' allocations made this flaky).
        assert!(peak_rss_kib(pid).unwrap() >= rss);
    }
}
