//! `pollen-sim`: a discrete-event simulator that drives the pollen protocol core (the same
//! `Mesh` state machine every node runs, built with the same features) over simulated
//! sites, links, churn and adversaries.
//!
//! ```text
//! pollen-sim run SCENARIO.toml [--seed N | --seeds A..B] [--out DIR] [--quiet]
//! pollen-sim compare A/summary.json B/summary.json
//! ```

mod engine;
mod net;
mod report;
mod scenario;
mod units;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};

#[derive(Parser, Debug)]
#[command(
    name = "pollen-sim",
    version,
    about = "Simulate a Pollen mesh on virtual time"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run a scenario: a summary table on stdout; summary.json, timeseries.csv,
    /// coverage.svg, bytes.svg and perf.json in --out.
    Run {
        /// Scenario file (TOML; see scenarios/).
        scenario: PathBuf,
        /// Master seed (default: the scenario's).
        #[arg(long, conflicts_with = "seeds")]
        seed: Option<u64>,
        /// Several seeds, A..B inclusive: mean / min / max per figure.
        #[arg(long, value_name = "A..B")]
        seeds: Option<String>,
        /// Output directory (default: sim-out/<scenario name>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
        /// Multiply every site's node count by this (0 measures the engine's baseline
        /// memory: the run then has the publisher site's first node and one more).
        #[arg(long, hide = true)]
        scale: Option<f64>,
    },
    /// Compare two summary.json files figure by figure.
    Compare {
        /// Baseline.
        a: PathBuf,
        /// Candidate.
        b: PathBuf,
    },
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Run {
            scenario,
            seed,
            seeds,
            out,
            quiet,
            scale,
        } => run(&scenario, seed, seeds.as_deref(), out, quiet, scale),
        Cmd::Compare { a, b } => {
            print!("{}", report::compare(&a, &b)?);
            Ok(())
        }
    }
}

fn parse_seeds(s: &str) -> Result<Vec<u64>> {
    let (a, b) = s
        .split_once("..")
        .context("--seeds takes A..B (inclusive), e.g. 1..8")?;
    let (a, b): (u64, u64) = (
        a.trim().parse().context("--seeds: A")?,
        b.trim()
            .trim_start_matches('=')
            .parse()
            .context("--seeds: B")?,
    );
    if b < a || b - a >= 1000 {
        bail!("--seeds A..B needs A <= B and at most 1000 seeds");
    }
    Ok((a..=b).collect())
}

/// A `/proc/self/status` figure in KiB (`VmHWM:` peak resident set, `VmRSS:` now);
/// 0 where there is no such file.
fn proc_kib(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn run(
    path: &Path,
    seed: Option<u64>,
    seeds: Option<&str>,
    out: Option<PathBuf>,
    quiet: bool,
    scale: Option<f64>,
) -> Result<()> {
    let mut sc = scenario::Scenario::load(path)?;
    if let Some(k) = scale {
        for s in &mut sc.sites {
            s.nodes = ((s.nodes as f64) * k).round().max(1.0) as usize;
            if k == 0.0 {
                s.count = 1;
            }
        }
        if k == 0.0 {
            sc.sites.truncate(1);
            sc.sites[0].nodes = 2;
        }
    }
    let seeds = match (seed, seeds) {
        (_, Some(s)) => parse_seeds(s)?,
        (Some(s), None) => vec![s],
        (None, None) => vec![sc.seed],
    };
    let out = out.unwrap_or_else(|| PathBuf::from("sim-out").join(&sc.name));
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let progress = !quiet && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut summaries = Vec::new();
    let mut perf = Vec::new();
    for &s in &seeds {
        let dir = if seeds.len() > 1 {
            out.join(format!("seed-{s}"))
        } else {
            out.clone()
        };
        std::fs::create_dir_all(&dir)?;
        let rss_before = proc_kib("VmRSS:");
        let started = std::time::Instant::now();
        let mut sim = engine::Sim::new(sc.clone(), s, progress);
        let built = started.elapsed().as_secs_f64();
        sim.run();
        let wall = started.elapsed().as_secs_f64();
        let summary = report::summarize(&sim);
        report::write_series(&sim, &dir)?;
        std::fs::write(
            dir.join("summary.json"),
            serde_json::to_string_pretty(&summary)? + "\n",
        )?;
        let peak = proc_kib("VmHWM:");
        let p = serde_json::json!({
            "seed": s,
            "nodes": sim.node_count(),
            "wall_s": wall,
            "build_s": built,
            "virtual_s": sim.now as f64 / 1e6,
            "events": sim.stats.events,
            "events_per_s": sim.stats.events as f64 / wall.max(1e-9),
            "peak_rss_kib": peak,
            "rss_before_build_kib": rss_before,
            "kib_per_node_over_start": (peak.saturating_sub(rss_before)) as f64 / sim.node_count() as f64,
            "peak_flows": sim.stats.peak_flows,
        });
        std::fs::write(
            dir.join("perf.json"),
            serde_json::to_string_pretty(&p)? + "\n",
        )?;
        perf.push(p);
        if seeds.len() > 1 {
            eprintln!(
                "seed {s}: {:.1} s wall, {} events, trace {}",
                wall, sim.stats.events, summary.trace_hash
            );
        }
        summaries.push(summary);
    }
    let summary = if summaries.len() > 1 {
        let agg = report::aggregate(&summaries);
        std::fs::write(
            out.join("summary.json"),
            serde_json::to_string_pretty(&agg)? + "\n",
        )?;
        std::fs::write(
            out.join("perf.json"),
            serde_json::to_string_pretty(&perf)? + "\n",
        )?;
        agg
    } else {
        summaries.remove(0)
    };
    print!("{}", report::table(&summary));
    std::io::Write::flush(&mut std::io::stdout())?;
    eprintln!("wrote {}", out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scenario(name: &str) -> scenario::Scenario {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../scenarios")
            .join(name);
        scenario::Scenario::load(&path).expect("scenario loads")
    }

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

    /// Scenario mistakes are errors that name the problem, not silent defaults.
    #[test]
    fn bad_scenarios_are_refused_clearly() {
        let base = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios/ci-small.toml"),
        )
        .unwrap();
        let check = |text: String, want: &str| {
            let dir = tempfile_dir();
            let p = dir.join("s.toml");
            std::fs::write(&p, text).unwrap();
            let e = format!("{:#}", scenario::Scenario::load(&p).unwrap_err());
            assert!(e.contains(want), "{want:?} not in {e:?}");
        };
        check(
            base.replace("name = \"ci-small\"", "name = \"x\"\nnodez = 3"),
            "nodez",
        );
        check(base.replace("\"100Mbit\"", "\"100 furlongs\""), "furlongs");
        check(
            base.replace("version = 2", "version = 1"),
            "strictly increase",
        );
        check(base.replace("\"256KiB\"", "\"1000B\""), "chunk");
        check(
            base.replace("corrupt = 0.05", "corrupt = 0.9"),
            "adversary shares",
        );
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("pollen-sim-test-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

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
}
