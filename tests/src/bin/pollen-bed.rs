//! `pollen-bed`: run one scenario both ways, `pollen-sim` and the multi-site test bed
//! (real `pollen run` processes in network namespaces, see `pollen_tests::bed`), and print
//! the two side by side.
//!
//! ```text
//! pollen-bed compare SCENARIO.toml [--seed N]      (root: it builds network namespaces)
//! ```
//!
//! The scenario is a `pollen-sim` file. The bed takes its sites (`count`, `nodes`, WAN
//! latency and rates, node rates, `loss` as packet loss on each site's WAN link), the
//! publisher (its site and `upload`) and the first release (size, chunk size); anything
//! else it cannot reproduce (churn, outages, partitions, adversaries, more releases,
//! stages) is refused with the field's name. Its `[peers]` are replaced by the node's own
//! rule (every site peer, WAN peers up to `target_peers` in all; `PeerSpec::target_peers`),
//! since the bed's nodes run their defaults. What the two do not model alike is printed
//! under the table. Per site it prints the time to 50, 90 and 100% of the site's nodes
//! (from the publish) and the bytes into the site over its WAN link, each as simulator /
//! bed and their ratio.

use anyhow::{Context, Result, bail};
use pollen_sim::scenario::Scenario;
use pollen_tests::bed::{self, Bed, Site, Watch};
use pollen_tests::mesh::{Node, Operator, test_bytes};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

fn main() {
    if let Err(e) = run() {
        eprintln!("pollen-bed: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(cmd), Some(path)) = (args.next(), args.next()) else {
        bail!("usage: pollen-bed compare SCENARIO.toml [--seed N]");
    };
    if cmd != "compare" {
        bail!("unknown command {cmd}; usage: pollen-bed compare SCENARIO.toml [--seed N]");
    }
    let mut seed = None;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--seed" => seed = Some(args.next().context("--seed N")?.parse()?),
            other => bail!("unknown argument {other}"),
        }
    }
    let mut sc = Scenario::load(&PathBuf::from(&path))?;
    let seed = seed.unwrap_or(sc.seed);
    check_supported(&sc)?;
    // The bed's nodes run `pollen run`'s defaults: every site peer mDNS finds, and WAN
    // peers from the bootstrap and Kademlia up to `target_peers` in all. The simulator
    // gets the same rule, whatever the file says (its own defaults bound a large run's
    // cost: 6 LAN and 2 WAN peers, which made it 40% fast on 3 sites of 6).
    let node = pollen_node::config::NodeConfig::default();
    sc.peers.lan_degree = node.max_connections as usize;
    sc.peers.target_peers = Some(node.target_peers);
    eprintln!(
        "peers as `pollen run` picks them, in both: every site peer, WAN peers up to {} in all",
        node.target_peers
    );
    let sites = bed_sites(&sc);
    let total: usize = sites.iter().map(|s| s.nodes).sum();
    if total > 60 {
        bail!("{total} nodes: the bed runs at most 60 processes on this machine");
    }
    let release = &sc.releases[0];
    let size = release.size.0;
    eprintln!(
        "{}: {} sites, {total} nodes, {} MiB; the simulator first",
        sc.name,
        sites.len(),
        size >> 20
    );
    let sim = simulate(&sc, seed);
    eprintln!("now the bed");
    let real = on_the_bed(&sc, sites.clone(), seed)?;
    print_table(&sc, &sites, &sim, &real);
    Ok(())
}

/// Refuse what the bed cannot reproduce.
fn check_supported(sc: &Scenario) -> Result<()> {
    let mut no = Vec::new();
    if sc.churn.is_some() {
        no.push("churn");
    }
    if sc.intermittent_sites.is_some() {
        no.push("intermittent_sites");
    }
    if !sc.outages.is_empty() {
        no.push("outages");
    }
    if !sc.partitions.is_empty() {
        no.push("partitions");
    }
    if sc.late_joiners.is_some() {
        no.push("late_joiners");
    }
    let a = &sc.adversaries;
    if a.corrupt + a.replay + a.forge + a.flood > 0.0 || a.equivocate_at.is_some() {
        no.push("adversaries");
    }
    if sc.releases.len() != 1 {
        no.push("more than one release");
    }
    if sc.releases.iter().any(|r| r.stages.len() > 1) {
        no.push("stages");
    }
    if sc.sites.iter().any(|s| s.gateways.is_some()) {
        no.push("gateways");
    }
    if !no.is_empty() {
        bail!("the bed does not reproduce: {}", no.join(", "));
    }
    Ok(())
}

/// The scenario's sites, expanded (`name-i` when `count` > 1, as the simulator names them).
fn bed_sites(sc: &Scenario) -> Vec<Site> {
    let mut out = Vec::new();
    for s in &sc.sites {
        for i in 0..s.count {
            out.push(Site {
                name: s.instance_name(i),
                nodes: s.nodes,
                wan_latency: Duration::from_micros(s.wan_latency.0),
                wan_jitter: Duration::ZERO,
                wan_loss: s.loss,
                wan_up: s.wan_up.0,
                wan_down: s.wan_down.0,
                node_up: Some(s.node_up.0),
                node_down: Some(s.node_down.0),
                nat: false,
            });
        }
    }
    out
}

/// The simulator counts payload and frame headers; the bed's counters see TCP/IP and
/// Ethernet headers too: the simulator's bytes are divided by this share of a full
/// segment (the engine gives payload the same share of each link).
const WIRE: f64 = pollen_sim::net::PAYLOAD_SHARE;

/// Per site: (t50, t90, t100 in seconds, WAN bytes in, WAN bytes out).
type Figures = BTreeMap<String, (Option<f64>, Option<f64>, Option<f64>, f64, f64)>;

fn simulate(sc: &Scenario, seed: u64) -> Figures {
    let mut sim = pollen_sim::engine::Sim::new(sc.clone(), seed, false);
    sim.run();
    let s = pollen_sim::report::summarize(&sim);
    let v = sc.releases[0].version;
    sim.site_facts()
        .iter()
        .map(|site| {
            let get = |q: &str| {
                s.figures
                    .get(&format!("sites.{}.v{v}.{q}", site.name))
                    .copied()
            };
            (
                site.name.clone(),
                (
                    get("p50"),
                    get("p90"),
                    get("p100"),
                    site.wan_in as f64 / WIRE,
                    site.wan_out as f64 / WIRE,
                ),
            )
        })
        .collect()
}

fn on_the_bed(sc: &Scenario, sites: Vec<Site>, seed: u64) -> Result<Figures> {
    let pub_site = sites
        .iter()
        .position(|s| s.name == sc.publisher.site || s.name == format!("{}-0", sc.publisher.site))
        .context("the publisher's site is not among the sites")?;
    let Some(b) = Bed::new(sites, seed) else {
        bail!("cannot create network namespaces here (root needed)");
    };
    if let Some(up) = sc.publisher.upload {
        b.shape_node_up(pub_site, 0, up.0);
    }
    // POLLEN_BED_SYSCTL=key=value,...: network sysctls for every node (to test a cause).
    for kv in std::env::var("POLLEN_BED_SYSCTL")
        .unwrap_or_default()
        .split(',')
    {
        if let Some((k, v)) = kv.split_once('=') {
            b.node_sysctl(k, v);
        }
    }
    let tmp = tempfile::tempdir()?;
    let op = Operator::new(&tmp.path().join("op"), false);
    let trust = vec!["--trust".to_string(), op.trust_file.display().to_string()];
    let nodes = b.start_nodes(tmp.path(), pub_site, &trust);
    bed::wait_meshed(&nodes, Duration::from_secs(120));
    let release = &sc.releases[0];
    let file = tmp.path().join("artifact.bin");
    std::fs::write(&file, test_bytes(release.size.0 as usize, seed))?;
    // Every node but the publisher, with its site.
    let watched: Vec<(usize, &Node)> = nodes
        .iter()
        .enumerate()
        .flat_map(|(i, ns)| {
            ns.iter()
                .enumerate()
                .filter(move |(j, _)| !(i == pub_site && *j == 0))
                .map(move |(_, n)| (i, n))
        })
        .collect();
    let before: Vec<(u64, u64)> = (0..b.sites.len()).map(|i| b.wan_bytes(i)).collect();
    let refs: Vec<&Node> = watched.iter().map(|(_, n)| *n).collect();
    let w = Watch::new(&refs, "bed.compare", release.version);
    bed::publish(
        &op,
        &nodes[pub_site][0],
        &file,
        "bed.compare",
        release.version,
        release.chunk.0,
    );
    let times = w.wait(Duration::from_micros(sc.duration.0).min(Duration::from_secs(1800)));
    // Chunks each site's nodes took from peers of other sites, against the release's
    // chunks: the payload alone (the WAN byte counts include every header and control
    // message), and how it spreads over the site's nodes.
    let chunks = release.size.0.div_ceil(release.chunk.0).max(1);
    println!(
        "bed: chunks each site's nodes took from each other site, in copies of the release's \
         {chunks} (payload only; the WAN byte counts include every header and control message)"
    );
    for (i, ns) in nodes.iter().enumerate() {
        let name = &b.sites[i].name;
        let statuses: Vec<_> = ns.iter().map(|n| n.status()).collect();
        let from_site = |src: &str| -> u64 {
            statuses
                .iter()
                .flat_map(|st| st.peers.iter())
                .filter(|p| p.site.as_deref() == Some(src))
                .map(|p| p.chunks_from)
                .sum()
        };
        let per_src: Vec<String> = b
            .sites
            .iter()
            .filter(|s| &s.name != name)
            .map(|s| {
                format!(
                    "from {} {:.3}",
                    s.name,
                    from_site(&s.name) as f64 / chunks as f64
                )
            })
            .collect();
        let per_node: Vec<u64> = statuses
            .iter()
            .map(|st| {
                st.peers
                    .iter()
                    .filter(|p| p.site.as_ref().is_some_and(|s| s != name))
                    .map(|p| p.chunks_from)
                    .sum()
            })
            .collect();
        println!("  {name}: {}; per node {per_node:?}", per_src.join(", "));
    }
    let mut out = Figures::new();
    for (i, site) in b.sites.iter().enumerate() {
        let t: Vec<Option<Duration>> = watched
            .iter()
            .zip(&times)
            .filter(|((si, _), _)| *si == i)
            .map(|(_, t)| *t)
            .collect();
        let q = |x| bed::quantile(&t, x).map(|d| d.as_secs_f64());
        out.insert(
            site.name.clone(),
            (
                q(0.5),
                q(0.9),
                q(1.0),
                (b.wan_bytes(i).0 - before[i].0) as f64,
                (b.wan_bytes(i).1 - before[i].1) as f64,
            ),
        );
    }
    Ok(out)
}

fn print_table(sc: &Scenario, sites: &[Site], sim: &Figures, real: &Figures) {
    let size = sc.releases[0].size.0 as f64;
    let secs = |x: Option<f64>| x.map_or("-".into(), |v| format!("{v:.1}"));
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "-".into(),
    };
    println!(
        "| site | t50 sim / bed (s) | ratio | t90 sim / bed | ratio | t100 sim / bed | ratio | WAN in sim / bed (artifacts) | ratio | WAN out sim / bed | ratio |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for s in sites {
        let (Some(a), Some(b)) = (sim.get(&s.name), real.get(&s.name)) else {
            continue;
        };
        println!(
            "| {} | {} / {} | {} | {} / {} | {} | {} / {} | {} | {:.3} / {:.3} | {} | {:.3} / {:.3} | {} |",
            s.name,
            secs(a.0),
            secs(b.0),
            ratio(a.0, b.0),
            secs(a.1),
            secs(b.1),
            ratio(a.1, b.1),
            secs(a.2),
            secs(b.2),
            ratio(a.2, b.2),
            a.3 / size,
            b.3 / size,
            ratio(Some(a.3), Some(b.3)),
            a.4 / size,
            b.4 / size,
            ratio(Some(a.4), Some(b.4)),
        );
    }
    println!(
        "\nNot modelled alike: the simulator's `loss` loses control messages (retransmitted after \
         200 ms), the bed's loses packets on the WAN link; real nodes peer with what they \
         find first (the publisher is every node's bootstrap), the simulator with random \
         peers by the same counts; `lan_latency` is not applied on the bed's bridges; \
         the simulator's WAN bytes are its payload and frame bytes with full segments' \
         TCP/IP and Ethernet headers added, the bed's count every header (acknowledgements \
         and partial segments too)."
    );
}
