//! Test tooling shared by every crate's tests, the benchmarks and the quickstart.
//!
//! - [`pg`]: the throwaway PostgreSQL cluster (`tests/pg.sh`) and a fresh database per test.

pub mod pg;
