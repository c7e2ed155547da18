//! `pollen-sim` as a library: the discrete-event engine that drives the pollen protocol
//! core over simulated sites, links, churn and adversaries, and the report of a run. The
//! `pollen-sim` binary (`src/main.rs`) is the command line around it; the tests in
//! `tests/` drive it directly.
//!
//! - [`scenario`] loads and checks a scenario file (its [`units`]: durations, sizes, rates);
//! - [`engine`] builds the world of a scenario and a seed and runs it on virtual time
//!   ([`net`] is its flow-level network model);
//! - [`report`] turns a finished run into figures, a table and the output files.
//!
//! The same scenario and seed give the same bytes in every output except `perf.json`.

pub mod engine;
pub mod net;
pub mod report;
pub mod scenario;
pub mod units;
