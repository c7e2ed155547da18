//! `pollen-sim`: a discrete-event simulator that drives the pollen protocol core (the same
//! `Mesh` state machine every node runs, built with the same features) over simulated
//! sites, links, churn and adversaries.
//!
//! ```text
//! pollen-sim run SCENARIO.toml [--seed N | --seeds A..B] [--out DIR] [--quiet]
//! pollen-sim compare A/summary.json B/summary.json
//! ```
//!
//! This file is the command line only; the engine and the report are the library
//! (`src/lib.rs`), which the tests in `tests/` drive directly.

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use pollen_sim::{engine, report, scenario};
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
        report::write_summary(&dir, &summary)?;
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
        report::write_perf(&dir, &p)?;
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
        report::write_summary(&out, &agg)?;
        report::write_perf(&out, &perf)?;
        agg
    } else {
        summaries.remove(0)
    };
    print!("{}", report::table(&summary));
    std::io::Write::flush(&mut std::io::stdout())?;
    eprintln!("wrote {}", out.display());
    Ok(())
}
