//! The mesh state machine: one per node, holding every protocol decision.
//!
//! # Contract
//!
//! * **Inputs**: [`Mesh::handle`] with an [`Input`] and [`Mesh::handle_timeout`]. Every call
//!   takes [`Now`]: monotonic time that never goes backwards between calls, and the wall
//!   clock. Calling `handle_timeout` before the deadline does nothing.
//! * **Outputs**: after *every* call, drain [`Mesh::poll_output`] until it returns `None`,
//!   then read [`Mesh::poll_timeout`] for the next deadline.
//!
//! The methods of [`Mesh`] are of four kinds:
//!
//! * **queries** (`id`, `config`, `release`, `releases`, `actives`, `live_files`,
//!   `manifest`, `chunk_spec`, `needs_chunk`, ...) never mutate and are cheap: use them to
//!   answer a narrow question. [`Mesh::status`] is the one exception to "cheap": a display
//!   view that counts every release's sample; build it for humans only;
//! * **inputs**: [`Mesh::handle`] and [`Mesh::handle_timeout`];
//! * **outputs**: [`Mesh::poll_output`] and [`Mesh::poll_timeout`];
//! * **setters** for the driver's wiring: [`Mesh::set_interner`].
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
//! Manifests and instructions spread plumtree-style: the payload goes to every peer on the
//! gossip tree and an `IHave` to the others (lazy peers). A node that receives a payload
//! it already holds answers `Prune`, which takes the link off the tree; a node that hears
//! an `IHave` for something it lacks pulls it (`Want`) after `ihave_delay` unless the
//! payload arrived meanwhile, and the pull grafts the link back. Trust roots go to every
//! peer. Health reports that change the local sample are batched and pushed each tick to
//! `eager_fanout` random peers. Anti-entropy: on connect and every
//! `anti_entropy_interval` (to one random peer) nodes exchange a [`Digest`](crate::wire::Digest) and pull what
//! they lack, so a node back from hours offline catches up.
//!
//! # Chunk exchange
//!
//! Peers announce bitfields (`Have`) and new chunks (`HaveChunk`). For each peer with free
//! request slots (same site first, then lowest RTT), the scheduler requests the rarest
//! missing chunk that peer has; a peer that holds the whole file (a seed) is asked only for
//! chunks that no non-seed peer has, so seeds push new chunks into the swarm and peers
//! trade the rest. When every missing chunk is in flight, requests older than
//! `endgame_after` are duplicated to another peer (endgame) and the loser is cancelled.
//! A peer on another site (behind a WAN link) is asked only for chunks no peer on this
//! site has, one at a time.
//!
//! # Parts
//!
//! [`Mesh`] is a router: [`Mesh::handle`] / [`Mesh::handle_timeout`] route each input to
//! the part's handler. The parts that own their data (`PeerTable`, `Exchange`, `Gossip`,
//! the timer table) take what they need from their siblings as arguments, write their outputs to
//! the queue they are handed, and ask the router (by return value) for what crosses
//! parts: a penalty, a release refresh, forgetting a banned peer everywhere. The other
//! parts are still files of methods on [`Mesh`] over its fields.
//!
//! * `config`: [`Config`], penalties and fixed bounds;
//! * `timers`: the one timer table;
//! * `peers`: `PeerTable`, the peer table: admission, scores and bans, random sampling,
//!   site predicates;
//! * `gossip`: `Gossip`, the plumtree state: lazy peers, push, IHave/Prune, delayed pulls,
//!   report batches; the answers from the object tables (`Want`, digests) stay on `Mesh`;
//! * `objects`: acceptance of trust roots, manifests, instructions and reports, and the
//!   one `reject`;
//! * `releases`: channels and releases, retention, and which release this node serves;
//! * `exchange`: `Exchange`, files, availability and requests; `exchange/schedule` picks
//!   chunks, `exchange/superseed` seeds a new file;
//! * `status`: queries and the display view;
//! * [`restore`]: the command order that restores what a driver persisted.

use crate::ids::Channel;
use crate::ids::{ManifestId, NodeId};
use crate::io::{Command, Event, Input, Output, PeerInfo};
use crate::manifest::Manifest;
use crate::rollout::{ReportSample, SignedInstruction};
use crate::time::{Instant, Now, UnixTime};
use crate::trust::{SignedNodeCert, TrustRoot};
use crate::wire::{Message, ObjectId};
use alloc::collections::{BTreeMap, BTreeSet, VecDeque};
use alloc::sync::Arc;
use rand_core::Rng;

mod config;
mod exchange;
mod gossip;
mod objects;
mod peers;
mod releases;
pub mod restore;
mod status;
mod timers;

#[cfg(test)]
mod testkit;

pub use config::{Config, QUEUED_UPLOADS};
pub use status::{ChannelView, ReleaseRef, ReleaseView};

use config::PENALTY_SEVERE;
use config::PENALTY_TIMEOUT;
use exchange::{Ctx, Exchange, Penalty};
use gossip::Gossip;
use peers::PeerTable;
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
    /// Where decoded manifests are kept (see [`Mesh::set_interner`]).
    interner: Option<Interner>,
    /// This node's id (its ed25519 public key).
    id: NodeId,
    /// Tunables.
    config: Config,
    /// Every random choice (peer samples, tie-break salts, chunk start, shuffles).
    rng: R,
    /// The trust root in force; without one, nothing signed is accepted.
    trust: Option<TrustRoot>,
    /// This node's certificate (fleets), shown to each peer on connect.
    cert: Option<SignedNodeCert>,
    /// Followed channels, their retained releases and what is active (part `releases`).
    channels: BTreeMap<Channel, ChannelState>,
    /// Version pins of channels not followed yet (at most `max_channels`): applied when
    /// the channel's entry is created, so a pin never takes a channel slot by itself.
    pending_pins: BTreeMap<Channel, u64>,
    /// The version of the last trust-root equivocation seen (two validly signed roots of
    /// one version): reported once per version, the root in force kept.
    trust_equivocation: Option<u64>,
    /// Manifest id -> (channel, version), for every retained release.
    index: BTreeMap<ManifestId, (Channel, u64)>,
    /// Files, availability and chunk requests (part `exchange`, owns its data).
    exchange: Exchange,
    /// Connected peers: site, RTT, score, salt, refusal (part `peers`, owns its data).
    peers: PeerTable,
    /// The health-report sample of every retained release.
    samples: BTreeMap<ManifestId, ReportSample>,
    /// The latest operator instruction per retained release (signed, and its body).
    instructions: BTreeMap<ManifestId, (SignedInstruction, crate::rollout::InstructionBody)>,
    /// Authorised instructions for releases not known yet (they can arrive before the
    /// manifest when a node catches up), at most [`MAX_PENDING_INSTRUCTIONS`].
    pending_instructions:
        BTreeMap<(Channel, u64), (SignedInstruction, crate::rollout::InstructionBody)>,
    /// The gossip tree, delayed pulls and the report batch (part `gossip`, owns its data).
    gossip: Gossip,
    /// Releases pinned by the operator: never trimmed (see [`Command::Pin`]).
    pinned: BTreeSet<ManifestId>,
    /// Outputs waiting for [`Mesh::poll_output`].
    outputs: VecDeque<Output>,
    /// Every deadline but the delayed pulls (part `timers`).
    timers: TimerTable,
    /// Until then, no promotion to a newer version (see [`Config::catch_up`]); None once
    /// caught up.
    catch_up_until: Option<Instant>,
    /// The wall clock of the latest call (for penalties raised outside an input).
    last_wall: UnixTime,
    /// The monotonic time of the last input (penalties decay by it).
    last_mono: Instant,
}

impl<R: Rng> Mesh<R> {
    /// A node with id `id` (its ed25519 public key), `config`, and randomness from `rng`.
    pub fn new(id: NodeId, config: Config, rng: R, now: Now) -> Self {
        let peers = PeerTable::new(&config);
        let gossip = Gossip::new(&config);
        Mesh {
            interner: None,
            id,
            config,
            rng,
            trust: None,
            cert: None,
            channels: BTreeMap::new(),
            pending_pins: BTreeMap::new(),
            trust_equivocation: None,
            index: BTreeMap::new(),
            exchange: Exchange::default(),
            peers,
            samples: BTreeMap::new(),
            instructions: BTreeMap::new(),
            pending_instructions: BTreeMap::new(),
            gossip,
            pinned: BTreeSet::new(),
            outputs: VecDeque::new(),
            timers: {
                let mut t = TimerTable::default();
                t.set(Timer::Tick, now.mono);
                t
            },
            catch_up_until: None,
            last_wall: now.wall,
            last_mono: now.mono,
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
        let wants = self.gossip.next_timeout();
        self.timers.next_timeout().into_iter().chain(wants).min()
    }

    /// The exchange, and what it borrows from its siblings for one call.
    fn exchange_cx(&mut self) -> (&mut Exchange, Ctx<'_, R>) {
        let cx = Ctx {
            me: self.id,
            peers: &mut self.peers,
            timers: &mut self.timers,
            config: &self.config,
            rng: &mut self.rng,
            out: &mut self.outputs,
        };
        (&mut self.exchange, cx)
    }

    /// Give the penalty a part asked for, if any.
    fn penalise_for(&mut self, penalty: Option<Penalty>) {
        if let Some((peer, points, reason)) = penalty {
            self.penalise(peer, points, reason);
        }
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
        self.last_mono = now.mono;
        let hint = match &input {
            Input::Received {
                from,
                msg: Message::HaveChunk { file, index },
            } => Some((*from, *file, *index)),
            _ => None,
        };
        // Messages that cannot make a chunk requestable: a peer's request or cancel, a
        // fetch hint (it only holds chunks back), and gossip that does not carry a
        // manifest, a report or an instruction. Unless handling one dropped a peer or a
        // request (a penalty), no schedule pass follows it; time-based changes (a hint
        // expiring, endgame) wait for the next tick or chunk event. A seeding node gets
        // a request per chunk it uploads: this is most of its passes.
        let passive = matches!(
            &input,
            Input::Received {
                msg: Message::Request { .. }
                    | Message::Cancel { .. }
                    | Message::Fetching { .. }
                    | Message::IHave(_)
                    | Message::Want(_)
                    | Message::Digest(_)
                    | Message::Prune
                    | Message::Unknown(_),
                ..
            }
        );
        let before = (self.peers.len(), self.exchange.request_count());
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
                let (x, mut cx) = self.exchange_cx();
                if x.on_chunk_stored(&mut cx, now.mono, from, file, index) {
                    self.refresh_all(now);
                }
            }
            Input::ChunkReceived { from, file, index } => {
                let (x, mut cx) = self.exchange_cx();
                x.on_chunk_received(&mut cx, now.mono, from, file, index);
            }
            Input::ChunkFailed {
                from,
                file,
                index,
                reason,
            } => {
                let (x, mut cx) = self.exchange_cx();
                let penalty = x.on_chunk_failed(&mut cx, now, from, file, index, reason);
                self.penalise_for(penalty);
            }
            Input::Command { id, cmd } => {
                let result = self.on_command(now, cmd);
                self.emit(Event::CommandDone { id, result });
            }
        }
        match hint {
            // A peer announcing one chunk can only make that chunk requestable from it:
            // no need to rescan everything (the most frequent message by far).
            Some((peer, file, index)) => {
                let (x, mut cx) = self.exchange_cx();
                x.schedule_one(&mut cx, now, peer, file, index);
            }
            None if passive && before == (self.peers.len(), self.exchange.request_count()) => {}
            None => {
                let (x, mut cx) = self.exchange_cx();
                x.schedule(&mut cx, now);
            }
        }
    }

    /// Run timers that are due. Calling it early does nothing.
    pub fn handle_timeout(&mut self, now: Now) {
        self.last_wall = now.wall;
        self.last_mono = now.mono;
        // Requests past their deadline: each cancelled and its peer penalised, in turn
        // (a ban drops the peer's other requests before they time out).
        while let Some(id) = self.timers.pop_due_request(now.mono) {
            let (x, mut cx) = self.exchange_cx();
            if let Some(peer) = x.timeout_request(&mut cx, id) {
                self.penalise(peer, PENALTY_TIMEOUT, "chunk request timed out".into());
            }
        }
        // Delayed pulls that are due: one `Want` per peer for what is still missing.
        let pulls: Vec<(ObjectId, NodeId)> = self
            .gossip
            .take_due(now)
            .into_iter()
            .filter(|(o, peer)| !self.holds(o) && self.peers.contains(peer))
            .collect();
        Gossip::send_wants(pulls, &mut self.outputs);
        if self.timers.is_due(Timer::AntiEntropy, now.mono) {
            self.timers.set(
                Timer::AntiEntropy,
                now.mono + self.config.anti_entropy_interval,
            );
            self.on_anti_entropy_timer();
        }
        if self.timers.is_due(Timer::Tick, now.mono) {
            self.timers
                .set(Timer::Tick, now.mono + self.config.rollout_tick);
            let (x, mut cx) = self.exchange_cx();
            x.reveal_stalled(&mut cx, now);
            if self.catch_up_until.is_some_and(|t| t <= now.mono) {
                self.catch_up_until = None;
            }
            self.gossip
                .flush_reports(&self.peers, &mut self.rng, &mut self.outputs);
            self.refresh_all(now);
        }
        let (x, mut cx) = self.exchange_cx();
        x.schedule(&mut cx, now);
    }

    // ----- peers up and down: the router forwards them to every part ----------------------

    fn on_peer_up(&mut self, now: Now, peer: NodeId, info: PeerInfo) {
        if peer == self.id {
            return;
        }
        let trust = &self.trust;
        let refused = |info: &PeerInfo| match trust {
            Some(t) => t
                .check_certificate(&peer, info.cert.as_ref(), now.wall)
                .is_err(),
            None => false,
        };
        if !self
            .peers
            .up(&mut self.rng, peer, info, refused, &mut self.outputs)
        {
            // Not admitted, or refused and dropped from the table.
            self.exchange.forget_refused(&peer);
            self.gossip.leave_tree(peer);
            return;
        }
        if self.timers.get(Timer::AntiEntropy).is_none() {
            self.timers.set(
                Timer::AntiEntropy,
                now.mono + self.config.anti_entropy_interval,
            );
        }
        if let Some(c) = self.cert.clone() {
            self.send(peer, Message::Certificate(c));
        }
        let d = self.digest(false);
        self.send(peer, Message::Digest(d));
        let (x, mut cx) = self.exchange_cx();
        x.announce_files_to(&mut cx, peer);
    }

    /// `peer` is gone (closed, or banned by [`Mesh::penalise`]): out of the peer table, its
    /// chunks out of availability, its requests dropped, its offers forgotten.
    fn on_peer_down(&mut self, _now: Now, peer: NodeId) {
        if self.peers.remove(&peer).is_none() {
            return;
        }
        let (x, mut cx) = self.exchange_cx();
        x.forget_peer(&mut cx, peer);
        self.gossip.forget_peer(peer);
    }

    /// Penalise `peer` (see [`PeerTable::penalise`]); a ban forgets it in every part now.
    fn penalise(&mut self, peer: NodeId, points: u32, reason: String) {
        if self
            .peers
            .penalise(peer, points, reason, self.last_mono, &mut self.outputs)
        {
            self.on_peer_down(Now::new(self.last_mono, self.last_wall), peer);
        }
    }

    // ----- messages --------------------------------------------------------------------

    fn on_message(&mut self, now: Now, from: NodeId, msg: Message) {
        match msg {
            Message::Manifest(m) => {
                let known = self.index.contains_key(&ManifestId(m.body_hash()));
                self.gossip
                    .tree_update(&self.peers, from, known, &mut self.outputs);
                let _ = self.on_manifest(now, Some(from), m, false);
            }
            Message::TrustRoot(t) => {
                let _ = self.on_trust_root(now, Some(from), t);
            }
            Message::Prune => self.gossip.on_prune(&self.peers, from),
            Message::Reports(list) => {
                for r in list.into_iter().take(crate::wire::MAX_LIST) {
                    self.on_report(now, Some(from), r);
                }
            }
            Message::Instruction(i) => {
                let known = self.holds(&ObjectId::Instruction(i.body_hash()));
                self.gossip
                    .tree_update(&self.peers, from, known, &mut self.outputs);
                let _ = self.on_instruction(now, Some(from), i);
            }
            Message::IHave(ids) => {
                let missing: Vec<ObjectId> = ids.into_iter().filter(|o| !self.holds(o)).collect();
                self.gossip.on_ihave(now, from, missing);
            }
            Message::Want(ids) => self.on_want(from, ids),
            Message::Digest(d) => {
                let reply = d.reply;
                let gap = self.config.anti_entropy_interval / 2;
                let answer = self.peers.digest_answer_due(from, now.mono, gap);
                self.on_digest(from, d, answer);
                if reply && self.catch_up_until.take().is_some() {
                    self.refresh_all(now);
                }
            }
            Message::Have { file, chunks } => {
                let (x, mut cx) = self.exchange_cx();
                let penalty = x.on_have(&mut cx, from, file, chunks);
                self.penalise_for(penalty);
            }
            Message::HaveChunk { file, index } => {
                let (x, mut cx) = self.exchange_cx();
                let penalty = x.on_have_chunk(&mut cx, from, file, index);
                self.penalise_for(penalty);
            }
            Message::Fetching {
                file,
                index,
                millis,
            } => {
                let (x, cx) = self.exchange_cx();
                x.on_fetching(&cx, now.mono, from, file, index, millis);
            }
            Message::Request { id, file, index } => {
                let (x, mut cx) = self.exchange_cx();
                x.superseed_served(&mut cx, now, file, index);
                x.on_request(&mut cx, from, id, file, index);
            }
            Message::Cancel { id } => self.outputs.push_back(Output::CancelChunk { to: from, id }),
            Message::Reject { id, reason } => {
                let (x, mut cx) = self.exchange_cx();
                x.on_reject(&mut cx, now.mono, from, id, reason);
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
            // Drivers consume `Hello` (it carries the site and protocol version they put in
            // `PeerInfo`); unknown kinds from newer peers are ignored.
            Message::Unknown(_) | Message::Hello(_) => {}
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
                let (x, mut cx) = self.exchange_cx();
                x.on_local_chunks(&mut cx, now, file, chunks)?;
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
                // A pin of a channel not followed yet waits aside (it takes no channel
                // slot) until the channel's first manifest arrives.
                let Some(c) = self.channels.get_mut(&channel) else {
                    match version {
                        Some(v) => {
                            if self.pending_pins.len() >= self.config.max_channels
                                && !self.pending_pins.contains_key(&channel)
                            {
                                return Err(format!(
                                    "at most {} pins of channels not followed yet",
                                    self.config.max_channels
                                ));
                            }
                            self.pending_pins.insert(channel, v);
                        }
                        None => {
                            self.pending_pins.remove(&channel);
                        }
                    }
                    return Ok(());
                };
                c.pinned_version = version;
                // An unpinned channel that holds nothing gives its slot back.
                if version.is_none() && c.releases.is_empty() && c.active.is_none() {
                    self.channels.remove(&channel);
                    return Ok(());
                }
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

#[cfg(test)]
mod tests {
    use super::testkit::{add_mesh_peer, at, mesh, peer};
    use crate::io::{Input, Output};
    use crate::wire::Message;

    #[test]
    fn inputs_that_cannot_make_a_chunk_requestable_run_no_schedule_pass() {
        let (mut m, f) = mesh(4, None);
        // Placed by hand: chunks 0 and 1 are requestable, but no pass has run yet.
        add_mesh_peer(&mut m, 1, None, f, &[0]);
        add_mesh_peer(&mut m, 2, None, f, &[1]);
        let asked = |m: &mut super::testkit::TestMesh| {
            core::iter::from_fn(|| m.poll_output())
                .filter(|o| {
                    matches!(
                        o,
                        Output::Send {
                            msg: Message::Request { .. },
                            ..
                        }
                    )
                })
                .count()
        };
        for msg in [
            Message::Cancel { id: 9 },
            Message::Fetching {
                file: f,
                index: 3,
                millis: 100,
            },
            Message::IHave(Vec::new()),
        ] {
            m.handle(at(1), Input::Received { from: peer(1), msg });
        }
        assert_eq!(asked(&mut m), 0);
        m.handle_timeout(at(2));
        assert_eq!(asked(&mut m), 2, "the next pass asks each peer");
    }
}
