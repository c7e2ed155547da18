//! A deterministic in-memory harness: N [`Mesh`] state machines over virtual time, with
//! seeded links that have latency, jitter (reordering) and a per-node upload bandwidth.
//!
//! It plays the driver's part for every node: delivers messages, models chunk transfers as
//! `size / bandwidth` on the sender's uplink, answers activations with health reports
//! according to a policy, and records statistics for assertions. Behind the `test-utils`
//! feature; the simulator (`pollen-sim`) grows the same idea to thousands of nodes.
//!
//! Bounded by construction: [`Harness::run_until`] stops after `max_steps` events and panics
//! with the seed, so a livelock fails a test instead of hanging it.

use crate::chunking::FileSpec;
use crate::ids::{ContentId, ManifestId, NodeId};
use crate::io::{ChunkFailure, Command, Event, Input, Output};
use crate::manifest::{Channel, SignedManifest};
use crate::rollout::HealthReport;
use crate::state::{Config, Mesh};
use crate::time::{Instant, Now, UnixTime};
use crate::trust::SignedTrustRoot;
use crate::wire::{Bitfield, Message};
use alloc::collections::{BTreeMap, BTreeSet, BinaryHeap};
use core::cmp::Reverse;
use core::time::Duration;
use ed25519_dalek::SigningKey;
use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};

mod fixtures;
mod link;
mod policy;
mod topology;

pub use fixtures::{Operator, manifest_body, random_file_spec};
pub use link::LinkModel;
pub use policy::HealthPlan;
use policy::Policy;

/// Per-node harness state besides the state machine.
#[derive(Debug)]
pub struct HarnessNode {
    /// The node's key (its id is the public key).
    pub key: SigningKey,
    /// The state machine.
    pub mesh: Mesh<ChaCha8Rng>,
    /// Serves corrupt chunks.
    pub corrupt: bool,
    /// Upload bandwidth of this node, bytes per second, if not the link model's.
    pub upload_bytes_per_sec: Option<u64>,
    /// The certificate this node shows peers (fleets).
    pub cert: Option<crate::trust::SignedNodeCert>,
    /// What the node serves now, per channel.
    pub active: BTreeMap<Channel, (u64, ManifestId)>,
    /// Every (channel, version) this node ever served.
    pub served: BTreeSet<(Channel, u64)>,
    /// Every event the node emitted, with the time.
    pub events: Vec<(Instant, Event)>,
    /// How far this node's wall clock is off the harness's, in milliseconds (clock skew).
    pub clock_offset_ms: i64,
    /// Stopped (see [`Harness::stop`]): its timers do not run.
    pub down: bool,
    uplink_free: Instant,
    timer_at: Option<Instant>,
}

impl HarnessNode {
    /// The node id.
    pub fn id(&self) -> NodeId {
        self.mesh.id()
    }
}

/// Counters for assertions.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    /// Chunk transfers that arrived intact.
    pub chunk_transfers: u64,
    /// Of those, arrivals of chunks the receiver already held.
    pub duplicate_transfers: u64,
    /// Corrupt chunks that arrived (and were refused).
    pub corrupt_arrivals: u64,
    /// Times a node stored a chunk it already had (must stay 0).
    pub double_stores: u64,
    /// Bytes uploaded per node.
    pub uploaded: Vec<u64>,
    /// Control messages delivered.
    pub messages: u64,
}

#[derive(Debug)]
enum Ev {
    Deliver {
        to: usize,
        from: usize,
        msg: Message,
    },
    Chunk {
        to: usize,
        from: usize,
        file: ContentId,
        index: u32,
    },
    Timer {
        node: usize,
    },
    Report {
        node: usize,
        report: HealthReport,
    },
}

/// N state machines on virtual time.
pub struct Harness {
    /// The nodes.
    pub nodes: Vec<HarnessNode>,
    /// Counters.
    pub stats: Stats,
    /// The seed this run was built from.
    pub seed: u64,
    /// Links.
    pub link: LinkModel,
    /// Hard cap on events per `run_*` call.
    pub max_steps: u64,
    index: BTreeMap<NodeId, usize>,
    now: Instant,
    wall_origin: UnixTime,
    queue: BinaryHeap<Reverse<(Instant, u64)>>,
    pending: BTreeMap<u64, Ev>,
    seq: u64,
    rng: ChaCha8Rng,
    edges: BTreeSet<(usize, usize)>,
    cut: BTreeSet<usize>,
    stored: BTreeSet<(usize, ContentId, u32)>,
    policy: Policy,
    trace: blake3::Hasher,
    next_cmd: u64,
    /// Latest delivery time per directed link (control messages keep their order).
    fifo: BTreeMap<(usize, usize), Instant>,
}

impl core::fmt::Debug for Harness {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Harness")
            .field("nodes", &self.nodes.len())
            .field("now", &self.now)
            .field("seed", &self.seed)
            .finish()
    }
}

impl Harness {
    /// `n` nodes with `config`, links from `link`, everything seeded from `seed`. Wall-clock
    /// time starts at `wall_origin` when virtual time is zero.
    pub fn new(
        n: usize,
        config: Config,
        link: LinkModel,
        seed: u64,
        wall_origin: UnixTime,
    ) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut nodes = Vec::with_capacity(n);
        let mut index = BTreeMap::new();
        let now = Now::new(Instant::ZERO, wall_origin);
        for i in 0..n {
            let mut b = [0u8; 32];
            rng.fill_bytes(&mut b);
            let key = SigningKey::from_bytes(&b);
            let id = NodeId::from(&key);
            let node_rng = ChaCha8Rng::seed_from_u64(rng.next_u64());
            index.insert(id, i);
            nodes.push(HarnessNode {
                key,
                mesh: Mesh::new(id, config.clone(), node_rng, now),
                corrupt: false,
                cert: None,
                upload_bytes_per_sec: None,
                active: BTreeMap::new(),
                served: BTreeSet::new(),
                events: Vec::new(),
                clock_offset_ms: 0,
                down: false,
                uplink_free: Instant::ZERO,
                timer_at: None,
            });
        }
        Harness {
            nodes,
            stats: Stats {
                uploaded: vec![0; n],
                ..Stats::default()
            },
            seed,
            link,
            max_steps: 20_000_000,
            index,
            now: Instant::ZERO,
            wall_origin,
            queue: BinaryHeap::new(),
            pending: BTreeMap::new(),
            seq: 0,
            rng,
            edges: BTreeSet::new(),
            cut: BTreeSet::new(),
            stored: BTreeSet::new(),
            policy: Box::new(|_, _, _| HealthPlan::ok()),
            trace: blake3::Hasher::new(),
            next_cmd: 1,
            fifo: BTreeMap::new(),
        }
    }

    /// Current virtual time.
    pub fn now(&self) -> Instant {
        self.now
    }

    /// Current wall-clock time.
    pub fn wall(&self) -> UnixTime {
        self.wall_origin.plus(self.now - Instant::ZERO)
    }

    /// Node `i`'s wall clock: the harness's, off by the node's `clock_offset_ms`.
    pub fn wall_of(&self, i: usize) -> UnixTime {
        let w = self.wall();
        let off = self.nodes[i].clock_offset_ms;
        if off >= 0 {
            w.plus(Duration::from_millis(off as u64))
        } else {
            w.minus(Duration::from_millis(off.unsigned_abs()))
        }
    }

    fn clocks(&self, i: usize) -> Now {
        Now::new(self.now, self.wall_of(i))
    }

    /// Set the health policy: what node `i` reports for (channel, version).
    pub fn set_policy(&mut self, p: impl FnMut(usize, &Channel, u64) -> HealthPlan + 'static) {
        self.policy = Box::new(p);
    }

    /// A hash of every output of every node so far, with its time: equal runs, equal hash.
    pub fn trace_hash(&self) -> [u8; 32] {
        *self.trace.clone().finalize().as_bytes()
    }

    /// Give every node the trust root.
    pub fn install_trust(&mut self, trust: &SignedTrustRoot) {
        for i in 0..self.nodes.len() {
            let res = self.command(i, Command::SetTrustRoot(trust.clone()));
            assert!(res.is_ok(), "trust root refused: {res:?}");
        }
    }

    /// Run a command on node `i`; returns its result.
    pub fn command(&mut self, i: usize, cmd: Command) -> Result<(), String> {
        let id = self.next_cmd;
        self.next_cmd += 1;
        let before = self.nodes[i].events.len();
        self.input(i, Input::Command { id, cmd });
        self.nodes[i].events[before..]
            .iter()
            .find_map(|(_, e)| match e {
                Event::CommandDone { id: x, result } if *x == id => Some(result.clone()),
                _ => None,
            })
            .unwrap_or_else(|| Err("no result".into()))
    }

    /// Publish on node `i`: inject the manifest, then tell it it holds every chunk of
    /// `files`.
    pub fn publish(
        &mut self,
        i: usize,
        m: &SignedManifest,
        files: &[&FileSpec],
    ) -> Result<(), String> {
        self.command(i, Command::Publish(m.clone()))?;
        for f in files {
            let chunks = Bitfield::full(f.chunk_count() as u32);
            self.command(
                i,
                Command::LocalChunks {
                    file: f.content_id,
                    chunks,
                },
            )?;
        }
        Ok(())
    }

    /// Deliver `msg` to node `to` as if node `from` sent it, now.
    pub fn inject(&mut self, from: usize, to: usize, msg: Message) {
        let from_id = self.nodes[from].id();
        self.input(to, Input::Received { from: from_id, msg });
    }

    /// Feed an input to node `i` and process its outputs.
    pub fn input(&mut self, i: usize, input: Input) {
        let now = self.clocks(i);
        self.nodes[i].mesh.handle(now, input);
        self.drain(i);
    }

    fn push(&mut self, at: Instant, ev: Ev) {
        self.seq += 1;
        self.pending.insert(self.seq, ev);
        self.queue.push(Reverse((at, self.seq)));
    }

    fn drain(&mut self, i: usize) {
        while let Some(out) = self.nodes[i].mesh.poll_output() {
            self.trace.update(&self.now.as_micros().to_le_bytes());
            self.trace.update(&(i as u64).to_le_bytes());
            self.trace.update(format!("{out:?}").as_bytes());
            match out {
                Output::Send { to, msg } => {
                    if let Some(&j) = self.index.get(&to)
                        && self.linked(i, j)
                    {
                        // One stream per direction: control messages arrive in order.
                        let d = self.delay();
                        let at = (self.now + d)
                            .max(self.fifo.get(&(i, j)).copied().unwrap_or(Instant::ZERO));
                        self.fifo.insert((i, j), at);
                        self.push(
                            at,
                            Ev::Deliver {
                                to: j,
                                from: i,
                                msg,
                            },
                        );
                    }
                }
                Output::SendChunk {
                    to,
                    id: _,
                    file,
                    index,
                } => {
                    let Some(&j) = self.index.get(&to) else {
                        continue;
                    };
                    let len = self.nodes[i]
                        .mesh
                        .chunk_spec(&file)
                        .and_then(|s| s.chunk_len(u64::from(index)).ok())
                        .unwrap_or(0);
                    let bw = self.nodes[i]
                        .upload_bytes_per_sec
                        .unwrap_or(self.link.upload_bytes_per_sec)
                        .max(1);
                    let start = self.now.max(self.nodes[i].uplink_free);
                    let end = start + Duration::from_micros(len * 1_000_000 / bw);
                    self.nodes[i].uplink_free = end;
                    self.stats.uploaded[i] += len;
                    let d = self.delay();
                    self.push(
                        end + d,
                        Ev::Chunk {
                            to: j,
                            from: i,
                            file,
                            index,
                        },
                    );
                }
                Output::CancelChunk { .. } => {}
                Output::Disconnect { peer, .. } => {
                    if let Some(&j) = self.index.get(&peer) {
                        // Closing the connection: the other side sees it go down.
                        let me = self.nodes[i].id();
                        let now = self.clocks(j);
                        self.nodes[j].mesh.handle(now, Input::PeerDown { peer: me });
                        self.drain(j);
                        self.edges.remove(&(i.min(j), i.max(j)));
                    }
                }
                Output::Event(e) => {
                    self.on_event(i, &e);
                    self.nodes[i].events.push((self.now, e));
                }
            }
        }
        self.arm_timer(i);
    }

    fn arm_timer(&mut self, i: usize) {
        if let Some(t) = self.nodes[i].mesh.poll_timeout() {
            let armed = self.nodes[i].timer_at;
            if armed.is_none_or(|a| t < a || a < self.now) {
                self.nodes[i].timer_at = Some(t);
                self.push(t.max(self.now), Ev::Timer { node: i });
            }
        }
    }

    /// Process events until virtual time `until` (inclusive) or the queue empties.
    pub fn run_until(&mut self, until: Instant) {
        let mut steps = 0u64;
        while let Some(Reverse((t, seq))) = self.queue.peek().copied() {
            if t > until {
                break;
            }
            steps += 1;
            assert!(
                steps <= self.max_steps,
                "harness exceeded {} steps (seed {}): livelock?",
                self.max_steps,
                self.seed
            );
            self.queue.pop();
            self.now = self.now.max(t);
            let Some(ev) = self.pending.remove(&seq) else {
                continue;
            };
            self.step(ev);
        }
        self.now = self.now.max(until);
    }

    /// Run for `d` of virtual time.
    pub fn run_for(&mut self, d: Duration) {
        let until = self.now + d;
        self.run_until(until);
    }

    fn step(&mut self, ev: Ev) {
        match ev {
            Ev::Deliver { to, from, msg } => {
                if !self.linked(to, from) || !self.edges.contains(&(to.min(from), to.max(from))) {
                    return;
                }
                self.stats.messages += 1;
                let from_id = self.nodes[from].id();
                self.input(to, Input::Received { from: from_id, msg });
            }
            Ev::Chunk {
                to,
                from,
                file,
                index,
            } => {
                if !self.linked(to, from) || !self.edges.contains(&(to.min(from), to.max(from))) {
                    return;
                }
                let from_id = self.nodes[from].id();
                if self.nodes[from].corrupt {
                    self.stats.corrupt_arrivals += 1;
                    let reason = ChunkFailure::Corrupt;
                    self.input(
                        to,
                        Input::ChunkFailed {
                            from: from_id,
                            file,
                            index,
                            reason,
                        },
                    );
                    return;
                }
                self.stats.chunk_transfers += 1;
                if !self.nodes[to].mesh.needs_chunk(&file, index) {
                    self.stats.duplicate_transfers += 1;
                    return;
                }
                if !self.stored.insert((to, file, index)) {
                    self.stats.double_stores += 1;
                }
                self.input(
                    to,
                    Input::ChunkStored {
                        from: Some(from_id),
                        file,
                        index,
                    },
                );
            }
            Ev::Timer { node } => {
                if self.nodes[node].timer_at.is_some_and(|t| t <= self.now) {
                    self.nodes[node].timer_at = None;
                }
                if self.nodes[node].down {
                    return;
                }
                let now = self.clocks(node);
                self.nodes[node].mesh.handle_timeout(now);
                self.drain(node);
            }
            Ev::Report { node, report } => {
                let _ = self.command(node, Command::ReportHealth(report));
            }
        }
    }

    /// Does node `i` hold every chunk of `file`?
    pub fn has_file(&self, i: usize, file: &FileSpec) -> bool {
        (0..file.chunk_count() as u32).all(|c| self.nodes[i].mesh.has_chunk(&file.content_id, c))
    }

    /// Index of a node by id.
    pub fn index_of(&self, id: &NodeId) -> Option<usize> {
        self.index.get(id).copied()
    }
}
