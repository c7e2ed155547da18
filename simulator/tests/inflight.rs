//! Chunk requests in flight per peer, and why the default is two.

mod common;

use common::scenario;
use pollen_sim::{engine, report, units::Bytes};

/// Time to 100% over the lower bound of a 100-node LAN fetching 32 MiB with `inflight`
/// requests per peer.
fn t100_over_bound(inflight: usize) -> f64 {
    let mut sc = scenario("lan-1000.toml");
    sc.sites[0].nodes = 100;
    sc.releases[0].size = Bytes(32 << 20);
    sc.protocol.max_inflight_per_peer = Some(inflight);
    let mut sim = engine::Sim::new(sc, 1, false);
    sim.run();
    report::summarize(&sim).figures["v1.t100_over_lower_bound"]
}

/// A sender serves each receiver one chunk at a time, so a receiver's third request to a
/// peer only waits in that peer's queue, bound to it while another holder may come free
/// first; new chunks then spread a hop slower. The node used to keep 8 in flight.
#[test]
fn two_requests_per_peer_spread_a_release_faster_than_eight() {
    let (two, eight) = (t100_over_bound(2), t100_over_bound(8));
    eprintln!("time to 100% over the bound: 2 in flight {two:.3}, 8 in flight {eight:.3}");
    assert!(
        two < eight * 0.85,
        "2 in flight: {two}, 8 in flight: {eight}"
    );
}
