//! Staged rollouts: a failing canary stage holds the release back.

mod common;

use common::scenario;
use pollen_sim::{engine, report};

/// A canary that fails on weak devices: the gate fails, no node outside the canary
/// stage ever serves the release, and every honest node ends on v1.
#[test]
fn failing_canary_stays_in_its_stage() {
    let mut sc = scenario("staged-canary-fail.toml");
    sc.sites[0].count = 2;
    sc.sites[0].nodes = 60;
    // Every device weak: whichever nodes the canary stage holds, it fails.
    sc.sites[0].weak_fraction = 1.0;
    let mut sim = engine::Sim::new(sc, 2, false);
    sim.run();
    let s = report::summarize(&sim);
    assert!(
        s.figures.contains_key("v2.gate_failed_s"),
        "{:?}",
        s.figures
    );
    assert_eq!(s.figures["v2.served_outside_canary"], 0.0);
    assert!(!s.figures.contains_key("v2.stage1.t50_s"));
    assert!(s.figures["v2.failed_nodes"] >= 1.0);
}
