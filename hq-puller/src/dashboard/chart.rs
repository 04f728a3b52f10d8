//! Inline SVG charts rendered on the server (no JavaScript, nothing fetched by the
//! browser). Inputs are (time, value) points; the x axis is the time window.

use chrono::{DateTime, Utc};
use std::fmt::Write;

/// A point of a series.
pub type Point = (DateTime<Utc>, f64);

/// Rounds a maximum up to 1, 2 or 5 times a power of ten (at least 1).
pub fn nice_max(v: f64) -> f64 {
    if !(v.is_finite() && v > 1.0) {
        return 1.0;
    }
    let p = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * p)
        .find(|c| *c >= v)
        .unwrap_or(10.0 * p)
}

/// Per bucket of the window, the maximum value of any point in it (`None`: no point).
pub fn bucket_max(
    points: &[Point],
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    buckets: usize,
) -> Vec<Option<f64>> {
    let mut out = vec![None; buckets];
    let span = (to - from).num_milliseconds().max(1) as f64;
    for (t, v) in points {
        if *t < from || *t > to || !v.is_finite() {
            continue;
        }
        let i = (((*t - from).num_milliseconds() as f64 / span) * buckets as f64) as usize;
        let slot = &mut out[i.min(buckets - 1)];
        *slot = Some(slot.map_or(*v, |m: f64| m.max(*v)));
    }
    out
}

fn polyline(values: &[Option<f64>], x0: f64, w: f64, y0: f64, h: f64, max: f64) -> String {
    let n = values.len().max(2) - 1;
    let mut pts = String::new();
    for (i, v) in values.iter().enumerate() {
        if let Some(v) = v {
            let x = x0 + w * i as f64 / n as f64;
            let y = y0 + h - h * (v / max).clamp(0.0, 1.0);
            let _ = write!(pts, "{x:.1},{y:.1} ");
        }
    }
    pts.trim_end().to_string()
}

/// The main chart: the largest lag of any location over the window, in seconds.
pub fn lag_chart(points: &[Point], from: DateTime<Utc>, to: DateTime<Utc>) -> String {
    let (w, h, left, top, bottom) = (900.0, 220.0, 60.0, 10.0, 30.0);
    let plot_w = w - left - 10.0;
    let plot_h = h - top - bottom;
    let values = bucket_max(points, from, to, 180);
    let max = nice_max(values.iter().flatten().fold(0.0, |a, b| a.max(*b)));
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" class="chart" id="lag-chart" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" aria-label="largest replication lag over time">"#
    );
    s.push_str(r##"<rect width="100%" height="100%" fill="#ffffff"/>"##);
    for i in 0..=4 {
        let y = top + plot_h * f64::from(i) / 4.0;
        let label = max * f64::from(4 - i) / 4.0;
        let label = if max < 10.0 {
            format!("{label:.2}")
        } else {
            format!("{label:.0}")
        };
        let _ = write!(
            s,
            r##"<line x1="{left}" y1="{y:.1}" x2="{x2}" y2="{y:.1}" stroke="#dddddd"/><text x="{tx}" y="{ty:.1}" font-size="11" text-anchor="end" fill="#555555">{label} s</text>"##,
            x2 = left + plot_w,
            tx = left - 6.0,
            ty = y + 4.0,
        );
    }
    for i in 0..=6 {
        let x = left + plot_w * f64::from(i) / 6.0;
        let t = from + (to - from) * i / 6;
        let anchor = match i {
            0 => "start",
            6 => "end",
            _ => "middle",
        };
        let _ = write!(
            s,
            r##"<text x="{x:.1}" y="{y}" font-size="11" text-anchor="{anchor}" fill="#555555">{}</text>"##,
            t.format("%H:%M"),
            y = h - 10.0,
        );
    }
    let pts = polyline(&values, left, plot_w, top, plot_h, max);
    if pts.is_empty() {
        let _ = write!(
            s,
            r##"<text x="{x}" y="{y}" font-size="14" text-anchor="middle" fill="#888888">no runs in this window yet</text>"##,
            x = left + plot_w / 2.0,
            y = top + plot_h / 2.0,
        );
    } else {
        let _ = write!(
            s,
            r##"<polyline fill="none" stroke="#1f6feb" stroke-width="2" points="{pts}"/>"##
        );
        // Dots only where they stay readable (few points, e.g. right after installing).
        let dots = pts.split(' ').count() <= 40;
        for p in pts.split(' ').filter(|_| dots) {
            if let Some((x, y)) = p.split_once(',') {
                let _ = write!(s, r##"<circle cx="{x}" cy="{y}" r="2.5" fill="#1f6feb"/>"##);
            }
        }
    }
    s.push_str("</svg>");
    s
}

/// A small per-location chart of its lag over the window.
pub fn sparkline(points: &[Point], from: DateTime<Utc>, to: DateTime<Utc>) -> String {
    let (w, h) = (160.0, 28.0);
    let values = bucket_max(points, from, to, 60);
    let max = nice_max(values.iter().flatten().fold(0.0, |a, b| a.max(*b)));
    let pts = polyline(&values, 1.0, w - 2.0, 2.0, h - 4.0, max);
    format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" class="spark" width="{w}" height="{h}" viewBox="0 0 {w} {h}"><rect width="100%" height="100%" fill="#f6f8fa"/><polyline fill="none" stroke="#1f6feb" stroke-width="1.5" points="{pts}"/><title>max {max:.0} s</title></svg>"##
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_maxima() {
        assert_eq!(nice_max(0.0), 1.0);
        assert_eq!(nice_max(f64::NAN), 1.0);
        assert_eq!(nice_max(3.0), 5.0);
        assert_eq!(nice_max(17.0), 20.0);
        assert_eq!(nice_max(500.0), 500.0);
        assert_eq!(nice_max(501.0), 1000.0);
    }

    #[test]
    fn buckets_keep_the_maximum_and_ignore_outside_points() {
        let from = DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let to = from + chrono::Duration::seconds(100);
        let p = |s: i64, v: f64| (from + chrono::Duration::seconds(s), v);
        let b = bucket_max(
            &[
                p(1, 3.0),
                p(5, 7.0),
                p(55, 1.0),
                p(100, 2.0),
                p(-1, 99.0),
                p(101, 99.0),
            ],
            from,
            to,
            10,
        );
        assert_eq!(b[0], Some(7.0));
        assert_eq!(b[5], Some(1.0));
        assert_eq!(b[9], Some(2.0));
        assert_eq!(b.iter().flatten().count(), 3);
    }

    #[test]
    fn chart_is_svg_with_a_line_or_a_note() {
        let to = Utc::now();
        let from = to - chrono::Duration::hours(1);
        let empty = lag_chart(&[], from, to);
        assert!(empty.starts_with("<svg") && empty.ends_with("</svg>"));
        assert!(empty.contains("no runs"));
        let one = lag_chart(&[(to - chrono::Duration::minutes(30), 12.0)], from, to);
        assert!(one.contains("<polyline") && one.contains("20 s"), "{one}");
    }
}
