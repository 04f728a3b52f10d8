//! Test tooling shared by every crate's tests, the benchmarks and the quickstart.
//!
//! - [`bench`]: figures of the benchmark binaries.
//! - [`pg`]: the throwaway PostgreSQL cluster (`tests/pg.sh`) and a fresh database per test.
//! - [`db`]: one handle over SQLite and PostgreSQL branch databases.
//! - [`workload`]: the product-management workload (`pm-sim seed` / `pm-sim run`).
//! - [`compare`]: the oracle: one location at HQ against its branch database.
//! - [`process`]: spawning, waiting for, signalling and restarting real processes.
//! - [`proxy`]: a TCP fault proxy (refuse, reset, stall, truncate, throttle, flap).
//! - [`rig`]: a fault-test installation (branches behind proxies, HQ, workload).
//! - [`docs`]: the public interface derived from the code, checked against the docs.
//! - [`fleet`]: branches (database + `branch-listener`) and HQ (`hq-puller`) as test objects.
//! - [`peers`]: the peers benchmarks compare with (PostgreSQL logical replication).

pub mod bench;
pub mod compare;
pub mod db;
pub mod docs;
pub mod fleet;
pub mod peers;
pub mod pg;
pub mod process;
pub mod proxy;
pub mod rig;
pub mod workload;
