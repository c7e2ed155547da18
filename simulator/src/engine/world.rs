//! The world of a run: building it from a scenario and a seed ([`Sim::new`]), the state
//! each node and site carries while it runs ([`NodeState`], [`SiteState`]), the scripted
//! events (releases, churn, intermittent WAN links, outages, partitions, late joiners,
//! attacks) scheduled at the start, and what those events do when they fire.
//!
//! Building draws from the engine's RNG in a fixed order: the root and publisher keys,
//! then per node its key, whether it is weak and its RNG seed, then the peer graph, then
//! who misbehaves and who joins late. Changing that order changes every run.

use super::rand::{chance, exp, key_from, pick};
use super::{Ev, ReleaseTrack, Sim, Stats, T0, TimedQueue};
use crate::net::{Net, PAYLOAD_SHARE, ResId};
use crate::scenario::{OnOff, Scenario};
use pollen_protocol::manifest::{Channel, Manifest};
use pollen_protocol::signing::Signed;
use pollen_protocol::trust::{ChannelPattern, SignedTrustRoot, TrustRootBody};
use pollen_protocol::{
    Command, Config, ContentId, Instant, ManifestId, Mesh, NodeId, Now, PublicKey, SigningKey,
    UnixTime,
};
use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

/// A simulated node: its core and what the engine knows about it.
#[derive(Debug)]
pub(super) struct NodeState {
    /// The protocol core, as a node runs it.
    pub(super) mesh: Mesh<ChaCha8Rng>,
    /// Its identity key (signs its health reports).
    pub(super) key: SigningKey,
    /// Index of its site.
    pub(super) site: u32,
    /// Its uplink.
    pub(super) up: ResId,
    /// Its downlink.
    pub(super) down: ResId,
    /// Network on (churn, late joining).
    pub(super) online: bool,
    /// A weak device (`device_class = "weak"`; fails releases with `fail_on_weak`).
    pub(super) weak: bool,
    /// Sends corrupt chunks.
    pub(super) corrupt: bool,
    /// Replays the first manifest.
    pub(super) replay: bool,
    /// Sends manifests signed by an unknown key.
    pub(super) forge: bool,
    /// Floods announcements of objects that do not exist.
    pub(super) flood: bool,
    /// The time its core's timer is armed for.
    pub(super) timer_at: Option<u64>,
    /// Its neighbours in the peer graph.
    pub(super) adj: Vec<Edge>,
    /// What it serves now: version.
    pub(super) serving: Option<u64>,
    /// Chunk uploads in progress.
    pub(super) uploads: u32,
    /// The receivers of those uploads: one at a time to each, as the node writes chunks
    /// to a peer one after the other on its stream.
    pub(super) sending_to: Vec<u32>,
    /// Chunk sends waiting for an upload slot or for the send before them to the same
    /// receiver, oldest first.
    pub(super) upload_queue: VecDeque<QueuedChunk>,
}

/// A chunk send waiting for an upload slot.
#[derive(Clone, Copy, Debug)]
pub(super) struct QueuedChunk {
    /// The receiver's node index.
    pub(super) to: u32,
    /// The receiver's request id.
    pub(super) req: u64,
    /// The file.
    pub(super) file: ContentId,
    /// The chunk's index in the file.
    pub(super) index: u32,
}

/// One end of an edge of the peer graph (each edge is stored at both ends).
#[derive(Clone, Copy, Debug)]
pub(super) struct Edge {
    /// The neighbour's node index.
    pub(super) peer: u32,
    /// The link is up (both cores were told PeerUp).
    pub(super) up: bool,
    /// One end disconnected the other: the link never comes up again.
    pub(super) banned: bool,
}

impl Edge {
    /// A new edge to `peer`: down, not banned.
    fn to(peer: u32) -> Edge {
        Edge {
            peer,
            up: false,
            banned: false,
        }
    }
}

impl NodeState {
    /// Misbehaves in any way.
    pub(super) fn adversary(&self) -> bool {
        self.corrupt || self.replay || self.forge || self.flood
    }
}

/// A simulated site: its links and whether it is reachable.
#[derive(Debug)]
pub(super) struct SiteState {
    /// Its name (`name-k` for the k-th copy of a scenario site with `count` > 1).
    pub(super) name: String,
    /// Its WAN uplink.
    pub(super) wan_up: ResId,
    /// Its WAN downlink.
    pub(super) wan_down: ResId,
    /// One-way latency between two of its nodes, µs.
    pub(super) lan_latency: u64,
    /// One-way latency from its nodes to the WAN, µs.
    pub(super) wan_latency: u64,
    /// Probability that a control message sent from it is lost once.
    pub(super) loss: f64,
    /// WAN link on (intermittent sites).
    pub(super) wan_on: bool,
    /// Site powered (outages).
    pub(super) powered: bool,
    /// Partitioned from the other sites.
    pub(super) cut: bool,
    /// Its nodes: indices `nodes.0..nodes.1`.
    pub(super) nodes: (u32, u32),
    /// Bytes received over its WAN link.
    pub(super) wan_in: u64,
    /// Bytes sent over its WAN link.
    pub(super) wan_out: u64,
}

/// The root and publisher keys (drawn in that order) and the trust root every node starts
/// with: one publisher, allowed on every channel.
fn trust_root(rng: &mut ChaCha8Rng) -> (SigningKey, SignedTrustRoot) {
    let root = key_from(rng);
    let publisher_key = key_from(rng);
    let mut trust_body = TrustRootBody::single_publisher(
        PublicKey::from(&root),
        PublicKey::from(&publisher_key),
        ChannelPattern("*".into()),
        UnixTime::from_secs(1_000),
        UnixTime::from_secs(10_000_000_000),
    );
    // The name travels in the gossiped trust root, so it is part of the byte counts.
    trust_body.publishers[0].name = "operator".into();
    let trust = Signed::sign(&trust_body, &[&root]);
    (publisher_key, trust)
}

/// The core's configuration: the defaults with the scenario's `[protocol]` overrides.
fn core_config(sc: &Scenario) -> Config {
    let mut cfg = Config::default();
    if let Some(v) = sc.protocol.eager_fanout {
        cfg.eager_fanout = v;
    }
    if let Some(v) = sc.protocol.max_inflight_per_peer {
        cfg.max_inflight_per_peer = v;
    }
    if let Some(v) = sc.protocol.max_inflight_wan {
        cfg.max_inflight_wan = v.max(1);
    }
    if let Some(v) = sc.protocol.site_inflight_wan {
        cfg.site_inflight_wan = v.max(1);
    }
    if let Some(v) = sc.protocol.anti_entropy_interval {
        cfg.anti_entropy_interval = Duration::from_micros(v.0);
    }
    if let Some(v) = sc.protocol.request_timeout {
        cfg.request_timeout = Duration::from_micros(v.0);
    }
    if let Some(v) = sc.protocol.report_sample_size {
        cfg.report_sample_size = v;
    }
    if let Some(v) = sc.protocol.prefetch {
        cfg.prefetch = v;
    }
    cfg
}

/// Sites and their nodes, in scenario order, with their resources in `net` (each node's
/// up and down, then its site's WAN up and down) and the node index of each node id.
fn sites_and_nodes(
    sc: &Scenario,
    cfg: &Config,
    rng: &mut ChaCha8Rng,
    net: &mut Net,
) -> (Vec<SiteState>, Vec<NodeState>, HashMap<NodeId, u32>) {
    let mut sites = Vec::new();
    let mut nodes: Vec<NodeState> = Vec::new();
    let mut ids = HashMap::new();
    let now0 = Now::new(Instant::ZERO, T0);
    // One copy of each manifest for all nodes (the core lets a driver intern them).
    let interned: Arc<std::sync::Mutex<BTreeMap<ManifestId, Arc<Manifest>>>> = Arc::default();
    for spec in &sc.sites {
        for c in 0..spec.count {
            let name = spec.instance_name(c);
            let site = sites.len() as u32;
            let first = nodes.len() as u32;
            for _ in 0..spec.nodes {
                let key = key_from(rng);
                let id = NodeId::from(&key);
                let weak = chance(rng, spec.weak_fraction);
                let mut ncfg = cfg.clone();
                ncfg.site = Some(name.clone());
                if weak {
                    ncfg.device.device_class = Some("weak".into());
                }
                let node_rng = ChaCha8Rng::seed_from_u64(rng.next_u64());
                ids.insert(id, nodes.len() as u32);
                let mut mesh = Mesh::new(id, ncfg, node_rng, now0);
                let shared = interned.clone();
                mesh.set_interner(Box::new(move |m: Arc<Manifest>| {
                    let mut t = shared.lock().unwrap_or_else(|e| e.into_inner());
                    t.entry(m.id).or_insert(m).clone()
                }));
                nodes.push(NodeState {
                    mesh,
                    key,
                    site,
                    up: net.add_resource(spec.node_up.0 * PAYLOAD_SHARE),
                    down: net.add_resource(spec.node_down.0 * PAYLOAD_SHARE),
                    online: true,
                    weak,
                    corrupt: false,
                    replay: false,
                    forge: false,
                    flood: false,
                    timer_at: None,
                    adj: Vec::new(),
                    serving: None,
                    uploads: 0,
                    sending_to: Vec::new(),
                    upload_queue: Default::default(),
                });
            }
            sites.push(SiteState {
                name,
                wan_up: net.add_resource(spec.wan_up.0 * PAYLOAD_SHARE),
                wan_down: net.add_resource(spec.wan_down.0 * PAYLOAD_SHARE),
                lan_latency: spec.lan_latency.0,
                wan_latency: spec.wan_latency.0,
                loss: spec.loss,
                wan_on: true,
                powered: true,
                cut: false,
                nodes: (first, nodes.len() as u32),
                wan_in: 0,
                wan_out: 0,
            });
        }
    }
    (sites, nodes, ids)
}

/// The publisher: the first node of the publisher's site (or of its first copy).
fn find_publisher(sc: &Scenario, sites: &[SiteState]) -> u32 {
    sites
        .iter()
        .find(|s| s.name == sc.publisher.site || s.name == format!("{}-0", sc.publisher.site))
        .map_or(0, |s| s.nodes.0)
}

/// Which nodes reach the WAN: every node, or each site's first `gateways`. Returns the
/// flag per node and the list of gateways (empty when every node is one).
fn gateways(sc: &Scenario, n: usize) -> (Vec<bool>, Vec<u32>) {
    let mut gateway = vec![true; n];
    let mut gateways: Vec<u32> = Vec::new();
    let mut k = 0;
    for spec in &sc.sites {
        for _ in 0..spec.count {
            for j in 0..spec.nodes {
                if let Some(g) = spec.gateways {
                    gateway[k] = j < g.max(1);
                    if gateway[k] {
                        gateways.push(k as u32);
                    }
                }
                k += 1;
            }
        }
    }
    if gateways.len() == n {
        gateways.clear();
    }
    (gateway, gateways)
}

/// The peer graph as (low, high) node pairs: `lan_degree` random peers on the node's site,
/// `wan_degree` elsewhere (from gateways only, to gateways only), and a ring inside each
/// site and between sites that keeps the graph connected. With `target_peers` (the node's
/// rule): every site peer when `lan_degree` covers the site, and distinct WAN peers up to
/// the target.
fn peer_graph(
    sc: &Scenario,
    sites: &[SiteState],
    nodes: &[NodeState],
    rng: &mut ChaCha8Rng,
) -> BTreeSet<(u32, u32)> {
    let n = nodes.len();
    let (gateway, gateways) = gateways(sc, n);
    let mut edges: BTreeSet<(u32, u32)> = Default::default();
    for i in 0..n as u32 {
        let s = &sites[nodes[i as usize].site as usize];
        let (lo, hi) = s.nodes;
        let local = (hi - lo) as usize;
        let lan = sc.peers.lan_degree.min(local.saturating_sub(1));
        if sc.peers.target_peers.is_some() && lan + 1 == local {
            // The node's rule, on a site it can peer with whole: every site peer.
            for j in lo..hi {
                if j != i {
                    edges.insert((i.min(j), i.max(j)));
                }
            }
        } else {
            for _ in 0..lan {
                let j = lo + pick(rng, local) as u32;
                if j != i {
                    edges.insert((i.min(j), i.max(j)));
                }
            }
        }
        if sites.len() > 1 {
            if !gateway[i as usize] {
                continue;
            }
            let pool = if gateways.is_empty() {
                n
            } else {
                gateways.len()
            };
            // A WAN peer: any node of another site, or one of its gateways.
            let draw = |rng: &mut ChaCha8Rng| {
                if gateways.is_empty() {
                    pick(rng, pool) as u32
                } else {
                    gateways[pick(rng, pool)]
                }
            };
            if let Some(target) = sc.peers.target_peers {
                // The node's rule: distinct WAN peers until it has `target` in all.
                let want = target.saturating_sub(lan).min(pool);
                let mut got = BTreeSet::new();
                for _ in 0..want * 8 {
                    if got.len() == want {
                        break;
                    }
                    let j = draw(rng);
                    if nodes[j as usize].site != nodes[i as usize].site && got.insert(j) {
                        edges.insert((i.min(j), i.max(j)));
                    }
                }
                continue;
            }
            for _ in 0..sc.peers.wan_degree {
                let j = draw(rng);
                if nodes[j as usize].site != nodes[i as usize].site {
                    edges.insert((i.min(j), i.max(j)));
                }
            }
        } else {
            // One site: the "WAN" peers are more random peers of the same LAN.
            for _ in 0..sc.peers.wan_degree {
                let j = pick(rng, n) as u32;
                if j != i {
                    edges.insert((i.min(j), i.max(j)));
                }
            }
        }
    }
    // A ring inside each site and between sites keeps the graph connected.
    for s in sites {
        for i in s.nodes.0..s.nodes.1.saturating_sub(1) {
            edges.insert((i, i + 1));
        }
    }
    for w in sites.windows(2) {
        edges.insert((w[0].nodes.0, w[1].nodes.0));
    }
    edges
}

/// Who misbehaves how (never the publisher) and who joins late; returns the late flags.
fn adversaries_and_late_joiners(
    sc: &Scenario,
    nodes: &mut [NodeState],
    publisher: u32,
    rng: &mut ChaCha8Rng,
) -> Vec<bool> {
    let adv = &sc.adversaries;
    let mut late = vec![false; nodes.len()];
    for (i, node) in nodes.iter_mut().enumerate() {
        if i as u32 == publisher {
            continue;
        }
        node.corrupt = chance(rng, adv.corrupt);
        node.replay = chance(rng, adv.replay);
        node.forge = chance(rng, adv.forge);
        node.flood = chance(rng, adv.flood);
        if let Some(l) = &sc.late_joiners
            && chance(rng, l.fraction)
        {
            late[i] = true;
            node.online = false;
        }
    }
    late
}

/// The progress bar of an interactive run: virtual seconds.
fn progress_bar(sc: &Scenario) -> indicatif::ProgressBar {
    let b = indicatif::ProgressBar::new(sc.duration.0 / 1_000_000);
    b.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {pos}/{len} s virtual, {elapsed} wall",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    b.set_message(sc.name.clone());
    b
}

impl Sim {
    /// Build the world of `sc` from `seed`: sites, nodes (keys, RNGs, resources), the peer
    /// graph, adversaries and the scheduled events.
    pub fn new(sc: Scenario, seed: u64, progress: bool) -> Sim {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let (publisher_key, trust) = trust_root(&mut rng);
        let mut net = Net::default();
        let cfg = core_config(&sc);
        let (sites, mut nodes, ids) = sites_and_nodes(&sc, &cfg, &mut rng, &mut net);
        let n = nodes.len();
        let publisher = find_publisher(&sc, &sites);
        if let Some(up) = sc.publisher.upload {
            let r = nodes[publisher as usize].up;
            net.res[r as usize].cap = up.0 * PAYLOAD_SHARE / 1e6;
        }
        for (a, b) in peer_graph(&sc, &sites, &nodes, &mut rng) {
            nodes[a as usize].adj.push(Edge::to(b));
            nodes[b as usize].adj.push(Edge::to(a));
        }
        let late = adversaries_and_late_joiners(&sc, &mut nodes, publisher, &mut rng);
        let churned = vec![false; n];
        let sample_every = sc
            .sample_every
            .map_or((sc.duration.0 / 200).max(1_000), |d| d.0.max(1_000));
        let bar = progress.then(|| progress_bar(&sc));
        let mut sim = Sim {
            releases: Vec::new(),
            seed,
            now: 0,
            queue: TimedQueue::new(),
            rng,
            nodes,
            sites,
            net,
            ids,
            files: HashMap::new(),
            publisher,
            publisher_key,
            trust,
            channel: Channel::new("model").expect("valid channel"),
            stats: Stats::default(),
            trace: blake3::Hasher::new(),
            rows: Vec::new(),
            sample_every,
            upload_slots: sc.protocol.upload_slots.unwrap_or(16).max(1) as u32,
            queued_uploads: sc
                .protocol
                .queued_uploads
                .unwrap_or(pollen_protocol::QUEUED_UPLOADS),
            cur_hop: None,
            progress: bar,
            late,
            churned,
            settled_at: None,
            scenario: sc,
        };
        sim.schedule_world();
        sim
    }

    /// Give every node the trust root, bring up the links, and schedule the scenario's
    /// events. The steps run in this order: it fixes both the engine's RNG draws and the
    /// order of events scheduled for the same time.
    fn schedule_world(&mut self) {
        self.start_nodes();
        self.schedule_releases();
        self.schedule_churn();
        self.schedule_intermittent_sites();
        self.schedule_outages_and_partitions();
        self.schedule_late_joiners();
        self.schedule_attacks();
        self.push(0, Ev::Sample);
    }

    /// Every node gets the trust root; every edge whose both ends are online comes up.
    fn start_nodes(&mut self) {
        let n = self.nodes.len();
        for i in 0..n {
            let t = self.trust.clone();
            self.command(i as u32, Command::SetTrustRoot(t));
        }
        // Connect every edge whose both ends are online.
        for i in 0..n as u32 {
            self.refresh_links(i);
        }
    }

    /// A track per release, and its publication at its time.
    fn schedule_releases(&mut self) {
        let n = self.nodes.len();
        let specs = self.scenario.releases.clone();
        for (r, spec) in specs.iter().enumerate() {
            self.releases.push(ReleaseTrack::new(r, spec, n));
            self.push(spec.at.0, Ev::Publish { release: r });
        }
    }

    /// Churn: a share of the nodes (not the publisher, not late joiners) go off line after
    /// an exponential up time, and keep switching.
    fn schedule_churn(&mut self) {
        let n = self.nodes.len();
        if let Some(c) = self.scenario.churn.clone() {
            for i in 0..n {
                if i as u32 != self.publisher && !self.late[i] && chance(&mut self.rng, c.fraction)
                {
                    self.churned[i] = true;
                    let t = exp(&mut self.rng, c.mean_up.0.max(1));
                    self.push(
                        t,
                        Ev::NodeOnline {
                            node: i as u32,
                            on: false,
                            churn: true,
                        },
                    );
                }
            }
        }
    }

    /// Intermittent sites: a share of the sites (not the publisher's) switch their WAN
    /// link, starting in the steady state.
    fn schedule_intermittent_sites(&mut self) {
        if let Some(c) = self.scenario.intermittent_sites.clone() {
            let pub_site = self.nodes[self.publisher as usize].site;
            for s in 0..self.sites.len() as u32 {
                if s != pub_site && chance(&mut self.rng, c.fraction) {
                    // Start in the steady state: down with probability down/(up+down).
                    let p_down = c.mean_down.0 as f64 / (c.mean_up.0 + c.mean_down.0) as f64;
                    if chance(&mut self.rng, p_down) {
                        self.sites[s as usize].wan_on = false;
                        let t = exp(&mut self.rng, c.mean_down.0.max(1));
                        self.push(
                            t,
                            Ev::SiteWan {
                                site: s,
                                on: true,
                                churn: true,
                            },
                        );
                    } else {
                        let t = exp(&mut self.rng, c.mean_up.0.max(1));
                        self.push(
                            t,
                            Ev::SiteWan {
                                site: s,
                                on: false,
                                churn: true,
                            },
                        );
                    }
                }
            }
        }
    }

    /// Outages (sites lose power) and partitions (sites cut from the others), each from
    /// its start to its end.
    fn schedule_outages_and_partitions(&mut self) {
        for o in self.scenario.outages.clone() {
            for s in self.chosen_sites(&o.sites, o.fraction) {
                self.push(o.from.0, Ev::SitePower { site: s, on: false });
                self.push(o.until.0, Ev::SitePower { site: s, on: true });
            }
        }
        for o in self.scenario.partitions.clone() {
            for s in self.chosen_sites(&o.sites, o.fraction) {
                self.push(o.from.0, Ev::SiteCut { site: s, on: true });
                self.push(o.until.0, Ev::SiteCut { site: s, on: false });
            }
        }
    }

    /// Late joiners come on line at the scenario's time.
    fn schedule_late_joiners(&mut self) {
        let n = self.nodes.len();
        if let Some(l) = self.scenario.late_joiners.clone() {
            for i in 0..n {
                if self.late[i] {
                    self.push(
                        l.at.0,
                        Ev::NodeOnline {
                            node: i as u32,
                            on: true,
                            churn: false,
                        },
                    );
                }
            }
        }
    }

    /// The adversaries' first round at 1 s (if any replay, forge or flood), and the
    /// equivocation.
    fn schedule_attacks(&mut self) {
        let a = self.scenario.adversaries.clone();
        if a.replay > 0.0 || a.forge > 0.0 || a.flood > 0.0 {
            self.push(1_000_000, Ev::Attack);
        }
        if let Some(t) = a.equivocate_at {
            self.push(t.0, Ev::Equivocate);
        }
    }

    /// The sites an outage or partition hits: those named, or else each site but the
    /// publisher's with probability `fraction`.
    fn chosen_sites(&mut self, names: &[String], fraction: f64) -> Vec<u32> {
        let pub_site = self.nodes[self.publisher as usize].site;
        if names.is_empty() {
            (0..self.sites.len() as u32)
                .filter(|&s| s != pub_site && chance(&mut self.rng, fraction))
                .collect()
        } else {
            (0..self.sites.len() as u32)
                .filter(|&s| names.contains(&self.sites[s as usize].name))
                .collect()
        }
    }

    /// How long until the next switch of an on/off process that is now `on`.
    fn on_off(&mut self, spec: &OnOff, on: bool) -> u64 {
        exp(
            &mut self.rng,
            if on { spec.mean_up.0 } else { spec.mean_down.0 }.max(1),
        )
    }

    /// The nodes of site `s`.
    fn site_nodes(&self, s: u32) -> std::ops::Range<u32> {
        let (a, b) = self.sites[s as usize].nodes;
        a..b
    }

    /// `Ev::NodeOnline`: node `node` goes on or off line; under churn, schedule its next
    /// switch.
    pub(super) fn node_online(&mut self, node: u32, on: bool, churn: bool) {
        self.nodes[node as usize].online = on;
        self.refresh_links(node);
        if churn && let Some(c) = self.scenario.churn.clone() {
            let t = self.on_off(&c, on);
            self.push(
                self.now + t,
                Ev::NodeOnline {
                    node,
                    on: !on,
                    churn: true,
                },
            );
        }
    }

    /// `Ev::SiteWan`: site `site`'s WAN link goes up or down; if it is intermittent,
    /// schedule its next switch.
    pub(super) fn site_wan(&mut self, site: u32, on: bool, churn: bool) {
        self.sites[site as usize].wan_on = on;
        for k in self.site_nodes(site) {
            self.refresh_links(k);
        }
        if churn && let Some(c) = self.scenario.intermittent_sites.clone() {
            let t = self.on_off(&c, on);
            self.push(
                self.now + t,
                Ev::SiteWan {
                    site,
                    on: !on,
                    churn: true,
                },
            );
        }
    }

    /// `Ev::SitePower`: site `site` loses or regains power.
    pub(super) fn site_power(&mut self, site: u32, on: bool) {
        self.sites[site as usize].powered = on;
        for k in self.site_nodes(site) {
            self.refresh_links(k);
        }
    }

    /// `Ev::SiteCut`: site `site` is cut from the other sites (`on`) or rejoins them.
    pub(super) fn site_cut(&mut self, site: u32, on: bool) {
        self.sites[site as usize].cut = on;
        for k in self.site_nodes(site) {
            self.refresh_links(k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sites(count: usize, nodes: usize, target: Option<usize>) -> Sim {
        let text = format!(
            "name = \"t\"\nduration = \"1s\"\n\
             [[sites]]\nname = \"s\"\ncount = {count}\nnodes = {nodes}\n\
             lan_latency = \"1ms\"\nwan_latency = \"40ms\"\nwan_up = \"20Mbit\"\n\
             wan_down = \"20Mbit\"\nnode_up = \"1Gbit\"\nnode_down = \"1Gbit\"\n\
             [publisher]\nsite = \"s\"\n\
             [[releases]]\nat = \"0s\"\nversion = 1\nsize = \"1MiB\"\n\
             [peers]\nlan_degree = 256\nwan_degree = 2\n{}",
            target.map_or(String::new(), |t| format!("target_peers = {t}\n"))
        );
        let sc: Scenario = toml::from_str(&text).expect("scenario");
        sc.validate().expect("valid");
        Sim::new(sc, 1, false)
    }

    /// (LAN peers, WAN peers) of node `i`.
    fn degree(sim: &Sim, i: usize) -> (usize, usize) {
        let site = sim.nodes[i].site;
        let lan = sim.nodes[i]
            .adj
            .iter()
            .filter(|e| sim.nodes[e.peer as usize].site == site)
            .count();
        (lan, sim.nodes[i].adj.len() - lan)
    }

    /// The node's rule (`target_peers`): on three sites of six every node has its 5 site
    /// peers and dials 11 of the 12 across the WAN (16 in all), so with the dials of others
    /// nearly every pair peers, as `pollen run` does there; the default (`wan_degree` 2
    /// random draws) leaves most nodes with two or three WAN peers.
    #[test]
    fn target_peers_gives_a_small_mesh_nearly_every_peer() {
        let sim = sites(3, 6, Some(16));
        let mut wan = 0;
        for i in 0..18 {
            let (l, w) = degree(&sim, i);
            assert_eq!(l, 5, "node {i}");
            assert!((11..=12).contains(&w), "node {i}: {w} WAN peers");
            wan += w;
        }
        assert!(wan >= 18 * 12 - 4, "{wan} WAN peer ends");
        let sim = sites(3, 6, None);
        let wan: usize = (0..18).map(|i| degree(&sim, i).1).sum();
        assert!(wan < 18 * 6, "{wan} WAN peer ends");
    }

    /// On sites larger than the target a node dials no WAN peer of its own: what it has
    /// across the WAN are the peers that dialled it and the ring between sites.
    #[test]
    fn target_peers_on_large_sites_dials_nothing_across_the_wan() {
        let sim = sites(3, 20, Some(16));
        for i in 0..60 {
            let (lan, wan) = degree(&sim, i);
            assert_eq!(lan, 19, "node {i}");
            assert!(wan <= 2, "node {i}: {wan} WAN peers");
        }
    }

    /// A sender serves each receiver's requests in turn (the node writes one chunk frame
    /// at a time per peer), up to its upload slots across receivers. A cancel drops a
    /// queued send and only that receiver's (request ids are the receiver's own: the
    /// engine once matched the id alone and cut another receiver's transfer, which then
    /// waited out its deadline); a send already on its way runs to its end, as on the node.
    #[test]
    fn uploads_go_one_at_a_time_per_receiver_and_cancels_drop_queued_sends() {
        let mut sim = sites(1, 4, None);
        let file = pollen_protocol::ContentId([7; 32]);
        sim.files.insert(
            file,
            super::super::PublishedFile {
                size: 4 << 20,
                chunk: 1 << 20,
                release: 0,
            },
        );
        sim.upload_slots = 2;
        let running = |sim: &Sim| {
            let mut v: Vec<(u32, u64)> = sim
                .net
                .flows
                .iter()
                .flatten()
                .map(|f| (f.to, f.req))
                .collect();
            v.sort();
            v
        };
        // Node 0: to 1 under ids 5 and 6, to 2 and 3 under id 5.
        sim.send_chunk(0, 1, 5, file, 0);
        sim.send_chunk(0, 1, 6, file, 1);
        sim.send_chunk(0, 2, 5, file, 0);
        sim.send_chunk(0, 3, 5, file, 1);
        // 1's second send waits behind its first, though a slot was free for it.
        assert_eq!(running(&sim), vec![(1, 5), (2, 5)]);
        // 3 cancels its id 5: its queued send goes, 1's and 2's (also id 5) stay; 1's
        // running send is not cut by 1's cancel of it either.
        sim.cancel_upload(0, 3, 5);
        sim.cancel_upload(0, 1, 5);
        assert_eq!(running(&sim), vec![(1, 5), (2, 5)]);
        let queued: Vec<(u32, u64)> = sim.nodes[0]
            .upload_queue
            .iter()
            .map(|q| (q.to, q.req))
            .collect();
        assert_eq!(queued, vec![(1, 6)]);
        // 1's first send ends: its second starts.
        let (id, ver) = sim
            .net
            .flows
            .iter()
            .enumerate()
            .find_map(|(id, f)| f.as_ref().filter(|f| f.to == 1).map(|f| (id as u32, f.ver)))
            .expect("1's send runs");
        sim.flow_done(id, ver);
        assert_eq!(running(&sim), vec![(1, 6), (2, 5)]);
        assert!(sim.nodes[0].upload_queue.is_empty());
    }
}
