//! The discrete-event engine: the protocol core (`pollen_protocol::Mesh`, the same code a
//! node runs) on every simulated node, driven over virtual time by events ordered by
//! (time, sequence number).
//!
//! Determinism: one master seed gives the engine's RNG (topology, churn, loss, who
//! misbehaves) and, through it, each node's RNG and key; every collection iterated is
//! ordered (vectors, `BTreeMap`); hash maps are only looked up. The same scenario and seed
//! give the same outputs and the same trace hash.
//!
//! The contract: [`Sim::new`] builds the world of a scenario and a seed, [`Sim::run`] runs
//! it to the end (or until every node settled), and the report reads the result, read
//! only, through the pub fields ([`Sim::releases`], [`Sim::rows`], [`Sim::stats`], ...)
//! and the getters ([`Sim::node_facts`], [`Sim::site_facts`], [`Sim::release_spec`],
//! [`Sim::trace_hash`]). Nodes, sites and the event queue are private to the engine.
//!
//! Layout. This file is the driver: [`Sim`], the events (`Ev`) and their queue
//! (`TimedQueue`), the run loop, and the only path into a node's core (`input`,
//! `command`, `drain`, `arm_timer`). The other files add `impl Sim` blocks and call back
//! into the driver, never into each other in a circle:
//! - `world`: building the world (sites, nodes, peer graph, adversaries), scheduling its
//!   scripted events (releases, churn, outages, partitions, late joiners) and applying them;
//! - `transfer`: links up and down, control messages (send, loss, deliver), chunk flows and
//!   upload slots, byte accounting;
//! - `releases`: per-release tracking, building and publishing manifests;
//! - `events`: what the engine does with the core's events (bookkeeping, health reports);
//! - `adversary`: replayed, forged and flooded announcements, the equivocation;
//! - `sample`: counters, the time series, the "settled" test and the facts the report reads;
//! - `rand`: the few random draws on the engine's RNG.

mod adversary;
mod events;
mod rand;
mod releases;
mod sample;
mod transfer;
mod world;

pub use releases::ReleaseTrack;
pub use sample::{LinkBytes, NodeFacts, Row, SiteFacts, Stats};

use crate::net::{FlowId, Net};
use crate::scenario::Scenario;
use pollen_protocol::manifest::Channel;
use pollen_protocol::trust::SignedTrustRoot;
use pollen_protocol::wire::Message;
use pollen_protocol::{
    Command, ContentId, Input, Instant, NodeId, Now, Output, SigningKey, UnixTime,
};
use rand_chacha::ChaCha8Rng;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::time::Duration;
use world::{NodeState, SiteState};

/// Wall-clock time at virtual time zero.
pub const T0: UnixTime = UnixTime::from_secs(1_700_000_000);
/// Not yet (a time never reached).
pub const NEVER: u64 = u64::MAX;

/// What can happen at a point of virtual time.
#[derive(Debug)]
enum Ev {
    /// A control message arrives.
    Deliver {
        to: u32,
        from: u32,
        msg: Box<Message>,
    },
    /// A chunk flow should be complete (stale if the flow's version moved on).
    FlowDone { id: FlowId, ver: u32 },
    /// A node's core asked to be woken (stale unless it is still the node's armed time).
    Timer { node: u32, at: u64 },
    /// The publisher publishes a release.
    Publish { release: usize },
    /// A node goes on or off line (churn: and schedules its next switch).
    NodeOnline { node: u32, on: bool, churn: bool },
    /// A site's WAN link goes up or down (churn: and schedules its next switch).
    SiteWan { site: u32, on: bool, churn: bool },
    /// A site's power (outages).
    SitePower { site: u32, on: bool },
    /// A site is cut from the others (on) or rejoins them.
    SiteCut { site: u32, on: bool },
    /// The adversaries' once-a-second round.
    Attack,
    /// An adversary sends a second manifest for the last release's version.
    Equivocate,
    /// Take a row of the time series (and test whether the run has settled).
    Sample,
}

/// A min-queue of events by time; events at the same time come out in the order they were
/// pushed (or last moved).
///
/// Two kinds of entries share the order: plain events, and keyed ones, at most one per key
/// (a flow's completion). Moving a keyed entry replaces it in place: a flow whose rate
/// changes a hundred times leaves no stale events behind to be popped and skipped (they
/// were 42% of the events speed-10k-64m popped, 55% of lan-1000's).
#[derive(Debug)]
struct TimedQueue<E> {
    heap: BinaryHeap<Reverse<Timed<E>>>,
    /// Sequence number of the last push.
    seq: u64,
    /// The keyed entries: a binary min-heap by (time, sequence)...
    keyed: Vec<(Timed<E>, u32)>,
    /// ...and where each key sits in it (`NOT_QUEUED`: nowhere).
    pos: Vec<u32>,
}

const NOT_QUEUED: u32 = u32::MAX;

/// An event with its time and push sequence number; ordered by (time, sequence) only.
#[derive(Debug)]
struct Timed<E> {
    t: u64,
    seq: u64,
    ev: E,
}

impl<E> PartialEq for Timed<E> {
    fn eq(&self, o: &Self) -> bool {
        (self.t, self.seq) == (o.t, o.seq)
    }
}
impl<E> Eq for Timed<E> {}
impl<E> PartialOrd for Timed<E> {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl<E> Ord for Timed<E> {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.t, self.seq).cmp(&(o.t, o.seq))
    }
}

impl<E> TimedQueue<E> {
    fn new() -> Self {
        TimedQueue {
            heap: BinaryHeap::new(),
            seq: 0,
            keyed: Vec::new(),
            pos: Vec::new(),
        }
    }

    /// Schedule `ev` at time `t`.
    fn push(&mut self, t: u64, ev: E) {
        self.seq += 1;
        self.heap.push(Reverse(Timed {
            t,
            seq: self.seq,
            ev,
        }));
    }

    /// Schedule `ev` at time `t` as the entry of `key`, replacing the one it had.
    fn set(&mut self, key: u32, t: u64, ev: E) {
        self.seq += 1;
        let entry = Timed {
            t,
            seq: self.seq,
            ev,
        };
        let k = key as usize;
        if k >= self.pos.len() {
            self.pos.resize(k + 1, NOT_QUEUED);
        }
        let at = self.pos[k];
        if at == NOT_QUEUED {
            self.keyed.push((entry, key));
            let last = self.keyed.len() - 1;
            self.pos[k] = last as u32;
            self.sift_up(last);
        } else {
            // The new time may be earlier or later than the old one.
            self.keyed[at as usize].0 = entry;
            self.resift(at as usize);
        }
    }

    /// Drop the entry of `key`, if it has one.
    fn unset(&mut self, key: u32) {
        if let Some(&at) = self.pos.get(key as usize)
            && at != NOT_QUEUED
        {
            self.remove_keyed(at as usize);
        }
    }

    fn remove_keyed(&mut self, at: usize) -> Timed<E> {
        let last = self.keyed.len() - 1;
        self.swap_keyed(at, last);
        let (entry, key) = self.keyed.pop().expect("not empty");
        self.pos[key as usize] = NOT_QUEUED;
        if at < self.keyed.len() {
            self.resift(at);
        }
        entry
    }

    /// Restore the heap order around the entry at `at`, whose time changed either way.
    fn resift(&mut self, at: usize) {
        let at = self.sift_up(at);
        self.sift_down(at);
    }

    fn swap_keyed(&mut self, a: usize, b: usize) {
        self.keyed.swap(a, b);
        self.pos[self.keyed[a].1 as usize] = a as u32;
        self.pos[self.keyed[b].1 as usize] = b as u32;
    }

    /// Move the entry at `at` up to its place; returns where it ended.
    fn sift_up(&mut self, mut at: usize) -> usize {
        while at > 0 {
            let parent = (at - 1) / 2;
            if self.keyed[at].0 >= self.keyed[parent].0 {
                break;
            }
            self.swap_keyed(at, parent);
            at = parent;
        }
        at
    }

    fn sift_down(&mut self, mut at: usize) {
        loop {
            let (l, r) = (2 * at + 1, 2 * at + 2);
            let mut min = at;
            if l < self.keyed.len() && self.keyed[l].0 < self.keyed[min].0 {
                min = l;
            }
            if r < self.keyed.len() && self.keyed[r].0 < self.keyed[min].0 {
                min = r;
            }
            if min == at {
                break;
            }
            self.swap_keyed(at, min);
            at = min;
        }
    }

    /// The earliest event, plain or keyed, and its time.
    fn pop(&mut self) -> Option<(u64, E)> {
        let keyed_first = match (self.heap.peek(), self.keyed.first()) {
            (_, None) => false,
            (None, Some(_)) => true,
            (Some(Reverse(p)), Some((k, _))) => k < p,
        };
        let x = if keyed_first {
            self.remove_keyed(0)
        } else {
            self.heap.pop()?.0
        };
        Some((x.t, x.ev))
    }

    /// Entries queued, plain and keyed.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.heap.len() + self.keyed.len()
    }
}

/// A file the publisher has published: what a chunk transfer needs to know of it.
#[derive(Clone, Copy, Debug)]
struct PublishedFile {
    /// Size, bytes.
    size: u64,
    /// Chunk size, bytes.
    chunk: u32,
    /// Index of its release.
    release: usize,
}

/// A simulation run.
pub struct Sim {
    /// The scenario.
    pub scenario: Scenario,
    /// The master seed.
    pub seed: u64,
    /// Virtual time, µs.
    pub now: u64,
    /// Events to come.
    queue: TimedQueue<Ev>,
    /// The engine's RNG (topology, churn, loss, adversaries); nodes have their own.
    rng: ChaCha8Rng,
    /// Every node, by index; a site's nodes are consecutive.
    nodes: Vec<NodeState>,
    /// Every site (a scenario site with `count` > 1 is several), by index.
    sites: Vec<SiteState>,
    /// Resources and flows.
    pub net: Net,
    /// Node index by node id.
    ids: HashMap<NodeId, u32>,
    /// Releases, in scenario order.
    pub releases: Vec<ReleaseTrack>,
    /// Published files by content id.
    files: HashMap<ContentId, PublishedFile>,
    /// The publisher's node index.
    publisher: u32,
    /// The key the publisher signs manifests with.
    publisher_key: SigningKey,
    /// The trust root every node starts with.
    trust: SignedTrustRoot,
    /// The one channel releases are published on.
    channel: Channel,
    /// Counters.
    pub stats: Stats,
    /// Hash of every output of every node with its time (see [`Sim::trace_hash`]).
    trace: blake3::Hasher,
    /// Time series.
    pub rows: Vec<Row>,
    /// Virtual time between two rows, µs.
    sample_every: u64,
    /// Chunk uploads a node runs at once; more wait in its queue.
    upload_slots: u32,
    /// Sends a node keeps waiting for a slot before it answers requests `Busy`.
    queued_uploads: usize,
    /// While a manifest is delivered: (release, hops to the receiver), so the
    /// `ManifestAccepted` it causes records its hop count.
    cur_hop: Option<(usize, u16)>,
    /// Progress bar (interactive runs).
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

impl Sim {
    fn push(&mut self, t: u64, ev: Ev) {
        self.queue.push(t, ev);
    }

    fn clocks(&self) -> Now {
        Now::new(
            Instant::from_micros(self.now),
            T0.plus(Duration::from_micros(self.now)),
        )
    }

    /// Hand `input` to node `i`'s core and act on what it outputs.
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

    /// Act on every output of node `i`'s core, then re-arm its timer.
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
                        self.send_chunk(i, j, id, file, index);
                    }
                }
                Output::CancelChunk { to, id } => {
                    self.trace(i, 3);
                    if let Some(&j) = self.ids.get(&to) {
                        self.cancel_upload(i, j, id);
                    }
                }
                Output::Disconnect { peer, .. } => {
                    self.trace(i, 4);
                    self.stats.penalties += 1;
                    if let Some(&j) = self.ids.get(&peer) {
                        self.ban(i, j);
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

    /// Schedule node `i`'s next timeout, unless one at or before it is already armed.
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

    /// Run to the end of the scenario (or until every node settled).
    pub fn run(&mut self) {
        let end = self.scenario.duration.0;
        let mut quiet_samples = 0;
        while let Some((t, ev)) = self.queue.pop() {
            if t > end {
                break;
            }
            self.now = self.now.max(t);
            self.stats.events += 1;
            match ev {
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
                Ev::NodeOnline { node, on, churn } => self.node_online(node, on, churn),
                Ev::SiteWan { site, on, churn } => self.site_wan(site, on, churn),
                Ev::SitePower { site, on } => self.site_power(site, on),
                Ev::SiteCut { site, on } => self.site_cut(site, on),
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
}

#[cfg(test)]
mod tests {
    use super::TimedQueue;

    /// Earliest time first; at the same time, the order of pushing.
    #[test]
    fn timed_queue_orders_by_time_then_push_order() {
        let mut q = TimedQueue::new();
        q.push(5, "c");
        q.push(1, "a");
        q.push(5, "d");
        q.push(1, "b");
        q.push(0, "first");
        let order: Vec<_> = std::iter::from_fn(|| q.pop()).collect();
        assert_eq!(
            order,
            [(0, "first"), (1, "a"), (1, "b"), (5, "c"), (5, "d")]
        );
    }

    /// A keyed entry, moved, comes out once, at its last time, in order with the plain
    /// events (same time: in the order of the last push or move); unset, never.
    #[test]
    fn keyed_entries_move_in_place_and_order_with_plain_events() {
        let mut q = TimedQueue::new();
        q.set(3, 10, "k3 first time");
        q.push(5, "p5");
        q.set(7, 5, "k7");
        q.set(3, 2, "k3");
        q.set(9, 8, "k9");
        q.push(5, "p5 later");
        q.set(1, 1, "k1");
        q.unset(1);
        q.unset(42);
        q.set(9, 20, "k9 moved later");
        assert_eq!(q.len(), 5);
        let order: Vec<_> = std::iter::from_fn(|| q.pop()).collect();
        assert_eq!(
            order,
            [
                (2, "k3"),
                (5, "p5"),
                (5, "k7"),
                (5, "p5 later"),
                (20, "k9 moved later")
            ]
        );
    }

    /// Against a model (a sorted list): many random sets, unsets and pops agree.
    #[test]
    fn keyed_entries_agree_with_a_sorted_list() {
        let mut q = TimedQueue::new();
        let mut model: Vec<(u64, u64, u32)> = Vec::new(); // (t, seq, key)
        let mut x = 0x2545_F491_u64;
        let mut seq = 0;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let key = (x % 64) as u32;
            let t = (x >> 8) % 1000;
            match (x >> 20) % 4 {
                0 | 1 => {
                    seq += 1;
                    model.retain(|e| e.2 != key);
                    model.push((t, seq, key));
                    q.set(key, t, key);
                }
                2 => {
                    model.retain(|e| e.2 != key);
                    q.unset(key);
                }
                _ => {
                    model.sort_unstable();
                    let want = (!model.is_empty()).then(|| model.remove(0));
                    assert_eq!(q.pop(), want.map(|(t, _, k)| (t, k)));
                }
            }
            assert_eq!(q.len(), model.len());
        }
    }
}
