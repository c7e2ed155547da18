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

use crate::chunking::FileSpec;
use crate::ids::{ContentId, ManifestId, NodeId};
use crate::io::{ChunkFailure, Command, Event, Input, ObjectKind, Output, PeerInfo};
use crate::manifest::{Channel, DeviceProfile, Manifest, SignedManifest};
use crate::rollout::{
    Decision, HealthReport, HealthStatus, ReportSample, RolloutAction, SignedInstruction, evaluate,
};
use crate::signing::SignedError;
use crate::time::{Instant, Now, UnixTime};
use crate::trust::{SignedNodeCert, TrustError, TrustRoot};
use crate::wire::{Bitfield, ChannelDigest, Digest, Message, ObjectId, RejectReason};
use alloc::collections::{BTreeMap, BTreeSet, VecDeque};
use alloc::sync::Arc;
use core::time::Duration;
use rand_core::Rng;

extern crate alloc;

/// Tunables. Defaults suit a LAN of a few hundred nodes.
#[derive(Clone, Debug)]
pub struct Config {
    /// This node's site (LAN), preferred for chunk exchange.
    pub site: Option<String>,
    /// What this device offers, for choosing a variant.
    pub device: DeviceProfile,
    /// Peers that get an eager push of each new object.
    pub eager_fanout: usize,
    /// Wait after an `IHave` before pulling (lets the eager push arrive first).
    pub ihave_delay: Duration,
    /// Most peers tracked; further `PeerUp`s are disconnected.
    pub max_peers: usize,
    /// Chunk requests in flight per peer.
    pub max_inflight_per_peer: usize,
    /// Chunk requests in flight to a peer that holds the whole file, while other peers hold
    /// parts of it (seeds should push new chunks, not the same ones to everybody).
    pub max_inflight_per_seed: usize,
    /// A request unanswered for this long is retried elsewhere.
    pub request_timeout: Duration,
    /// In the endgame, a request older than this is duplicated to another peer.
    pub endgame_after: Duration,
    /// Anti-entropy period (one random peer per period).
    pub anti_entropy_interval: Duration,
    /// Rollout evaluation period while a rollout is in progress.
    pub rollout_tick: Duration,
    /// Reports kept per release (K of the deterministic sample).
    pub report_sample_size: usize,
    /// Manifests kept per channel (the active one is always kept).
    pub retained_versions: usize,
    /// Most channels followed.
    pub max_channels: usize,
    /// Most files tracked.
    pub max_files: usize,
    /// Penalty score at which a peer is disconnected.
    pub disconnect_score: u32,
    /// Most pending pulls (`IHave`s waiting for their delay).
    pub max_pending_wants: usize,
    /// After the local store fails to keep a chunk (full disk), downloads pause this long.
    pub store_retry: Duration,
    /// Most pinned releases (see [`Command::Pin`]).
    pub max_pinned: usize,
    /// How far ahead of this node's clock a signed timestamp (health report, instruction)
    /// may be. Later ones are refused for now, without penalty: anti-entropy offers them
    /// again once this clock has caught up.
    pub max_clock_skew: Duration,
    /// A node whose latest report for a release is older than this counts as stale (not
    /// heard from lately) in the status; gate decisions do not depend on it.
    pub report_ttl: Duration,
    /// After restoring releases from disk ([`Command::Restore`]), a node switches to a newer
    /// version only once it has caught up with a peer (received the answer to its digest,
    /// and with it any halt it missed while offline), or after this long without one.
    /// Rollbacks never wait; a fresh node has nothing stale and does not wait.
    pub catch_up: Duration,
    /// Download releases this node is not (yet) in the stage for, so it can switch at once
    /// when its stage opens.
    pub prefetch: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            site: None,
            device: DeviceProfile::default(),
            eager_fanout: 4,
            ihave_delay: Duration::from_millis(200),
            max_peers: 512,
            max_inflight_per_peer: 4,
            max_inflight_per_seed: 1,
            request_timeout: Duration::from_secs(30),
            endgame_after: Duration::from_secs(2),
            anti_entropy_interval: Duration::from_secs(20),
            rollout_tick: Duration::from_secs(1),
            report_sample_size: 256,
            retained_versions: 4,
            max_channels: 256,
            max_files: 1024,
            disconnect_score: 100,
            max_pending_wants: 1024,
            prefetch: true,
            max_pinned: 256,
            max_clock_skew: Duration::from_secs(10 * 60),
            report_ttl: Duration::from_secs(5 * 60),
            catch_up: Duration::from_secs(10),
            store_retry: Duration::from_secs(5),
        }
    }
}

/// Most instructions held for releases not known yet.
const MAX_PENDING_INSTRUCTIONS: usize = 64;

/// Most equivocating manifests remembered per channel.
const MAX_EQUIVOCATIONS: usize = 64;

/// Penalty for a message that does not decode or is forged: disconnect at once.
const PENALTY_SEVERE: u32 = 100;
/// Penalty for a corrupt chunk.
const PENALTY_CORRUPT: u32 = 40;
/// Penalty for a protocol misstep an honest but confused peer could make.
const PENALTY_MINOR: u32 = 5;
/// Penalty for a request that timed out.
const PENALTY_TIMEOUT: u32 = 2;

#[derive(Debug)]
struct Peer {
    site: Option<String>,
    rtt: Option<Duration>,
    score: u32,
    /// Random tie-break among otherwise equal peers.
    salt: u64,
    haves: Haves,
    inflight: usize,
    /// Refused by fleet rules: nothing is sent to or accepted from it.
    refused: bool,
    /// Pruned from the gossip tree: objects go to it as `IHave`s only.
    lazy: bool,
}

/// A peer's chunks per file: a few files per peer, so a sorted vector (a `BTreeMap` node
/// costs ~700 bytes even for one entry, per peer, per node of a large simulation).
#[derive(Debug, Default)]
struct Haves(Vec<(ContentId, Bitfield)>);

impl Haves {
    fn find(&self, k: &ContentId) -> Result<usize, usize> {
        self.0.binary_search_by(|(x, _)| x.cmp(k))
    }
    fn get(&self, k: &ContentId) -> Option<&Bitfield> {
        self.find(k).ok().map(|i| &self.0[i].1)
    }
    fn get_mut(&mut self, k: &ContentId) -> Option<&mut Bitfield> {
        self.find(k).ok().map(|i| &mut self.0[i].1)
    }
    fn contains_key(&self, k: &ContentId) -> bool {
        self.find(k).is_ok()
    }
    fn insert(&mut self, k: ContentId, v: Bitfield) {
        match self.find(&k) {
            Ok(i) => self.0[i].1 = v,
            Err(i) => self.0.insert(i, (k, v)),
        }
    }
    fn remove(&mut self, k: &ContentId) -> Option<Bitfield> {
        self.find(k).ok().map(|i| self.0.remove(i).1)
    }
    fn get_or_insert_with(&mut self, k: ContentId, f: impl FnOnce() -> Bitfield) -> &mut Bitfield {
        let i = match self.find(&k) {
            Ok(i) => i,
            Err(i) => {
                self.0.insert(i, (k, f()));
                i
            }
        };
        &mut self.0[i].1
    }
    fn len(&self) -> usize {
        self.0.len()
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<'a> IntoIterator for &'a Haves {
    type Item = (&'a ContentId, &'a Bitfield);
    type IntoIter = core::iter::Map<
        core::slice::Iter<'a, (ContentId, Bitfield)>,
        fn(&'a (ContentId, Bitfield)) -> (&'a ContentId, &'a Bitfield),
    >;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(k, v)| (k, v))
    }
}

#[derive(Debug)]
struct Release {
    manifest: Arc<Manifest>,
    variant: usize,
    decision: Option<Decision>,
    announced_stages: usize,
    announced_failure: bool,
}

#[derive(Debug, Default)]
struct ChannelState {
    highest: u64,
    releases: BTreeMap<u64, Release>,
    /// (version, manifest) the driver was told to serve.
    active: Option<(u64, ManifestId)>,
    /// What was active before the current activation (fallback if it fails).
    previous: Option<(u64, ManifestId)>,
    /// Releases this node failed to activate.
    failed_local: BTreeSet<ManifestId>,
    /// Releases this node reported healthy at least once.
    reported_ok: BTreeSet<ManifestId>,
    /// Manifest ids seen per version beyond the kept one (equivocation evidence).
    equivocations: BTreeSet<(u64, ManifestId)>,
    /// Local pin: serve this version whatever the rollouts say (see
    /// [`Command::PinVersion`]).
    pinned_version: Option<u64>,
}

#[derive(Debug)]
struct FileState {
    spec: Arc<Manifest>,
    variant: usize,
    file: usize,
    have: Bitfield,
    /// Peers holding each chunk.
    avail: Vec<u16>,
    /// Peers holding the whole file.
    seeds: u16,
    /// Request ids in flight per chunk.
    inflight: BTreeMap<u32, Vec<u64>>,
    wanted: bool,
    /// Received and written, waiting for the sync that makes them durable.
    pending: BTreeSet<u32>,
    /// Initial seeding of a file nobody else has (see [`SuperSeed`]).
    superseed: Option<SuperSeed>,
}

/// Super-seeding: the first holder of a file (the node it was published through) shows
/// each peer only its own share of the chunks not yet uploaded, so every chunk leaves the
/// seed once before any leaves twice; once each was uploaded (or uploads stall, or a peer
/// with a share leaves) it announces the whole file.
#[derive(Debug)]
struct SuperSeed {
    /// Chunks uploaded at least once.
    served: Bitfield,
    /// Next chunk to hand out in a share.
    cursor: u32,
    /// Last time a chunk was uploaded for the first time.
    progress: Instant,
}

/// Without a first upload for this long, a super-seed announces everything.
const SUPERSEED_STALL: Duration = Duration::from_secs(5);

impl FileState {
    fn spec(&self) -> &FileSpec {
        &self.spec.body.artifact.variants[self.variant].files[self.file].spec
    }
    fn total(&self) -> u32 {
        self.have.len()
    }
    fn complete(&self) -> bool {
        self.have.count() == self.have.len()
    }
}

#[derive(Debug)]
struct Request {
    peer: NodeId,
    file: ContentId,
    index: u32,
    sent: Instant,
    deadline: Instant,
}

/// A summary of a release for status displays.
#[derive(Clone, Debug, PartialEq)]
pub struct ReleaseStatus {
    /// Version.
    pub version: u64,
    /// Manifest id.
    pub manifest: ManifestId,
    /// Stages in the plan.
    pub stages: usize,
    /// Latest decision.
    pub decision: Option<Decision>,
    /// This node's stage.
    pub my_stage: Option<usize>,
    /// The variant this node chose for its device (index into the artifact's variants).
    pub variant: usize,
    /// Healthy/failed/rolled-back in the sample.
    pub counts: crate::rollout::SampleCounts,
    /// Nodes this node knows (itself and its peers) that the open stages admit, that
    /// would enter the sample, and that have not reported yet.
    pub pending: u32,
    /// Nodes in the sample whose latest report is older than `report_ttl`.
    pub stale: u32,
    /// Failure classes in the sample: (class, nodes, one node's detail), most frequent
    /// first.
    pub failures: Vec<(crate::rollout::ErrorClass, u32, String)>,
    /// Files: (content id, chunks held, chunks total).
    pub files: Vec<(ContentId, u32, u32)>,
}

/// A summary of a channel for status displays.
#[derive(Clone, Debug, PartialEq)]
pub struct ChannelStatus {
    /// Channel.
    pub channel: Channel,
    /// Highest version accepted.
    pub highest: u64,
    /// Active (version, manifest).
    pub active: Option<(u64, ManifestId)>,
    /// Retained releases.
    pub releases: Vec<ReleaseStatus>,
    /// Versions with equivocation evidence.
    pub equivocations: Vec<u64>,
    /// The local pin, if any (see [`Command::PinVersion`]).
    pub pinned: Option<u64>,
}

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
    deadlines: BTreeSet<(Instant, u64)>,
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
    store_backoff: Option<Instant>,
    outputs: VecDeque<Output>,
    next_anti_entropy: Option<Instant>,
    next_tick: Option<Instant>,
    /// Until then, no promotion to a newer version (see [`Config::catch_up`]); None once
    /// caught up.
    catch_up_until: Option<Instant>,
    last_wall: UnixTime,
}

fn penalty_for(e: &TrustError) -> u32 {
    match e {
        TrustError::Malformed(_) | TrustError::Forged | TrustError::OutOfScope(_) => PENALTY_SEVERE,
        TrustError::UnderThreshold { .. } => PENALTY_SEVERE,
        TrustError::BadCertificate(_) => PENALTY_SEVERE,
        // An honest peer with a skewed clock or an old view may send these.
        TrustError::Expired
        | TrustError::TrustRootExpired
        | TrustError::Stale { .. }
        | TrustError::Future { .. } => 0,
    }
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
            deadlines: BTreeSet::new(),
            next_request: 1,
            samples: BTreeMap::new(),
            instructions: BTreeMap::new(),
            pending_instructions: BTreeMap::new(),
            pending_wants: BTreeMap::new(),
            pending_reports: Vec::new(),
            pinned: BTreeSet::new(),
            store_backoff: None,
            outputs: VecDeque::new(),
            next_anti_entropy: None,
            next_tick: Some(now.mono),
            catch_up_until: None,
            last_wall: now.wall,
        }
    }

    // ----- getters ---------------------------------------------------------------------

    /// Keep manifests through `f`, which may return an equal copy already held elsewhere
    /// (a simulator running many nodes in one process shares one copy of each manifest).
    /// `f` must return a manifest with the same id and content.
    pub fn set_interner(&mut self, f: InternFn) {
        self.interner = Some(Interner(f));
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The trust root in force.
    pub fn trust_root(&self) -> Option<&TrustRoot> {
        self.trust.as_ref()
    }

    /// Connected peers and their sites.
    pub fn peers(&self) -> impl Iterator<Item = (&NodeId, Option<&str>)> {
        self.peers.iter().map(|(id, p)| (id, p.site.as_deref()))
    }

    /// The spec of a tracked file, for verifying its chunks.
    pub fn chunk_spec(&self, file: &ContentId) -> Option<&FileSpec> {
        self.files.get(file).map(|f| f.spec())
    }

    /// Should the driver store this chunk? False if held already or unknown.
    pub fn needs_chunk(&self, file: &ContentId, index: u32) -> bool {
        self.files
            .get(file)
            .is_some_and(|f| index < f.total() && !f.have.get(index) && !f.pending.contains(&index))
    }

    /// Does this node hold the chunk?
    pub fn has_chunk(&self, file: &ContentId, index: u32) -> bool {
        self.files.get(file).is_some_and(|f| f.have.get(index))
    }

    /// A retained manifest by id.
    pub fn manifest(&self, id: &ManifestId) -> Option<&Arc<Manifest>> {
        let (c, v) = self.index.get(id)?;
        self.channels.get(c)?.releases.get(v).map(|r| &r.manifest)
    }

    /// The (version, manifest) active on a channel.
    pub fn active(&self, channel: &Channel) -> Option<(u64, ManifestId)> {
        self.channels.get(channel)?.active
    }

    /// Highest version accepted on a channel.
    pub fn highest(&self, channel: &Channel) -> u64 {
        self.channels.get(channel).map_or(0, |c| c.highest)
    }

    /// The report sample of a release.
    pub fn sample(&self, id: &ManifestId) -> Option<&ReportSample> {
        self.samples.get(id)
    }

    /// The signed latest operator instruction for a release (what a driver persists).
    pub fn signed_instruction(&self, id: &ManifestId) -> Option<&SignedInstruction> {
        self.instructions.get(id).map(|(s, _)| s)
    }

    /// The latest operator instruction for a release.
    pub fn instruction(&self, id: &ManifestId) -> Option<&crate::rollout::InstructionBody> {
        self.instructions.get(id).map(|(_, b)| b)
    }

    /// Status of every channel.
    pub fn status(&self) -> Vec<ChannelStatus> {
        self.channels
            .iter()
            .map(|(name, c)| ChannelStatus {
                channel: name.clone(),
                highest: c.highest,
                active: c.active,
                pinned: c.pinned_version,
                equivocations: c.equivocations.iter().map(|(v, _)| *v).collect(),
                releases: c
                    .releases
                    .values()
                    .map(|r| ReleaseStatus {
                        version: r.manifest.body.version,
                        manifest: r.manifest.id,
                        stages: r.manifest.body.rollout.stages.len(),
                        decision: r.decision.clone(),
                        my_stage: r.manifest.stage_of(&self.id),
                        variant: r.variant,
                        counts: self
                            .samples
                            .get(&r.manifest.id)
                            .map(|s| s.counts())
                            .unwrap_or_default(),
                        pending: self.pending_reporters(r),
                        stale: self.samples.get(&r.manifest.id).map_or(0, |s| {
                            let cutoff = self.last_wall.minus(self.config.report_ttl);
                            s.entries()
                                .filter(|e| e.latest_body.timestamp < cutoff)
                                .count() as u32
                        }),
                        failures: self
                            .samples
                            .get(&r.manifest.id)
                            .map(|s| s.failures())
                            .unwrap_or_default(),
                        files: r.manifest.body.artifact.variants[r.variant]
                            .files
                            .iter()
                            .map(|f| {
                                let (h, t) = self
                                    .files
                                    .get(&f.spec.content_id)
                                    .map_or((0, f.spec.chunk_count() as u32), |s| {
                                        (s.have.count(), s.total())
                                    });
                                (f.spec.content_id, h, t)
                            })
                            .collect(),
                    })
                    .collect(),
            })
            .collect()
    }

    fn pending_reporters(&self, r: &Release) -> u32 {
        let (Some(d), Some(sample)) = (&r.decision, self.samples.get(&r.manifest.id)) else {
            return 0;
        };
        core::iter::once(&self.id)
            .chain(self.peers.keys())
            .filter(|n| {
                d.admits(r.manifest.stage_of(n)) && !sample.contains(n) && sample.would_keep(n)
            })
            .count() as u32
    }

    // ----- outputs ---------------------------------------------------------------------

    /// The next output, or None when drained.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// The next deadline at which [`Mesh::handle_timeout`] wants to run.
    pub fn poll_timeout(&self) -> Option<Instant> {
        [
            self.next_anti_entropy,
            self.next_tick,
            self.deadlines.first().map(|(t, _)| *t),
            self.pending_wants.values().map(|(t, _)| *t).min(),
            self.store_backoff,
        ]
        .into_iter()
        .flatten()
        .min()
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

    /// Is `p` on another site (behind a WAN link)? Unknown sites count as local.
    fn remote(&self, p: &Peer) -> bool {
        self.config.site.is_some() && p.site.is_some() && p.site != self.config.site
    }

    /// Is `q` a usable peer on this node's site?
    fn on_site(&self, q: &Peer) -> bool {
        q.site == self.config.site && !q.refused
    }

    /// Request chunk `index` of `file` from `peer` if it is free, wanted and the peer has
    /// room (the rules of [`Mesh::pick_chunk`], for one chunk).
    fn schedule_one(&mut self, now: Now, peer: NodeId, file: ContentId, index: u32) {
        if self.store_backoff.is_some_and(|t| now.mono < t) {
            return;
        }
        let Some(p) = self.peers.get(&peer) else {
            return;
        };
        if p.inflight >= self.config.max_inflight_per_peer || p.refused {
            return;
        }
        let (Some(bits), Some(f)) = (p.haves.get(&file), self.files.get(&file)) else {
            return;
        };
        if !f.wanted
            || f.have.get(index)
            || !bits.get(index)
            || f.inflight.contains_key(&index)
            || f.pending.contains(&index)
        {
            return;
        }
        let avail = f.avail.get(index as usize).copied().unwrap_or(0);
        if bits.count() == f.total() && avail > f.seeds {
            // A seed serves only chunks no other peer can (see pick_chunk).
            return;
        }
        // Across a WAN link: one at a time, and only what no peer on this site has.
        if self.remote(p)
            && (p.inflight >= self.config.max_inflight_per_seed
                || self
                    .peers
                    .values()
                    .any(|q| self.on_site(q) && q.haves.get(&file).is_some_and(|b| b.get(index))))
        {
            return;
        }
        self.request(now, peer, file, index);
    }

    /// Run timers that are due. Calling it early does nothing.
    pub fn handle_timeout(&mut self, now: Now) {
        self.last_wall = now.wall;
        // Request timeouts.
        while let Some(&(t, id)) = self.deadlines.first() {
            if t > now.mono {
                break;
            }
            self.deadlines.pop_first();
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
        if self.next_anti_entropy.is_some_and(|t| t <= now.mono) {
            self.next_anti_entropy = Some(now.mono + self.config.anti_entropy_interval);
            if let Some(peer) = self.random_peers(1, None).first().copied() {
                let d = self.digest(false);
                self.send(peer, Message::Digest(d));
            }
        }
        if self.next_tick.is_some_and(|t| t <= now.mono) {
            self.next_tick = Some(now.mono + self.config.rollout_tick);
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

    // ----- peers -----------------------------------------------------------------------

    fn on_peer_up(&mut self, now: Now, peer: NodeId, info: PeerInfo) {
        if peer == self.id {
            return;
        }
        if !self.peers.contains_key(&peer) && self.peers.len() >= self.config.max_peers {
            self.outputs.push_back(Output::Disconnect {
                peer,
                reason: "peer table full".into(),
            });
            return;
        }
        let refused = match &self.trust {
            Some(t) => t
                .check_certificate(&peer, info.cert.as_ref(), now.wall)
                .is_err(),
            None => false,
        };
        let salt = self.rng.next_u64();
        let entry = self.peers.entry(peer).or_insert(Peer {
            site: None,
            rtt: None,
            score: 0,
            salt,
            haves: Haves::default(),
            inflight: 0,
            refused,
            lazy: false,
        });
        entry.site = info.site;
        entry.rtt = info.rtt;
        entry.refused = refused;
        if refused {
            self.outputs.push_back(Output::Disconnect {
                peer,
                reason: "no valid node certificate for this fleet".into(),
            });
            self.peers.remove(&peer);
            return;
        }
        if self.next_anti_entropy.is_none() {
            self.next_anti_entropy = Some(now.mono + self.config.anti_entropy_interval);
        }
        if let Some(c) = self.cert.clone() {
            self.send(peer, Message::Certificate(c));
        }
        let d = self.digest(false);
        self.send(peer, Message::Digest(d));
        self.announce_files_to(peer);
    }

    fn on_peer_down(&mut self, _now: Now, peer: NodeId) {
        let Some(p) = self.peers.remove(&peer) else {
            return;
        };
        for (file, bits) in &p.haves {
            if let Some(f) = self.files.get_mut(file) {
                remove_availability(f, bits);
            }
        }
        let ids: Vec<u64> = self
            .requests
            .iter()
            .filter(|(_, r)| r.peer == peer)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            if let Some(r) = self.requests.remove(&id) {
                self.deadlines.remove(&(r.deadline, id));
                self.forget_request(id, &r);
            }
        }
        self.pending_wants.retain(|_, (_, p)| *p != peer);
    }

    fn penalise(&mut self, peer: NodeId, points: u32, reason: String) {
        if points == 0 {
            return;
        }
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        p.score = p.score.saturating_add(points);
        let score = p.score;
        self.emit(Event::PeerPenalised {
            peer,
            reason: reason.clone(),
            score,
        });
        if score >= self.config.disconnect_score {
            self.outputs.push_back(Output::Disconnect { peer, reason });
            // Forget it now: nothing more is sent to or accepted from it.
            self.on_peer_down(Now::new(Instant::ZERO, self.last_wall), peer);
        }
    }

    fn random_peers(&mut self, n: usize, exclude: Option<NodeId>) -> Vec<NodeId> {
        let mut all: Vec<NodeId> = self
            .peers
            .keys()
            .filter(|p| Some(**p) != exclude)
            .copied()
            .collect();
        // Partial Fisher-Yates.
        let n = n.min(all.len());
        for i in 0..n {
            let j = i + (self.rng.next_u64() % (all.len() - i) as u64) as usize;
            all.swap(i, j);
        }
        all.truncate(n);
        all
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
                    self.deadlines.remove(&(r.deadline, id));
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

    fn holds(&self, o: &ObjectId) -> bool {
        match o {
            ObjectId::Manifest(id) => self.index.contains_key(id),
            ObjectId::TrustRoot(v) => self.trust.as_ref().is_some_and(|t| t.body.version >= *v),
            ObjectId::Instruction(h) => self
                .instructions
                .values()
                .chain(self.pending_instructions.values())
                .any(|(s, _)| s.body_hash() == *h),
        }
    }

    fn on_want(&mut self, from: NodeId, ids: Vec<ObjectId>) {
        // Each object once, and a bounded number per message: a Want repeating one large
        // manifest must not make us queue it thousands of times.
        const MAX_ANSWERS: usize = 64;
        let ids: BTreeSet<ObjectId> = ids.into_iter().take(crate::wire::MAX_LIST).collect();
        for o in ids.into_iter().take(MAX_ANSWERS) {
            match o {
                ObjectId::Manifest(id) => {
                    if let Some(m) = self.manifest(&id).map(|m| m.signed.clone()) {
                        self.send(from, Message::Manifest(m));
                    }
                }
                ObjectId::TrustRoot(_) => {
                    if let Some(t) = self.trust.as_ref().map(|t| t.signed.clone()) {
                        self.send(from, Message::TrustRoot(t));
                    }
                }
                ObjectId::Instruction(h) => {
                    if let Some(s) = self
                        .instructions
                        .values()
                        .find(|(s, _)| s.body_hash() == h)
                        .map(|(s, _)| s.clone())
                    {
                        self.send(from, Message::Instruction(s));
                    }
                }
            }
        }
    }

    fn digest(&self, reply: bool) -> Digest {
        Digest {
            trust_version: self.trust.as_ref().map_or(0, |t| t.body.version),
            channels: self
                .channels
                .iter()
                .map(|(c, s)| ChannelDigest {
                    channel: c.clone(),
                    highest: s.highest,
                    manifests: s
                        .releases
                        .iter()
                        .map(|(v, r)| (*v, r.manifest.id))
                        .collect(),
                })
                .collect(),
            reports: self
                .samples
                .iter()
                .map(|(id, s)| (*id, s.digest()))
                .collect(),
            instructions: self
                .instructions
                .values()
                .chain(self.pending_instructions.values())
                .map(|(s, _)| s.body_hash())
                .collect(),
            reply,
        }
    }

    fn on_digest(&mut self, from: NodeId, d: Digest) {
        let mut wants = Vec::new();
        let my_trust = self.trust.as_ref().map_or(0, |t| t.body.version);
        if d.trust_version > my_trust {
            wants.push(ObjectId::TrustRoot(d.trust_version));
        } else if d.trust_version < my_trust
            && let Some(t) = self.trust.as_ref().map(|t| t.signed.clone())
        {
            self.send(from, Message::TrustRoot(t));
        }
        for cd in &d.channels {
            let mine = self.channels.get(&cd.channel);
            let highest = mine.map_or(0, |c| c.highest);
            let mut list: Vec<(u64, ManifestId)> = cd
                .manifests
                .iter()
                .filter(|(v, id)| {
                    let known = self.index.contains_key(id);
                    let same_version_other_id = mine
                        .and_then(|c| c.releases.get(v))
                        .is_some_and(|r| r.manifest.id != *id)
                        && !mine.is_some_and(|c| c.equivocations.contains(&(*v, *id)));
                    !known && (*v > highest || same_version_other_id)
                })
                .copied()
                .collect();
            list.sort();
            wants.extend(list.into_iter().map(|(_, id)| ObjectId::Manifest(id)));
        }
        if !wants.is_empty() {
            wants.truncate(crate::wire::MAX_LIST);
            self.send(from, Message::Want(wants));
        }
        // Reports: push our sample where it differs.
        let reported: BTreeMap<ManifestId, [u8; 32]> = d.reports.iter().copied().collect();
        for (id, dig) in &reported {
            if let Some(s) = self.samples.get(id)
                && s.digest() != *dig
                && !s.is_empty()
            {
                let list = sample_reports(s);
                self.send(from, Message::Reports(list));
            }
        }
        for (id, s) in &self.samples {
            if !s.is_empty() && !d.reports.iter().any(|(i, _)| i == id) {
                let list = sample_reports(s);
                self.outputs.push_back(Output::Send {
                    to: from,
                    msg: Message::Reports(list),
                });
            }
        }
        let ours: Vec<SignedInstruction> = self
            .instructions
            .values()
            .filter(|(s, _)| !d.instructions.contains(&s.body_hash()))
            .map(|(s, _)| s.clone())
            .collect();
        for s in ours {
            self.send(from, Message::Instruction(s));
        }
        if !d.reply {
            let mine = self.digest(true);
            self.send(from, Message::Digest(mine));
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
                if let Some(c) = self.channels.get_mut(&body.channel) {
                    match body.status {
                        HealthStatus::Ok => {
                            c.reported_ok.insert(body.manifest);
                        }
                        // A failure before any Ok report is a failed activation: the driver
                        // kept serving what it served before. After an Ok it is a runtime
                        // failure, which the rollout gate handles.
                        HealthStatus::Failed { .. } if !c.reported_ok.contains(&body.manifest) => {
                            c.failed_local.insert(body.manifest);
                            if c.active.map(|a| a.1) == Some(body.manifest) {
                                c.active = c.previous.take();
                            }
                        }
                        _ => {}
                    }
                }
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

    fn channel_entry(&mut self, channel: &Channel) -> Result<&mut ChannelState, String> {
        if !self.channels.contains_key(channel) && self.channels.len() >= self.config.max_channels {
            return Err("too many channels".into());
        }
        Ok(self.channels.entry(channel.clone()).or_default())
    }

    // ----- trust roots -----------------------------------------------------------------

    fn on_trust_root(
        &mut self,
        now: Now,
        from: Option<NodeId>,
        t: crate::trust::SignedTrustRoot,
    ) -> Result<(), TrustError> {
        let res = match &self.trust {
            None if from.is_none() => TrustRoot::bootstrap(t, now.wall),
            // A peer cannot install our first trust root: that is the operator's call.
            None => return Ok(()),
            Some(cur) => {
                let Ok(body) = t.decode_body() else {
                    return self.reject_trust(
                        from,
                        TrustError::Malformed(SignedError::Invalid("bad body".into())),
                    );
                };
                if body.version <= cur.body.version {
                    return Ok(());
                }
                cur.verify_successor(t, now.wall)
            }
        };
        match res {
            Ok(root) => {
                let version = root.body.version;
                let signed = root.signed.clone();
                self.trust = Some(root);
                self.emit(Event::TrustRootUpdated {
                    version,
                    signed: signed.clone(),
                });
                for p in self.random_peers(usize::MAX, from) {
                    self.send(p, Message::TrustRoot(signed.clone()));
                }
                Ok(())
            }
            Err(e) => self.reject_trust(from, e),
        }
    }

    fn reject_trust(&mut self, from: Option<NodeId>, e: TrustError) -> Result<(), TrustError> {
        self.emit(Event::Rejected {
            kind: ObjectKind::TrustRoot,
            from,
            label: e.label(),
            reason: e.to_string(),
        });
        if let Some(p) = from {
            self.penalise(p, penalty_for(&e), format!("trust root: {e}"));
        }
        Err(e)
    }

    // ----- manifests -------------------------------------------------------------------

    fn reject_manifest(&mut self, from: Option<NodeId>, e: TrustError) -> Result<(), TrustError> {
        self.emit(Event::Rejected {
            kind: ObjectKind::Manifest,
            from,
            label: e.label(),
            reason: e.to_string(),
        });
        if let Some(p) = from {
            self.penalise(p, penalty_for(&e), format!("manifest: {e}"));
        }
        Err(e)
    }

    /// Accept or refuse a manifest. `restore`: re-accepting one persisted before a restart.
    fn on_manifest(
        &mut self,
        now: Now,
        from: Option<NodeId>,
        signed: SignedManifest,
        restore: bool,
    ) -> Result<(), TrustError> {
        let id = ManifestId(signed.body_hash());
        if let Some((channel, version)) = self.index.get(&id) {
            // Gossip duplicates are normal; a local re-publish of an old release is a
            // replay and is refused like one.
            let highest = self.channels.get(channel).map_or(0, |c| c.highest);
            if from.is_none() && !restore && *version < highest {
                let e = TrustError::Stale {
                    got: *version,
                    highest,
                };
                return self.reject_manifest(None, e);
            }
            return Ok(());
        }
        let m = match Manifest::decode(signed) {
            Ok(m) => m,
            Err(e) => return self.reject_manifest(from, TrustError::Malformed(e)),
        };
        let Some(trust) = &self.trust else {
            return self
                .reject_manifest(from, TrustError::TrustRootExpired)
                .map(|_| ());
        };
        let auth = if restore {
            trust.authorise_publisher_signed(&m.signed, &m.body.channel, UnixTime(0))
        } else {
            trust.authorise_manifest(&m, now.wall)
        };
        if let Err(e) = auth {
            return self.reject_manifest(from, e);
        }
        let channel = m.body.channel.clone();
        let version = m.body.version;
        let max_channels = self.config.max_channels;
        if !self.channels.contains_key(&channel) && self.channels.len() >= max_channels {
            return self.reject_manifest(
                from,
                TrustError::Malformed(SignedError::Invalid("too many channels".into())),
            );
        }
        let chan = self.channels.entry(channel.clone()).or_default();
        // Same channel and version, different body: equivocation.
        if let Some(existing) = chan.releases.get(&version) {
            let existing_signed = existing.manifest.signed.clone();
            let existing_id = existing.manifest.id;
            // Bounded: a leaked key could sign any number of bodies for one version.
            if chan.equivocations.contains(&(version, id))
                || chan.equivocations.len() >= MAX_EQUIVOCATIONS
            {
                return Ok(());
            }
            chan.equivocations.insert((version, id));
            chan.equivocations.insert((version, existing_id));
            let kept = existing_id.min(id);
            self.emit(Event::Equivocation {
                channel: channel.clone(),
                version,
                kept,
                evidence: Box::new((existing_signed.clone(), m.signed.clone())),
            });
            // Spread the evidence once, so every node converges on the same choice.
            let new_signed = m.signed.clone();
            for p in self.random_peers(usize::MAX, from) {
                self.send(p, Message::Manifest(existing_signed.clone()));
                self.send(p, Message::Manifest(new_signed.clone()));
            }
            if id < existing_id {
                let signed = m.signed.clone();
                self.insert_release(now, m);
                self.index.remove(&existing_id);
                // The kept manifest replaces the other one: persist it like an accepted one.
                self.emit(Event::ManifestAccepted {
                    id,
                    channel: channel.clone(),
                    version,
                    signed,
                });
            }
            return Ok(());
        }
        if !restore && version <= chan.highest {
            let highest = chan.highest;
            return self.reject_manifest(
                from,
                TrustError::Stale {
                    got: version,
                    highest,
                },
            );
        }
        if chan.equivocations.iter().any(|(v, _)| *v == version) && !restore {
            return Ok(());
        }
        chan.highest = chan.highest.max(version);
        let signed = m.signed.clone();
        self.insert_release(now, m);
        self.emit(Event::ManifestAccepted {
            id,
            channel: channel.clone(),
            version,
            signed: signed.clone(),
        });
        self.push_object(from, Message::Manifest(signed), ObjectId::Manifest(id));
        // While restoring, the active release is not marked yet: trim after SetActive.
        if !restore {
            self.trim_channel(&channel);
        }
        self.refresh_all(now);
        Ok(())
    }

    fn insert_release(&mut self, now: Now, m: Manifest) {
        let m = match &self.interner {
            Some(Interner(f)) => f(Arc::new(m)),
            None => Arc::new(m),
        };
        let variant = m.body.artifact.choose(&self.config.device);
        let channel = m.body.channel.clone();
        let version = m.body.version;
        self.index.insert(m.id, (channel.clone(), version));
        let chan = self
            .channels
            .get_mut(&channel)
            .expect("channel entry exists");
        chan.releases.insert(
            version,
            Release {
                manifest: m.clone(),
                variant,
                decision: None,
                announced_stages: 0,
                announced_failure: false,
            },
        );
        self.samples
            .entry(m.id)
            .or_insert_with(|| ReportSample::new(m.id, self.config.report_sample_size));
        for (fi, f) in m.body.artifact.variants[variant].files.iter().enumerate() {
            let cid = f.spec.content_id;
            if self.files.contains_key(&cid) || self.files.len() >= self.config.max_files {
                continue;
            }
            let total = f.spec.chunk_count() as u32;
            let mut fs = FileState {
                spec: m.clone(),
                variant,
                file: fi,
                have: Bitfield::new(total),
                avail: vec![0; total as usize],
                seeds: 0,
                inflight: BTreeMap::new(),
                wanted: false,
                pending: BTreeSet::new(),
                superseed: None,
            };
            for p in self.peers.values_mut() {
                if let Some(b) = p.haves.get_mut(&cid) {
                    if b.len() != total {
                        *b = b.resized(total);
                    }
                    add_availability(&mut fs, b);
                }
            }
            self.files.insert(cid, fs);
        }
        if let Some((s, body)) = self.pending_instructions.remove(&(channel, version)) {
            self.apply_instruction(now, None, m.id, s, body);
        }
    }

    /// Keep at most `retained_versions` releases per channel, never the active or the
    /// previous one.
    fn trim_channel(&mut self, channel: &Channel) {
        let keep = self.config.retained_versions.max(2);
        let Some(c) = self.channels.get_mut(channel) else {
            return;
        };
        let mut protected: BTreeSet<u64> = c
            .active
            .iter()
            .chain(c.previous.iter())
            .map(|a| a.0)
            .chain(c.pinned_version)
            .collect();
        protected.extend(
            c.releases
                .iter()
                .filter(|(_, r)| self.pinned.contains(&r.manifest.id))
                .map(|(v, _)| *v),
        );
        let mut removed = Vec::new();
        while c.releases.len() > keep {
            let Some(v) = c.releases.keys().find(|v| !protected.contains(v)).copied() else {
                break;
            };
            if let Some(r) = c.releases.remove(&v) {
                removed.push(r.manifest);
            }
        }
        for m in removed {
            self.index.remove(&m.id);
            self.samples.remove(&m.id);
            self.instructions.remove(&m.id);
            self.gc_files();
        }
    }

    /// Drop file state no retained release refers to.
    fn gc_files(&mut self) {
        let live: BTreeSet<ContentId> = self
            .channels
            .values()
            .flat_map(|c| c.releases.values())
            .flat_map(|r| {
                r.manifest.body.artifact.variants[r.variant]
                    .files
                    .iter()
                    .map(|f| f.spec.content_id)
            })
            .collect();
        self.files.retain(|k, _| live.contains(k));
    }

    /// Eager push to a few random peers, lazy IHave to the rest.
    /// Plumtree-style push: the payload to every peer still on the gossip tree (a peer
    /// that receives a duplicate prunes the link, one that pulls grafts it back), an
    /// `IHave` to the others so a lost branch is repaired by a pull. The first object
    /// floods; the duplicates it causes leave a spanning tree for the next ones.
    fn push_object(&mut self, from: Option<NodeId>, msg: Message, oid: ObjectId) {
        let peers = self.random_peers(usize::MAX, from);
        for p in peers {
            if self.peers.get(&p).is_some_and(|x| !x.lazy) {
                self.send(p, msg.clone());
            } else {
                self.send(p, Message::IHave(vec![oid]));
            }
        }
    }

    /// A gossip payload arrived from `from`: a duplicate prunes the link, a new one keeps
    /// (or puts) it on the tree.
    fn tree_update(&mut self, from: NodeId, duplicate: bool) {
        let Some(p) = self.peers.get_mut(&from) else {
            return;
        };
        if duplicate {
            if !p.lazy {
                p.lazy = true;
                self.send(from, Message::Prune);
            }
        } else {
            p.lazy = false;
        }
    }

    // ----- instructions ----------------------------------------------------------------

    fn on_instruction(
        &mut self,
        now: Now,
        from: Option<NodeId>,
        s: SignedInstruction,
    ) -> Result<(), TrustError> {
        let hash = s.body_hash();
        if self.holds(&ObjectId::Instruction(hash)) {
            return Ok(());
        }
        let body = match s.decode_body() {
            Ok(b) => b,
            Err(e) => return self.reject_instruction(from, TrustError::Malformed(e)),
        };
        let Some(trust) = &self.trust else {
            return Ok(());
        };
        if let Err(e) = trust.authorise_publisher_signed(&s, &body.channel, now.wall) {
            return self.reject_instruction(from, e);
        }
        if body.issued > now.wall.plus(self.config.max_clock_skew) {
            let ahead_ms = body.issued.0 - now.wall.0;
            return self.reject_instruction(from, TrustError::Future { ahead_ms });
        }
        let Some(mid) = self
            .channels
            .get(&body.channel)
            .and_then(|c| c.releases.get(&body.version))
            .map(|r| r.manifest.id)
        else {
            // Unknown release (the manifest may still be on its way): hold the latest
            // instruction per release, bounded, and apply it when the manifest arrives.
            let key = (body.channel.clone(), body.version);
            let newer = self
                .pending_instructions
                .get(&key)
                .is_none_or(|(cs, cb)| (cb.issued, cs.body_hash()) < (body.issued, hash));
            let room = self.pending_instructions.len() < MAX_PENDING_INSTRUCTIONS
                || self.pending_instructions.contains_key(&key);
            let plausible = self
                .channels
                .get(&body.channel)
                .is_none_or(|c| body.version > c.highest);
            if newer && room && plausible {
                self.pending_instructions.insert(key, (s.clone(), body));
                self.push_object(from, Message::Instruction(s), ObjectId::Instruction(hash));
            }
            return Ok(());
        };
        self.apply_instruction(now, from, mid, s, body);
        Ok(())
    }

    /// Make an authorised instruction for the known release `mid` take effect, if it is
    /// the latest one for it (by issue time, then body hash, so every node keeps the same).
    fn apply_instruction(
        &mut self,
        now: Now,
        from: Option<NodeId>,
        mid: ManifestId,
        s: SignedInstruction,
        body: crate::rollout::InstructionBody,
    ) {
        let hash = s.body_hash();
        if let Some((cs, cur)) = self.instructions.get(&mid)
            && (cur.issued, cs.body_hash()) >= (body.issued, hash)
        {
            return;
        }
        self.emit(Event::InstructionAccepted {
            channel: body.channel.clone(),
            version: body.version,
            action: body.action,
            signed: Box::new(s.clone()),
        });
        self.instructions.insert(mid, (s.clone(), body));
        self.push_object(from, Message::Instruction(s), ObjectId::Instruction(hash));
        self.refresh_all(now);
    }

    fn reject_instruction(
        &mut self,
        from: Option<NodeId>,
        e: TrustError,
    ) -> Result<(), TrustError> {
        self.emit(Event::Rejected {
            kind: ObjectKind::Instruction,
            from,
            label: e.label(),
            reason: e.to_string(),
        });
        if let Some(p) = from {
            self.penalise(p, penalty_for(&e), format!("instruction: {e}"));
        }
        Err(e)
    }

    // ----- health reports --------------------------------------------------------------

    /// Returns true when the report entered or changed the sample.
    fn on_report(&mut self, now: Now, from: Option<NodeId>, r: HealthReport) -> bool {
        let body = match r.signed.decode_body() {
            Ok(b) => b,
            Err(e) => {
                self.reject_report(from, PENALTY_SEVERE, "malformed", e.to_string());
                return false;
            }
        };
        // Cheap checks before the signature: only releases we keep have a sample.
        if !self.samples.contains_key(&body.manifest) {
            return false;
        }
        if body.timestamp > now.wall.plus(self.config.max_clock_skew) {
            // An honest node with a fast clock: no penalty, anti-entropy offers it again.
            self.reject_report(
                from,
                0,
                "future",
                format!(
                    "timestamp {} ms ahead of this clock (tolerance {} s)",
                    body.timestamp.0 - now.wall.0,
                    self.config.max_clock_skew.as_secs()
                ),
            );
            return false;
        }
        if r.signed.valid_signers(|k| k.0 == body.node.0).is_empty() {
            self.reject_report(
                from,
                PENALTY_SEVERE,
                "forged",
                "not signed by the reporting node".into(),
            );
            return false;
        }
        if let Some(t) = &self.trust
            && let Err(e) = t.check_certificate(&body.node, r.cert.as_ref(), now.wall)
        {
            self.reject_report(from, PENALTY_MINOR, e.label(), e.to_string());
            return false;
        }
        let Some(sample) = self.samples.get_mut(&body.manifest) else {
            return false;
        };
        let ok_release = self
            .index
            .get(&body.manifest)
            .is_some_and(|(c, v)| *c == body.channel && *v == body.version);
        if !ok_release {
            self.reject_report(
                from,
                PENALTY_MINOR,
                "mismatch",
                "report names the wrong channel or version".into(),
            );
            return false;
        }
        let changed = sample.insert(r.clone(), body);
        if changed {
            if self.pending_reports.len() < self.config.report_sample_size {
                self.pending_reports.push(r);
            }
            self.refresh_all(now);
        }
        changed
    }

    fn reject_report(
        &mut self,
        from: Option<NodeId>,
        penalty: u32,
        label: &'static str,
        reason: String,
    ) {
        self.emit(Event::Rejected {
            kind: ObjectKind::Report,
            from,
            label,
            reason: reason.clone(),
        });
        if let Some(p) = from {
            self.penalise(p, penalty, format!("health report: {reason}"));
        }
    }

    fn flush_reports(&mut self) {
        if self.pending_reports.is_empty() {
            return;
        }
        let batch = core::mem::take(&mut self.pending_reports);
        for p in self.random_peers(self.config.eager_fanout, None) {
            self.send(p, Message::Reports(batch.clone()));
        }
    }

    // ----- rollout ---------------------------------------------------------------------

    fn refresh_all(&mut self, now: Now) {
        let names: Vec<Channel> = self.channels.keys().cloned().collect();
        for c in names {
            self.refresh_channel(now, &c);
        }
    }

    fn refresh_channel(&mut self, now: Now, name: &Channel) {
        let me = self.id;
        let catching_up = self.catch_up_until.is_some();
        let Some(chan) = self.channels.get_mut(name) else {
            return;
        };
        let mut events = Vec::new();
        for (v, r) in chan.releases.iter_mut() {
            let halt = self
                .instructions
                .get(&r.manifest.id)
                .and_then(|(_, b)| match b.action {
                    RolloutAction::Halt => Some(b.issued),
                    RolloutAction::Resume => None,
                });
            let d = evaluate(
                &r.manifest.body.rollout,
                r.manifest.body.created,
                self.samples.get(&r.manifest.id),
                halt,
                now.wall,
            );
            while r.announced_stages < d.open_stages() {
                events.push(Event::StageOpened {
                    channel: name.clone(),
                    version: *v,
                    stage: r.announced_stages,
                    at: d.opened[r.announced_stages],
                });
                r.announced_stages += 1;
            }
            if let Some(f) = d.failure
                && !r.announced_failure
            {
                r.announced_failure = true;
                events.push(Event::RolloutFailed {
                    channel: name.clone(),
                    version: *v,
                    failure: f,
                });
            }
            r.decision = Some(d);
        }
        // The release this node should serve: the highest one that admits it.
        let target = chan
            .releases
            .iter()
            .rev()
            .find(|(_, r)| {
                !chan.failed_local.contains(&r.manifest.id)
                    && r.decision
                        .as_ref()
                        .is_some_and(|d| d.admits(r.manifest.stage_of(&me)))
            })
            .map(|(v, r)| (*v, r.manifest.id, r.variant));
        // A local pin overrides the rollouts: the pinned version if this node has it, else
        // whatever it serves now.
        let target = match chan.pinned_version {
            None => target,
            Some(pv) => match chan.releases.get(&pv) {
                Some(r) if !chan.failed_local.contains(&r.manifest.id) => {
                    Some((pv, r.manifest.id, r.variant))
                }
                _ => chan
                    .active
                    .and_then(|(v, id)| chan.releases.get(&v).map(|r| (v, id, r.variant))),
            },
        };
        // Which files to download: the target and, with prefetch, newer releases that are
        // not failed.
        let floor = target.map_or(0, |t| t.0);
        let mut wanted: Vec<(ContentId, bool)> = Vec::new();
        for (v, r) in &chan.releases {
            let failed = r.decision.as_ref().is_some_and(|d| d.rollback())
                || chan.failed_local.contains(&r.manifest.id);
            let want = !failed && (*v == floor || (*v > floor && self.config.prefetch));
            for f in &r.manifest.body.artifact.variants[r.variant].files {
                wanted.push((f.spec.content_id, want));
            }
        }
        let active = chan.active;
        let active_rolled_back = active.is_some_and(|(v, id)| {
            chan.releases.get(&v).is_some_and(|r| {
                r.manifest.id == id && r.decision.as_ref().is_some_and(|d| d.rollback())
            })
        });
        for (cid, want) in wanted {
            if let Some(f) = self.files.get_mut(&cid) {
                f.wanted |= want;
            }
        }
        let complete = |files: &BTreeMap<ContentId, FileState>, m: &Manifest, variant: usize| {
            m.body.artifact.variants[variant]
                .files
                .iter()
                .all(|f| files.get(&f.spec.content_id).is_some_and(|s| s.complete()))
        };
        let chan = self.channels.get_mut(name).expect("present");
        match target {
            Some((v, id, variant)) if Some((v, id)) != active => {
                let m = chan.releases[&v].manifest.clone();
                if complete(&self.files, &m, variant) {
                    let rolling_back = active.is_some_and(|(av, _)| av > v) || active_rolled_back;
                    if !rolling_back && catching_up {
                        // Promotions wait until this node has heard a peer's view.
                    } else if rolling_back {
                        events.push(Event::RollBack {
                            channel: name.clone(),
                            from: active.map_or(0, |a| a.0),
                            to: Some((v, id)),
                        });
                        chan.previous = None;
                        chan.active = Some((v, id));
                    } else {
                        events.push(Event::Activate {
                            channel: name.clone(),
                            version: v,
                            manifest: id,
                            variant,
                            previous: active.map(|a| a.0),
                        });
                        chan.previous = active;
                        chan.active = Some((v, id));
                    }
                } else if active_rolled_back {
                    events.push(Event::RollBack {
                        channel: name.clone(),
                        from: active.map_or(0, |a| a.0),
                        to: None,
                    });
                    chan.active = None;
                }
            }
            None if active_rolled_back => {
                events.push(Event::RollBack {
                    channel: name.clone(),
                    from: active.map_or(0, |a| a.0),
                    to: None,
                });
                chan.active = None;
            }
            _ => {}
        }
        for e in events {
            self.emit(e);
        }
    }

    // ----- chunk exchange --------------------------------------------------------------

    fn announce_files_to(&mut self, peer: NodeId) {
        let list: Vec<(ContentId, Bitfield)> = self
            .files
            .iter()
            .filter(|(_, f)| f.have.count() > 0 && f.superseed.is_none())
            .map(|(k, f)| (*k, f.have.clone()))
            .collect();
        for (file, chunks) in list {
            self.send(peer, Message::Have { file, chunks });
        }
        let seeding: Vec<ContentId> = self
            .files
            .iter()
            .filter(|(_, f)| f.superseed.is_some())
            .map(|(k, _)| *k)
            .collect();
        for file in seeding {
            self.announce_share(peer, file);
        }
    }

    /// Super-seeding: show `peer` the next share of the chunks not uploaded yet (an equal
    /// part for each current peer).
    fn announce_share(&mut self, peer: NodeId, file: ContentId) {
        let npeers = self.peers.len().max(1) as u32;
        let Some(f) = self.files.get_mut(&file) else {
            return;
        };
        let total = f.total();
        let Some(ss) = f.superseed.as_mut() else {
            return;
        };
        let unserved = total - ss.served.count();
        let share = unserved.div_ceil(npeers).max(1);
        let mut bits = Bitfield::new(total);
        let mut given = 0;
        let mut k = 0;
        while given < share && k < total {
            let i = (ss.cursor + k) % total;
            k += 1;
            if !ss.served.get(i) {
                bits.set(i);
                given += 1;
            }
        }
        ss.cursor = (ss.cursor + k) % total;
        self.send(peer, Message::Have { file, chunks: bits });
    }

    /// Stop super-seeding `file`: announce all of it.
    fn reveal(&mut self, file: ContentId) {
        if let Some(f) = self.files.get_mut(&file)
            && f.superseed.take().is_some()
        {
            self.announce_file(file);
        }
    }

    fn announce_file(&mut self, file: ContentId) {
        let Some(f) = self.files.get(&file) else {
            return;
        };
        let chunks = f.have.clone();
        let peers: Vec<NodeId> = self.peers.keys().copied().collect();
        for p in peers {
            self.send(
                p,
                Message::Have {
                    file,
                    chunks: chunks.clone(),
                },
            );
        }
    }

    fn on_have(&mut self, from: NodeId, file: ContentId, chunks: Bitfield) {
        let Some(peer) = self.peers.get_mut(&from) else {
            return;
        };
        match self.files.get_mut(&file) {
            Some(f) => {
                if chunks.len() != f.total() {
                    self.penalise(from, PENALTY_MINOR, "bitfield of the wrong length".into());
                    return;
                }
                if let Some(old) = peer.haves.get(&file) {
                    remove_availability(f, old);
                }
                add_availability(f, &chunks);
                peer.haves.insert(file, chunks);
            }
            None => {
                // Remember a bounded number of files we do not know yet.
                if peer.haves.len() < self.config.max_files {
                    peer.haves.insert(file, chunks);
                }
            }
        }
    }

    fn on_have_chunk(&mut self, from: NodeId, file: ContentId, index: u32) {
        let Some(peer) = self.peers.get_mut(&from) else {
            return;
        };
        let Some(f) = self.files.get_mut(&file) else {
            // A file we do not know yet (its manifest is still on its way): remember the
            // bit, growing the field up to a bound, so availability is right once we do.
            const MAX_UNKNOWN_BITS: u32 = 1 << 16;
            if index < MAX_UNKNOWN_BITS
                && (peer.haves.contains_key(&file) || peer.haves.len() < self.config.max_files)
            {
                let bits = peer.haves.get_or_insert_with(file, Bitfield::default);
                if index >= bits.len() {
                    *bits = bits.resized(index + 1);
                }
                bits.set(index);
            }
            return;
        };
        if index >= f.total() {
            self.penalise(from, PENALTY_MINOR, "chunk index out of range".into());
            return;
        }
        let total = f.total();
        let bits = peer.haves.get_or_insert_with(file, || Bitfield::new(total));
        if !bits.get(index) {
            let was_seed = bits.count() == bits.len();
            bits.set(index);
            f.avail[index as usize] = f.avail[index as usize].saturating_add(1);
            if !was_seed && bits.count() == bits.len() {
                f.seeds = f.seeds.saturating_add(1);
            }
        }
    }

    fn forget_request(&mut self, id: u64, r: &Request) {
        if let Some(p) = self.peers.get_mut(&r.peer) {
            p.inflight = p.inflight.saturating_sub(1);
        }
        if let Some(f) = self.files.get_mut(&r.file)
            && let Some(list) = f.inflight.get_mut(&r.index)
        {
            list.retain(|x| *x != id);
            if list.is_empty() {
                f.inflight.remove(&r.index);
            }
        }
    }

    /// Clear every request for this chunk; cancel the ones still running elsewhere.
    fn finish_requests(&mut self, from: Option<NodeId>, file: ContentId, index: u32) {
        let ids: Vec<u64> = self
            .files
            .get(&file)
            .and_then(|f| f.inflight.get(&index))
            .cloned()
            .unwrap_or_default();
        for id in ids {
            if let Some(r) = self.requests.remove(&id) {
                self.deadlines.remove(&(r.deadline, id));
                self.forget_request(id, &r);
                if Some(r.peer) != from {
                    self.send(r.peer, Message::Cancel { id });
                }
            }
        }
    }

    fn on_chunk_stored(&mut self, now: Now, from: Option<NodeId>, file: ContentId, index: u32) {
        self.finish_requests(from, file, index);
        let Some(f) = self.files.get_mut(&file) else {
            return;
        };
        f.pending.remove(&index);
        if index >= f.total() || f.have.get(index) {
            return;
        }
        f.have.set(index);
        let (have, total) = (f.have.count(), f.total());
        let peers: Vec<NodeId> = self.peers.keys().copied().collect();
        for p in peers {
            self.send(p, Message::HaveChunk { file, index });
        }
        self.emit(Event::FileProgress { file, have, total });
        if have == total {
            self.emit(Event::FileComplete { file });
            self.refresh_all(now);
        }
    }

    fn on_chunk_failed(
        &mut self,
        now: Now,
        from: NodeId,
        file: ContentId,
        index: u32,
        reason: ChunkFailure,
    ) {
        let ids: Vec<u64> = self
            .requests
            .iter()
            .filter(|(_, r)| r.peer == from && r.file == file && r.index == index)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            if let Some(r) = self.requests.remove(&id) {
                self.deadlines.remove(&(r.deadline, id));
                self.forget_request(id, &r);
            }
        }
        match reason {
            ChunkFailure::Corrupt => {
                // Never ask that peer for this file again.
                if let Some(p) = self.peers.get_mut(&from)
                    && let Some(bits) = p.haves.remove(&file)
                    && let Some(f) = self.files.get_mut(&file)
                {
                    remove_availability(f, &bits);
                }
                self.penalise(
                    from,
                    PENALTY_CORRUPT,
                    format!("corrupt chunk {index} of {}", file.short()),
                );
            }
            ChunkFailure::Store(_) => {
                if let Some(f) = self.files.get_mut(&file) {
                    f.pending.remove(&index);
                }
                // A full or failing disk: pause downloads rather than fetch bytes that
                // cannot be kept.
                self.store_backoff = Some(now.mono + self.config.store_retry);
            }
        }
    }

    /// Issue chunk requests to peers with free slots.
    fn schedule(&mut self, now: Now) {
        if self.store_backoff.is_some_and(|t| now.mono < t) {
            return;
        }
        self.store_backoff = None;
        let max = self.config.max_inflight_per_peer;
        if self.files.values().all(|f| !f.wanted || f.complete()) {
            return;
        }
        let my_site = self.config.site.clone();
        // Peers with free slots, best first: same site, lower RTT, random salt.
        let mut order: Vec<(bool, Duration, u64, NodeId)> = self
            .peers
            .iter()
            .filter(|(_, p)| p.inflight < max && !p.haves.is_empty())
            .map(|(id, p)| {
                let same = my_site.is_some() && p.site == my_site;
                (!same, p.rtt.unwrap_or(Duration::from_secs(1)), p.salt, *id)
            })
            .collect();
        order.sort();
        let files: Vec<ContentId> = self
            .files
            .iter()
            .filter(|(_, f)| f.wanted && !f.complete())
            .map(|(k, _)| *k)
            .collect();
        for (_, _, _, peer) in order {
            for file in &files {
                loop {
                    let slots = self
                        .peers
                        .get(&peer)
                        .map_or(0, |p| max.saturating_sub(p.inflight));
                    if slots == 0 {
                        break;
                    }
                    let Some(index) = self.pick_chunk(now, &peer, file) else {
                        break;
                    };
                    self.request(now, peer, *file, index);
                }
            }
        }
    }

    fn pick_chunk(&mut self, now: Now, peer: &NodeId, file: &ContentId) -> Option<u32> {
        let p = self.peers.get(peer)?;
        let bits = p.haves.get(file)?;
        let f = self.files.get(file)?;
        let n = f.total();
        if n == 0 {
            return None;
        }
        let is_seed = bits.count() == n;
        // Keep few requests queued at a seed: what it uploads twice is wasted on its uplink.
        if is_seed && p.inflight >= self.config.max_inflight_per_seed {
            return None;
        }
        // A peer on another site is behind a WAN link: ask it only for chunks no peer on
        // this site has (those come over the LAN), one at a time.
        let remote = self.remote(p);
        if remote && p.inflight >= self.config.max_inflight_per_seed {
            return None;
        }
        let local: Vec<u8> = if remote {
            let mut u = vec![0u8; f.have.as_bytes().len()];
            for q in self.peers.values() {
                if self.on_site(q)
                    && let Some(b) = q.haves.get(file)
                {
                    for (x, y) in u.iter_mut().zip(b.as_bytes()) {
                        *x |= *y;
                    }
                }
            }
            u
        } else {
            Vec::new()
        };
        // Chunk order from a random start, as before, but a byte (8 chunks) where the peer
        // has nothing this node lacks is skipped at once.
        let (pb, hb) = (bits.as_bytes(), f.have.as_bytes());
        let start = (self.rng.next_u64() % u64::from(n)) as u32;
        let mut best: Option<(u16, u32)> = None;
        let mut k = 0u32;
        while k < n {
            let i = (start + k) % n;
            let b = (i / 8) as usize;
            let cand = pb.get(b).copied().unwrap_or(0)
                & !hb.get(b).copied().unwrap_or(0xff)
                & !local.get(b).copied().unwrap_or(0);
            if cand == 0 {
                // Next byte boundary (or the wrap to chunk 0).
                k += (8 - i % 8).min(n - i);
                continue;
            }
            k += 1;
            if cand & (1 << (i % 8)) == 0 || f.inflight.contains_key(&i) || f.pending.contains(&i) {
                continue;
            }
            let avail = f.avail[i as usize];
            // Seeds serve only chunks no non-seed peer can.
            if is_seed && avail.saturating_sub(f.seeds) > 0 {
                continue;
            }
            if best.is_none_or(|(a, _)| avail < a) {
                best = Some((avail, i));
            }
        }
        if let Some((_, i)) = best {
            return Some(i);
        }
        let any_free_missing = hb.iter().enumerate().any(|(b, byte)| {
            let missing = !byte;
            missing != 0
                && (0..8u32).any(|bit| {
                    let i = b as u32 * 8 + bit;
                    missing & (1 << bit) != 0
                        && i < n
                        && !f.inflight.contains_key(&i)
                        && !f.pending.contains(&i)
                })
        });
        if any_free_missing {
            return None;
        }
        // Endgame: every missing chunk is in flight; duplicate old requests.
        let mut pick = None;
        for (i, ids) in &f.inflight {
            if !bits.get(*i) || ids.len() >= 2 {
                continue;
            }
            let old = ids.iter().all(|id| {
                self.requests.get(id).is_some_and(|r| {
                    r.peer != *peer
                        && now.mono.saturating_duration_since(r.sent) >= self.config.endgame_after
                })
            });
            if old {
                pick = Some(*i);
                break;
            }
        }
        pick
    }

    fn request(&mut self, now: Now, peer: NodeId, file: ContentId, index: u32) {
        let id = self.next_request;
        self.next_request += 1;
        let deadline = now.mono + self.config.request_timeout;
        self.requests.insert(
            id,
            Request {
                peer,
                file,
                index,
                sent: now.mono,
                deadline,
            },
        );
        self.deadlines.insert((deadline, id));
        if let Some(p) = self.peers.get_mut(&peer) {
            p.inflight += 1;
        }
        if let Some(f) = self.files.get_mut(&file) {
            f.inflight.entry(index).or_default().push(id);
        }
        self.send(peer, Message::Request { id, file, index });
    }
}

fn sample_reports(s: &ReportSample) -> Vec<HealthReport> {
    s.entries().flat_map(|e| e.reports().cloned()).collect()
}

fn clear_bit(bits: &mut Bitfield, i: u32) {
    if bits.get(i) {
        let mut fresh = Bitfield::new(bits.len());
        for j in 0..bits.len() {
            if j != i && bits.get(j) {
                fresh.set(j);
            }
        }
        *bits = fresh;
    }
}

fn add_availability(f: &mut FileState, bits: &Bitfield) {
    if bits.len() != f.total() {
        return;
    }
    for i in 0..bits.len() {
        if bits.get(i) {
            f.avail[i as usize] = f.avail[i as usize].saturating_add(1);
        }
    }
    if bits.count() == bits.len() {
        f.seeds = f.seeds.saturating_add(1);
    }
}

fn remove_availability(f: &mut FileState, bits: &Bitfield) {
    if bits.len() != f.total() {
        return;
    }
    for i in 0..bits.len() {
        if bits.get(i) {
            f.avail[i as usize] = f.avail[i as usize].saturating_sub(1);
        }
    }
    if bits.count() == bits.len() {
        f.seeds = f.seeds.saturating_sub(1);
    }
}

impl<R: Rng> Mesh<R> {
    /// Debug dump of the exchange state of one file (tests).
    #[doc(hidden)]
    pub fn debug_file(&self, file: &ContentId) -> String {
        let Some(f) = self.files.get(file) else {
            return "unknown file".into();
        };
        let missing: Vec<u32> = (0..f.total()).filter(|i| !f.have.get(*i)).collect();
        let mut s = format!(
            "wanted {} have {}/{} seeds {} missing {:?} inflight {:?}\n",
            f.wanted,
            f.have.count(),
            f.total(),
            f.seeds,
            missing,
            f.inflight
        );
        for i in &missing {
            s += &format!("  avail[{i}]={}\n", f.avail[*i as usize]);
        }
        for (id, p) in &self.peers {
            let b = p.haves.get(file);
            s += &format!(
                "  peer {} inflight {} count {:?} has-missing {:?}\n",
                id.short(),
                p.inflight,
                b.map(|b| b.count()),
                b.map(|b| missing.iter().filter(|i| b.get(**i)).count())
            );
        }
        s
    }
}
