//! The mesh state machine: one per node, holding every protocol decision.
//!
//! # Contract
//!
//! * **Inputs**: [`Mesh::handle`] with an [`Input`] and [`Mesh::handle_timeout`]. Every call
//!   takes [`Now`]: monotonic time that never goes backwards between calls, and the wall
//!   clock. Calling `handle_timeout` before the deadline does nothing.
//! * **Outputs**: after *every* call, drain [`Mesh::poll_output`] until it returns `None`,
//!   then read [`Mesh::poll_timeout`] for the next deadline.
//! * **Getters** (`id`, `status`, `chunk_spec`, ...) never mutate.
//!
//! Peer input never panics and never returns an error: a malformed or hostile message
//! becomes a penalty (and past a score, an [`Output::Disconnect`]). Chunk bytes never enter
//! the state machine: it names chunks by file and index, the driver verifies and stores
//! them and reports back. Randomness comes from the RNG handed to [`Mesh::new`], iteration
//! orders that reach outputs are BTreeMap orders, and every table has a bound from
//! [`Config`].
//!
//! # Gossip
//!
//! Manifests, trust roots and instructions spread by eager push to `eager_fanout` random
//! peers plus lazy `IHave` to the rest; a node that hears an `IHave` for something it lacks
//! pulls it (`Want`) after `ihave_delay` unless the push arrived meanwhile. Health reports
//! that change the local sample are batched and pushed each tick. Anti-entropy: on connect
//! and every `anti_entropy_interval` (to one random peer) nodes exchange a [`Digest`] and
//! pull what they lack, so a node back from hours offline catches up.
//!
//! # Chunk exchange
//!
//! Peers announce bitfields (`Have`) and new chunks (`HaveChunk`). For each peer with free
//! request slots (same site first, then lowest RTT), the scheduler requests the rarest
//! missing chunk that peer has; a peer that holds the whole file (a seed) is asked only for
//! chunks that no non-seed peer has, so seeds push new chunks into the swarm and peers
//! trade the rest. When every missing chunk is in flight, requests older than
//! `endgame_after` are duplicated to another peer (endgame) and the loser is cancelled.

use crate::bitfield::Bitfield;
use crate::ids::Channel;
use crate::ids::{ContentId, ManifestId, NodeId};
use crate::io::{Command, Event, Input, Output};
use crate::manifest::Manifest;
use crate::rollout::{HealthReport, ReportSample, SignedInstruction};
use crate::time::{Instant, Now, UnixTime};
use crate::trust::{SignedNodeCert, TrustRoot};
use crate::wire::{Message, ObjectId, RejectReason};
use alloc::collections::{BTreeMap, BTreeSet, VecDeque};
use alloc::sync::Arc;
use rand_core::Rng;

mod config;
mod exchange;
mod gossip;
mod objects;
mod peers;
mod releases;
mod status;
mod timers;

#[cfg(test)]
mod testkit;

pub use config::Config;
pub use status::{ChannelView, ReleaseRef, ReleaseView};

use config::{PENALTY_SEVERE, PENALTY_TIMEOUT};
use exchange::{FileState, Request, SUPERSEED_STALL, SuperSeed, clear_bit};
use peers::Peer;
use releases::ChannelState;
use timers::{Timer, TimerTable};

/// Maps a freshly decoded manifest to the copy to keep (see [`Mesh::set_interner`]).
pub type InternFn = Box<dyn Fn(Arc<Manifest>) -> Arc<Manifest> + Send>;

struct Interner(InternFn);

impl core::fmt::Debug for Interner {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("Interner")
    }
}

/// The state machine of one node. `R` is the RNG (seeded in the simulator).
#[derive(Debug)]
pub struct Mesh<R> {
    interner: Option<Interner>,
    id: NodeId,
    config: Config,
    rng: R,
    trust: Option<TrustRoot>,
    cert: Option<SignedNodeCert>,
    channels: BTreeMap<Channel, ChannelState>,
    /// Manifest id -> (channel, version), for every retained release.
    index: BTreeMap<ManifestId, (Channel, u64)>,
    files: BTreeMap<ContentId, FileState>,
    peers: BTreeMap<NodeId, Peer>,
    requests: BTreeMap<u64, Request>,
    next_request: u64,
    samples: BTreeMap<ManifestId, ReportSample>,
    instructions: BTreeMap<ManifestId, (SignedInstruction, crate::rollout::InstructionBody)>,
    /// Authorised instructions for releases not known yet (they can arrive before the
    /// manifest when a node catches up), at most [`MAX_PENDING_INSTRUCTIONS`].
    pending_instructions:
        BTreeMap<(Channel, u64), (SignedInstruction, crate::rollout::InstructionBody)>,
    pending_wants: BTreeMap<ObjectId, (Instant, NodeId)>,
    pending_reports: Vec<HealthReport>,
    pinned: BTreeSet<ManifestId>,
    outputs: VecDeque<Output>,
    timers: TimerTable,
    /// Until then, no promotion to a newer version (see [`Config::catch_up`]); None once
    /// caught up.
    catch_up_until: Option<Instant>,
    last_wall: UnixTime,
}

impl<R: Rng> Mesh<R> {
    /// A node with id `id` (its ed25519 public key), `config`, and randomness from `rng`.
    pub fn new(id: NodeId, config: Config, rng: R, now: Now) -> Self {
        Mesh {
            interner: None,
            id,
            config,
            rng,
            trust: None,
            cert: None,
            channels: BTreeMap::new(),
            index: BTreeMap::new(),
            files: BTreeMap::new(),
            peers: BTreeMap::new(),
            requests: BTreeMap::new(),
            next_request: 1,
            samples: BTreeMap::new(),
            instructions: BTreeMap::new(),
            pending_instructions: BTreeMap::new(),
            pending_wants: BTreeMap::new(),
            pending_reports: Vec::new(),
            pinned: BTreeSet::new(),
            outputs: VecDeque::new(),
            timers: {
                let mut t = TimerTable::default();
                t.set(Timer::Tick, now.mono);
                t
            },
            catch_up_until: None,
            last_wall: now.wall,
        }
    }

    // ----- setters ---------------------------------------------------------------------

    /// Keep manifests through `f`, which may return an equal copy already held elsewhere
    /// (a simulator running many nodes in one process shares one copy of each manifest).
    /// `f` must return a manifest with the same id and content.
    pub fn set_interner(&mut self, f: InternFn) {
        self.interner = Some(Interner(f));
    }

    // ----- outputs ---------------------------------------------------------------------

    /// The next output, or None when drained.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// The next deadline at which [`Mesh::handle_timeout`] wants to run.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let wants = self.pending_wants.values().map(|(t, _)| *t).min();
        self.timers.next_timeout().into_iter().chain(wants).min()
    }

    fn emit(&mut self, e: Event) {
        self.outputs.push_back(Output::Event(e));
    }

    fn send(&mut self, to: NodeId, msg: Message) {
        self.outputs.push_back(Output::Send { to, msg });
    }

    // ----- inputs ----------------------------------------------------------------------

    /// Feed one input. Drain [`Mesh::poll_output`] afterwards.
    pub fn handle(&mut self, now: Now, input: Input) {
        self.last_wall = now.wall;
        let hint = match &input {
            Input::Received {
                from,
                msg: Message::HaveChunk { file, index },
            } => Some((*from, *file, *index)),
            _ => None,
        };
        match input {
            Input::PeerUp { peer, info } => self.on_peer_up(now, peer, info),
            Input::PeerDown { peer } => self.on_peer_down(now, peer),
            Input::Received { from, msg } => {
                if self.peers.get(&from).is_some_and(|p| !p.refused) {
                    self.on_message(now, from, msg);
                }
            }
            Input::Malformed { from, error } => {
                self.penalise(from, PENALTY_SEVERE, format!("malformed frame: {error}"));
            }
            Input::ChunkStored { from, file, index } => {
                self.on_chunk_stored(now, from, file, index)
            }
            Input::ChunkReceived { from, file, index } => {
                self.finish_requests(Some(from), file, index);
                if let Some(f) = self.files.get_mut(&file)
                    && index < f.total()
                    && !f.have.get(index)
                {
                    f.pending.insert(index);
                }
            }
            Input::ChunkFailed {
                from,
                file,
                index,
                reason,
            } => self.on_chunk_failed(now, from, file, index, reason),
            Input::Command { id, cmd } => {
                let result = self.on_command(now, cmd);
                self.emit(Event::CommandDone { id, result });
            }
        }
        match hint {
            // A peer announcing one chunk can only make that chunk requestable from it:
            // no need to rescan everything (the most frequent message by far).
            Some((peer, file, index)) => self.schedule_one(now, peer, file, index),
            None => self.schedule(now),
        }
    }

    /// Run timers that are due. Calling it early does nothing.
    pub fn handle_timeout(&mut self, now: Now) {
        self.last_wall = now.wall;
        // Request timeouts.
        while let Some(id) = self.timers.pop_due_request(now.mono) {
            if let Some(req) = self.requests.remove(&id) {
                self.forget_request(id, &req);
                self.send(req.peer, Message::Cancel { id });
                self.penalise(req.peer, PENALTY_TIMEOUT, "chunk request timed out".into());
            }
        }
        // Delayed pulls.
        let due: Vec<ObjectId> = self
            .pending_wants
            .iter()
            .filter(|(_, (t, _))| *t <= now.mono)
            .map(|(o, _)| *o)
            .collect();
        let mut wants: BTreeMap<NodeId, Vec<ObjectId>> = BTreeMap::new();
        for o in due {
            if let Some((_, peer)) = self.pending_wants.remove(&o)
                && !self.holds(&o)
                && self.peers.contains_key(&peer)
            {
                wants.entry(peer).or_default().push(o);
            }
        }
        for (peer, list) in wants {
            self.send(peer, Message::Want(list));
        }
        if self.timers.is_due(Timer::AntiEntropy, now.mono) {
            self.timers.set(
                Timer::AntiEntropy,
                now.mono + self.config.anti_entropy_interval,
            );
            if let Some(peer) = self.random_peers(1, None).first().copied() {
                let d = self.digest(false);
                self.send(peer, Message::Digest(d));
            }
        }
        if self.timers.is_due(Timer::Tick, now.mono) {
            self.timers
                .set(Timer::Tick, now.mono + self.config.rollout_tick);
            let stalled: Vec<ContentId> = self
                .files
                .iter()
                .filter(|(_, f)| {
                    f.superseed.as_ref().is_some_and(|s| {
                        now.mono.saturating_duration_since(s.progress) >= SUPERSEED_STALL
                    })
                })
                .map(|(k, _)| *k)
                .collect();
            for file in stalled {
                self.reveal(file);
            }
            if self.catch_up_until.is_some_and(|t| t <= now.mono) {
                self.catch_up_until = None;
            }
            self.flush_reports();
            self.refresh_all(now);
        }
        self.schedule(now);
    }

    // ----- messages --------------------------------------------------------------------

    fn on_message(&mut self, now: Now, from: NodeId, msg: Message) {
        match msg {
            Message::Manifest(m) => {
                let known = self.index.contains_key(&ManifestId(m.body_hash()));
                self.tree_update(from, known);
                let _ = self.on_manifest(now, Some(from), m, false);
            }
            Message::TrustRoot(t) => {
                let _ = self.on_trust_root(now, Some(from), t);
            }
            Message::Prune => {
                if let Some(p) = self.peers.get_mut(&from) {
                    p.lazy = true;
                }
            }
            Message::Reports(list) => {
                for r in list.into_iter().take(crate::wire::MAX_LIST) {
                    self.on_report(now, Some(from), r);
                }
            }
            Message::Instruction(i) => {
                let known = self.holds(&ObjectId::Instruction(i.body_hash()));
                self.tree_update(from, known);
                let _ = self.on_instruction(now, Some(from), i);
            }
            Message::IHave(ids) => {
                for o in ids {
                    if !self.holds(&o)
                        && !self.pending_wants.contains_key(&o)
                        && self.pending_wants.len() < self.config.max_pending_wants
                    {
                        self.pending_wants
                            .insert(o, (now.mono + self.config.ihave_delay, from));
                    }
                }
            }
            Message::Want(ids) => {
                // A pull grafts the link back onto the tree.
                if let Some(p) = self.peers.get_mut(&from) {
                    p.lazy = false;
                }
                self.on_want(from, ids)
            }
            Message::Digest(d) => {
                let reply = d.reply;
                self.on_digest(from, d);
                if reply && self.catch_up_until.take().is_some() {
                    self.refresh_all(now);
                }
            }
            Message::Have { file, chunks } => self.on_have(from, file, chunks),
            Message::HaveChunk { file, index } => self.on_have_chunk(from, file, index),
            Message::Request { id, file, index } => {
                if let Some(f) = self.files.get_mut(&file)
                    && let Some(ss) = f.superseed.as_mut()
                    && f.have.get(index)
                    && !ss.served.get(index)
                {
                    ss.served.set(index);
                    ss.progress = now.mono;
                    if ss.served.count() == f.total() {
                        self.reveal(file);
                    }
                }
                if self.has_chunk(&file, index) {
                    self.outputs.push_back(Output::SendChunk {
                        to: from,
                        id,
                        file,
                        index,
                    });
                } else {
                    self.send(
                        from,
                        Message::Reject {
                            id,
                            reason: RejectReason::NotFound,
                        },
                    );
                }
            }
            Message::Cancel { id } => self.outputs.push_back(Output::CancelChunk { to: from, id }),
            Message::Reject { id, .. } => {
                if let Some(r) = self.requests.get(&id)
                    && r.peer == from
                {
                    let r = self.requests.remove(&id).expect("present");
                    self.timers.stop_request(r.deadline, id);
                    // The peer does not have it after all: stop asking it for that chunk.
                    if let Some(p) = self.peers.get_mut(&from)
                        && let Some(bits) = p.haves.get_mut(&r.file)
                    {
                        clear_bit(bits, r.index);
                    }
                    if let Some(f) = self.files.get_mut(&r.file)
                        && let Some(a) = f.avail.get_mut(r.index as usize)
                    {
                        *a = a.saturating_sub(1);
                    }
                    self.forget_request(id, &r);
                }
            }
            Message::Certificate(c) => {
                let ok = match &self.trust {
                    Some(t) => t.check_certificate(&from, Some(&c), now.wall).is_ok(),
                    None => true,
                };
                if !ok {
                    self.penalise(from, PENALTY_SEVERE, "invalid node certificate".into());
                }
            }
            Message::Unknown(_) | Message::Hello(_) => {} // `Message` is non_exhaustive for other crates only.
        }
    }
    // ----- commands --------------------------------------------------------------------

    fn on_command(&mut self, now: Now, cmd: Command) -> Result<(), String> {
        match cmd {
            Command::SetTrustRoot(t) => self.on_trust_root(now, None, t).map_err(|e| e.to_string()),
            Command::RestoreTrustRoot(t) => {
                let restored = match &self.trust {
                    None => TrustRoot::verify_self_signed(t),
                    Some(cur) => cur.verify_successor(t, UnixTime(0)),
                };
                match restored {
                    Ok(root) => {
                        self.trust = Some(root);
                        Ok(())
                    }
                    Err(e) => Err(e.to_string()),
                }
            }
            Command::Publish(m) => self
                .on_manifest(now, None, m, false)
                .map_err(|e| e.to_string()),
            Command::Restore(m) => {
                // What was restored may be stale: hold promotions until caught up.
                self.catch_up_until
                    .get_or_insert(now.mono + self.config.catch_up);
                self.on_manifest(now, None, m, true)
                    .map_err(|e| e.to_string())
            }
            Command::SetHighest { channel, version } => {
                let c = self.channel_entry(&channel)?;
                c.highest = c.highest.max(version);
                Ok(())
            }
            Command::SetActive { channel, manifest } => {
                let c = self.channels.get_mut(&channel).ok_or("unknown channel")?;
                let v = c
                    .releases
                    .iter()
                    .find(|(_, r)| r.manifest.id == manifest)
                    .map(|(v, _)| *v)
                    .ok_or("unknown manifest")?;
                c.active = Some((v, manifest));
                self.trim_channel(&channel);
                self.refresh_all(now);
                Ok(())
            }
            Command::LocalChunks { file, chunks } => {
                let Some(f) = self.files.get_mut(&file) else {
                    return Err(format!(
                        "file {} is not in any retained manifest",
                        file.short()
                    ));
                };
                if chunks.len() != f.total() || !chunks.is_valid() {
                    return Err("bitfield length does not match the file".into());
                }
                let was_complete = f.complete();
                for i in 0..chunks.len() {
                    if chunks.get(i) {
                        f.have.set(i);
                    }
                }
                if !was_complete && f.complete() && f.total() > 1 && f.avail.iter().all(|a| *a == 0)
                {
                    // Nobody we know has any of it: we are its first seed.
                    f.superseed = Some(SuperSeed {
                        served: Bitfield::new(f.total()),
                        cursor: 0,
                        progress: now.mono,
                    });
                    let mut peers: Vec<NodeId> = self.peers.keys().copied().collect();
                    // A random order, so who gets the first chunks differs between files.
                    for i in (1..peers.len()).rev() {
                        let j = (self.rng.next_u64() % (i as u64 + 1)) as usize;
                        peers.swap(i, j);
                    }
                    for p in peers {
                        self.announce_share(p, file);
                    }
                    self.refresh_all(now);
                    return Ok(());
                }
                self.announce_file(file);
                self.refresh_all(now);
                Ok(())
            }
            Command::ReportHealth(r) => {
                let body = r.signed.decode_body().map_err(|e| e.to_string())?;
                if body.node != self.id {
                    return Err("a node reports only its own health".into());
                }
                self.note_own_report(&body);
                if self.on_report(now, None, r) {
                    Ok(())
                } else {
                    Err("report not accepted (unknown release or not in the sample)".into())
                }
            }
            Command::Instruct(i) => self.on_instruction(now, None, i).map_err(|e| e.to_string()),
            Command::PinVersion { channel, version } => {
                let c = self.channel_entry(&channel)?;
                c.pinned_version = version;
                self.trim_channel(&channel);
                self.refresh_all(now);
                Ok(())
            }
            Command::Pin(id) => {
                if self.pinned.len() >= self.config.max_pinned && !self.pinned.contains(&id) {
                    return Err(format!(
                        "at most {} pinned releases",
                        self.config.max_pinned
                    ));
                }
                self.pinned.insert(id);
                Ok(())
            }
            Command::SetCertificate(c) => {
                if let Some(t) = &self.trust {
                    t.check_certificate(&self.id, Some(&c), now.wall)
                        .map_err(|e| e.to_string())?;
                }
                self.cert = Some(c);
                Ok(())
            }
        }
    }
}
