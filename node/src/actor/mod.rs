//! The node actor: one task owns the protocol state machine and the swarm.
//!
//! Inputs: swarm events, frames from the per-peer stream tasks, results from the store
//! (run on the blocking pool), commands from the HTTP API, and one timer at the core's
//! deadline. After each input the core's outputs are drained and turned into frames,
//! chunk uploads, disconnects and store work. Nothing here blocks: disk IO and hashing go
//! to `spawn_blocking`, sends to peers use `try_send` on bounded queues (a peer too slow to
//! keep up loses control frames rather than stalling every other peer).

mod activation;
mod chunks;
mod peers;
mod persist;
mod restore;
mod swarm;

use self::peers::PeerConn;
use self::persist::{Persist, StateSlot, spawn_persister};
use crate::config::NodeConfig;
use crate::handle::{ActorCmd, AppState, Refusal};
use crate::metrics::Metrics;
use crate::net::{
    self, Behaviour, ChunkJob, NetEvent, Out, RateLimiter, ReadDeadlines, ReaderShared,
    WriterShared,
};
use crate::serving::{LoadedModel, Registry};
use crate::status::{PeerStatus, Status};
use crate::store::{NodeState, Store, StoreError};
use anyhow::{Context, Result};
use futures::StreamExt;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId, Swarm};
use pollen_keys::time::unix_now;
use pollen_protocol::chunking::FileSpec;
use pollen_protocol::ids::{ContentId, ManifestId, NodeId};
use pollen_protocol::io::{Command, Event, Input, Output};
use pollen_protocol::manifest::{Channel, DeviceProfile, Manifest, SignedManifest};
use pollen_protocol::rollout::ErrorClass;
use pollen_protocol::signing::Signed;
use pollen_protocol::trust::SignedNodeCert;
use pollen_protocol::wire::{Bitfield, Message};
use pollen_protocol::{Config as CoreConfig, Instant as CoreInstant, Mesh, Now};
use rand_chacha::ChaCha8Rng;
use rand_core::SeedableRng;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::{Semaphore, mpsc, oneshot};
/// Results of work done off the actor (store IO and model loading on the blocking pool,
/// a timer for the sync back-off), dispatched by [`Actor::on_done`].
#[derive(Debug)]
enum Done {
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

/// Capacity of the channel from stream tasks to the actor.
const NET_QUEUE: usize = 1024;
/// Capacity of the channel of [`Done`] results.
const DONE_QUEUE: usize = 1024;
/// Persistence jobs queued (manifests, trust roots and flushes are never dropped in
/// practice: state, GC and pruning are coalesced by the persister).
const PERSIST_QUEUE: usize = 1024;
/// Capacity of the HTTP command channel.
const CMD_QUEUE: usize = 64;
/// Most recent errors kept for the status.
const MAX_ERRORS: usize = 32;
/// Most chunk specs cached; past it the cache starts again empty (specs are cheap to
/// copy from the core, and a node tracks far fewer files than this).
const MAX_SPECS: usize = 4096;
/// A connection whose pollen streams are not up by then is closed.
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);

/// The actor's state. Owned by one task; every field is touched only from [`Actor::run`].
pub struct Actor {
    /// The node's configuration, as loaded.
    cfg: NodeConfig,
    /// The protocol core: this node's view of the mesh (sans-IO, fed by [`Actor::handle`]).
    mesh: Mesh<ChaCha8Rng>,
    /// The libp2p swarm: transports, discovery, relay (see [`crate::net`]).
    swarm: Swarm<Behaviour>,
    /// Opens Pollen's streams to a peer.
    control: libp2p_stream::Control,
    /// The on-disk store, shared with the blocking pool, the persister and the HTTP API.
    store: Arc<Store>,
    /// Counters shared with the HTTP API and the stream tasks.
    metrics: Arc<Metrics>,
    /// Monotonic zero of the core's clock.
    origin: std::time::Instant,
    /// This node's id (its ed25519 public key).
    me: NodeId,
    /// Connections by libp2p peer (one record per peer, however many connections).
    peers: BTreeMap<PeerId, PeerConn>,
    /// The peer behind each node id of `peers`.
    by_node: BTreeMap<NodeId, PeerId>,
    /// Peers mDNS found on the LAN (until it says they expired), with an address and when
    /// they were last dialled: [`Actor::discovery_tick`] dials again those not connected,
    /// so a LAN peer lost once is not lost for good (at most `max_connections`).
    lan: BTreeMap<PeerId, (Multiaddr, Option<std::time::Instant>)>,
    /// Peers disconnected for misbehaving, refused until the given time.
    banned: BTreeMap<PeerId, std::time::Instant>,
    /// Given to stream tasks: frames and chunks from peers.
    net_tx: mpsc::Sender<NetEvent>,
    /// Frames and chunks from the stream tasks.
    net_rx: mpsc::Receiver<NetEvent>,
    /// Given to blocking jobs: their results.
    done_tx: mpsc::Sender<Done>,
    /// Results of blocking jobs and of the sync back-off timer.
    done_rx: mpsc::Receiver<Done>,
    /// Commands from the HTTP API.
    cmd_rx: mpsc::Receiver<ActorCmd>,
    /// What every writer task shares: store, upload slots, rate limit, metrics.
    writer: WriterShared,
    /// A cache of the core's chunk specs, bounded by [`MAX_SPECS`].
    specs: BTreeMap<ContentId, Arc<FileSpec>>,
    /// Chunks being written on the blocking pool.
    writing: BTreeSet<(ContentId, u32)>,
    /// Chunks written but not yet synced, with the peer that sent each.
    pending_sync: BTreeMap<(ContentId, u32), NodeId>,
    /// A sync runs (or its back-off after a failure).
    syncing: bool,
    /// Id of the next core command.
    next_cmd: u64,
    /// Recent errors for the status, newest last, at most [`MAX_ERRORS`].
    errors: VecDeque<String>,
    /// What the node persists of its own (pins, active releases, instructions, …).
    state: NodeState,
    /// This node's certificate, when the trust root requires one.
    cert: Option<SignedNodeCert>,
    /// The HTTP API address, for the status.
    http: SocketAddr,
    /// The addresses the swarm listens on.
    listen: BTreeSet<Multiaddr>,
    /// Jobs for the persister thread, bounded.
    persist: persist::PersistQueue,
    /// The newest node state for the persister (see [`StateSlot`]).
    state_slot: StateSlot,
    /// Files registered with the store in this run.
    opened: BTreeSet<ContentId>,
    /// Relays to listen through: address, and the listener once started.
    relays: BTreeMap<PeerId, (Multiaddr, Option<libp2p::core::transport::ListenerId>)>,
    /// Serialises chunk writes (see [`Actor::on_chunk`]).
    write_lock: Arc<std::sync::Mutex<()>>,
    /// The store is being loaded into the core: no garbage collection yet.
    restoring: bool,
    /// Something on disk could not be restored: no garbage collection in this run.
    restore_incomplete: bool,
    /// Generation of the next connection record (see [`PeerConn`]).
    next_gen: u64,
    /// Models being served, shared with the HTTP API.
    registry: Arc<Registry>,
    /// The node's signing key (health reports).
    secret: pollen_protocol::SigningKey,
    /// How long peers may take to send their Hello and each frame.
    deadlines: ReadDeadlines,
    /// Activations under way, by release: at most one per release the core retains.
    activating: BTreeMap<ManifestId, activation::Activating>,
}

impl std::fmt::Debug for Actor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Actor")
            .field("node", &self.me)
            .field("peers", &self.peers.len())
            .finish()
    }
}

impl Actor {
    /// Open the store, build the swarm, restore state. Returns the actor and the handle the
    /// HTTP API uses.
    pub fn new(cfg: NodeConfig, http: SocketAddr) -> Result<(Actor, AppState)> {
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
        let me = NodeId::from(&secret);
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
            site: cfg.site.clone(),
            device: DeviceProfile {
                device_class: cfg.device_class.clone(),
                ..DeviceProfile::default()
            },
            ..CoreConfig::default()
        };
        let mut deadlines = ReadDeadlines::new(core_cfg.request_timeout);
        if let Some(d) = cfg.test_frame_deadline {
            deadlines.grace = d;
            deadlines.min_rate = u64::MAX;
        }
        let origin = std::time::Instant::now();
        let mesh = Mesh::new(
            me,
            core_cfg,
            ChaCha8Rng::seed_from_u64(seed),
            Now::new(CoreInstant::ZERO, unix_now().unwrap_or_default()),
        );
        let (net_tx, net_rx) = mpsc::channel(NET_QUEUE);
        let (done_tx, done_rx) = mpsc::channel(DONE_QUEUE);
        let (cmd_tx, cmd_rx) = mpsc::channel(CMD_QUEUE);
        let (persist_tx, persist_rx) = mpsc::channel(PERSIST_QUEUE);
        let state_slot = StateSlot::default();
        let persist_bytes = persist::PersistBytes::default();
        spawn_persister(
            store.clone(),
            persist_rx,
            state_slot.clone(),
            persist_bytes.clone(),
        );
        let writer = WriterShared {
            store: store.clone(),
            uploads: Arc::new(Semaphore::new(cfg.max_concurrent_uploads)),
            waiting: Arc::default(),
            limiter: RateLimiter::new(cfg.upload_limit),
            metrics: metrics.clone(),
            corrupt: cfg.test_corrupt_chunks,
            pool: net::BufPool::new(),
        };
        let state = store.load_state().context("cannot read node state")?;
        let cert = match &cfg.cert {
            Some(p) => Some(pollen_keys::files::read_signed(p, "node certificate")?.0),
            None => None,
        };
        let registry = Arc::new(Registry::default());
        let handle = AppState {
            cmds: cmd_tx,
            metrics: metrics.clone(),
            store: store.clone(),
            registry: registry.clone(),
            inference: Arc::new(crate::serving::pool::Pool::new(
                cfg.inference_threads,
                cfg.inference_queue,
                crate::http::v2::BODY_BUDGET,
            )),
            uploads: Arc::new(tokio::sync::Semaphore::new(crate::http::v1::UPLOADS)),
            upload_quota: cfg.max_unreferenced_bytes,
            generations: Arc::new(crate::http::openai::Generations::new(
                cfg.max_generations,
                cfg.generation_queue,
                cfg.lm_threads(),
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
            lan: BTreeMap::new(),
            by_node: BTreeMap::new(),
            banned: BTreeMap::new(),
            net_tx,
            net_rx,
            done_tx,
            done_rx,
            cmd_rx,
            writer,
            specs: BTreeMap::new(),
            writing: BTreeSet::new(),
            pending_sync: BTreeMap::new(),
            syncing: false,
            next_cmd: 1,
            errors: VecDeque::new(),
            state,
            cert,
            http,
            listen: BTreeSet::new(),
            persist: persist::PersistQueue::new(persist_tx, persist_bytes),
            state_slot,
            opened: BTreeSet::new(),
            relays,
            write_lock: Arc::new(std::sync::Mutex::new(())),
            restoring: true,
            restore_incomplete: false,
            next_gen: 1,
            registry: registry.clone(),
            secret: secret.clone(),
            deadlines,
            activating: BTreeMap::new(),
        };
        actor.restore()?;
        actor.restoring = false;
        actor.gc();
        actor.recover_failed_activations();
        // Serve again what was active before the restart.
        let actives: Vec<_> = actor
            .mesh
            .actives()
            .map(|(c, v, m)| (c.clone(), v, m))
            .collect();
        for (channel, version, manifest) in actives {
            actor.start_activation(channel, version, manifest, false);
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
        Now::new(mono, unix_now().unwrap_or_default())
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
        self.run_command(cmd).map_err(|r| r.message)
    }

    /// Run a core command now; a refusal carries the stable label of the core's
    /// `Rejected` event, if it emitted one for this command.
    fn run_command(&mut self, cmd: Command) -> Result<(), Refusal> {
        let id = self.next_cmd;
        self.next_cmd += 1;
        let now = self.now();
        self.mesh.handle(now, Input::Command { id, cmd });
        let mut result = Err("no result".to_string());
        let mut code = None;
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
            if let Output::Event(Event::Rejected {
                from: None, label, ..
            }) = &out
            {
                code = Some(*label);
            }
            self.on_output(out);
        }
        result.map_err(|message| Refusal { message, code })
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
                let Some(s) = self.sender(&to) else { return };
                if !s.send_frame(msg.encode()) {
                    self.metrics.control_dropped.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!("control queue to {} full: message dropped", to.short());
                } else if let Message::Request { id, file, index } = msg {
                    self.requested(&to, id, file, index);
                }
            }
            Output::SendChunk {
                to,
                id,
                file,
                index,
            } => {
                let Some(spec) = self.spec(&file) else { return };
                let Some(s) = self.sender(&to) else { return };
                // Every upload taken and `queued_uploads` waiting: the peer is better
                // served by another holder; it frees the request and asks elsewhere for
                // a while (`busy_backoff`). (Writers take their permits asynchronously,
                // so a burst of requests with slots free is queued, not refused.)
                if self.writer.uploads.available_permits() == 0
                    && self.writer.waiting.load(Ordering::Relaxed) >= self.cfg.queued_uploads
                {
                    let busy = Message::Reject {
                        id,
                        reason: pollen_protocol::wire::RejectReason::Busy,
                    };
                    if s.send_frame(busy.encode()) {
                        self.metrics.chunks_busy.fetch_add(1, Ordering::Relaxed);
                    }
                    return;
                }
                let waiting = net::Waiting::new(&self.writer.waiting);
                let job = ChunkJob {
                    id,
                    spec,
                    index,
                    waiting,
                };
                if s.chunks.try_send(job).is_err() {
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
                self.metrics.peers_banned.fetch_add(1, Ordering::Relaxed);
                self.ban(&peer);
            }
            Output::Event(e) => self.on_event(e),
        }
    }

    /// Answer `reply` once every persistence job queued so far is done: a 2xx on a
    /// mutation is durable before it is sent.
    ///
    /// If a write failed, `reply` is dropped unanswered: the route answers an error.
    fn reply_when_durable<T: Send + 'static>(&mut self, reply: oneshot::Sender<T>, value: T) {
        let (tx, rx) = oneshot::channel();
        self.persist_job(Persist::Flush(tx));
        tokio::spawn(async move {
            if rx.await.is_ok() {
                let _ = reply.send(value);
            }
        });
    }

    /// Queue a job for the persister (see [`persist::PersistQueue::push`]); a job past
    /// the bounds is reported in the status, never dropped silently.
    fn persist_job(&mut self, job: Persist) {
        if let Err(e) = self.persist.push(job) {
            self.error(e);
        }
    }

    /// Hand the node state to the persister; never dropped (see [`StateSlot`]).
    fn save_state(&mut self) {
        *self.state_slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(self.state.clone());
        // A full queue already holds a job, and every batch writes the slot.
        self.persist.wake();
    }

    fn on_event(&mut self, e: Event) {
        match e {
            Event::TrustRootUpdated { version, signed } => {
                tracing::info!("trust root version {version} in force");
                self.persist_job(Persist::Trust(version, signed.to_bytes()));
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
                self.persist_job(Persist::Manifest(id, signed.to_bytes()));
                let h = self.state.highest.entry(channel.to_string()).or_default();
                *h = (*h).max(version);
                self.save_state();
                let files: Vec<_> = self
                    .mesh
                    .release(&channel, version)
                    .filter(|r| r.id() == id)
                    .map(|r| {
                        let all = &r.manifest.body.artifact.variants;
                        let ours: Vec<_> = r.files().map(|f| f.spec.content_id).collect();
                        // Other variants' files only when held (the publisher's): they
                        // are announced and served, never fetched.
                        let held = all
                            .iter()
                            .flat_map(|v| &v.files)
                            .map(|f| f.spec.content_id)
                            .filter(|c| !ours.contains(c) && self.store.has_blob(c))
                            .collect::<Vec<_>>();
                        ours.into_iter().chain(held).collect()
                    })
                    .unwrap_or_default();
                for file in files {
                    self.open_file(file, false);
                }
                self.gc();
            }
            Event::Rejected {
                kind,
                from,
                label,
                reason,
            } => {
                self.metrics.rejected(kind.label(), label);
                match from {
                    Some(p) => {
                        tracing::warn!("rejected {} from {}: {reason}", kind.label(), p.short())
                    }
                    None => tracing::warn!("rejected local {}: {reason}", kind.label()),
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
            Event::TrustRootEquivocation { version, .. } => {
                self.metrics.rejected("trust-root", "equivocation");
                self.error(format!(
                    "trust-root equivocation on version {version}: two roots of that version signed by the root keys (a root key may have leaked); keeping the one in force. Sign the next version to heal the fleet."
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
                variant,
                ..
            } => {
                self.start_activation_of(channel.clone(), version, manifest, variant, true);
                tracing::info!(
                    "{channel}: version {version} ({}) is complete; activating it",
                    manifest.short()
                );
                self.gc();
            }
            Event::RollBack {
                channel,
                from,
                from_manifest,
                to,
            } => {
                self.roll_back(&channel, from, from_manifest, to);
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
                    let tx = self.done_tx.clone();
                    tokio::task::spawn_blocking(move || {
                        let r = store.finish(&spec);
                        let _ = tx.blocking_send(Done::Finished(file, r));
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
                    .releases()
                    .map(|(c, r)| format!("{c}@{}", r.version))
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
                self.metrics.peer_penalties.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }

    /// Dispatch the result of work done off the actor.
    fn on_done(&mut self, done: Done) {
        match done {
            Done::Written {
                from,
                file,
                index,
                result,
            } => self.on_written(from, file, index, result),
            Done::Synced(result) => self.on_synced(result),
            Done::Finished(file, r) => {
                if let Err(e) = r {
                    self.store_error(format!("cannot finish file {}: {e}", file.short()), &e);
                }
            }
            Done::Opened(file, r) => self.on_opened(file, r),
            Done::Activated {
                channel,
                version,
                manifest,
                report,
                result,
            } => self.on_activated(channel, version, manifest, report, result),
            Done::RetrySync => {
                self.syncing = false;
                self.maybe_sync();
            }
        }
    }

    fn on_cmd(&mut self, cmd: ActorCmd) {
        match cmd {
            ActorCmd::Status { reply } => {
                let _ = reply.send(self.status());
            }
            ActorCmd::Instruct { bytes, reply } => {
                let result = match Signed::from_bytes(&bytes) {
                    Ok((s, _)) => self.run_command(Command::Instruct(s)),
                    Err(e) => Err(Refusal::new(format!("malformed instruction: {e}"))),
                };
                match result {
                    // The instruction is saved with the node state (on_event).
                    Ok(()) => self.reply_when_durable(reply, Ok("accepted".into())),
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
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
                    self.reply_when_durable(reply, Ok("ok".into()));
                } else {
                    let _ = reply.send(result.map(|_| "ok".into()));
                }
            }
            ActorCmd::ModelStates { channel, reply } => {
                let _ = reply.send(self.model_states(channel.as_deref()));
            }
            ActorCmd::LiveFiles { reply } => {
                let _ = reply.send(self.mesh.live_files());
            }
            ActorCmd::Manifest {
                channel,
                version,
                reply,
            } => {
                let bytes = Channel::new(&channel)
                    .ok()
                    .and_then(|c| self.mesh.release(&c, version))
                    .map(|r| r.manifest.signed.to_bytes());
                let _ = reply.send(bytes);
            }
            ActorCmd::Publish { bytes, reply } => {
                let signed: SignedManifest = match Manifest::from_bytes(&bytes) {
                    Ok(m) => m.signed,
                    Err(e) => {
                        let _ = reply.send(Err(Refusal::new(format!("malformed manifest: {e}"))));
                        return;
                    }
                };
                let id = ManifestId(signed.body_hash());
                // A manifest this node holds already (from gossip, or published here
                // before) is answered as accepted but neither pinned nor recorded as
                // published again: re-posting a current manifest must not pin releases
                // for good (review L4).
                let new = !self.mesh.releases().any(|(_, r)| r.id() == id);
                let result = self.run_command(Command::Publish(signed));
                match result {
                    Ok(()) => {
                        if new {
                            let _ = self.core_command(Command::Pin(id));
                            self.state.published.insert(id.to_hex());
                            self.save_state();
                        }
                        // Answer once the manifest and the new highest version are durable.
                        self.reply_when_durable(reply, Ok(id.to_hex()));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
        }
    }

    /// The `GET /v1/status` snapshot: this node's own parts here, the channels converted
    /// from the core's view by [`crate::status`].
    fn status(&self) -> Status {
        let pid = self.peer_id();
        let by_peer = self.metrics.chunks_by_peer();
        let trust = self.mesh.trust_root();
        let now = unix_now().unwrap_or_default();
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
            gates_open_to_sybils: trust.is_some_and(|t| !t.requires_certificates())
                && self.mesh.releases().any(|(_, r)| {
                    r.manifest
                        .body
                        .rollout
                        .stages
                        .iter()
                        .any(|s| s.gate.is_some())
                }),
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
                    let mut c = crate::status::channel(c, &self.mesh, now);
                    // What is served is what passed its activation here, which may lag
                    // (or, after a failure, differ from) the release the core chose.
                    let served = self.registry.current(&c.channel);
                    c.active_version = served.as_ref().map(|m| m.version);
                    c.active_manifest = served.map(|m| m.manifest.to_hex());
                    // The same state and reason clients see on /v2.
                    let states = self.model_states(Some(&c.channel)).pop();
                    for r in &mut c.releases {
                        let s = states
                            .iter()
                            .flat_map(|(_, vs)| vs)
                            .find(|s| s.version == r.version);
                        if let Some(s) = s {
                            r.state = s.state.as_str().to_string();
                            r.reason = s.reason.clone();
                            r.error_class = s.class.map(crate::serving::classify::label);
                        }
                    }
                    c
                })
                .collect(),
            errors: self.errors.iter().cloned().collect(),
        }
    }

    /// Run until `shutdown` resolves.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
        let readers = ReaderShared::new(
            self.net_tx.clone(),
            self.metrics.clone(),
            &self.cfg,
            self.deadlines,
            self.writer.pool.clone(),
        );
        tokio::spawn(net::run_acceptor(self.control.clone(), readers));
        self.bootstrap();
        let mut discovery = tokio::time::interval(Duration::from_secs(5));
        let mut redial = tokio::time::interval(Duration::from_secs(30));
        let mut health = tokio::time::interval(self.cfg.health_interval()?);
        health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Collect on a timer too, not only when releases change: a quiet node must still
        // drop uploads nobody published (review M2).
        let mut collect = tokio::time::interval_at(
            tokio::time::Instant::now() + persist::GC_INTERVAL,
            persist::GC_INTERVAL,
        );
        collect.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
            let persist = self.persist.sender();
            // Not biased: a stream of HTTP commands must not starve the swarm and the
            // timers, nor a busy swarm the commands (review L5).
            tokio::select! {
                _ = &mut shutdown => break,
                Some(cmd) = self.cmd_rx.recv() => self.on_cmd(cmd),
                Some(done) = self.done_rx.recv() => self.on_done(done),
                Some(ev) = self.net_rx.recv() => self.on_net(ev),
                ev = self.swarm.select_next_some() => self.on_swarm(ev),
                _ = sleep => {
                    let now = self.now();
                    self.mesh.handle_timeout(now);
                    self.drain();
                }
                _ = discovery.tick() => self.discovery_tick(),
                _ = health.tick() => {
                    self.health_tick();
                    self.drain();
                }
                _ = collect.tick() => self.gc(),
                Ok(permit) = persist.reserve(), if self.persist.waiting() => {
                    self.persist.send_next(permit);
                }
                _ = redial.tick() => {
                    // Not only when alone: a site cut off for hours keeps its LAN peers,
                    // and by the time its link returns its routing table may have lost
                    // every address across the WAN (each failed dial drops one); the
                    // bootstrap peers and a fresh lookup find the mesh again.
                    if self.peers.len() < self.cfg.target_peers {
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
