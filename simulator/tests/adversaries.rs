//! Adversaries (corrupt chunks, forged and replayed manifests, equivocation) are contained.

mod common;

use common::scenario;
use pollen_sim::{engine, report, units};

/// The attack mix: forged and replayed manifests are refused, the equivocation is
/// seen, corrupt chunks are caught, and honest online nodes still complete.
#[test]
fn attack_mix_is_contained() {
    let mut sc = scenario("attack-mix.toml");
    sc.sites[0].nodes = 30;
    sc.adversaries.corrupt = 0.1;
    sc.adversaries.forge = 0.05;
    sc.adversaries.replay = 0.05;
    sc.duration = units::Dur(20 * 60 * 1_000_000);
    let mut sim = engine::Sim::new(sc, 2, false);
    sim.run();
    let s = report::summarize(&sim);
    let f = |k: &str| s.figures.get(k).copied().unwrap_or(0.0);
    assert!(f("rejected.forged") > 0.0, "{:?}", s.figures);
    assert!(f("equivocations_seen") > 0.0);
    assert!(f("chunks.corrupt") > 0.0);
    let unfinished: u64 = s
        .never_completed
        .iter()
        .filter(|(k, _)| k.as_str() != "offline at the end")
        .map(|(_, v)| *v)
        .sum();
    assert_eq!(unfinished, 0, "{:?}", s.never_completed);
}
