//! Manifest gossip against its targets (redundancy, last delivery hop).

mod common;

use common::scenario;
use pollen_sim::{engine, report};

/// Manifest gossip over 300 nodes: once the first manifest has formed the gossip tree,
/// manifests 2..10 reach everybody with redundancy at most 0.3 and a last delivery hop
/// at most 1.5 log2 N.
#[test]
fn gossip_targets_hold_on_a_small_mesh() {
    let mut sc = scenario("gossip-1k.toml");
    sc.sites[0].nodes = 300;
    let mut sim = engine::Sim::new(sc, 5, false);
    sim.run();
    let s = report::summarize(&sim);
    let red = s.figures["gossip_2_10.redundancy_mean"];
    let hop = s.figures["gossip_2_10.last_hop_max"];
    assert!(red <= 0.3, "redundancy {red}");
    assert!(hop <= 1.5 * 300f64.log2(), "last hop {hop}");
    for v in 1..=10 {
        assert_eq!(s.figures[&format!("v{v}.gossip.reached")], 300.0, "v{v}");
    }
}
