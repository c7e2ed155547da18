//! Determinism: a run is a function of its scenario and seed.

mod common;

use common::scenario;
use pollen_sim::{engine, report};

/// The same seed gives the same summary and trace; another seed a different trace.
#[test]
fn same_seed_same_bytes() {
    let run = |seed| {
        let mut sim = engine::Sim::new(scenario("ci-small.toml"), seed, false);
        sim.run();
        serde_json::to_string(&report::summarize(&sim)).unwrap()
    };
    assert_eq!(run(3), run(3));
    assert_ne!(run(3), run(4));
}
