//! The discrete-event engine: the protocol core (`pollen_protocol::Mesh`, the same code a
//! node runs) on every simulated node, driven over virtual time by events ordered by
//! (time, sequence number).
//!
//! Determinism: one master seed gives the engine's RNG (topology, churn, loss, who
//! misbehaves) and, through it, each node's RNG and key; every collection iterated is
//! ordered (vectors, `BTreeMap`); hash maps are only looked up. The same scenario and seed
//! give the same outputs and the same trace hash.

use crate::net::{Flow, FlowId, Net, ResId, Reschedule};
use crate::scenario::{OnOff, Scenario};
use pollen_protocol::chunking::{ChunkSize, FileSpec, root_from_chaining_values};
use pollen_protocol::io::ChunkFailure;
use pollen_protocol::manifest::{
    Artifact, Channel, FileEntry, Manifest, ManifestBody, ModelMeta, SignedManifest, Variant,
};
use pollen_protocol::rollout::{
    ErrorClass, Gate, HealthReport, HealthReportBody, HealthStatus, RolloutPlan,
};
use pollen_protocol::signing::Signed;
use pollen_protocol::trust::{ChannelPattern, Publisher, SignedTrustRoot, TrustRootBody};
use pollen_protocol::wire::{Bitfield, Message, ObjectId};
use pollen_protocol::{
    Command, Config, ContentId, Event, Input, Instant, ManifestId, Mesh, NodeId, Now, Output,
    PeerInfo, PublicKey, SigningKey, UnixTime,
};
use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::Duration;

/// Wall-clock time at virtual time zero.
pub const T0: UnixTime = UnixTime::from_secs(1_700_000_000);
/// Not yet (a time never reached).
pub const NEVER: u64 = u64::MAX;
/// Bytes of a chunk frame besides the chunk (length prefix, kind, header).
const CHUNK_OVERHEAD: u64 = 4 + 1 + 64;
/// TCP's retransmission timeout after a lost control message.
const RTO_US: u64 = 200_000;

/// Link classes bytes are counted on.
#[derive(Clone, Copy, Debug, Default)]
pub struct Bytes {
    /// Control frames inside a site.
    pub lan_ctrl: u64,
    /// Chunk frames inside a site.
    pub lan_chunk: u64,
    /// Control frames between sites.
    pub wan_ctrl: u64,
    /// Chunk frames between sites.
    pub wan_chunk: u64,
}

/// Counters of a run.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    /// Bytes per link class.
    pub bytes: Bytes,
    /// Events processed.
    pub events: u64,
    /// Control messages delivered.
    pub messages: u64,
    /// Control messages lost once (and retransmitted).
    pub lost: u64,
    /// Chunk transfers completed.
    pub chunks: u64,
    /// Chunks that arrived but were no longer needed.
    pub duplicate_chunks: u64,
    /// Corrupt chunks received.
    pub corrupt_chunks: u64,
    /// Transfers cut by a cancel or a link going down.
    pub cancelled: u64,
    /// Objects rejected, by reason label.
    pub rejected: BTreeMap<String, u64>,
    /// Penalties and disconnections.
    pub penalties: u64,
    /// Equivocations detected (node-events).
    pub equivocations: u64,
    /// Peak flows in progress at once.
    pub peak_flows: usize,
    /// Chunk bytes the publisher uploaded.
    pub publisher_upload: u64,
}

/// Per-release results.
#[derive(Debug)]
pub struct ReleaseRt {
    /// Index in the scenario.
    pub spec: usize,
    /// Version.
    pub version: u64,
    /// The signed manifest, once published.
    pub manifest: Option<Arc<Manifest>>,
    /// Publish time, µs.
    pub published: u64,
    /// Each node's stage (u8::MAX: none).
    pub stage: Vec<u8>,
    /// When each node accepted the manifest.
    pub accepted: Vec<u64>,
    /// Gossip hops to each node (u16::MAX: not reached).
    pub hops: Vec<u16>,
    /// When each node held the whole artifact.
    pub complete: Vec<u64>,
    /// When each node started serving it.
    pub active: Vec<u64>,
    /// The node failed to activate it.
    pub failed: Vec<bool>,
    /// The node rolled back from it.
    pub rolled_back: Vec<bool>,
    /// Manifest payload messages delivered (for redundancy).
    pub payloads: u64,
    /// First time any node saw the rollout fail its gate.
    pub gate_failed: u64,
    /// Gated plans make nodes send health reports.
    pub gated: bool,
}

#[derive(Debug)]
struct SimNode {
    mesh: Mesh<ChaCha8Rng>,
    key: SigningKey,
    site: u32,
    up: ResId,
    down: ResId,
    /// Network on (churn, late joining).
    online: bool,
    weak: bool,
    corrupt: bool,
    replay: bool,
    forge: bool,
    flood: bool,
    timer_at: Option<u64>,
    /// (neighbour, link up, banned).
    adj: Vec<(u32, bool, bool)>,
    /// What it serves now: version.
    serving: Option<u64>,
    /// Chunk uploads in progress.
    uploads: u32,
    /// Chunk sends waiting for an upload slot: (to, request id, file, index).
    upload_queue: std::collections::VecDeque<(u32, u64, ContentId, u32)>,
}

#[derive(Debug)]
struct SiteRt {
    name: String,
    wan_up: ResId,
    wan_down: ResId,
    lan_latency: u64,
    wan_latency: u64,
    loss: f64,
    /// WAN link on (intermittent sites).
    wan_on: bool,
    /// Site powered (outages).
    powered: bool,
    /// Partitioned from the other sites.
    cut: bool,
    nodes: (u32, u32),
    wan_in: u64,
    wan_out: u64,
}

#[derive(Debug)]
enum Ev {
    Deliver {
        to: u32,
        from: u32,
        msg: Box<Message>,
    },
    FlowDone {
        id: FlowId,
        ver: u32,
    },
    Timer {
        node: u32,
        at: u64,
    },
    Publish {
        release: usize,
    },
    NodeOnline {
        node: u32,
        on: bool,
        churn: bool,
    },
    SiteWan {
        site: u32,
        on: bool,
        churn: bool,
    },
    SitePower {
        site: u32,
        on: bool,
    },
    SiteCut {
        site: u32,
        on: bool,
    },
    Attack,
    Equivocate,
    Sample,
}

struct Item {
    t: u64,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Item {
    fn eq(&self, o: &Self) -> bool {
        (self.t, self.seq) == (o.t, o.seq)
    }
}
impl Eq for Item {}
impl PartialOrd for Item {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Item {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.t, self.seq).cmp(&(o.t, o.seq))
    }
}

/// One row of the time series.
#[derive(Clone, Debug)]
pub struct Row {
    /// Time, µs.
    pub t: u64,
    /// Per release, per stage: nodes serving it.
    pub active: Vec<Vec<u32>>,
    /// Per release: nodes holding the whole artifact.
    pub complete: Vec<u32>,
    /// Bytes so far.
    pub bytes: Bytes,
    /// Nodes serving each version (index: release).
    pub serving: Vec<u32>,
    /// Nodes online.
    pub online: u32,
}

/// A simulation run.
pub struct Sim {
    /// The scenario.
    pub sc: Scenario,
    /// The master seed.
    pub seed: u64,
    /// Virtual time, µs.
    pub now: u64,
    queue: BinaryHeap<Reverse<Item>>,
    seq: u64,
    rng: ChaCha8Rng,
    nodes: Vec<SimNode>,
    sites: Vec<SiteRt>,
    /// Resources and flows.
    pub net: Net,
    by_req: HashMap<(u32, u64), FlowId>,
    ids: HashMap<NodeId, u32>,
    /// Releases.
    pub releases: Vec<ReleaseRt>,
    files: HashMap<ContentId, (u64, u32, usize)>,
    publisher: u32,
    publisher_key: SigningKey,
    trust: SignedTrustRoot,
    channel: Channel,
    /// Counters.
    pub stats: Stats,
    trace: blake3::Hasher,
    /// Time series.
    pub rows: Vec<Row>,
    sample_every: u64,
    upload_slots: u32,
    cur_hop: Option<(usize, u16)>,
    progress: Option<indicatif::ProgressBar>,
    /// Nodes that started late.
    pub late: Vec<bool>,
    /// Nodes affected by churn.
    pub churned: Vec<bool>,
    /// The run ended early: every node had settled.
    pub settled_at: Option<u64>,
}

impl std::fmt::Debug for Sim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sim")
            .field("nodes", &self.nodes.len())
            .field("now", &self.now)
            .finish()
    }
}

fn exp(rng: &mut ChaCha8Rng, mean: u64) -> u64 {
    let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    (-(1.0 - u).ln() * mean as f64).max(1.0) as u64
}

fn pick(rng: &mut ChaCha8Rng, n: usize) -> usize {
    (rng.next_u64() % n as u64) as usize
}

fn chance(rng: &mut ChaCha8Rng, p: f64) -> bool {
    p > 0.0 && ((rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < p
}

fn key_from(rng: &mut ChaCha8Rng) -> SigningKey {
    let mut b = [0u8; 32];
    rng.fill_bytes(&mut b);
    SigningKey::from_bytes(&b)
}

impl Sim {
    /// Build the world of `sc` from `seed`: sites, nodes (keys, RNGs, resources), the peer
    /// graph, adversaries and the scheduled events.
    pub fn new(sc: Scenario, seed: u64, progress: bool) -> Sim {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let root = key_from(&mut rng);
        let publisher_key = key_from(&mut rng);
        let pk = |k: &SigningKey| PublicKey(k.verifying_key().to_bytes());
        let trust_body = TrustRootBody {
            version: 1,
            created: UnixTime::from_secs(1_000),
            expires: UnixTime::from_secs(10_000_000_000),
            root_keys: vec![pk(&root)],
            root_threshold: 1,
            publishers: vec![Publisher {
                key: pk(&publisher_key),
                name: "operator".into(),
                channels: vec![ChannelPattern("*".into())],
            }],
            publish_threshold: 1,
            fleet_key: None,
        };
        let trust = Signed::sign(&trust_body, &[&root]);
        let mut net = Net::default();
        let mut sites = Vec::new();
        let mut nodes: Vec<SimNode> = Vec::new();
        let mut ids = HashMap::new();
        let mut cfg = Config::default();
        if let Some(v) = sc.protocol.eager_fanout {
            cfg.eager_fanout = v;
        }
        if let Some(v) = sc.protocol.max_inflight_per_peer {
            cfg.max_inflight_per_peer = v;
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
        let now0 = Now::new(Instant::ZERO, T0);
        // One copy of each manifest for all nodes (the core lets a driver intern them).
        let interned: Arc<std::sync::Mutex<BTreeMap<ManifestId, Arc<Manifest>>>> = Arc::default();
        for spec in &sc.sites {
            for c in 0..spec.count {
                let name = if spec.count > 1 {
                    format!("{}-{c}", spec.name)
                } else {
                    spec.name.clone()
                };
                let site = sites.len() as u32;
                let first = nodes.len() as u32;
                for _ in 0..spec.nodes {
                    let key = key_from(&mut rng);
                    let id = NodeId(key.verifying_key().to_bytes());
                    let weak = chance(&mut rng, spec.weak_fraction);
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
                    nodes.push(SimNode {
                        mesh,
                        key,
                        site,
                        up: net.add_resource(spec.node_up.0),
                        down: net.add_resource(spec.node_down.0),
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
                        upload_queue: Default::default(),
                    });
                }
                sites.push(SiteRt {
                    name,
                    wan_up: net.add_resource(spec.wan_up.0),
                    wan_down: net.add_resource(spec.wan_down.0),
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
        let n = nodes.len();
        let publisher = sites
            .iter()
            .find(|s| s.name == sc.publisher.site || s.name == format!("{}-0", sc.publisher.site))
            .map_or(0, |s| s.nodes.0);
        if let Some(up) = sc.publisher.upload {
            let r = nodes[publisher as usize].up;
            net.res[r as usize].cap = up.0 / 1e6;
        }
        // Which nodes reach the WAN: every node, or each site's first `gateways`.
        let mut gateway = vec![true; n];
        let mut gateways: Vec<u32> = Vec::new();
        {
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
        }
        // Peer graph: lan_degree random peers on the node's site, wan_degree elsewhere.
        let mut edges: std::collections::BTreeSet<(u32, u32)> = Default::default();
        for i in 0..n as u32 {
            let s = &sites[nodes[i as usize].site as usize];
            let (lo, hi) = s.nodes;
            let local = (hi - lo) as usize;
            for _ in 0..sc.peers.lan_degree.min(local.saturating_sub(1)) {
                let j = lo + pick(&mut rng, local) as u32;
                if j != i {
                    edges.insert((i.min(j), i.max(j)));
                }
            }
            if sites.len() > 1 {
                if !gateway[i as usize] {
                    continue;
                }
                for _ in 0..sc.peers.wan_degree {
                    // A WAN peer: any node of another site, or one of its gateways.
                    let j = if gateways.is_empty() {
                        pick(&mut rng, n) as u32
                    } else {
                        gateways[pick(&mut rng, gateways.len())]
                    };
                    if nodes[j as usize].site != nodes[i as usize].site {
                        edges.insert((i.min(j), i.max(j)));
                    }
                }
            } else {
                // One site: the "WAN" peers are more random peers of the same LAN.
                for _ in 0..sc.peers.wan_degree {
                    let j = pick(&mut rng, n) as u32;
                    if j != i {
                        edges.insert((i.min(j), i.max(j)));
                    }
                }
            }
        }
        // A ring inside each site and between sites keeps the graph connected.
        for s in &sites {
            for i in s.nodes.0..s.nodes.1.saturating_sub(1) {
                edges.insert((i, i + 1));
            }
        }
        for w in sites.windows(2) {
            edges.insert((w[0].nodes.0, w[1].nodes.0));
        }
        for &(a, b) in &edges {
            nodes[a as usize].adj.push((b, false, false));
            nodes[b as usize].adj.push((a, false, false));
        }
        // Adversaries (never the publisher).
        let adv = &sc.adversaries;
        let mut late = vec![false; n];
        let churned = vec![false; n];
        for (i, node) in nodes.iter_mut().enumerate() {
            if i as u32 == publisher {
                continue;
            }
            node.corrupt = chance(&mut rng, adv.corrupt);
            node.replay = chance(&mut rng, adv.replay);
            node.forge = chance(&mut rng, adv.forge);
            node.flood = chance(&mut rng, adv.flood);
            if let Some(l) = &sc.late_joiners
                && chance(&mut rng, l.fraction)
            {
                late[i] = true;
                node.online = false;
            }
        }
        let sample_every = sc
            .sample_every
            .map_or((sc.duration.0 / 200).max(1_000), |d| d.0.max(1_000));
        let bar = progress.then(|| {
            let b = indicatif::ProgressBar::new(sc.duration.0 / 1_000_000);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg} [{bar:30}] {pos}/{len} s virtual, {elapsed} wall",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            b.set_message(sc.name.clone());
            b
        });
        let mut sim = Sim {
            releases: Vec::new(),
            seed,
            now: 0,
            queue: BinaryHeap::new(),
            seq: 0,
            rng,
            nodes,
            sites,
            net,
            by_req: HashMap::new(),
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
            cur_hop: None,
            progress: bar,
            late,
            churned,
            settled_at: None,
            sc,
        };
        sim.schedule_world();
        sim
    }

    fn push(&mut self, t: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse(Item {
            t,
            seq: self.seq,
            ev,
        }));
    }

    fn schedule_world(&mut self) {
        let n = self.nodes.len();
        for i in 0..n {
            let t = self.trust.clone();
            self.command(i as u32, Command::SetTrustRoot(t));
        }
        // Connect every edge whose both ends are online.
        for i in 0..n as u32 {
            self.refresh_links(i);
        }
        let specs = self.sc.releases.clone();
        for (r, spec) in specs.iter().enumerate() {
            let at = spec.at.0;
            self.releases.push(ReleaseRt {
                spec: r,
                version: spec.version,
                manifest: None,
                published: NEVER,
                stage: vec![u8::MAX; n],
                accepted: vec![NEVER; n],
                hops: vec![u16::MAX; n],
                complete: vec![NEVER; n],
                active: vec![NEVER; n],
                failed: vec![false; n],
                rolled_back: vec![false; n],
                payloads: 0,
                gate_failed: NEVER,
                gated: spec.gate.is_some(),
            });
            self.push(at, Ev::Publish { release: r });
        }
        if let Some(c) = self.sc.churn.clone() {
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
        if let Some(c) = self.sc.intermittent_sites.clone() {
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
        for o in self.sc.outages.clone() {
            for s in self.chosen_sites(&o.sites, o.fraction) {
                self.push(o.from.0, Ev::SitePower { site: s, on: false });
                self.push(o.until.0, Ev::SitePower { site: s, on: true });
            }
        }
        for o in self.sc.partitions.clone() {
            for s in self.chosen_sites(&o.sites, o.fraction) {
                self.push(o.from.0, Ev::SiteCut { site: s, on: true });
                self.push(o.until.0, Ev::SiteCut { site: s, on: false });
            }
        }
        if let Some(l) = self.sc.late_joiners.clone() {
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
        let a = self.sc.adversaries.clone();
        if a.replay > 0.0 || a.forge > 0.0 || a.flood > 0.0 {
            self.push(1_000_000, Ev::Attack);
        }
        if let Some(t) = a.equivocate_at {
            self.push(t.0, Ev::Equivocate);
        }
        self.push(0, Ev::Sample);
    }

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

    fn clocks(&self) -> Now {
        Now::new(
            Instant::from_micros(self.now),
            T0.plus(Duration::from_micros(self.now)),
        )
    }

    /// Can `a` and `b` exchange bytes now?
    fn linked(&self, a: u32, b: u32) -> bool {
        let (na, nb) = (&self.nodes[a as usize], &self.nodes[b as usize]);
        if !na.online || !nb.online {
            return false;
        }
        let (sa, sb) = (&self.sites[na.site as usize], &self.sites[nb.site as usize]);
        if !sa.powered || !sb.powered {
            return false;
        }
        na.site == nb.site || (sa.wan_on && sb.wan_on && !sa.cut && !sb.cut)
    }

    fn latency(&self, a: u32, b: u32) -> u64 {
        let (sa, sb) = (self.nodes[a as usize].site, self.nodes[b as usize].site);
        if sa == sb {
            self.sites[sa as usize].lan_latency
        } else {
            self.sites[sa as usize].wan_latency + self.sites[sb as usize].wan_latency
        }
    }

    /// Bring node `i`'s links in line with who can reach whom: PeerUp / PeerDown on both
    /// ends, and transfers over links that went down are cut.
    fn refresh_links(&mut self, i: u32) {
        for k in 0..self.nodes[i as usize].adj.len() {
            let (j, was, banned) = self.nodes[i as usize].adj[k];
            let now_up = !banned && self.linked(i, j);
            if now_up == was {
                continue;
            }
            self.set_edge(i, j, now_up);
            if now_up {
                let rtt = Duration::from_micros(2 * self.latency(i, j));
                for (x, y) in [(i, j), (j, i)] {
                    let info = PeerInfo {
                        site: Some(
                            self.sites[self.nodes[y as usize].site as usize]
                                .name
                                .clone(),
                        ),
                        rtt: Some(rtt),
                        cert: None,
                    };
                    let peer = self.nodes[y as usize].mesh.id();
                    self.input(x, Input::PeerUp { peer, info });
                }
            } else {
                for id in self.net.between(
                    i,
                    j,
                    [self.nodes[i as usize].up, self.nodes[i as usize].down],
                ) {
                    self.cancel_flow(id);
                }
                for (x, y) in [(i, j), (j, i)] {
                    let peer = self.nodes[y as usize].mesh.id();
                    self.input(x, Input::PeerDown { peer });
                }
            }
        }
    }

    fn set_edge(&mut self, i: u32, j: u32, up: bool) {
        for (a, b) in [(i, j), (j, i)] {
            if let Some(e) = self.nodes[a as usize].adj.iter_mut().find(|e| e.0 == b) {
                e.1 = up;
            }
        }
    }

    fn input(&mut self, i: u32, input: Input) {
        let now = self.clocks();
        self.nodes[i as usize].mesh.handle(now, input);
        self.drain(i);
    }

    fn command(&mut self, i: u32, cmd: Command) {
        self.input(i, Input::Command { id: 0, cmd });
    }

    fn trace(&mut self, node: u32, tag: u8) {
        self.trace.update(&self.now.to_le_bytes());
        self.trace.update(&node.to_le_bytes());
        self.trace.update(&[tag]);
    }

    fn drain(&mut self, i: u32) {
        let outs: Vec<Output> =
            std::iter::from_fn(|| self.nodes[i as usize].mesh.poll_output()).collect();
        for out in outs {
            match out {
                Output::Send { to, msg } => {
                    self.trace(i, 1);
                    if let Some(&j) = self.ids.get(&to) {
                        self.send(i, j, msg);
                    }
                }
                Output::SendChunk {
                    to,
                    id,
                    file,
                    index,
                } => {
                    self.trace(i, 2);
                    if let Some(&j) = self.ids.get(&to) {
                        let node = &mut self.nodes[i as usize];
                        if node.uploads < self.upload_slots {
                            self.start_flow(i, j, id, file, index);
                        } else if node.upload_queue.len() < 4096 {
                            node.upload_queue.push_back((j, id, file, index));
                        }
                    }
                }
                Output::CancelChunk { id, .. } => {
                    self.trace(i, 3);
                    if let Some(f) = self.by_req.get(&(i, id)).copied() {
                        self.cancel_flow(f);
                    } else {
                        self.nodes[i as usize].upload_queue.retain(|q| q.1 != id);
                    }
                }
                Output::Disconnect { peer, .. } => {
                    self.trace(i, 4);
                    self.stats.penalties += 1;
                    if let Some(&j) = self.ids.get(&peer) {
                        for (a, b) in [(i, j), (j, i)] {
                            if let Some(e) =
                                self.nodes[a as usize].adj.iter_mut().find(|e| e.0 == b)
                            {
                                e.2 = true;
                            }
                        }
                        let was_up = self.nodes[i as usize].adj.iter().any(|e| e.0 == j && e.1);
                        if was_up {
                            self.set_edge(i, j, false);
                            for f in self.net.between(
                                i,
                                j,
                                [self.nodes[i as usize].up, self.nodes[i as usize].down],
                            ) {
                                self.cancel_flow(f);
                            }
                            let me = self.nodes[i as usize].mesh.id();
                            self.input(j, Input::PeerDown { peer: me });
                        }
                    }
                }
                Output::Event(e) => {
                    self.trace(i, 5);
                    self.on_event(i, e);
                }
            }
        }
        self.arm_timer(i);
    }

    fn arm_timer(&mut self, i: u32) {
        if let Some(t) = self.nodes[i as usize].mesh.poll_timeout() {
            let t = t.as_micros().max(self.now);
            let armed = self.nodes[i as usize].timer_at;
            if armed.is_none_or(|a| t < a || a < self.now) {
                self.nodes[i as usize].timer_at = Some(t);
                self.push(t, Ev::Timer { node: i, at: t });
            }
        }
    }

    fn count_bytes(&mut self, from: u32, to: u32, bytes: u64, chunk: bool) {
        let (sa, sb) = (self.nodes[from as usize].site, self.nodes[to as usize].site);
        let b = &mut self.stats.bytes;
        match (sa == sb, chunk) {
            (true, false) => b.lan_ctrl += bytes,
            (true, true) => b.lan_chunk += bytes,
            (false, false) => b.wan_ctrl += bytes,
            (false, true) => b.wan_chunk += bytes,
        }
        if sa != sb {
            self.sites[sa as usize].wan_out += bytes;
            self.sites[sb as usize].wan_in += bytes;
        }
    }

    fn send(&mut self, from: u32, to: u32, msg: Message) {
        if !self.linked(from, to) {
            return;
        }
        let len = msg.wire_len() as u64;
        self.count_bytes(from, to, len, false);
        let mut delay = self.latency(from, to);
        let site = self.nodes[from as usize].site as usize;
        let loss = self.sites[site].loss;
        while chance(&mut self.rng, loss) {
            self.stats.lost += 1;
            self.count_bytes(from, to, len, false);
            delay += RTO_US;
        }
        self.push(
            self.now + delay,
            Ev::Deliver {
                to,
                from,
                msg: Box::new(msg),
            },
        );
    }

    fn start_flow(&mut self, from: u32, to: u32, req: u64, file: ContentId, index: u32) {
        if !self.linked(from, to) {
            return;
        }
        let Some(&(size, chunk, _)) = self.files.get(&file) else {
            return;
        };
        let start = u64::from(index) * u64::from(chunk);
        if start >= size {
            return;
        }
        let len = (size - start).min(u64::from(chunk)) + CHUNK_OVERHEAD;
        let (a, b) = (&self.nodes[from as usize], &self.nodes[to as usize]);
        let mut res = [a.up, b.down, 0, 0];
        let mut nres = 2;
        if a.site != b.site {
            res[2] = self.sites[a.site as usize].wan_up;
            res[3] = self.sites[b.site as usize].wan_down;
            nres = 4;
        }
        let flow = Flow {
            from,
            to,
            req,
            file,
            index,
            total: len as f64,
            done: 0.0,
            rate: 0.0,
            last: self.now,
            res,
            nres,
            ver: 0,
            latency: self.latency(from, to),
            corrupt: a.corrupt,
        };
        let mut out = Vec::new();
        let id = self.net.start(self.now, flow, &mut out);
        self.nodes[from as usize].uploads += 1;
        self.by_req.insert((from, req), id);
        self.stats.peak_flows = self.stats.peak_flows.max(self.net.active());
        self.reschedule(out);
    }

    fn reschedule(&mut self, out: Vec<Reschedule>) {
        for (id, ver, at) in out {
            self.push(at, Ev::FlowDone { id, ver });
        }
    }

    /// An upload slot of `node` freed: start its next queued send that can still go.
    fn next_upload(&mut self, node: u32) {
        let x = &mut self.nodes[node as usize];
        x.uploads = x.uploads.saturating_sub(1);
        while let Some((to, req, file, index)) = self.nodes[node as usize].upload_queue.pop_front()
        {
            if self.linked(node, to) {
                self.start_flow(node, to, req, file, index);
                break;
            }
        }
    }

    fn cancel_flow(&mut self, id: FlowId) {
        let mut out = Vec::new();
        if let Some(f) = self.net.finish(self.now, id, &mut out) {
            self.next_upload(f.from);
            self.by_req.remove(&(f.from, f.req));
            self.stats.cancelled += 1;
            self.count_bytes(f.from, f.to, f.done as u64, true);
            if f.from == self.publisher {
                self.stats.publisher_upload += f.done as u64;
            }
        }
        self.reschedule(out);
    }

    fn flow_done(&mut self, id: FlowId, ver: u32) {
        let current = self.net.flows.get(id as usize).and_then(|f| f.as_ref());
        if current.is_none_or(|f| f.ver != ver) {
            return;
        }
        let mut out = Vec::new();
        let Some(f) = self.net.finish(self.now, id, &mut out) else {
            return;
        };
        self.reschedule(out);
        self.next_upload(f.from);
        self.by_req.remove(&(f.from, f.req));
        self.count_bytes(f.from, f.to, f.total as u64, true);
        if f.from == self.publisher {
            self.stats.publisher_upload += f.total as u64;
        }
        self.stats.chunks += 1;
        let from = self.nodes[f.from as usize].mesh.id();
        if f.corrupt {
            self.stats.corrupt_chunks += 1;
            self.input(
                f.to,
                Input::ChunkFailed {
                    from,
                    file: f.file,
                    index: f.index,
                    reason: ChunkFailure::Corrupt,
                },
            );
            return;
        }
        if !self.nodes[f.to as usize].mesh.needs_chunk(&f.file, f.index) {
            self.stats.duplicate_chunks += 1;
        }
        self.input(
            f.to,
            Input::ChunkStored {
                from: Some(from),
                file: f.file,
                index: f.index,
            },
        );
    }

    fn release_of_version(&self, v: u64) -> Option<usize> {
        self.releases.iter().position(|r| r.version == v)
    }

    fn report(&mut self, i: u32, r: usize, status: HealthStatus) {
        let Some(m) = self.releases[r].manifest.clone() else {
            return;
        };
        let node = &self.nodes[i as usize];
        let body = HealthReportBody {
            node: node.mesh.id(),
            channel: self.channel.clone(),
            version: m.body.version,
            manifest: m.id,
            status,
            requests: 0,
            errors: 0,
            latency_p50_us: 0,
            latency_p99_us: 0,
            timestamp: T0.plus(Duration::from_micros(self.now)),
        };
        let report = HealthReport {
            signed: Signed::sign(&body, &[&node.key]),
            cert: None,
        };
        self.command(i, Command::ReportHealth(report));
    }

    fn on_event(&mut self, i: u32, e: Event) {
        let iu = i as usize;
        match e {
            Event::ManifestAccepted { version, .. } => {
                if let Some(r) = self.release_of_version(version) {
                    let rel = &mut self.releases[r];
                    if rel.accepted[iu] == NEVER {
                        rel.accepted[iu] = self.now;
                        rel.hops[iu] = match self.cur_hop {
                            Some((cr, h)) if cr == r => h,
                            _ => 0,
                        };
                    }
                }
            }
            Event::FileComplete { file } => {
                if let Some(&(_, _, r)) = self.files.get(&file)
                    && self.releases[r].complete[iu] == NEVER
                {
                    self.releases[r].complete[iu] = self.now;
                }
            }
            Event::Activate { version, .. } => {
                let Some(r) = self.release_of_version(version) else {
                    return;
                };
                let spec = &self.sc.releases[self.releases[r].spec];
                if spec.fail_on_weak && self.nodes[iu].weak {
                    self.releases[r].failed[iu] = true;
                    self.report(
                        i,
                        r,
                        HealthStatus::Failed {
                            class: ErrorClass::GoldenMismatch,
                            detail: "golden check failed on this device class".into(),
                        },
                    );
                    return;
                }
                self.nodes[iu].serving = Some(version);
                if self.releases[r].active[iu] == NEVER {
                    self.releases[r].active[iu] = self.now;
                }
                if self.releases[r].gated {
                    self.report(i, r, HealthStatus::Ok);
                }
            }
            Event::RollBack { from, to, .. } => {
                self.nodes[iu].serving = to.map(|t| t.0);
                if let Some(r) = self.release_of_version(from) {
                    self.releases[r].rolled_back[iu] = true;
                    if self.releases[r].gated {
                        self.report(i, r, HealthStatus::RolledBack);
                    }
                }
            }
            Event::RolloutFailed { version, .. } => {
                if let Some(r) = self.release_of_version(version)
                    && self.releases[r].gate_failed == NEVER
                {
                    self.releases[r].gate_failed = self.now;
                }
            }
            Event::Rejected { label, .. } => {
                *self.stats.rejected.entry(label.to_string()).or_default() += 1;
            }
            Event::Equivocation { .. } => self.stats.equivocations += 1,
            _ => {}
        }
    }

    fn manifest_for(&mut self, r: usize, version: u64, salt: u8) -> SignedManifest {
        let spec = self.sc.releases[self.releases[r].spec].clone();
        let chunk = ChunkSize::new(spec.chunk.0).expect("validated");
        let count = pollen_protocol::chunking::chunk_count(spec.size.0, chunk);
        // Synthetic chaining values: chunks are never hashed in the simulator (a corrupt
        // chunk is a flag on its flow), but the manifest has the real size and layout.
        let mut seed = ChaCha8Rng::seed_from_u64(self.seed ^ version ^ (u64::from(salt) << 56));
        let cvs: Vec<[u8; 32]> = if count > 1 {
            (0..count)
                .map(|_| {
                    let mut b = [0u8; 32];
                    seed.fill_bytes(&mut b);
                    b
                })
                .collect()
        } else {
            Vec::new()
        };
        let content_id = if count > 1 {
            root_from_chaining_values(&cvs).expect("non-empty")
        } else {
            let mut b = [0u8; 32];
            seed.fill_bytes(&mut b);
            ContentId(b)
        };
        let file = FileSpec {
            content_id,
            size: spec.size.0,
            chunk_size: chunk,
            chaining_values: cvs,
        };
        let gate = spec.gate.map(|g| Gate {
            min_healthy: g.min_healthy,
            max_failure_ppm: (g.max_failure * 1e6).round().clamp(0.0, 1e6) as u32,
        });
        let plan = RolloutPlan::percent(
            &spec.stages,
            Duration::from_micros(spec.stage_interval.0),
            gate,
        );
        let created = T0.plus(Duration::from_micros(self.now));
        let body = ManifestBody {
            channel: self.channel.clone(),
            version,
            artifact: Artifact {
                variants: vec![Variant {
                    name: "default".into(),
                    requires: Default::default(),
                    files: vec![FileEntry {
                        name: "model.onnx".into(),
                        spec: file,
                    }],
                }],
            },
            model: ModelMeta::default(),
            golden: vec![],
            rollout: plan,
            created,
            expires: created.plus(Duration::from_secs(365 * 86_400)),
            replaces: None,
        };
        Signed::sign(&body, &[&self.publisher_key])
    }

    fn publish(&mut self, r: usize) {
        let version = self.releases[r].version;
        let signed = self.manifest_for(r, version, 0);
        let m = Arc::new(Manifest::decode(signed.clone()).expect("own manifest decodes"));
        let spec = &m.body.artifact.variants[0].files[0].spec;
        self.files
            .insert(spec.content_id, (spec.size, spec.chunk_size.get(), r));
        let n = self.nodes.len();
        let rel = &mut self.releases[r];
        rel.published = self.now;
        for k in 0..n {
            rel.stage[k] = m
                .stage_of(&self.nodes[k].mesh.id())
                .map_or(u8::MAX, |s| s as u8);
        }
        rel.manifest = Some(m.clone());
        let p = self.publisher;
        self.cur_hop = None;
        self.command(p, Command::Publish(signed));
        let chunks = Bitfield::full(spec.chunk_count() as u32);
        self.command(
            p,
            Command::LocalChunks {
                file: spec.content_id,
                chunks,
            },
        );
        self.command(p, Command::Pin(m.id));
    }

    fn deliver(&mut self, to: u32, from: u32, msg: Message) {
        if !self.linked(from, to) {
            return;
        }
        self.stats.messages += 1;
        self.cur_hop = None;
        if let Message::Manifest(m) = &msg {
            let id = ManifestId(m.body_hash());
            if let Some(r) = self
                .releases
                .iter()
                .position(|r| r.manifest.as_ref().is_some_and(|x| x.id == id))
            {
                self.releases[r].payloads += 1;
                let h = self.releases[r].hops[from as usize];
                self.cur_hop = Some((r, h.saturating_add(1)));
            }
        }
        let peer = self.nodes[from as usize].mesh.id();
        self.input(to, Input::Received { from: peer, msg });
        self.cur_hop = None;
    }

    fn attack(&mut self) {
        let n = self.nodes.len();
        let first = self.releases.first().and_then(|r| r.manifest.clone());
        let forger = key_from(&mut self.rng);
        for i in 0..n as u32 {
            let (replay, forge, flood) = {
                let x = &self.nodes[i as usize];
                (x.replay, x.forge, x.flood)
            };
            if !(replay || forge || flood) || !self.nodes[i as usize].online {
                continue;
            }
            let peers = self.up_peers(i);
            let minute = self.now % 60_000_000 < 1_000_000;
            if replay
                && minute
                && let Some(m) = &first
            {
                for &j in &peers {
                    self.send(i, j, Message::Manifest(m.signed.clone()));
                }
            }
            if forge && minute && !self.releases.is_empty() {
                let mut body = self.releases[0].manifest.as_ref().map(|m| m.body.clone());
                if let Some(b) = body.as_mut() {
                    b.version = 1_000_000 + self.now / 1_000_000;
                    let s: SignedManifest = Signed::sign(b, &[&forger]);
                    for &j in &peers {
                        self.send(i, j, Message::Manifest(s.clone()));
                    }
                }
            }
            if flood {
                for &j in &peers {
                    let ids: Vec<ObjectId> = (0..100)
                        .map(|_| {
                            let mut b = [0u8; 32];
                            self.rng.fill_bytes(&mut b);
                            ObjectId::Manifest(ManifestId(b))
                        })
                        .collect();
                    self.send(i, j, Message::IHave(ids));
                }
            }
        }
        self.push(self.now + 1_000_000, Ev::Attack);
    }

    /// Neighbours node `i` is connected to now.
    fn up_peers(&self, i: u32) -> Vec<u32> {
        self.nodes[i as usize]
            .adj
            .iter()
            .filter(|e| e.1)
            .map(|e| e.0)
            .collect()
    }

    fn equivocate(&mut self) {
        let Some(r) = self.releases.iter().rposition(|r| r.manifest.is_some()) else {
            return;
        };
        let version = self.releases[r].version;
        let signed = self.manifest_for(r, version, 1);
        let i = (0..self.nodes.len() as u32)
            .find(|&i| {
                let x = &self.nodes[i as usize];
                x.corrupt || x.replay || x.forge || x.flood
            })
            .unwrap_or((self.publisher + 1) % self.nodes.len() as u32);
        let peers = self.up_peers(i);
        for j in peers {
            self.send(i, j, Message::Manifest(signed.clone()));
        }
    }

    fn on_off(&mut self, spec: &OnOff, on: bool) -> u64 {
        exp(
            &mut self.rng,
            if on { spec.mean_up.0 } else { spec.mean_down.0 }.max(1),
        )
    }

    fn site_nodes(&self, s: u32) -> std::ops::Range<u32> {
        let (a, b) = self.sites[s as usize].nodes;
        a..b
    }

    fn sample(&mut self) {
        let n = self.nodes.len();
        let mut row = Row {
            t: self.now,
            active: Vec::new(),
            complete: Vec::new(),
            bytes: self.stats.bytes,
            serving: vec![0; self.releases.len()],
            online: self.nodes.iter().filter(|x| x.online).count() as u32,
        };
        for r in &self.releases {
            let stages = self.sc.releases[r.spec].stages.len();
            let mut per = vec![0u32; stages];
            let mut complete = 0;
            for k in 0..n {
                if r.active[k] != NEVER
                    && !r.rolled_back[k]
                    && let Some(c) = per.get_mut(r.stage[k] as usize)
                {
                    *c += 1;
                }
                if r.complete[k] != NEVER {
                    complete += 1;
                }
            }
            row.active.push(per);
            row.complete.push(complete);
        }
        for x in &self.nodes {
            if let Some(v) = x.serving
                && let Some(r) = self.releases.iter().position(|r| r.version == v)
            {
                row.serving[r] += 1;
            }
        }
        self.rows.push(row);
        if let Some(b) = &self.progress {
            b.set_position(self.now / 1_000_000);
        }
    }

    /// Has every node settled: all releases published, nothing in flight, and every
    /// honest online node serving the last release (or failed on it, or out of its plan,
    /// or the release failed its gate and the node went back)?
    fn settled(&self) -> bool {
        let sc = &self.sc;
        let scripted = sc
            .releases
            .iter()
            .map(|r| r.at.0)
            .chain(sc.adversaries.equivocate_at.map(|d| d.0))
            .chain(sc.outages.iter().chain(&sc.partitions).map(|o| o.until.0))
            .chain(sc.late_joiners.iter().map(|l| l.at.0))
            .max()
            .unwrap_or(0);
        if self.now < scripted {
            return false;
        }
        let Some(last) = self.releases.last() else {
            return true;
        };
        if last.manifest.is_none() || self.net.active() > 0 {
            return false;
        }
        (0..self.nodes.len()).all(|k| {
            let x = &self.nodes[k];
            let honest = !(x.corrupt || x.replay || x.forge || x.flood);
            !honest
                || !x.online
                || x.serving == Some(last.version)
                || last.failed[k]
                || last.stage[k] == u8::MAX
                || (last.gate_failed != NEVER && x.serving != Some(last.version))
        })
    }

    /// Run to the end of the scenario (or until every node settled).
    pub fn run(&mut self) {
        let end = self.sc.duration.0;
        let mut quiet_samples = 0;
        while let Some(Reverse(item)) = self.queue.pop() {
            if item.t > end {
                break;
            }
            self.now = self.now.max(item.t);
            self.stats.events += 1;
            match item.ev {
                Ev::Deliver { to, from, msg } => self.deliver(to, from, *msg),
                Ev::FlowDone { id, ver } => self.flow_done(id, ver),
                Ev::Timer { node, at } => {
                    if self.nodes[node as usize].timer_at == Some(at) {
                        self.nodes[node as usize].timer_at = None;
                        let now = self.clocks();
                        self.nodes[node as usize].mesh.handle_timeout(now);
                        self.drain(node);
                    }
                }
                Ev::Publish { release } => self.publish(release),
                Ev::NodeOnline { node, on, churn } => {
                    self.nodes[node as usize].online = on;
                    self.refresh_links(node);
                    if churn && let Some(c) = self.sc.churn.clone() {
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
                Ev::SiteWan { site, on, churn } => {
                    self.sites[site as usize].wan_on = on;
                    for k in self.site_nodes(site) {
                        self.refresh_links(k);
                    }
                    if churn && let Some(c) = self.sc.intermittent_sites.clone() {
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
                Ev::SitePower { site, on } => {
                    self.sites[site as usize].powered = on;
                    for k in self.site_nodes(site) {
                        self.refresh_links(k);
                    }
                }
                Ev::SiteCut { site, on } => {
                    self.sites[site as usize].cut = on;
                    for k in self.site_nodes(site) {
                        self.refresh_links(k);
                    }
                }
                Ev::Attack => self.attack(),
                Ev::Equivocate => self.equivocate(),
                Ev::Sample => {
                    self.sample();
                    if self.settled() {
                        quiet_samples += 1;
                    } else {
                        quiet_samples = 0;
                    }
                    if quiet_samples >= 3 {
                        self.settled_at = Some(self.now);
                        break;
                    }
                    self.push(self.now + self.sample_every, Ev::Sample);
                }
            }
        }
        self.sample();
        if let Some(b) = &self.progress {
            b.finish_and_clear();
        }
    }

    /// A hash of every output of every node with its time, and of the final state.
    pub fn trace_hash(&self) -> String {
        let mut h = self.trace.clone();
        h.update(&self.stats.events.to_le_bytes());
        h.finalize().to_hex()[..16].to_string()
    }

    /// Number of nodes.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// The publisher's index.
    pub fn publisher(&self) -> u32 {
        self.publisher
    }

    /// Facts about a node for the report: (site, online, weak, adversary, up, down bytes/s).
    pub fn node_facts(&self, k: usize) -> (u32, bool, bool, bool, f64, f64) {
        let x = &self.nodes[k];
        (
            x.site,
            x.online && self.sites[x.site as usize].powered,
            x.weak,
            x.corrupt || x.replay || x.forge || x.flood,
            self.net.res[x.up as usize].cap * 1e6,
            self.net.res[x.down as usize].cap * 1e6,
        )
    }

    /// Sites: (name, WAN bytes in, WAN down bytes/s, holds the publisher).
    pub fn site_facts(&self) -> Vec<(String, u64, f64, bool)> {
        let ps = self.nodes[self.publisher as usize].site;
        self.sites
            .iter()
            .enumerate()
            .map(|(i, s)| {
                (
                    s.name.clone(),
                    s.wan_in,
                    self.net.res[s.wan_down as usize].cap * 1e6,
                    i as u32 == ps,
                )
            })
            .collect()
    }
}
