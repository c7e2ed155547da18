//! Scenario files (TOML). Every field is documented here and in the commented examples in
//! `scenarios/`; unknown fields are errors so a typo cannot silently change a run.

use crate::units::{Bytes, Dur, Rate};
use anyhow::{Context, Result, bail};
use serde::Deserialize;
use std::path::Path;

/// A whole scenario.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Name, shown in reports.
    pub name: String,
    /// Master seed when `--seed` is not given.
    #[serde(default = "one")]
    pub seed: u64,
    /// Virtual time at which the run stops (it also stops once nothing is left to do).
    pub duration: Dur,
    /// Time-series sampling interval (default: duration / 200).
    #[serde(default)]
    pub sample_every: Option<Dur>,
    /// Sites (LANs); `count` replicates one definition.
    pub sites: Vec<SiteSpec>,
    /// How nodes pick peers.
    #[serde(default)]
    pub peers: PeerSpec,
    /// Where the operator publishes.
    pub publisher: PublisherSpec,
    /// Releases published during the run, in order.
    pub releases: Vec<ReleaseSpec>,
    /// Node churn: a share of nodes alternate between online and offline.
    #[serde(default)]
    pub churn: Option<OnOff>,
    /// Intermittent sites: a share of sites lose their WAN link on and off.
    #[serde(default)]
    pub intermittent_sites: Option<OnOff>,
    /// Scheduled site outages (every node of the site offline).
    #[serde(default)]
    pub outages: Vec<Outage>,
    /// Scheduled partitions: the listed sites are cut off from all others.
    #[serde(default)]
    pub partitions: Vec<Outage>,
    /// Late joiners: a share of nodes is offline until a given time.
    #[serde(default)]
    pub late_joiners: Option<LateJoin>,
    /// Misbehaving nodes.
    #[serde(default)]
    pub adversaries: Adversaries,
    /// Protocol settings (the core's `Config`) that researchers vary.
    #[serde(default)]
    pub protocol: ProtocolSpec,
}

fn one() -> u64 {
    1
}

/// A site (or `count` identical sites).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteSpec {
    /// Name (a suffix `-i` is added when `count` > 1).
    pub name: String,
    /// How many such sites.
    #[serde(default = "one_usize")]
    pub count: usize,
    /// Nodes per site.
    pub nodes: usize,
    /// One-way latency between two nodes of the site.
    pub lan_latency: Dur,
    /// One-way latency from the site to the WAN core (two sites: the sum of theirs).
    pub wan_latency: Dur,
    /// The site's WAN uplink and downlink (shared by every flow leaving / entering it).
    pub wan_up: Rate,
    /// WAN downlink.
    pub wan_down: Rate,
    /// Each node's upload capacity.
    pub node_up: Rate,
    /// Each node's download capacity.
    pub node_down: Rate,
    /// Probability that a control message is lost on a link of this site (it is then
    /// retransmitted after an RTO of 200 ms, as TCP would).
    #[serde(default)]
    pub loss: f64,
    /// Share of the site's nodes that are weak devices (device class "weak").
    #[serde(default)]
    pub weak_fraction: f64,
    /// Nodes of the site that reach the WAN (its first ones); the others have LAN peers
    /// only, as behind a site gateway. Default: every node dials `wan_degree` WAN peers.
    #[serde(default)]
    pub gateways: Option<usize>,
}

fn one_usize() -> usize {
    1
}

impl SiteSpec {
    /// The name of copy `c` of this site: `name-c` when `count` > 1, else `name`.
    pub fn instance_name(&self, c: usize) -> String {
        if self.count > 1 {
            format!("{}-{c}", self.name)
        } else {
            self.name.clone()
        }
    }
}

/// Peer selection: random peers on the node's own site and on others.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerSpec {
    /// Peers each node dials on its own site. The node dials every LAN peer mDNS finds, up
    /// to `max_connections` (256): the site's size, up to 256, is what it does; fewer bound
    /// the simulator's cost (every chunk a node gets is announced to each peer), and then
    /// each node's WAN share rule sees part of its site only.
    pub lan_degree: usize,
    /// Peers each node dials on other sites (Kademlia / bootstrap).
    pub wan_degree: usize,
    /// The node's own rule instead of `wan_degree`: dial distinct peers on other sites
    /// until the node has this many peers in all, its LAN peers counted, as `pollen run`
    /// does with its `target_peers` (16). A site of 6 in three sites of 6 then peers with
    /// every node; a site of 200 dials none across the WAN beyond the ring.
    #[serde(default)]
    pub target_peers: Option<usize>,
}

impl Default for PeerSpec {
    fn default() -> Self {
        PeerSpec {
            lan_degree: 6,
            wan_degree: 2,
            target_peers: None,
        }
    }
}

/// The publishing node: the first node of `site`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublisherSpec {
    /// Site name (the first of replicated sites is `name-0`).
    pub site: String,
    /// Its upload capacity (default: the site's `node_up`).
    #[serde(default)]
    pub upload: Option<Rate>,
}

/// One release.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseSpec {
    /// When the operator publishes it.
    pub at: Dur,
    /// Version (strictly increasing).
    pub version: u64,
    /// Artifact size.
    pub size: Bytes,
    /// Chunk size (a power of two, 16 KiB to 16 MiB).
    #[serde(default = "mib")]
    pub chunk: Bytes,
    /// Cumulative stage shares in percent (default: one stage of 100%).
    #[serde(default = "hundred")]
    pub stages: Vec<f64>,
    /// Time between stages.
    #[serde(default)]
    pub stage_interval: Dur,
    /// Gate on every stage but the last.
    #[serde(default)]
    pub gate: Option<GateSpec>,
    /// The golden check fails on weak devices: they report a failure at activation.
    #[serde(default)]
    pub fail_on_weak: bool,
}

fn mib() -> Bytes {
    Bytes(1 << 20)
}

fn hundred() -> Vec<f64> {
    vec![100.0]
}

/// A stage gate.
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GateSpec {
    /// Healthy reports needed before the next stage.
    pub min_healthy: u32,
    /// Largest tolerated failure share (0.1 = 10%).
    pub max_failure: f64,
}

/// An on/off process: the chosen share alternates, with exponentially distributed up and
/// down times of the given means.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OnOff {
    /// Share of nodes (or sites) affected.
    pub fraction: f64,
    /// Mean time up.
    pub mean_up: Dur,
    /// Mean time down.
    pub mean_down: Dur,
}

/// A scheduled event on some sites between two times.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outage {
    /// Site names affected (replicated sites: `name-i`), or empty to use `fraction`.
    #[serde(default)]
    pub sites: Vec<String>,
    /// Share of sites affected when `sites` is empty (chosen by the seed).
    #[serde(default)]
    pub fraction: f64,
    /// Start.
    pub from: Dur,
    /// End (the link heals / the site comes back).
    pub until: Dur,
}

/// Late joiners.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LateJoin {
    /// Share of nodes.
    pub fraction: f64,
    /// When they come online.
    pub at: Dur,
}

/// Adversaries: shares of nodes that misbehave. They run the same protocol core and add
/// their misbehaviour on top.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Adversaries {
    /// Serve corrupt chunks.
    #[serde(default)]
    pub corrupt: f64,
    /// Replay the first release's manifest to their peers every minute.
    #[serde(default)]
    pub replay: f64,
    /// Send manifests signed by a key the trust root does not know, every minute.
    #[serde(default)]
    pub forge: f64,
    /// Send 100 junk `IHave`s a second to each peer.
    #[serde(default)]
    pub flood: f64,
    /// At this time a leaked publisher key signs a second manifest for the latest
    /// release's version, injected by one adversary node.
    #[serde(default)]
    pub equivocate_at: Option<Dur>,
}

/// Protocol settings (the core's `Config`).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProtocolSpec {
    /// Peers that get an eager push of each object.
    #[serde(default)]
    pub eager_fanout: Option<usize>,
    /// Chunk requests in flight per peer.
    #[serde(default)]
    pub max_inflight_per_peer: Option<usize>,
    /// Chunk requests a site keeps in flight across the WAN, split among the members
    /// fetching for it (default 8).
    #[serde(default)]
    pub site_inflight_wan: Option<usize>,
    /// The least a member keeps in flight across the WAN under the share rule (default 2).
    #[serde(default)]
    pub max_inflight_wan: Option<usize>,
    /// Anti-entropy period.
    #[serde(default)]
    pub anti_entropy_interval: Option<Dur>,
    /// Chunk request timeout.
    #[serde(default)]
    pub request_timeout: Option<Dur>,
    /// Health reports kept per release (K).
    #[serde(default)]
    pub report_sample_size: Option<usize>,
    /// Download releases before the node's stage opens.
    #[serde(default)]
    pub prefetch: Option<bool>,
    /// Chunk uploads a node runs at once; more requests wait in order (the node's
    /// `max_concurrent_uploads`, default 16).
    #[serde(default)]
    pub upload_slots: Option<usize>,
    /// Chunk sends a node keeps waiting for an upload slot; a request past them is
    /// answered `Busy` (the node's `queued_uploads`, default 2).
    #[serde(default)]
    pub queued_uploads: Option<usize>,
}

impl Scenario {
    /// Read and check a scenario file.
    pub fn load(path: &Path) -> Result<Scenario> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read scenario {}", path.display()))?;
        let s: Scenario = toml::from_str(&text)
            .with_context(|| format!("invalid scenario {}", path.display()))?;
        s.validate()
            .with_context(|| format!("scenario {}", path.display()))?;
        Ok(s)
    }

    /// Field rules.
    pub fn validate(&self) -> Result<()> {
        if self.sites.is_empty() {
            bail!("at least one site");
        }
        let nodes: usize = self.sites.iter().map(|s| s.count * s.nodes).sum();
        if nodes < 2 {
            bail!("at least two nodes");
        }
        if nodes > 1_000_000 {
            bail!("at most 1,000,000 nodes");
        }
        for s in &self.sites {
            if s.count == 0 || s.nodes == 0 {
                bail!("site {}: count and nodes must be at least 1", s.name);
            }
            if !(0.0..1.0).contains(&s.loss) {
                bail!("site {}: loss must be in [0, 1)", s.name);
            }
            if !(0.0..=1.0).contains(&s.weak_fraction) {
                bail!("site {}: weak_fraction must be in [0, 1]", s.name);
            }
        }
        if self.releases.is_empty() {
            bail!("at least one release");
        }
        let mut prev = 0;
        for r in &self.releases {
            if r.version <= prev {
                bail!("release versions must strictly increase");
            }
            prev = r.version;
            pollen_protocol::chunking::ChunkSize::new(r.chunk.0)
                .map_err(|e| anyhow::anyhow!("release {}: chunk: {e}", r.version))?;
            if r.size.0 == 0 {
                bail!("release {}: size must be above zero", r.version);
            }
            if r.stages.is_empty() || r.stages.iter().any(|s| !(0.0..=100.0).contains(s)) {
                bail!("release {}: stages are percentages", r.version);
            }
        }
        for f in [
            self.adversaries.corrupt,
            self.adversaries.replay,
            self.adversaries.forge,
            self.adversaries.flood,
        ] {
            if !(0.0..=0.5).contains(&f) {
                bail!("adversary shares must be in [0, 0.5]");
            }
        }
        Ok(())
    }
}
