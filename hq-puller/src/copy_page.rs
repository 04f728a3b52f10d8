//! A snapshot page in `COPY` text (a PostgreSQL branch's `format=copy` page) copied
//! straight into its target table, without the temporary table and `INSERT ... SELECT`
//! of [`schemas::sql::hq::create_load_page`], when that gives the same rows:
//!
//! - no blob column (the page carries blobs as hex, the target's `bytea` reads `\x`);
//! - every numeric field is a plain decimal that fits the column's `numeric(p,s)`
//!   exactly (no non-zero digit beyond the scale, at most `p - s` integer digits): the
//!   test of `sync.fit_numeric`, so a value is never rounded by the column;
//! - each line has one field per named column.
//!
//! Each line gets the location id in front and `_seq` 0, `_deleted` false behind;
//! `_applied_at` takes its default `now()`. Any other page (or one that meets a key
//! already present) goes through the temporary table and the upsert's checks.

use schemas::catalogue::{ColumnType, Table};
use schemas::sql::q;
use schemas::wire::CopyRows;

/// `COPY target (location_id, columns..., _seq, _deleted) FROM STDIN`.
pub fn statement(target: &str, columns: &[String]) -> String {
    let cols: Vec<String> = columns.iter().map(|c| q(c)).collect();
    format!(
        "COPY {target} (location_id, {}, _seq, _deleted) FROM STDIN",
        cols.join(", ")
    )
}

/// The page's lines for [`statement`], or `None` when the page must go through the
/// temporary table (see the module documentation).
pub fn direct_text(table: &Table, copy: &CopyRows, location: &str) -> Option<Vec<u8>> {
    let mut numeric: Vec<Option<(u8, u8)>> = Vec::with_capacity(copy.columns.len());
    for name in &copy.columns {
        match table.column(name)?.ty {
            ColumnType::Blob => return None,
            ColumnType::Numeric { precision, scale } => numeric.push(Some((precision, scale))),
            _ => numeric.push(None),
        }
    }
    let checked = numeric.iter().rposition(Option::is_some);
    let prefix = escape(location);
    let text = copy.text.as_bytes();
    let mut out = Vec::with_capacity(text.len() + copy.rows as usize * (prefix.len() + 6));
    let mut start = 0;
    for end in memchr::memchr_iter(b'\n', text) {
        let line = &text[start..end];
        start = end + 1;
        // Fields up to the last numeric one are checked one by one; the rest only counted.
        let mut tabs = memchr::memchr_iter(b'\t', line);
        let mut consumed = 0;
        let mut field_start = 0;
        for (i, fits) in numeric
            .iter()
            .enumerate()
            .take(checked.map_or(0, |l| l + 1))
        {
            let field_end = if i + 1 < numeric.len() {
                consumed += 1;
                tabs.next()?
            } else {
                line.len()
            };
            if let Some((p, s)) = fits {
                if !numeric_fits(&line[field_start..field_end], *p, *s) {
                    return None;
                }
            }
            field_start = field_end + 1;
        }
        let fields = consumed + tabs.count() + 1;
        if fields != numeric.len() {
            return None;
        }
        out.extend_from_slice(prefix.as_bytes());
        out.push(b'\t');
        out.extend_from_slice(line);
        out.extend_from_slice(b"\t0\tf\n");
    }
    if start != text.len() {
        return None;
    }
    Some(out)
}

/// A value as a `COPY` text field.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
    out
}

/// `field` is `\N` or a plain decimal (`-?digits[.digits]`) equal to itself rounded to
/// `scale` digits and below `10^(precision - scale)` in magnitude.
fn numeric_fits(field: &[u8], precision: u8, scale: u8) -> bool {
    if field == b"\\N" {
        return true;
    }
    let body = field.strip_prefix(b"-").unwrap_or(field);
    let (int, frac, dot) = match memchr::memchr(b'.', body) {
        Some(i) => (&body[..i], &body[i + 1..], true),
        None => (body, &body[..0], false),
    };
    if int.is_empty()
        || !int.iter().all(u8::is_ascii_digit)
        || !frac.iter().all(u8::is_ascii_digit)
        || (dot && frac.is_empty())
    {
        return false;
    }
    let int_digits = int.len() - int.iter().take_while(|&&b| b == b'0').count();
    let frac_digits = frac.len() - frac.iter().rev().take_while(|&&b| b == b'0').count();
    int_digits <= usize::from(precision.saturating_sub(scale)) && frac_digits <= usize::from(scale)
}

#[cfg(test)]
mod tests {
    use super::*;
    use schemas::Catalogue;

    fn page(columns: &[&str], text: &str) -> CopyRows {
        CopyRows {
            columns: columns.iter().map(|c| c.to_string()).collect(),
            rows: text.lines().count() as u64,
            text: text.into(),
        }
    }

    #[test]
    fn numerics_fit_exactly_or_go_the_checked_way() {
        for (v, fits) in [
            ("\\N", true),
            ("19.90", true),
            ("-9999999999.99", true),
            ("0009999999999.990", true),
            ("0", true),
            ("10000000000", false),
            ("1.505", false),
            ("1e5", false),
            ("NaN", false),
            ("", false),
            ("1.", false),
            (".5", false),
            ("--1", false),
            ("+1", false),
        ] {
            assert_eq!(numeric_fits(v.as_bytes(), 12, 2), fits, "{v}");
        }
        assert!(numeric_fits(b"0.99", 2, 2) && !numeric_fits(b"1.00", 2, 2));
    }

    #[test]
    fn lines_get_the_location_and_bookkeeping() {
        let cat = Catalogue::product_management();
        let t = cat.table("products").unwrap();
        let p = page(
            &["product_id", "sku", "unit_price"],
            "1\ta\\tb\t19.90\n2\t\\N\t\\N\n",
        );
        assert_eq!(
            direct_text(t, &p, "b\\01").unwrap(),
            b"b\\\\01\t1\ta\\tb\t19.90\t0\tf\nb\\\\01\t2\t\\N\t\\N\t0\tf\n"
        );
        assert_eq!(
            statement("hq.\"products\"", &p.columns),
            "COPY hq.\"products\" (location_id, \"product_id\", \"sku\", \"unit_price\", _seq, _deleted) FROM STDIN"
        );
        // Not fitting, a field too many or too few: the checked way.
        assert!(direct_text(t, &page(&["product_id", "unit_price"], "1\t1.505\n"), "b").is_none());
        assert!(direct_text(t, &page(&["product_id"], "1\t2\n"), "b").is_none());
        assert!(direct_text(t, &page(&["product_id", "sku"], "1\n"), "b").is_none());
        // A numeric before other fields: checked, the rest counted.
        let mid = ["product_id", "unit_price", "sku"];
        assert!(direct_text(t, &page(&mid, "1\t19.90\tx\n"), "b").is_some());
        assert!(direct_text(t, &page(&mid, "1\t19.90\tx\ty\n"), "b").is_none());
        assert!(direct_text(t, &page(&mid, "1\t19.90\n"), "b").is_none());
        assert!(direct_text(t, &page(&mid, "1\t19.905\tx\n"), "b").is_none());
        assert!(
            direct_text(t, &page(&mid, "1\t19.90\tx"), "b").is_none(),
            "unterminated"
        );
        let blob = Table {
            name: "x".into(),
            primary_key: vec!["k".into()],
            columns: vec![
                schemas::Column {
                    name: "k".into(),
                    ty: ColumnType::Integer,
                    nullable: false,
                },
                schemas::Column {
                    name: "b".into(),
                    ty: ColumnType::Blob,
                    nullable: true,
                },
            ],
            file_column: None,
        };
        assert!(direct_text(&blob, &page(&["k", "b"], "1\tff\n"), "b").is_none());
    }
}
