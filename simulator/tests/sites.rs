//! The WAN share rule on sites without gateways.

mod common;

use common::scenario;
use pollen_sim::{engine, report, units::Bytes};

/// Sites where every node dials WAN peers and, as the node does, every peer of its site:
/// each chunk crosses a site's WAN link about once. Without the members' fetch hints the
/// members that owned no chunk lifted the rule 2 s into the release (the first WAN chunks
/// take longer on a link all owners share) and fetched it again: here 2.83 copies per site
/// (3.27 at most) and 41.4 s, against 1.13 (1.26) and 24.4 s with them.
#[test]
fn sites_without_gateways_fetch_about_one_copy() {
    let mut sc = scenario("sites-50x200.toml");
    sc.sites[0].count = 6;
    sc.sites[0].nodes = 20;
    sc.sites[0].gateways = None;
    sc.peers.lan_degree = 19;
    sc.releases[0].size = Bytes(16 << 20);
    let mut sim = engine::Sim::new(sc, 1, false);
    sim.run();
    let s = report::summarize(&sim);
    let mean = s.figures["wan_bytes_per_site_over_artifact.mean"];
    let max = s.figures["wan_bytes_per_site_over_artifact.max"];
    assert_eq!(s.figures["v1.failed_nodes"], 0.0);
    assert!(
        s.figures.contains_key("v1.complete.t100_s"),
        "{:?}",
        s.figures
    );
    assert!(
        mean <= 1.2 && max <= 1.4,
        "copies per site: mean {mean}, max {max}"
    );
}
