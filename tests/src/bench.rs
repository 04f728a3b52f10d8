//! Figures of the benchmark binaries (`tests/src/bin/bench-*.rs`).

/// Median, minimum and maximum of repeated measurements.
pub fn median_min_max(mut v: Vec<f64>) -> (f64, f64, f64) {
    assert!(!v.is_empty(), "no measurements");
    v.sort_by(|a, b| a.total_cmp(b));
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

#[cfg(test)]
mod tests {
    #[test]
    fn median_of_three() {
        assert_eq!(super::median_min_max(vec![3.0, 1.0, 2.0]), (2.0, 1.0, 3.0));
    }
}
