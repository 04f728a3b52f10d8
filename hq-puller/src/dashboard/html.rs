//! The dashboard page: one self-contained HTML document (inline CSS and SVG, no
//! JavaScript, nothing loaded from elsewhere). Every text from the database or the
//! configuration goes through [`esc`].

use super::chart;
use super::data::{LocationView, Snapshot};
use chrono::{DateTime, Utc};
use std::collections::HashMap;
use std::fmt::Write;

/// Escapes text for HTML element content and quoted attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn ago(t: Option<DateTime<Utc>>, now: DateTime<Utc>) -> String {
    let Some(t) = t else {
        return "never".into();
    };
    let s = (now - t).num_seconds().max(0);
    let rel = match s {
        0..=119 => format!("{s} s ago"),
        120..=7199 => format!("{} min ago", s / 60),
        _ => format!("{} h ago", s / 3600),
    };
    format!(
        r#"<time datetime="{}" title="{}">{rel}</time>"#,
        t.to_rfc3339(),
        t.format("%Y-%m-%d %H:%M:%S UTC")
    )
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        s.chars().take(n).collect::<String>() + "…"
    }
}

const STYLE: &str = "body{font-family:sans-serif;margin:16px;color:#1f2328;background:#fff}\
h1{font-size:20px;margin:0 0 8px}h2{font-size:16px;margin:16px 0 6px}\
.summary span{display:inline-block;margin-right:12px;padding:2px 8px;border-radius:10px;background:#eef}\
table{border-collapse:collapse;font-size:12px;width:100%}\
th,td{border-bottom:1px solid #ddd;padding:3px 6px;text-align:left;vertical-align:middle}\
th{background:#f6f8fa}td.num{text-align:right}\
.state{padding:1px 6px;border-radius:8px;color:#fff;font-weight:bold}\
.state-ok{background:#1a7f37}.state-failing{background:#bf8700}.state-paused{background:#cf222e}\
.state-needs_resync{background:#8250df}.stalled{color:#cf222e;font-weight:bold}\
.err{color:#cf222e;max-width:360px;overflow-wrap:anywhere}\
.run{display:inline-block;width:10px;height:10px;margin-right:2px;border-radius:2px;background:#999}\
.run-ok{background:#1a7f37}.run-failed{background:#bf8700}.run-paused{background:#cf222e}\
.run-needs_resync{background:#8250df}.run-running{background:#1f6feb}.run-interrupted{background:#999}";

/// Renders the page.
pub fn page(snap: &Snapshot) -> String {
    let now = snap.generated_at;
    let from = now - chrono::Duration::hours(i64::from(snap.window_hours));
    let mut per_location: HashMap<&str, Vec<chart::Point>> = HashMap::new();
    let mut all = Vec::with_capacity(snap.samples.len());
    for s in &snap.samples {
        per_location
            .entry(s.location_id.as_str())
            .or_default()
            .push((s.at, s.lag_seconds));
        all.push((s.at, s.lag_seconds));
    }
    let mut counts: Vec<(&str, usize)> = crate::store::state::ALL
        .iter()
        .map(|st| {
            let n = snap
                .locations
                .iter()
                .filter(|l| l.status.row.state == *st)
                .count();
            (*st, n)
        })
        .collect();
    counts.retain(|(_, n)| *n > 0);
    let mut h = String::with_capacity(64 * 1024);
    let _ = write!(
        h,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"30\">\
         <title>hq-puller: {n} locations</title><style>{STYLE}</style></head><body>\
         <h1>Branch replication: {n} locations</h1>\
         <p>Generated {gen}. Read-only; refreshes every 30 s. JSON: <a href=\"/api/status\">/api/status</a>.</p>\
         <p class=\"summary\" id=\"summary\">",
        n = snap.locations.len(),
        gen = esc(&now.format("%Y-%m-%d %H:%M:%S UTC").to_string()),
    );
    for (st, n) in counts {
        let _ = write!(h, "<span class=\"state-count\">{}: {n}</span>", esc(st));
    }
    let _ = write!(
        h,
        "</p><h2>Largest lag of any location, last {} h</h2>{}",
        snap.window_hours,
        chart::lag_chart(&all, from, now)
    );
    h.push_str(
        "<h2>Locations</h2><table id=\"locations\"><thead><tr><th>location</th><th>name</th>\
         <th>state</th><th>mode</th><th>lag s</th><th>backlog</th><th>last success</th>\
         <th>last error</th><th>recent runs</th><th>lag history</th></tr></thead><tbody>",
    );
    for l in &snap.locations {
        row(
            &mut h,
            l,
            per_location.get(l.status.row.id.as_str()),
            from,
            now,
        );
    }
    h.push_str("</tbody></table></body></html>\n");
    h
}

fn row(
    h: &mut String,
    l: &LocationView,
    samples: Option<&Vec<chart::Point>>,
    from: DateTime<Utc>,
    now: DateTime<Utc>,
) {
    let r = &l.status.row;
    let stalled = if l.status.job_stalled {
        " <span class=\"stalled\" title=\"the job has not fired for two periods\">not firing</span>"
    } else {
        ""
    };
    let error = r.paused_reason.as_deref().or(r.last_error.as_deref());
    let error_html = match error {
        Some(e) => format!(
            "<span class=\"err\" title=\"{}\">{}</span> {}",
            esc(e),
            esc(&truncate(e, 160)),
            if r.paused_reason.is_some() {
                String::new()
            } else {
                ago(r.last_error_at, now)
            }
        ),
        None => String::new(),
    };
    let mut runs = String::new();
    for run in &l.recent_runs {
        let title = format!(
            "run {} {} at {}: {} changes in {} batches{}",
            run.run_id,
            run.outcome,
            run.started_at.format("%Y-%m-%d %H:%M:%S UTC"),
            run.changes,
            run.batches,
            run.error
                .as_deref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        );
        let _ = write!(
            runs,
            "<span class=\"run run-{}\" title=\"{}\"></span>",
            esc(&run.outcome),
            esc(&title)
        );
    }
    let _ = write!(
        h,
        "<tr class=\"location\" data-location=\"{id}\" data-state=\"{state}\">\
         <td>{id}</td><td>{name}</td>\
         <td><span class=\"state state-{state}\">{state}</span>{stalled}</td><td>{mode}</td>\
         <td class=\"num\">{lag:.1}</td><td class=\"num\">{backlog}</td><td>{success}</td>\
         <td>{error_html}</td><td>{runs}</td><td>{spark}</td></tr>",
        id = esc(&r.id),
        name = esc(&r.name),
        state = esc(&r.state),
        mode = esc(&l.status.mode),
        lag = r.lag_seconds,
        backlog = r.backlog,
        success = ago(r.last_success_at, now),
        spark = chart::sparkline(samples.map(Vec::as_slice).unwrap_or(&[]), from, now),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::LocationStatus;
    use crate::store::StatusRow;

    fn location(id: &str, name: &str, error: Option<&str>) -> LocationView {
        LocationView {
            status: LocationStatus {
                row: StatusRow {
                    id: id.into(),
                    name: name.into(),
                    state: "paused".into(),
                    paused_reason: error.map(String::from),
                    cursor: None,
                    instance_id: None,
                    backlog: 3,
                    lag_seconds: 1.5,
                    applied_changes: 0,
                    last_fired_at: None,
                    last_success_at: None,
                    last_error: error.map(String::from),
                    last_error_at: None,
                    last_run_id: None,
                    last_run_started_at: None,
                    last_run_finished_at: None,
                    last_run_outcome: None,
                    last_run_batches: None,
                    last_run_changes: None,
                    last_run_error: None,
                },
                mode: "schedule".into(),
                schedule: None,
                job_stalled: true,
            },
            recent_runs: vec![],
        }
    }

    #[test]
    fn escapes_names_and_errors() {
        assert_eq!(
            esc(r#"<a href="x">&'"#),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
        let snap = Snapshot {
            generated_at: Utc::now(),
            locations: vec![location(
                "b01",
                "<script>alert(1)</script>",
                Some("bad \"value\" <b>"),
            )],
            samples: vec![],
            window_hours: 6,
        };
        let p = page(&snap);
        assert!(!p.contains("<script>"), "{p}");
        assert!(!p.contains("<b>"), "{p}");
        assert!(p.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(p.contains("bad &quot;value&quot; &lt;b&gt;"));
        assert!(p.contains("data-location=\"b01\""));
        assert!(p.contains("not firing"));
        assert!(p.contains("paused: 1"));
    }
}
