//! `hq-puller status`: a table (or JSON) per location from `sync.locations` and its
//! latest run.

use crate::store::StatusRow;

pub fn json(rows: &[StatusRow]) -> String {
    serde_json::to_string_pretty(rows).expect("status rows serialize")
}

pub fn table(rows: &[StatusRow]) -> String {
    let mut out = format!(
        "{:<12} {:<13} {:<25} {:>9} {:>8}  {:<28} {}\n",
        "LOCATION", "STATE", "LAST SUCCESS", "BACKLOG", "LAG S", "CURSOR (tick)", "LAST ERROR"
    );
    for r in rows {
        let success = r
            .last_success_at
            .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
            .unwrap_or_else(|| "never".into());
        let cursor = r
            .cursor
            .as_deref()
            .and_then(|c| c.split(':').nth(1).map(|t| format!("tick {t}")))
            .unwrap_or_else(|| "(start)".into());
        let err = r
            .paused_reason
            .as_deref()
            .or(r.last_error.as_deref())
            .unwrap_or("")
            .replace('\n', " ");
        out.push_str(&format!(
            "{:<12} {:<13} {:<25} {:>9} {:>8.1}  {:<28} {}\n",
            r.id, r.state, success, r.backlog, r.lag_seconds, cursor, err
        ));
    }
    out
}
