//! The scripted world events (outages, partitions, intermittent WAN links, late joiners,
//! gateways, the equivocation) run deterministically. The reference scenarios CI compares
//! byte for byte use few of them, so this keeps a refactor of the engine honest there too.

mod common;

use common::scenario;
use pollen_sim::scenario::{LateJoin, OnOff, Outage, Scenario};
use pollen_sim::units::Dur;
use pollen_sim::{engine, report};

const MIN: u64 = 60 * 1_000_000;

/// ci-small with every kind of scripted world event on top.
fn eventful() -> Scenario {
    let mut sc = scenario("ci-small.toml");
    sc.sites[1].count = 3;
    sc.sites[1].nodes = 10;
    sc.sites[1].gateways = Some(2);
    sc.intermittent_sites = Some(OnOff {
        fraction: 0.5,
        mean_up: Dur(4 * MIN),
        mean_down: Dur(MIN),
    });
    sc.outages.push(Outage {
        sites: vec![],
        fraction: 0.5,
        from: Dur(2 * MIN),
        until: Dur(5 * MIN),
    });
    sc.partitions.push(Outage {
        sites: vec!["edge-2".into()],
        fraction: 0.0,
        from: Dur(3 * MIN),
        until: Dur(6 * MIN),
    });
    sc.late_joiners = Some(LateJoin {
        fraction: 0.1,
        at: Dur(8 * MIN),
    });
    sc.adversaries.equivocate_at = Some(Dur(7 * MIN));
    sc
}

/// The same seed gives the same summary (and trace) with every world event scripted.
#[test]
fn world_events_are_deterministic() {
    let run = |seed| {
        let mut sim = engine::Sim::new(eventful(), seed, false);
        sim.run();
        report::summarize(&sim)
    };
    let a = run(9);
    let b = run(9);
    assert_eq!(
        serde_json::to_string(&a).unwrap(),
        serde_json::to_string(&b).unwrap()
    );
    assert!(a.figures["equivocations_seen"] > 0.0, "{:?}", a.figures);
    assert_eq!(a.nodes, 50);
}
