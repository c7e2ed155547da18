//! `pollen-sim`: drives the pollen-protocol state machine over simulated networks.
//!
//! This first version runs the protocol core's deterministic harness (`harness`
//! subcommand): N nodes on virtual time distribute one artifact from one publisher, and it
//! prints what happened. The full scenario-driven simulator (sites, churn, attackers, TOML
//! scenarios, reports) grows from here.

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};
use core::time::Duration;
use pollen_protocol::harness::{Harness, LinkModel, Operator, manifest_body, random_file_spec};
use pollen_protocol::rollout::RolloutPlan;
use pollen_protocol::signing::Signed;
use pollen_protocol::{Config, Instant, UnixTime};

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
    /// One publisher, N nodes, one artifact: run the real protocol core on the in-memory
    /// harness and report dissemination.
    Harness {
        /// Nodes in the mesh.
        #[arg(long, default_value_t = 50)]
        nodes: usize,
        /// Random peers per node.
        #[arg(long, default_value_t = 6)]
        degree: usize,
        /// Chunks in the artifact.
        #[arg(long, default_value_t = 64)]
        chunks: usize,
        /// Chunk size in KiB (a power of two, 16 to 16384).
        #[arg(long, default_value_t = 16)]
        chunk_kib: u64,
        /// Upload bandwidth per node, MiB/s.
        #[arg(long, default_value_t = 10)]
        upload_mib: u64,
        /// Master seed: the same seed gives the same run.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Harness {
            nodes,
            degree,
            chunks,
            chunk_kib,
            upload_mib,
            seed,
        } => harness(nodes, degree, chunks, chunk_kib, upload_mib, seed),
    }
}

fn harness(
    nodes: usize,
    degree: usize,
    chunks: usize,
    chunk_kib: u64,
    upload_mib: u64,
    seed: u64,
) -> Result<()> {
    if nodes < 2 {
        bail!("need at least 2 nodes");
    }
    let t0 = UnixTime::from_secs(1_700_000_000);
    let link = LinkModel {
        upload_bytes_per_sec: upload_mib * 1024 * 1024,
        ..LinkModel::default()
    };
    let op = Operator::new(seed, 1, None);
    let mut h = Harness::new(nodes, Config::default(), link, seed, t0);
    h.install_trust(&op.trust);
    h.connect_random(degree);
    let chunk = chunk_kib * 1024;
    let spec = random_file_spec(chunks * chunk as usize, chunk, seed);
    let body = manifest_body("demo.model", 1, spec.clone(), RolloutPlan::immediate(), t0);
    let m = Signed::sign(&body, &op.signers(1));
    h.publish(0, &m, &[&spec]).map_err(anyhow::Error::msg)?;
    let step = Duration::from_millis(10);
    let limit = Instant::ZERO + Duration::from_secs(3600);
    let mut coverage = Vec::new();
    let mut last = 0;
    while h.now() < limit {
        h.run_for(step);
        let done = (0..nodes).filter(|&i| h.has_file(i, &spec)).count();
        if done != last {
            if std::env::var_os("SIM_DEBUG").is_some() {
                eprintln!("{:?} {done}", h.now());
            }
            coverage.push((h.now(), done));
            last = done;
        }
        if done == nodes {
            break;
        }
    }
    let s = &h.stats;
    let size = spec.size as f64;
    let lower_bound = size / link.upload_bytes_per_sec as f64;
    println!(
        "pollen-sim harness: {nodes} nodes, degree {degree}, {chunks} x {chunk_kib} KiB, seed {seed}"
    );
    println!("{:<44} {:>12}", "figure", "value");
    let at = |frac: f64| {
        coverage
            .iter()
            .find(|(_, d)| *d as f64 >= frac * nodes as f64)
            .map_or("never".to_string(), |(t, _)| {
                format!("{:.3} s", t.as_micros() as f64 / 1e6)
            })
    };
    for (label, f) in [
        ("time to 50% of nodes", 0.5),
        ("time to 90% of nodes", 0.9),
        ("time to 100% of nodes", 1.0),
    ] {
        println!("{label:<44} {:>12}", at(f));
    }
    println!(
        "{:<44} {:>12.3}",
        "publisher upload / artifact",
        s.uploaded[0] as f64 / size
    );
    println!(
        "{:<44} {:>12.3} s",
        "one artifact over one uplink (F/u)", lower_bound
    );
    println!("{:<44} {:>12}", "chunk transfers", s.chunk_transfers);
    println!(
        "{:<44} {:>12}",
        "duplicate transfers", s.duplicate_transfers
    );
    println!("{:<44} {:>12}", "control messages", s.messages);
    println!(
        "{:<44} {:>12}",
        "trace hash (same seed, same hash)",
        hex8(&h.trace_hash())
    );
    if last != nodes {
        bail!("only {last} of {nodes} nodes completed within an hour of virtual time");
    }
    Ok(())
}

fn hex8(b: &[u8; 32]) -> String {
    b[..8].iter().map(|x| format!("{x:02x}")).collect()
}
