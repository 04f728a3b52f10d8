//! `hq-puller status`: a table (or JSON) per location from `sync.locations`, its latest
//! run, and whether its cron job is firing.

use crate::config::{next_fires, Mode, Settings};
use crate::store::StatusRow;
use chrono::{DateTime, Utc};
use serde::Serialize;

/// One location as reported by `status`.
#[derive(Debug, Clone, Serialize)]
pub struct LocationStatus {
    #[serde(flatten)]
    pub row: StatusRow,
    /// `schedule`, `stream`, `disabled`, or `unconfigured` (in the database only).
    pub mode: String,
    pub schedule: Option<String>,
    /// A scheduled location whose job has not fired for two periods (or never): the
    /// service is down or its job stalled.
    pub job_stalled: bool,
}

pub fn build(rows: Vec<StatusRow>, settings: &Settings, now: DateTime<Utc>) -> Vec<LocationStatus> {
    rows.into_iter()
        .map(|row| {
            let loc = settings.location(&row.id);
            let mode = match loc {
                None => "unconfigured",
                Some(l) if !l.enabled => "disabled",
                Some(l) if l.mode == Mode::Stream => "stream",
                Some(_) => "schedule",
            };
            let job_stalled = match loc {
                Some(l) if mode == "schedule" => {
                    let period = match next_fires(&l.cron, now, 2).as_slice() {
                        [a, b] => *b - *a,
                        _ => chrono::Duration::zero(),
                    };
                    match row.last_fired_at {
                        None => true,
                        Some(t) => now - t > period * 2 + chrono::Duration::seconds(1),
                    }
                }
                _ => false,
            };
            LocationStatus {
                schedule: loc.map(|l| l.schedule.clone()),
                mode: mode.into(),
                job_stalled,
                row,
            }
        })
        .collect()
}

pub fn json(rows: &[LocationStatus]) -> String {
    serde_json::to_string_pretty(rows).expect("status rows serialize")
}

pub fn table(rows: &[LocationStatus]) -> String {
    let mut out = format!(
        "{:<12} {:<22} {:<25} {:>9} {:>8}  {:<14} {}\n",
        "LOCATION", "STATE", "LAST SUCCESS", "BACKLOG", "LAG S", "CURSOR", "LAST ERROR"
    );
    for s in rows {
        let r = &s.row;
        let success = r
            .last_success_at
            .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
            .unwrap_or_else(|| "never".into());
        let cursor = r
            .cursor
            .as_deref()
            .and_then(|c| c.split(':').nth(1).map(|t| format!("tick {t}")))
            .unwrap_or_else(|| "(start)".into());
        let state = if s.job_stalled {
            format!("{} (not firing)", r.state)
        } else {
            r.state.clone()
        };
        let err = r
            .paused_reason
            .as_deref()
            .or(r.last_error.as_deref())
            .unwrap_or("")
            .replace('\n', " ");
        out.push_str(&format!(
            "{:<12} {:<22} {:<25} {:>9} {:>8.1}  {:<14} {}\n",
            r.id, state, success, r.backlog, r.lag_seconds, cursor, err
        ));
    }
    out
}
