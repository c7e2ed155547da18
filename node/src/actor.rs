//! The node actor: one task owns the protocol state machine and the swarm.
//!
//! Inputs: swarm events, frames from the per-peer stream tasks, results from the store
//! (run on the blocking pool), commands from the HTTP API, and one timer at the core's
//! deadline. After each input the core's outputs are drained and turned into frames,
//! chunk uploads, disconnects and store work. Nothing here blocks: disk IO and hashing go
//! to `spawn_blocking`, sends to peers use `try_send` on bounded queues (a peer too slow to
//! keep up loses control frames rather than stalling every other peer).

use crate::config::NodeConfig;
use crate::metrics::Metrics;
use crate::net::{
    self, Behaviour, BehaviourEvent, ChunkJob, NetEvent, Out, PeerSender, RateLimiter, WriterShared,
};
use crate::serving::{LoadedModel, Registry, WindowStats};
use crate::status::{
    ChannelStatus, FailureStatus, FileStatus, PeerStatus, ReleaseStatus, StageStatus, Status,
};
use crate::store::{NodeState, Store, StoreError};
use anyhow::{Context, Result};
use futures::StreamExt;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, Swarm, identify, kad, mdns};
use pollen_protocol::chunking::FileSpec;
use pollen_protocol::ids::{ContentId, ManifestId, NodeId};
use pollen_protocol::io::{ChunkFailure, Command, Event, Input, ObjectKind, Output, PeerInfo};
use pollen_protocol::manifest::{DeviceProfile, Manifest, SignedManifest};
use pollen_protocol::rollout::{ErrorClass, HealthReport, HealthReportBody, HealthStatus};
use pollen_protocol::rollout::{RolloutAction, Waiting};
use pollen_protocol::signing::Signed;
use pollen_protocol::trust::{SignedNodeCert, SignedTrustRoot};
use pollen_protocol::wire::{Bitfield, Hello};
use pollen_protocol::{Config as CoreConfig, Instant as CoreInstant, Mesh, Now, UnixTime};
use rand_chacha::ChaCha8Rng;
use rand_core::SeedableRng;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};
use tokio::sync::{Semaphore, mpsc, oneshot};

/// Commands from the HTTP API.
#[derive(Debug)]
pub enum ActorCmd {
    /// Inject a signed manifest (its files must already be in the store).
    Publish {
        /// Envelope bytes.
        bytes: Vec<u8>,
        /// Outcome.
        reply: oneshot::Sender<Result<String, String>>,
    },
    /// A snapshot of the status.
    Status {
        /// The snapshot.
        reply: oneshot::Sender<Status>,
    },
    /// Inject a signed rollout instruction (halt / resume).
    Instruct {
        /// Envelope bytes.
        bytes: Vec<u8>,
        /// Outcome.
        reply: oneshot::Sender<Result<String, String>>,
    },
    /// Pin a channel to a version (None: unpin); persisted.
    Pin {
        /// Channel.
        channel: String,
        /// Version.
        version: Option<u64>,
        /// Outcome.
        reply: oneshot::Sender<Result<String, String>>,
    },
    /// The signed manifest of a retained release.
    Manifest {
        /// Channel.
        channel: String,
        /// Version.
        version: u64,
        /// Envelope bytes, if the node keeps the release.
        reply: oneshot::Sender<Option<Vec<u8>>>,
    },
}

/// Results of work on the blocking pool.
#[derive(Debug)]
enum StoreDone {
    Written {
        from: NodeId,
        file: ContentId,
        index: u32,
        result: Result<(), StoreError>,
    },
    Synced(Result<Vec<(ContentId, Vec<u32>)>, StoreError>),
    Finished(ContentId, Result<std::path::PathBuf, StoreError>),
    Opened(ContentId, Result<Bitfield, StoreError>),
    /// A model finished loading and its golden checks (or failed to).
    Activated {
        channel: pollen_protocol::manifest::Channel,
        version: u64,
        manifest: ManifestId,
        report: bool,
        result: Result<Arc<LoadedModel>, (ErrorClass, String)>,
    },
    /// The back-off after a failed sync is over.
    RetrySync,
}

struct PeerConn {
    /// Distinguishes this record from earlier ones of the same peer.
    generation: u64,
    /// When the connection came up (a peer that never says Hello is dropped).
    since: std::time::Instant,
    node: NodeId,
    relayed: bool,
    sender: Option<PeerSender>,
    hello: Option<Hello>,
    up: bool,
}

/// Capacity of the channel from stream tasks to the actor.
const NET_QUEUE: usize = 1024;
/// Persistence jobs queued (manifests, trust roots and flushes are never dropped in
/// practice: state, GC and pruning are coalesced by the persister).
const PERSIST_QUEUE: usize = 1 << 16;
/// Files younger than this are never garbage-collected (a publish may be uploading them).
const GC_GRACE: Duration = Duration::from_secs(600);
/// Capacity of the HTTP command channel.
const CMD_QUEUE: usize = 64;
/// Most recent errors kept for the status.
const MAX_ERRORS: usize = 32;
/// A connection whose pollen streams are not up by then is closed.
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a disconnected misbehaving peer is refused.
const BAN: Duration = Duration::from_secs(600);
/// Most banned peers remembered.
const MAX_BANS: usize = 4096;

/// What the HTTP layer holds.
#[derive(Clone, Debug)]
pub struct Handle {
    /// Commands to the actor.
    pub cmds: mpsc::Sender<ActorCmd>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The store.
    pub store: Arc<Store>,
    /// Models being served.
    pub registry: Arc<Registry>,
    /// The bounded inference pool.
    pub inference: Arc<crate::inference::Pool>,
}

/// The actor's state.
pub struct Actor {
    cfg: NodeConfig,
    mesh: Mesh<ChaCha8Rng>,
    swarm: Swarm<Behaviour>,
    control: libp2p_stream::Control,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    origin: std::time::Instant,
    me: NodeId,
    peers: BTreeMap<PeerId, PeerConn>,
    by_node: BTreeMap<NodeId, PeerId>,
    banned: BTreeMap<PeerId, std::time::Instant>,
    net_tx: mpsc::Sender<NetEvent>,
    net_rx: mpsc::Receiver<NetEvent>,
    store_tx: mpsc::Sender<StoreDone>,
    store_rx: mpsc::Receiver<StoreDone>,
    cmd_rx: mpsc::Receiver<ActorCmd>,
    writer: WriterShared,
    specs: BTreeMap<ContentId, Arc<FileSpec>>,
    writing: BTreeSet<(ContentId, u32)>,
    pending_sync: BTreeMap<(ContentId, u32), NodeId>,
    syncing: bool,
    next_cmd: u64,
    replies: BTreeMap<u64, oneshot::Sender<Result<String, String>>>,
    errors: VecDeque<String>,
    state: NodeState,
    cert: Option<SignedNodeCert>,
    http: SocketAddr,
    listen: BTreeSet<Multiaddr>,
    persist: mpsc::Sender<Persist>,
    opened: BTreeSet<ContentId>,
    /// Relays to listen through: address, and the listener once started.
    relays: BTreeMap<PeerId, (Multiaddr, Option<libp2p::core::transport::ListenerId>)>,
    write_lock: Arc<std::sync::Mutex<()>>,
    restoring: bool,
    /// Something on disk could not be restored: no garbage collection in this run.
    restore_incomplete: bool,
    next_gen: u64,
    registry: Arc<Registry>,
    secret: pollen_protocol::SigningKey,
}

impl std::fmt::Debug for Actor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Actor")
            .field("node", &self.me)
            .field("peers", &self.peers.len())
            .finish()
    }
}

#[derive(Debug)]
enum Persist {
    Manifest(ManifestId, Vec<u8>),
    /// Answered once every job before it is done.
    Flush(oneshot::Sender<()>),
    Trust(u64, Vec<u8>),
    State(NodeState),
    Gc(BTreeSet<ContentId>),
    /// Delete stored manifests not in the set (releases the core no longer keeps).
    PruneManifests(BTreeSet<ManifestId>),
}

fn wall() -> UnixTime {
    let ms = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    UnixTime(ms)
}

impl Actor {
    /// Open the store, build the swarm, restore state. Returns the actor and the handle the
    /// HTTP API uses.
    pub fn new(cfg: NodeConfig, http: SocketAddr) -> Result<(Actor, Handle)> {
        std::fs::create_dir_all(&cfg.data_dir)
            .with_context(|| format!("cannot create data dir {}", cfg.data_dir.display()))?;
        let store = Arc::new(Store::open(&cfg.data_dir).context("cannot open the store")?);
        let key_path = cfg.data_dir.join("identity.key");
        let secret = if key_path.exists() {
            pollen_keys::load_key_file(&key_path)?
        } else {
            pollen_keys::generate_key_file(&key_path)?
        };
        let keypair = libp2p::identity::Keypair::ed25519_from_bytes(secret.to_bytes())
            .context("identity key")?;
        let me = NodeId(secret.verifying_key().to_bytes());
        let mut swarm = net::build_swarm(keypair, &cfg)?;
        for a in &cfg.listen {
            let addr: Multiaddr = a
                .parse()
                .with_context(|| format!("bad listen address {a}"))?;
            swarm
                .listen_on(addr.clone())
                .with_context(|| format!("cannot listen on {addr}"))?;
        }
        // Relays: listen through each once connected to it (see `on_swarm`).
        let mut relays = BTreeMap::new();
        for r in &cfg.relays {
            let addr: Multiaddr = r
                .parse()
                .with_context(|| format!("bad relay address {r}"))?;
            let Some(Protocol::P2p(peer)) = addr.iter().last() else {
                anyhow::bail!("relay address {r} must end in /p2p/<peer id>");
            };
            relays.insert(peer, (addr, None));
        }
        for a in &cfg.external {
            let addr: Multiaddr = a
                .parse()
                .with_context(|| format!("bad external address {a}"))?;
            swarm.add_external_address(addr);
        }
        let control = swarm.behaviour().stream.new_control();
        let metrics = Arc::new(Metrics::default());
        let seed = cfg.seed.unwrap_or_else(|| {
            let mut b = [0u8; 8];
            let _ = getrandom::fill(&mut b);
            u64::from_le_bytes(b)
        });
        let core_cfg = CoreConfig {
            // Enough requests in flight to keep a LAN link busy at 1 MiB chunks.
            max_inflight_per_peer: 8,
            site: cfg.site.clone(),
            device: DeviceProfile {
                device_class: cfg.device_class.clone(),
                ..DeviceProfile::default()
            },
            ..CoreConfig::default()
        };
        let origin = std::time::Instant::now();
        let mesh = Mesh::new(
            me,
            core_cfg,
            ChaCha8Rng::seed_from_u64(seed),
            Now::new(CoreInstant::ZERO, wall()),
        );
        let (net_tx, net_rx) = mpsc::channel(NET_QUEUE);
        let (store_tx, store_rx) = mpsc::channel(NET_QUEUE);
        let (cmd_tx, cmd_rx) = mpsc::channel(CMD_QUEUE);
        let (persist_tx, persist_rx) = mpsc::channel(PERSIST_QUEUE);
        spawn_persister(store.clone(), persist_rx);
        let writer = WriterShared {
            store: store.clone(),
            uploads: Arc::new(Semaphore::new(cfg.max_concurrent_uploads)),
            limiter: RateLimiter::new(cfg.upload_limit),
            metrics: metrics.clone(),
            corrupt: cfg.test_corrupt_chunks,
        };
        let state = store.load_state().context("cannot read node state")?;
        let cert = match &cfg.cert {
            Some(p) => Some(pollen_keys::files::read_signed(p, "node certificate")?.0),
            None => None,
        };
        let registry = Arc::new(Registry::default());
        let handle = Handle {
            cmds: cmd_tx,
            metrics: metrics.clone(),
            store: store.clone(),
            registry: registry.clone(),
            inference: Arc::new(crate::inference::Pool::new(
                cfg.inference_threads,
                cfg.inference_queue,
            )),
        };
        let mut actor = Actor {
            cfg,
            mesh,
            swarm,
            control,
            store,
            metrics,
            origin,
            me,
            peers: BTreeMap::new(),
            by_node: BTreeMap::new(),
            banned: BTreeMap::new(),
            net_tx,
            net_rx,
            store_tx,
            store_rx,
            cmd_rx,
            writer,
            specs: BTreeMap::new(),
            writing: BTreeSet::new(),
            pending_sync: BTreeMap::new(),
            syncing: false,
            next_cmd: 1,
            replies: BTreeMap::new(),
            errors: VecDeque::new(),
            state,
            cert,
            http,
            listen: BTreeSet::new(),
            persist: persist_tx,
            opened: BTreeSet::new(),
            relays,
            write_lock: Arc::new(std::sync::Mutex::new(())),
            restoring: true,
            restore_incomplete: false,
            next_gen: 1,
            registry: registry.clone(),
            secret: secret.clone(),
        };
        actor.restore()?;
        actor.restoring = false;
        actor.gc();
        // Serve again what was active before the restart.
        for c in actor.mesh.status() {
            if let Some((version, manifest)) = c.active {
                actor.start_activation(c.channel.clone(), version, manifest, false);
            }
        }
        Ok((actor, handle))
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.me
    }

    /// Its libp2p peer id.
    pub fn peer_id(&self) -> PeerId {
        *self.swarm.local_peer_id()
    }

    fn now(&self) -> Now {
        let mono = CoreInstant::from_micros(self.origin.elapsed().as_micros() as u64);
        Now::new(mono, wall())
    }

    fn error(&mut self, e: String) {
        tracing::error!("{e}");
        if self.errors.len() >= MAX_ERRORS {
            self.errors.pop_front();
        }
        self.errors.push_back(e);
    }

    /// Run a core command now, returning its result.
    fn core_command(&mut self, cmd: Command) -> Result<(), String> {
        let id = self.next_cmd;
        self.next_cmd += 1;
        let now = self.now();
        self.mesh.handle(now, Input::Command { id, cmd });
        let mut result = Err("no result".to_string());
        // Take every output first: handling one may issue a nested command (an activation's
        // health report), which must not swallow this command's result.
        let outs: Vec<Output> = std::iter::from_fn(|| self.mesh.poll_output()).collect();
        for out in outs {
            if let Output::Event(Event::CommandDone { id: x, result: r }) = &out
                && *x == id
            {
                result = r.clone();
                continue;
            }
            self.on_output(out);
        }
        result
    }

    /// Load the trust root chain, the configured trust root, manifests, versions and
    /// durable chunks from disk into the core.
    fn restore(&mut self) -> Result<()> {
        // Stored roots are restored whatever the time: a site offline past its root's
        // expiry keeps serving what it has.
        for bytes in self.store.trust_roots()? {
            match Signed::from_bytes(&bytes) {
                Ok((s, _)) => {
                    if let Err(e) = self.core_command(Command::RestoreTrustRoot(s)) {
                        self.restore_incomplete = true;
                        tracing::warn!("stored trust root not usable: {e}");
                    }
                }
                Err(e) => {
                    self.restore_incomplete = true;
                    tracing::warn!("stored trust root unreadable: {e}");
                }
            }
        }
        if let Some(p) = self.cfg.trust.clone() {
            let (s, body): (SignedTrustRoot, _) =
                pollen_keys::files::read_signed(&p, "trust root")?;
            let current = self.mesh.trust_root().map_or(0, |t| t.body.version);
            if body.version > current
                && let Err(e) = self.core_command(Command::SetTrustRoot(s))
            {
                if current == 0 {
                    anyhow::bail!("trust root {}: {e}", p.display());
                }
                self.error(format!(
                    "configured trust root {} not installed: {e}",
                    p.display()
                ));
            }
        }
        if let Some(c) = self.cert.clone()
            && let Err(e) = self.core_command(Command::SetCertificate(c))
        {
            anyhow::bail!("node certificate: {e}");
        }
        let mut manifests: Vec<Manifest> = Vec::new();
        for (id, bytes) in self.store.manifests()? {
            match Manifest::from_bytes(&bytes) {
                Ok(m) => manifests.push(m),
                Err(e) => tracing::warn!("stored manifest {} unreadable: {e}", id.short()),
            }
        }
        manifests.sort_by_key(|m| m.body.version);
        // Version pins (the config file's win over those set at run time), then release
        // pins: restored releases are trimmed only once the active one is marked.
        let mut pins = self.state.pins.clone();
        pins.extend(self.cfg.pins.clone());
        self.state.pins = pins.clone();
        for (channel, version) in pins {
            if let Ok(channel) = pollen_protocol::manifest::Channel::new(&channel) {
                let _ = self.core_command(Command::PinVersion {
                    channel,
                    version: Some(version),
                });
            }
        }
        for id in self.state.published.clone() {
            if let Ok(id) = id.parse::<ManifestId>() {
                let _ = self.core_command(Command::Pin(id));
            }
        }
        for m in manifests {
            let id = m.id;
            if let Err(e) = self.core_command(Command::Restore(m.signed)) {
                self.restore_incomplete = true;
                tracing::warn!("stored manifest {} not restored: {e}", id.short());
            }
        }
        for (channel, version) in self.state.highest.clone() {
            if let Ok(channel) = pollen_protocol::manifest::Channel::new(&channel) {
                let _ = self.core_command(Command::SetHighest { channel, version });
            }
        }
        for (channel, id) in self.state.active.clone() {
            if let (Ok(channel), Ok(manifest)) = (
                pollen_protocol::manifest::Channel::new(&channel),
                id.parse::<ManifestId>(),
            ) {
                let _ = self.core_command(Command::SetActive { channel, manifest });
            }
        }
        for hex in self
            .state
            .instructions
            .values()
            .cloned()
            .collect::<Vec<_>>()
        {
            let parsed = hex::decode(&hex)
                .ok()
                .and_then(|b| Signed::from_bytes(&b).ok());
            match parsed {
                Some((s, _)) => {
                    if let Err(e) = self.core_command(Command::Instruct(s)) {
                        tracing::warn!("stored rollout instruction not restored: {e}");
                    }
                }
                None => tracing::warn!("stored rollout instruction unreadable"),
            }
        }
        // Durable chunks of every tracked file.
        for c in self.mesh.status() {
            for r in c.releases {
                for (cid, _, _) in r.files {
                    self.open_file(cid, true);
                }
            }
        }
        Ok(())
    }

    fn spec(&mut self, file: &ContentId) -> Option<Arc<FileSpec>> {
        if let Some(s) = self.specs.get(file) {
            return Some(s.clone());
        }
        let s = Arc::new(self.mesh.chunk_spec(file)?.clone());
        if self.specs.len() > 4096 {
            self.specs.clear();
        }
        self.specs.insert(*file, s.clone());
        Some(s)
    }

    /// Register a file with the store and report its durable chunks to the core.
    /// `blocking`: at startup, do it inline.
    fn open_file(&mut self, file: ContentId, blocking: bool) {
        if !self.opened.insert(file) {
            return;
        }
        let Some(spec) = self.spec(&file) else { return };
        let store = self.store.clone();
        if blocking {
            let r = store.open_file(&spec);
            self.on_opened(file, r);
        } else {
            let tx = self.store_tx.clone();
            tokio::task::spawn_blocking(move || {
                let r = store.open_file(&spec);
                let _ = tx.blocking_send(StoreDone::Opened(file, r));
            });
        }
    }

    fn on_opened(&mut self, file: ContentId, r: Result<Bitfield, StoreError>) {
        match r {
            Ok(bits) => {
                // Every chunk durable but no blob: killed between the last sync and the
                // rename. Finish it now.
                if bits.count() == bits.len()
                    && !self.store.has_blob(&file)
                    && let Some(spec) = self.spec(&file)
                {
                    let store = self.store.clone();
                    let tx = self.store_tx.clone();
                    tokio::task::spawn_blocking(move || {
                        let r = store.finish(&spec);
                        let _ = tx.blocking_send(StoreDone::Finished(file, r));
                    });
                }
                if bits.count() > 0 {
                    let _ = self.core_command(Command::LocalChunks { file, chunks: bits });
                }
            }
            Err(e) => {
                self.opened.remove(&file);
                self.store_error(format!("cannot open file {}: {e}", file.short()), &e);
            }
        }
    }

    fn store_error(&mut self, msg: String, _e: &StoreError) {
        self.metrics.store_errors.fetch_add(1, Ordering::Relaxed);
        self.error(msg);
    }

    fn handle(&mut self, input: Input) {
        let now = self.now();
        self.mesh.handle(now, input);
        self.drain();
    }

    fn drain(&mut self) {
        while let Some(out) = self.mesh.poll_output() {
            self.on_output(out);
        }
    }

    fn on_output(&mut self, out: Output) {
        match out {
            Output::Send { to, msg } => {
                if let Some(s) = self.sender(&to)
                    && s.control.try_send(Out::Frame(msg.encode())).is_err()
                {
                    tracing::warn!("control queue to {} full: message dropped", to.short());
                }
            }
            Output::SendChunk {
                to,
                id,
                file,
                index,
            } => {
                let Some(spec) = self.spec(&file) else { return };
                if let Some(s) = self.sender(&to)
                    && s.chunks.try_send(ChunkJob { id, spec, index }).is_err()
                {
                    tracing::debug!("chunk queue to {} full: request {id} dropped", to.short());
                }
            }
            Output::CancelChunk { to, id } => {
                if let Some(s) = self.sender(&to) {
                    let _ = s.control.try_send(Out::Cancel(id));
                }
            }
            Output::Disconnect { peer, reason } => {
                tracing::warn!("disconnecting {}: {reason}", peer.short());
                if let Some(p) = self.by_node.get(&peer).copied() {
                    if self.banned.len() >= MAX_BANS {
                        self.banned.pop_first();
                    }
                    self.banned.insert(p, std::time::Instant::now() + BAN);
                    let _ = self.swarm.disconnect_peer_id(p);
                }
            }
            Output::Event(e) => self.on_event(e),
        }
    }

    fn sender(&self, node: &NodeId) -> Option<PeerSender> {
        let p = self.by_node.get(node)?;
        self.peers.get(p)?.sender.clone()
    }

    fn save_state(&mut self) {
        let _ = self.persist.try_send(Persist::State(self.state.clone()));
    }

    fn on_event(&mut self, e: Event) {
        match e {
            Event::CommandDone { id, result } => {
                if let Some(r) = self.replies.remove(&id) {
                    let _ = r.send(result.map(|_| "accepted".to_string()));
                }
            }
            Event::TrustRootUpdated { version, signed } => {
                tracing::info!("trust root version {version} in force");
                let _ = self
                    .persist
                    .try_send(Persist::Trust(version, signed.to_bytes()));
            }
            Event::ManifestAccepted {
                id,
                channel,
                version,
                signed,
            } => {
                tracing::info!(
                    "accepted manifest {} for {channel} version {version}",
                    id.short()
                );
                self.metrics
                    .manifests_accepted
                    .fetch_add(1, Ordering::Relaxed);
                let _ = self
                    .persist
                    .try_send(Persist::Manifest(id, signed.to_bytes()));
                let h = self.state.highest.entry(channel.to_string()).or_default();
                *h = (*h).max(version);
                self.save_state();
                if let Some(m) = self.mesh.manifest(&id).cloned() {
                    let variant = m.body.artifact.choose(&self.mesh.config().device);
                    for f in &m.body.artifact.variants[variant].files {
                        self.open_file(f.spec.content_id, false);
                    }
                }
                self.gc();
            }
            Event::Rejected {
                kind,
                from,
                label,
                reason,
            } => {
                self.metrics.rejected(kind_label(kind), label);
                match from {
                    Some(p) => {
                        tracing::warn!("rejected {} from {}: {reason}", kind_label(kind), p.short())
                    }
                    None => tracing::warn!("rejected local {}: {reason}", kind_label(kind)),
                }
            }
            Event::Equivocation {
                channel,
                version,
                kept,
                ..
            } => {
                self.error(format!(
                    "equivocation on {channel} version {version}: two validly signed manifests (a publisher key may have leaked); keeping {}",
                    kept.short()
                ));
            }
            Event::StageOpened {
                channel,
                version,
                stage,
                ..
            } => {
                tracing::info!("{channel} version {version}: stage {} open", stage + 1);
            }
            Event::RolloutFailed {
                channel,
                version,
                failure,
            } => {
                self.error(format!(
                    "{channel} version {version} failed its rollout gate: {failure:?}"
                ));
            }
            Event::Activate {
                channel,
                version,
                manifest,
                ..
            } => {
                self.start_activation(channel.clone(), version, manifest, true);
                tracing::info!(
                    "{channel}: version {version} ({}) is complete and active",
                    manifest.short()
                );
                self.state
                    .active
                    .insert(channel.to_string(), manifest.to_hex());
                self.save_state();
                self.gc();
            }
            Event::RollBack {
                channel, from, to, ..
            } => {
                self.roll_back(&channel, from, to);
                tracing::warn!("{channel}: rolling back from version {from} to {to:?}");
                match to {
                    Some((_, m)) => {
                        self.state.active.insert(channel.to_string(), m.to_hex());
                    }
                    None => {
                        self.state.active.remove(channel.as_str());
                    }
                }
                self.save_state();
            }
            Event::FileProgress { .. } => {}
            Event::FileComplete { file } => {
                if let Some(spec) = self.spec(&file) {
                    let store = self.store.clone();
                    let tx = self.store_tx.clone();
                    tokio::task::spawn_blocking(move || {
                        let r = store.finish(&spec);
                        let _ = tx.blocking_send(StoreDone::Finished(file, r));
                    });
                }
            }
            Event::InstructionAccepted {
                channel,
                version,
                action,
                signed,
            } => {
                tracing::info!("{channel} version {version}: operator instruction {action:?}");
                self.state.instructions.insert(
                    format!("{channel}@{version}"),
                    hex::encode(signed.to_bytes()),
                );
                // Keep only instructions for releases the core still holds.
                let kept: BTreeSet<String> = self
                    .mesh
                    .status()
                    .iter()
                    .flat_map(|c| {
                        c.releases
                            .iter()
                            .map(move |r| format!("{}@{}", c.channel, r.version))
                    })
                    .collect();
                self.state.instructions.retain(|k, _| kept.contains(k));
                self.save_state();
            }
            Event::PeerPenalised {
                peer,
                reason,
                score,
            } => {
                tracing::warn!("peer {} penalised ({score}): {reason}", peer.short());
            }
            _ => {}
        }
    }
    /// Load a release's model and run its golden checks on the blocking pool; the result
    /// comes back as [`StoreDone::Activated`].
    fn start_activation(
        &mut self,
        channel: pollen_protocol::manifest::Channel,
        version: u64,
        manifest: ManifestId,
        report: bool,
    ) {
        let Some(m) = self.mesh.manifest(&manifest).cloned() else {
            return;
        };
        let variant = m.body.artifact.choose(&self.mesh.config().device);
        let Some(file) = m.body.artifact.variants[variant].files.first() else {
            return;
        };
        let spec = file.spec.clone();
        let golden = m.body.golden.clone();
        let store = self.store.clone();
        let tx = self.store_tx.clone();
        tokio::task::spawn_blocking(move || {
            let result = (|| {
                let path = store.finish(&spec).map_err(|e| {
                    (
                        ErrorClass::Unavailable,
                        format!("model file not in the store: {e}"),
                    )
                })?;
                let loaded = LoadedModel::load(&path, channel.as_str(), version, manifest)?;
                loaded
                    .golden(&golden)
                    .map_err(|e| (ErrorClass::GoldenMismatch, e))?;
                Ok(Arc::new(loaded))
            })();
            let _ = tx.blocking_send(StoreDone::Activated {
                channel,
                version,
                manifest,
                report,
                result,
            });
        });
    }

    fn on_activated(
        &mut self,
        channel: pollen_protocol::manifest::Channel,
        version: u64,
        manifest: ManifestId,
        report: bool,
        result: Result<Arc<LoadedModel>, (ErrorClass, String)>,
    ) {
        match result {
            Ok(model) => {
                tracing::info!("{channel} version {version} passed its checks and serves");
                self.registry.activate(model);
                if report {
                    self.report(&channel, version, manifest, HealthStatus::Ok);
                }
            }
            Err((class, detail)) => {
                self.error(format!(
                    "{channel} version {version} failed to activate ({class:?}): {detail}"
                ));
                let detail: String = detail.chars().take(240).collect();
                self.report(
                    &channel,
                    version,
                    manifest,
                    HealthStatus::Failed { class, detail },
                );
            }
        }
    }

    /// Serve the warm previous version again (or load it), and report the rollback.
    fn roll_back(
        &mut self,
        channel: &pollen_protocol::manifest::Channel,
        from: u64,
        to: Option<(u64, ManifestId)>,
    ) {
        match to {
            Some((v, id)) => {
                if !self.registry.roll_back_to(channel.as_str(), &id) {
                    self.start_activation(channel.clone(), v, id, false);
                }
            }
            None => self.registry.remove(channel.as_str()),
        }
        let from_id = self
            .mesh
            .status()
            .into_iter()
            .find(|c| &c.channel == channel)
            .and_then(|c| c.releases.into_iter().find(|r| r.version == from))
            .map(|r| r.manifest);
        if let Some(m) = from_id {
            self.report(channel, from, m, HealthStatus::RolledBack);
        }
    }

    /// Sign a health report with the node key and hand it to the core, which gossips it.
    fn report(
        &mut self,
        channel: &pollen_protocol::manifest::Channel,
        version: u64,
        manifest: ManifestId,
        status: HealthStatus,
    ) {
        self.report_with(channel, version, manifest, status, WindowStats::default());
    }

    /// [`Actor::report`] with the figures of a serving window.
    fn report_with(
        &mut self,
        channel: &pollen_protocol::manifest::Channel,
        version: u64,
        manifest: ManifestId,
        status: HealthStatus,
        w: WindowStats,
    ) {
        let body = HealthReportBody {
            node: self.me,
            channel: channel.clone(),
            version,
            manifest,
            status,
            requests: w.requests,
            errors: w.errors,
            latency_p50_us: w.p50_us,
            latency_p99_us: w.p99_us,
            timestamp: wall(),
        };
        let report = HealthReport {
            signed: Signed::sign(&body, &[&self.secret]),
            cert: self.cert.clone(),
        };
        if let Err(e) = self.core_command(Command::ReportHealth(report)) {
            tracing::debug!("health report not taken: {e}");
        }
    }

    /// Delete files that no retained or published release refers to.
    fn gc(&mut self) {
        // While restoring, the core holds only part of what is on disk; and if anything on
        // disk could not be restored, the core does not know all that must be kept.
        if self.restoring || self.restore_incomplete {
            return;
        }
        let mut keep = BTreeSet::new();
        let mut manifests: BTreeSet<ManifestId> = BTreeSet::new();
        for c in self.mesh.status() {
            for r in c.releases {
                manifests.insert(r.manifest);
                keep.extend(r.files.into_iter().map(|(cid, _, _)| cid));
            }
        }
        let _ = self.persist.try_send(Persist::Gc(keep));
        manifests.extend(
            self.state
                .published
                .iter()
                .filter_map(|h| h.parse::<ManifestId>().ok()),
        );
        let _ = self.persist.try_send(Persist::PruneManifests(manifests));
    }

    fn on_net(&mut self, ev: NetEvent) {
        match ev {
            NetEvent::OutboundReady {
                peer,
                sender,
                generation,
            } => {
                if let Some(c) = self.peers.get_mut(&peer)
                    && c.generation == generation
                {
                    c.sender = Some(sender);
                    self.maybe_up(peer);
                }
            }
            NetEvent::Hello { peer, hello } => {
                if let Some(c) = self.peers.get_mut(&peer) {
                    c.hello = Some(hello);
                    self.maybe_up(peer);
                }
            }
            NetEvent::Message { peer, msg } => {
                if let Some(c) = self.peers.get(&peer)
                    && c.up
                {
                    let from = c.node;
                    self.handle(Input::Received { from, msg });
                }
            }
            NetEvent::Chunk {
                peer,
                header,
                frame,
                offset,
            } => self.on_chunk(peer, header, frame, offset),
            NetEvent::Malformed { peer, error } => {
                if let Some(c) = self.peers.get(&peer) {
                    let from = c.node;
                    self.handle(Input::Malformed { from, error });
                }
            }
            NetEvent::StreamClosed { peer, writer_gen } => {
                // The writer of an older connection record: nothing to do with this one.
                if writer_gen
                    .is_some_and(|g| self.peers.get(&peer).is_some_and(|c| c.generation != g))
                {
                    return;
                }
                if self.peers.contains_key(&peer) && self.swarm.is_connected(&peer) {
                    // One direction broke: drop the connection, discovery reconnects.
                    let _ = self.swarm.disconnect_peer_id(peer);
                }
            }
        }
    }

    fn maybe_up(&mut self, peer: PeerId) {
        let Some(c) = self.peers.get_mut(&peer) else {
            return;
        };
        if c.up || c.sender.is_none() || c.hello.is_none() {
            return;
        }
        c.up = true;
        let hello = c.hello.clone().unwrap_or(Hello {
            site: None,
            cert: None,
        });
        let same = self.cfg.site.is_some() && hello.site == self.cfg.site;
        if let Some(s) = &c.sender {
            s.same_site.store(same, Ordering::Relaxed);
        }
        let node = c.node;
        self.metrics.peers.store(
            self.peers.values().filter(|p| p.up).count() as u64,
            Ordering::Relaxed,
        );
        let rtt = None;
        self.handle(Input::PeerUp {
            peer: node,
            info: PeerInfo {
                site: hello.site,
                rtt,
                cert: hello.cert,
            },
        });
    }

    fn on_chunk(
        &mut self,
        peer: PeerId,
        header: pollen_protocol::wire::ChunkHeader,
        frame: Vec<u8>,
        offset: usize,
    ) {
        let Some(c) = self.peers.get(&peer) else {
            return;
        };
        if !c.up {
            return;
        }
        let from = c.node;
        let key = (header.file, header.index);
        if !self.mesh.needs_chunk(&header.file, header.index)
            || self.writing.contains(&key)
            || self.pending_sync.contains_key(&key)
        {
            self.metrics
                .chunks_duplicate
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        let Some(spec) = self.spec(&header.file) else {
            return;
        };
        self.writing.insert(key);
        let store = self.store.clone();
        let tx = self.store_tx.clone();
        let lock = self.write_lock.clone();
        tokio::task::spawn_blocking(move || {
            // One chunk write at a time: concurrent pwrites to one file only contend on
            // the inode lock (measured: 7% of the receiver's time spinning on it).
            let _guard = lock.lock().unwrap_or_else(|e| e.into_inner());
            let result = store.write_chunk(&spec, header.index, &frame[offset..]);
            let _ = tx.blocking_send(StoreDone::Written {
                from,
                file: header.file,
                index: header.index,
                result,
            });
        });
    }

    fn on_store(&mut self, done: StoreDone) {
        match done {
            StoreDone::Written {
                from,
                file,
                index,
                result,
            } => {
                self.writing.remove(&(file, index));
                match result {
                    Ok(()) => {
                        self.pending_sync.insert((file, index), from);
                        // Free the request slot now; the chunk counts once synced.
                        self.handle(Input::ChunkReceived { from, file, index });
                        self.maybe_sync();
                    }
                    Err(StoreError::Corrupt(msg)) => {
                        self.metrics.chunks_failed.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(
                            "corrupt chunk {index} of {} from {}: {msg}",
                            file.short(),
                            from.short()
                        );
                        self.handle(Input::ChunkFailed {
                            from,
                            file,
                            index,
                            reason: ChunkFailure::Corrupt,
                        });
                    }
                    Err(e) => {
                        let msg = format!("cannot store chunk {index} of {}: {e}", file.short());
                        self.store_error(msg.clone(), &e);
                        self.handle(Input::ChunkFailed {
                            from,
                            file,
                            index,
                            reason: ChunkFailure::Store(msg),
                        });
                    }
                }
            }
            StoreDone::Synced(result) => {
                self.syncing = false;
                match result {
                    Ok(done) => {
                        // Chunks of files the core dropped meanwhile will never be reported.
                        let dropped: Vec<(ContentId, u32)> = self
                            .pending_sync
                            .keys()
                            .filter(|(f, _)| self.mesh.chunk_spec(f).is_none())
                            .copied()
                            .collect();
                        for k in dropped {
                            self.pending_sync.remove(&k);
                        }
                        for (file, indices) in done {
                            for index in indices {
                                let from = self.pending_sync.remove(&(file, index));
                                self.metrics.chunks_verified.fetch_add(1, Ordering::Relaxed);
                                if let Some(f) = from {
                                    self.metrics.chunk_from(&f.to_hex());
                                }
                                self.handle(Input::ChunkStored { from, file, index });
                            }
                        }
                    }
                    Err(e) => {
                        let msg = format!("store sync failed: {e}");
                        self.store_error(msg, &e);
                        // A persistent failure (full disk, read-only filesystem) must not
                        // spin: retry after a pause.
                        self.syncing = true;
                        let tx = self.store_tx.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            let _ = tx.send(StoreDone::RetrySync).await;
                        });
                        return;
                    }
                }
                self.maybe_sync();
            }
            StoreDone::Finished(file, r) => {
                if let Err(e) = r {
                    self.store_error(format!("cannot finish file {}: {e}", file.short()), &e);
                }
            }
            StoreDone::Opened(file, r) => self.on_opened(file, r),
            StoreDone::Activated {
                channel,
                version,
                manifest,
                report,
                result,
            } => self.on_activated(channel, version, manifest, report, result),
            StoreDone::RetrySync => {
                self.syncing = false;
                self.maybe_sync();
            }
        }
    }

    /// Start a sync if chunks wait for one and none runs. Syncs batch every chunk written
    /// since the last one.
    fn maybe_sync(&mut self) {
        if self.syncing || self.pending_sync.is_empty() {
            return;
        }
        self.syncing = true;
        let store = self.store.clone();
        let tx = self.store_tx.clone();
        tokio::task::spawn_blocking(move || {
            let r = store.sync_all();
            let _ = tx.blocking_send(StoreDone::Synced(r));
        });
    }

    fn on_cmd(&mut self, cmd: ActorCmd) {
        match cmd {
            ActorCmd::Status { reply } => {
                let _ = reply.send(self.status());
            }
            ActorCmd::Instruct { bytes, reply } => {
                let result = match Signed::from_bytes(&bytes) {
                    Ok((s, _)) => self.core_command(Command::Instruct(s)),
                    Err(e) => Err(format!("malformed instruction: {e}")),
                };
                let _ = reply.send(result.map(|_| "accepted".into()));
            }
            ActorCmd::Pin {
                channel,
                version,
                reply,
            } => {
                let result = pollen_protocol::manifest::Channel::new(&channel)
                    .map_err(|e| e.to_string())
                    .and_then(|c| {
                        self.core_command(Command::PinVersion {
                            channel: c,
                            version,
                        })
                    });
                if result.is_ok() {
                    match version {
                        Some(v) => {
                            tracing::info!("{channel}: pinned to version {v}");
                            self.state.pins.insert(channel, v);
                        }
                        None => {
                            tracing::info!("{channel}: unpinned");
                            self.state.pins.remove(&channel);
                        }
                    }
                    self.save_state();
                }
                let _ = reply.send(result.map(|_| "ok".into()));
            }
            ActorCmd::Manifest {
                channel,
                version,
                reply,
            } => {
                let bytes = self
                    .mesh
                    .status()
                    .into_iter()
                    .find(|c| c.channel.as_str() == channel)
                    .and_then(|c| c.releases.into_iter().find(|r| r.version == version))
                    .and_then(|r| self.mesh.manifest(&r.manifest))
                    .map(|m| m.signed.to_bytes());
                let _ = reply.send(bytes);
            }
            ActorCmd::Publish { bytes, reply } => {
                let signed: SignedManifest = match Manifest::from_bytes(&bytes) {
                    Ok(m) => m.signed,
                    Err(e) => {
                        let _ = reply.send(Err(format!("malformed manifest: {e}")));
                        return;
                    }
                };
                let id = ManifestId(signed.body_hash());
                let result = self.core_command(Command::Publish(signed));
                match result {
                    Ok(()) => {
                        let _ = self.core_command(Command::Pin(id));
                        self.state.published.insert(id.to_hex());
                        self.save_state();
                        // Answer once the manifest and the new highest version are durable.
                        let (tx, rx) = oneshot::channel();
                        let _ = self.persist.try_send(Persist::Flush(tx));
                        tokio::spawn(async move {
                            let _ = rx.await;
                            let _ = reply.send(Ok(id.to_hex()));
                        });
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
        }
    }

    fn status(&self) -> Status {
        let pid = self.peer_id();
        let by_peer = self.metrics.chunks_by_peer();
        let trust = self.mesh.trust_root();
        let now = wall();
        Status {
            node_id: self.me.to_hex(),
            peer_id: pid.to_string(),
            site: self.cfg.site.clone(),
            listen: self
                .listen
                .iter()
                .map(|a| {
                    if matches!(a.iter().last(), Some(Protocol::P2p(_))) {
                        a.to_string()
                    } else {
                        format!("{a}/p2p/{pid}")
                    }
                })
                .collect(),
            http: self.http.to_string(),
            trust_version: trust.map_or(0, |t| t.body.version),
            fleet: trust.is_some_and(|t| t.requires_certificates()),
            peers: self
                .peers
                .iter()
                .filter(|(_, c)| c.up)
                .map(|(p, c)| PeerStatus {
                    node_id: c.node.to_hex(),
                    peer_id: p.to_string(),
                    site: c.hello.as_ref().and_then(|h| h.site.clone()),
                    chunks_from: by_peer.get(&c.node.to_hex()).copied().unwrap_or(0),
                    relayed: c.relayed,
                })
                .collect(),
            channels: self
                .mesh
                .status()
                .into_iter()
                .map(|c| {
                    let active = c.active;
                    let serving_expired = active
                        .and_then(|(v, _)| c.releases.iter().find(|r| r.version == v))
                        .and_then(|r| self.mesh.manifest(&r.manifest))
                        .is_some_and(|m| m.body.expires <= now);
                    ChannelStatus {
                        channel: c.channel.to_string(),
                        highest: c.highest,
                        active_version: active.map(|a| a.0),
                        active_manifest: active.map(|a| a.1.to_hex()),
                        equivocations: c.equivocations.clone(),
                        serving_expired,
                        pinned: c.pinned,
                        releases: c
                            .releases
                            .iter()
                            .map(|r| {
                                let d = r.decision.as_ref();
                                ReleaseStatus {
                                    version: r.version,
                                    manifest: r.manifest.to_hex(),
                                    stages: r.stages,
                                    open_stages: d.map_or(0, |d| d.open_stages()),
                                    waiting: d.and_then(|d| d.waiting).map(|w| match w {
                                        Waiting::Until(t) => {
                                            format!("stage time at unix {} ms", t.as_millis())
                                        }
                                        Waiting::Healthy { have, need } => {
                                            format!("gate: {have} of {need} healthy reports")
                                        }
                                        Waiting::Halted => "halted by the operator".into(),
                                        Waiting::Failed => "failed its gate".into(),
                                    }),
                                    rolled_back: d.is_some_and(|d| d.rollback()),
                                    halted: d.is_some_and(|d| d.halted),
                                    my_stage: r.my_stage,
                                    variant: self
                                        .mesh
                                        .manifest(&r.manifest)
                                        .and_then(|m| m.body.artifact.variants.get(r.variant))
                                        .map(|v| v.name.clone())
                                        .unwrap_or_default(),
                                    healthy: r.counts.healthy,
                                    failed: r.counts.failed,
                                    rolled_back_nodes: r.counts.rolled_back,
                                    pending: r.pending,
                                    stale: r.stale,
                                    failures: r
                                        .failures
                                        .iter()
                                        .map(|(class, nodes, detail)| FailureStatus {
                                            class: format!("{class:?}"),
                                            nodes: *nodes,
                                            detail: detail.clone(),
                                        })
                                        .collect(),
                                    stage_list: self.stage_list(r),
                                    runtime_limit: self
                                        .mesh
                                        .manifest(&r.manifest)
                                        .and_then(|m| m.body.rollout.runtime)
                                        .map(|l| {
                                            format!(
                                                "{} of ≥{} requests",
                                                pollen_keys::manifest::format_ppm(l.max_error_ppm),
                                                l.min_requests
                                            )
                                        }),
                                    instruction: self.mesh.instruction(&r.manifest).map(|i| {
                                        (
                                            match i.action {
                                                RolloutAction::Halt => "halt".to_string(),
                                                RolloutAction::Resume => "resume".to_string(),
                                            },
                                            i.issued.as_millis(),
                                        )
                                    }),
                                    files: r
                                        .files
                                        .iter()
                                        .map(|(cid, have, total)| FileStatus {
                                            content_id: cid.to_hex(),
                                            have: *have,
                                            total: *total,
                                        })
                                        .collect(),
                                }
                            })
                            .collect(),
                    }
                })
                .collect(),
            errors: self.errors.iter().cloned().collect(),
        }
    }

    /// Each stage of a release's plan and where it stands on this node.
    fn stage_list(&self, r: &pollen_protocol::state::ReleaseView) -> Vec<StageStatus> {
        let Some(m) = self.mesh.manifest(&r.manifest) else {
            return Vec::new();
        };
        let d = r.decision.as_ref();
        let open = d.map_or(0, |d| d.open_stages());
        m.body
            .rollout
            .stages
            .iter()
            .enumerate()
            .map(|(i, st)| {
                let why = if i < open {
                    "open".to_string()
                } else if i == open {
                    match d.and_then(|d| d.waiting) {
                        Some(Waiting::Until(t)) => {
                            format!("opens at {}", pollen_keys::time::format_unix(t))
                        }
                        Some(Waiting::Healthy { have, need }) => {
                            format!("gate: {have} of {need} healthy reports")
                        }
                        Some(Waiting::Halted) => "halted by the operator".into(),
                        Some(Waiting::Failed) => "closed: the rollout failed its gate".into(),
                        None => "not evaluated yet".into(),
                    }
                } else if d.is_some_and(|d| d.rollback()) {
                    "closed: the rollout failed its gate".into()
                } else {
                    format!("after stage {i}")
                };
                StageStatus {
                    share_percent: f64::from(st.share_ppm) / 10_000.0,
                    open: i < open,
                    opened_at_ms: d.and_then(|d| d.opened.get(i)).map(|t| t.as_millis()),
                    why,
                    gate: st.gate.map(|g| {
                        format!(
                            "{} healthy, at most {} failed",
                            g.min_healthy,
                            pollen_keys::manifest::format_ppm(g.max_failure_ppm)
                        )
                    }),
                }
            })
            .collect()
    }

    /// Every `health_interval`: report each served release's requests, errors and latency
    /// over the window, as a failure when the window broke the plan's runtime limit or the
    /// runtime panicked `crash_loop_panics` times.
    fn health_tick(&mut self) {
        for c in self.mesh.status() {
            let Some((version, id)) = c.active else {
                continue;
            };
            let Some(model) = self
                .registry
                .current(c.channel.as_str())
                .filter(|m| m.manifest == id)
            else {
                continue;
            };
            let w = model.health.take();
            let limit = self.mesh.manifest(&id).and_then(|m| m.body.rollout.runtime);
            let status = crate::serving::window_status(&w, limit, self.cfg.crash_loop_panics);
            if let HealthStatus::Failed { detail, .. } = &status {
                self.error(format!("{} version {version}: {detail}", c.channel));
            }
            self.report_with(&c.channel, version, id, status, w);
        }
    }

    fn on_swarm(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        match ev {
            SwarmEvent::NewListenAddr { address, .. } => {
                println!("listening on {address}/p2p/{}", self.peer_id());
                // A relay server only serves once it has a confirmed external address; a
                // node configured as a relay announces the addresses it listens on.
                if self.cfg.relay_server
                    && !address.iter().any(|p| matches!(p, Protocol::P2pCircuit))
                {
                    self.swarm.add_external_address(address.clone());
                }
                self.listen.insert(address);
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.listen.remove(&address);
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                reason,
                ..
            } => {
                // A relay listener ends with its relay connection: start again on reconnect.
                for (addr, l) in self.relays.values_mut() {
                    if *l == Some(listener_id) {
                        tracing::warn!("listener through relay {addr} closed: {reason:?}");
                        *l = None;
                    }
                }
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                num_established,
                endpoint,
                ..
            } => {
                if let Some(until) = self.banned.get(&peer_id) {
                    if *until > std::time::Instant::now() {
                        let _ = self.swarm.disconnect_peer_id(peer_id);
                        return;
                    }
                    self.banned.remove(&peer_id);
                }
                let Some(node) = net::node_id_of(&peer_id) else {
                    let _ = self.swarm.disconnect_peer_id(peer_id);
                    return;
                };
                if let Some((addr, listener)) = self.relays.get(&peer_id).cloned()
                    && listener.is_none()
                    && !endpoint.is_relayed()
                {
                    match self
                        .swarm
                        .listen_on(addr.clone().with(Protocol::P2pCircuit))
                    {
                        Ok(id) => {
                            tracing::info!("listening through relay {addr}");
                            self.relays.insert(peer_id, (addr, Some(id)));
                        }
                        Err(e) => self.error(format!("cannot listen through relay {addr}: {e}")),
                    }
                }
                if endpoint.is_relayed() {
                    self.metrics
                        .relayed_connections
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::info!("relayed connection with {peer_id}");
                }
                if endpoint.is_dialer() {
                    self.swarm
                        .behaviour_mut()
                        .kad
                        .add_address(&peer_id, endpoint.get_remote_address().clone());
                }
                if num_established.get() == 1 || !self.peers.contains_key(&peer_id) {
                    self.peers.insert(
                        peer_id,
                        PeerConn {
                            generation: self.next_gen,
                            since: std::time::Instant::now(),
                            node,
                            relayed: endpoint.is_relayed(),
                            sender: None,
                            hello: None,
                            up: false,
                        },
                    );
                    self.by_node.insert(node, peer_id);
                    let hello = Hello {
                        site: self.cfg.site.clone(),
                        cert: self.cert.clone(),
                    };
                    tokio::spawn(net::run_writer(
                        self.control.clone(),
                        peer_id,
                        hello,
                        self.writer.clone(),
                        self.net_tx.clone(),
                        self.next_gen,
                    ));
                    self.next_gen += 1;
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established,
                ..
            } => {
                if num_established == 0 {
                    if let Some(c) = self.peers.remove(&peer_id) {
                        self.by_node.remove(&c.node);
                        if c.up {
                            self.handle(Input::PeerDown { peer: c.node });
                        }
                    }
                    self.metrics.peers.store(
                        self.peers.values().filter(|p| p.up).count() as u64,
                        Ordering::Relaxed,
                    );
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                for a in info.listen_addrs {
                    self.swarm.behaviour_mut().kad.add_address(&peer_id, a);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(list))) => {
                for (peer, addr) in list {
                    self.swarm
                        .behaviour_mut()
                        .kad
                        .add_address(&peer, addr.clone());
                    if !self.swarm.is_connected(&peer) && self.peers.len() < self.cfg.target_peers {
                        let _ = self.swarm.dial(addr);
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::RoutingUpdated {
                peer,
                addresses,
                ..
            })) => {
                if !self.swarm.is_connected(&peer)
                    && self.peers.len() < self.cfg.target_peers
                    && peer != self.peer_id()
                {
                    let addrs: Vec<Multiaddr> = addresses.iter().cloned().collect();
                    self.dial(peer, addrs);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                result: kad::QueryResult::GetClosestPeers(Ok(ok)),
                ..
            })) => {
                for p in ok.peers {
                    if !self.swarm.is_connected(&p.peer_id)
                        && self.peers.len() < self.cfg.target_peers
                        && p.peer_id != self.peer_id()
                    {
                        self.dial(p.peer_id, p.addrs);
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::RelayServer(
                libp2p::relay::Event::ReservationReqAccepted { src_peer_id, .. },
            )) => {
                // Make the reserving node findable through us: its circuit addresses go
                // into the DHT, so peers that look it up can dial it via this relay.
                let me = self.peer_id();
                let addrs: Vec<Multiaddr> = self
                    .listen
                    .iter()
                    .filter(|a| !a.iter().any(|p| matches!(p, Protocol::P2pCircuit)))
                    .map(|a| a.clone().with(Protocol::P2p(me)).with(Protocol::P2pCircuit))
                    .collect();
                for a in addrs {
                    self.swarm.behaviour_mut().kad.add_address(&src_peer_id, a);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Ping(libp2p::ping::Event { .. })) => {}
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                tracing::debug!("dial {peer_id:?} failed: {error}");
            }
            other => {
                tracing::trace!("swarm: {other:?}");
            }
        }
    }

    fn dial(&mut self, peer: PeerId, addrs: Vec<Multiaddr>) {
        if self
            .banned
            .get(&peer)
            .is_some_and(|t| *t > std::time::Instant::now())
        {
            return;
        }
        let opts = libp2p::swarm::dial_opts::DialOpts::peer_id(peer)
            .addresses(addrs)
            .build();
        let _ = self.swarm.dial(opts);
    }
    fn bootstrap(&mut self) {
        let relays: Vec<(PeerId, Multiaddr)> = self
            .relays
            .iter()
            .map(|(p, (a, _))| (*p, a.clone()))
            .collect();
        for (peer, addr) in relays {
            if !self.swarm.is_connected(&peer) {
                self.dial(peer, vec![addr]);
            }
        }
        for b in self.cfg.bootstrap.clone() {
            let Ok(addr) = b.parse::<Multiaddr>() else {
                self.error(format!("bad bootstrap address {b}"));
                continue;
            };
            match addr.iter().last() {
                Some(Protocol::P2p(peer)) => {
                    self.swarm
                        .behaviour_mut()
                        .kad
                        .add_address(&peer, addr.clone());
                    self.dial(peer, vec![addr]);
                }
                _ => {
                    let _ = self.swarm.dial(addr);
                }
            }
        }
        // Look ourselves up at once: the answers fill the routing table, and every peer
        // that enters it is dialled while we have fewer than the target.
        let _ = self.swarm.behaviour_mut().kad.bootstrap();
    }

    /// Run until `shutdown` resolves.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
        tokio::spawn(net::run_acceptor(
            self.control.clone(),
            self.net_tx.clone(),
            RateLimiter::new(self.cfg.download_limit),
            self.metrics.clone(),
            self.cfg.site.clone(),
        ));
        self.bootstrap();
        let mut discovery = tokio::time::interval(Duration::from_secs(5));
        let mut redial = tokio::time::interval(Duration::from_secs(30));
        let mut health = tokio::time::interval(self.cfg.health_interval()?);
        health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            let deadline = self.mesh.poll_timeout().map(|t| {
                let d = Duration::from_micros(t.as_micros());
                tokio::time::Instant::from_std(self.origin + d)
            });
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => futures::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = &mut shutdown => break,
                Some(cmd) = self.cmd_rx.recv() => self.on_cmd(cmd),
                Some(done) = self.store_rx.recv() => self.on_store(done),
                Some(ev) = self.net_rx.recv() => self.on_net(ev),
                ev = self.swarm.select_next_some() => self.on_swarm(ev),
                _ = sleep => {
                    let now = self.now();
                    self.mesh.handle_timeout(now);
                    self.drain();
                }
                _ = discovery.tick() => {
                    // Connections whose pollen streams never came up hold a slot for nothing.
                    let stale: Vec<PeerId> = self
                        .peers
                        .iter()
                        .filter(|(_, c)| !c.up && c.since.elapsed() > HELLO_TIMEOUT)
                        .map(|(p, _)| *p)
                        .collect();
                    for p in stale {
                        tracing::debug!("{p}: no pollen handshake in {HELLO_TIMEOUT:?}; disconnecting");
                        let _ = self.swarm.disconnect_peer_id(p);
                    }
                    if self.peers.len() < self.cfg.target_peers && self.swarm.connected_peers().count() > 0 {
                        self.swarm.behaviour_mut().kad.get_closest_peers(PeerId::random());
                    }
                }
                _ = health.tick() => {
                    self.health_tick();
                    self.drain();
                }
                _ = redial.tick() => {
                    if self.peers.is_empty() {
                        self.bootstrap();
                    }
                }
            }
        }
        // Make what was written durable before exiting.
        let store = self.store.clone();
        let _ = tokio::task::spawn_blocking(move || store.sync_all()).await;
        Ok(())
    }
}

fn kind_label(k: ObjectKind) -> &'static str {
    match k {
        ObjectKind::Manifest => "manifest",
        ObjectKind::TrustRoot => "trust_root",
        ObjectKind::Report => "health_report",
        ObjectKind::Instruction => "instruction",
        ObjectKind::Certificate => "certificate",
    }
}

/// Persistence runs in order on one blocking thread, off the actor.
fn spawn_persister(store: Arc<Store>, mut rx: mpsc::Receiver<Persist>) {
    std::thread::Builder::new()
        .name("pollen-persist".into())
        .spawn(move || {
            while let Some(first) = rx.blocking_recv() {
                // Take everything queued: keep every manifest, trust root and flush in
                // order, but only the last state, GC and prune (later ones supersede).
                let mut batch = vec![first];
                while let Ok(j) = rx.try_recv() {
                    batch.push(j);
                }
                let last_of =
                    |pred: fn(&Persist) -> bool, batch: &[Persist]| batch.iter().rposition(pred);
                let last_state = last_of(|j| matches!(j, Persist::State(_)), &batch);
                let last_gc = last_of(|j| matches!(j, Persist::Gc(_)), &batch);
                let last_prune = last_of(|j| matches!(j, Persist::PruneManifests(_)), &batch);
                // A flush answers only when the newest state is durable too.
                let newest_state = last_state.and_then(|j| match &batch[j] {
                    Persist::State(st) => Some(st.clone()),
                    _ => None,
                });
                for (i, job) in batch.into_iter().enumerate() {
                    if let (Persist::Flush(_), Some(j), Some(st)) =
                        (&job, last_state, &newest_state)
                        && j > i
                        && let Err(e) = store.save_state(st)
                    {
                        tracing::error!("persisting state: {e}");
                    }
                    let superseded = match &job {
                        Persist::State(_) => Some(i) != last_state,
                        Persist::Gc(_) => Some(i) != last_gc,
                        Persist::PruneManifests(_) => Some(i) != last_prune,
                        _ => false,
                    };
                    if superseded {
                        continue;
                    }
                    let r = match &job {
                        Persist::Manifest(id, b) => store.save_manifest(id, b),
                        Persist::Trust(v, b) => store.save_trust_root(*v, b),
                        Persist::State(s) => store.save_state(s),
                        Persist::Gc(keep) => store.gc(keep, GC_GRACE).map(|_| ()),
                        Persist::Flush(_) => Ok(()),
                        Persist::PruneManifests(keep) => store.manifests().and_then(|all| {
                            for (id, _) in all {
                                if !keep.contains(&id) {
                                    store.remove_manifest(&id)?;
                                }
                            }
                            Ok(())
                        }),
                    };
                    if let Persist::Flush(done) = job {
                        let _ = done.send(());
                        continue;
                    }
                    if let Err(e) = r {
                        tracing::error!("persisting {job:?}: {e}");
                    }
                }
            }
        })
        .expect("spawning the persistence thread");
}
