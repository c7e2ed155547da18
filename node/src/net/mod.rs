//! The libp2p side: the swarm's behaviours, and the per-peer stream tasks that carry
//! Pollen's own protocol.
//!
//! Each connected pair of nodes runs one stream per direction on [`PROTOCOL_ID`]: a node
//! writes frames on the stream it opened and reads them on the one the peer opened. The
//! first frame each way is a `Hello` (site, certificate). Control frames take priority over
//! chunk frames in the writer. Frames are length-prefixed and capped by kind before their
//! body is buffered ([`pollen_protocol::wire`]); a bad frame ends the stream and is
//! reported so the core can penalise the peer.
//!
//! What a peer can make the node hold is bounded on the reading side: a few inbound
//! streams per peer ([`ReaderShared::streams_per_peer`]); a first frame that is a Hello of
//! at most [`MAX_HELLO_FRAME`] bytes, whole within [`ReadDeadlines::hello`]; a deadline
//! per frame; buffers that grow with the bytes received, not with the length claimed,
//! out of one budget shared by every reader ([`FRAME_BUDGET`]). On the sending side each
//! peer's control queue is bounded in frames and in bytes ([`CONTROL_BYTES`]).
//!
//! Hashing and disk IO of chunks never run on the async threads: the writer reads chunks
//! with `spawn_blocking`, and received chunks go to the actor, which verifies and writes
//! them on the blocking pool.

pub mod buf;
pub mod mux;

use crate::config::NodeConfig;
use crate::metrics::{Metrics, PeerClass};
use crate::store::Store;
use anyhow::{Context, Result};
use futures::{AsyncRead, AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::identity::Keypair;
use libp2p::swarm::NetworkBehaviour;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::{
    PeerId, StreamProtocol, Swarm, autonat, connection_limits, dcutr, identify, kad, mdns, noise,
    ping, relay, tcp, yamux,
};
use pollen_protocol::chunking::FileSpec;
use pollen_protocol::ids::{ContentId, NodeId};
use pollen_protocol::wire::{self, ChunkHeader, Frame, Hello, KIND_CHUNK, Message, frame_cap};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

pub use buf::{BufPool, FrameBuf};

/// Pollen's libp2p protocol id (the wire version is in it).
pub const PROTOCOL_ID: StreamProtocol = StreamProtocol::new(wire::PROTOCOL_ID);
/// Kademlia protocol id: Pollen's own DHT, not the IPFS one.
pub const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/pollen/kad/1.0.0");
/// Control frames queued per peer before further ones are dropped.
pub const CONTROL_QUEUE: usize = 4096;
/// Bytes of control frames queued per peer before further ones are dropped (frames of at
/// most [`SMALL_FRAME`] bytes are bounded by [`CONTROL_QUEUE`] alone). Eight of the largest
/// control frames: a burst of big manifests still goes through to a peer that reads.
///
/// Past it a frame is dropped rather than the peer disconnected: what the core sends is
/// gossip that anti-entropy and `Want` repair, whereas a disconnected peer that was only
/// behind would reconnect into the same burst. A peer that stops reading is closed by
/// the writer's timeout.
pub const CONTROL_BYTES: usize = 8 << 20;
/// Control frames this small (requests, cancels, rejects, chunk announcements) are never
/// dropped for bytes: losing a request would make it time out and count against the peer.
pub const SMALL_FRAME: usize = 256;
/// Chunk uploads queued per peer.
pub const CHUNK_QUEUE: usize = 64;

/// All behaviours of a node's swarm.
#[derive(NetworkBehaviour)]
#[allow(missing_debug_implementations)] // the derive makes an event enum we cannot annotate
pub struct Behaviour {
    /// Connection limits.
    pub limits: connection_limits::Behaviour,
    /// Identify (listen addresses, agent).
    pub identify: identify::Behaviour,
    /// Liveness and RTT.
    pub ping: ping::Behaviour,
    /// LAN discovery.
    pub mdns: Toggle<mdns::tokio::Behaviour>,
    /// WAN discovery.
    pub kad: kad::Behaviour<kad::store::MemoryStore>,
    /// NAT status.
    pub autonat: autonat::Behaviour,
    /// Relay server (optional).
    pub relay_server: Toggle<relay::Behaviour>,
    /// Relay client (listen through relays behind NAT).
    pub relay_client: relay::client::Behaviour,
    /// Hole punching.
    pub dcutr: dcutr::Behaviour,
    /// Pollen's own streams.
    pub stream: libp2p_stream::Behaviour,
}

/// The node id of a peer: its ed25519 public key, recovered from the peer id.
pub fn node_id_of(peer: &PeerId) -> Option<NodeId> {
    let mh = peer.as_ref();
    if mh.code() != 0 {
        return None; // not an identity multihash: not an ed25519 key
    }
    let pk = libp2p::identity::PublicKey::try_decode_protobuf(mh.digest()).ok()?;
    let ed = pk.try_into_ed25519().ok()?;
    Some(NodeId(ed.to_bytes()))
}

/// The peer id of a node id.
pub fn peer_id_of(node: &NodeId) -> Option<PeerId> {
    let ed = libp2p::identity::ed25519::PublicKey::try_from_bytes(&node.0).ok()?;
    Some(libp2p::identity::PublicKey::from(ed).to_peer_id())
}

/// Bytes a TCP connection reads from its socket at a time (see [`build_swarm`]).
pub const TCP_READ_BUFFER: usize = 256 << 10;

/// Build the swarm.
pub fn build_swarm(key: Keypair, cfg: &NodeConfig) -> Result<Swarm<Behaviour>> {
    let mdns_on = cfg.mdns;
    let relay_on = cfg.relay_server;
    let relay_cfg = relay::Config {
        max_circuit_duration: Duration::from_secs(3600),
        max_circuit_bytes: cfg.relay_circuit_bytes,
        ..relay::Config::default()
    };
    let limits = connection_limits::ConnectionLimits::default()
        .with_max_established(Some(cfg.max_connections))
        .with_max_established_per_peer(Some(cfg.max_connections_per_peer))
        .with_max_pending_incoming(Some(64))
        .with_max_pending_outgoing(Some(64));
    let swarm = libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_quic()
        .with_other_transport(|key| {
            // TCP as `with_tcp` builds it, but read through a buffer: noise reads the
            // socket 8 KiB at a time, so a bulk transfer made 128 reads per MiB, each of
            // which acknowledges data back to the sender.
            use libp2p::Transport as _;
            let noise = noise::Config::new(key)?;
            let tcp = tcp::tokio::Transport::new(tcp::Config::default().nodelay(true));
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
                libp2p::Transport::map(tcp, |conn, _| {
                    futures::io::BufReader::with_capacity(TCP_READ_BUFFER, conn)
                })
                .upgrade(libp2p::core::upgrade::Version::V1Lazy)
                .authenticate(noise)
                .multiplex(mux::Yamux::new(64)),
            )
        })
        .map_err(|e| anyhow::anyhow!("building the TCP transport: {e}"))?
        .with_relay_client(noise::Config::new, yamux::Config::default)?
        .with_behaviour(|key, relay_client| {
            let id = key.public().to_peer_id();
            let mut kad_cfg = kad::Config::new(KAD_PROTOCOL);
            kad_cfg.set_query_timeout(Duration::from_secs(30));
            let mut kad =
                kad::Behaviour::with_config(id, kad::store::MemoryStore::new(id), kad_cfg);
            // Loopback and LAN addresses are real here: always answer DHT queries.
            kad.set_mode(Some(kad::Mode::Server));
            let mdns = if mdns_on {
                Some(mdns::tokio::Behaviour::new(mdns::Config::default(), id)?)
            } else {
                None
            };
            Ok(Behaviour {
                limits: connection_limits::Behaviour::new(limits),
                identify: identify::Behaviour::new(
                    identify::Config::new("/pollen/id/1".into(), key.public())
                        .with_agent_version(format!("pollen/{}", env!("CARGO_PKG_VERSION"))),
                ),
                ping: ping::Behaviour::new(ping::Config::new()),
                mdns: mdns.into(),
                kad,
                autonat: autonat::Behaviour::new(id, autonat::Config::default()),
                relay_server: relay_on
                    .then(|| relay::Behaviour::new(id, relay_cfg))
                    .into(),
                relay_client,
                dcutr: dcutr::Behaviour::new(id),
                stream: libp2p_stream::Behaviour::new(),
            })
        })
        .map_err(|e| anyhow::anyhow!("building behaviours: {e}"))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(120)))
        .build();
    Ok(swarm)
}

/// A shared token bucket: `acquire(n)` waits until `n` bytes fit the rate.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    state: tokio::sync::Mutex<(f64, tokio::time::Instant)>,
}

impl RateLimiter {
    /// A limiter of `bytes_per_sec`, or None for 0 (unlimited).
    pub fn new(bytes_per_sec: u64) -> Option<Arc<Self>> {
        (bytes_per_sec > 0).then(|| {
            Arc::new(RateLimiter {
                rate: bytes_per_sec as f64,
                state: tokio::sync::Mutex::new((
                    bytes_per_sec as f64 / 10.0,
                    tokio::time::Instant::now(),
                )),
            })
        })
    }

    /// Take `n` bytes from the bucket, sleeping while it is in debt. Users queue on the
    /// lock, so the limit holds across every task sharing the limiter.
    pub async fn acquire(&self, n: usize) {
        let mut st = self.state.lock().await;
        let now = tokio::time::Instant::now();
        let burst = self.rate / 10.0;
        st.0 = (st.0 + (now - st.1).as_secs_f64() * self.rate).min(burst);
        st.1 = now;
        st.0 -= n as f64;
        if st.0 < 0.0 {
            tokio::time::sleep(Duration::from_secs_f64(-st.0 / self.rate)).await;
        }
    }
}

/// Events from the per-peer stream tasks to the actor.
#[derive(Debug)]
pub enum NetEvent {
    /// The peer's first frame.
    Hello {
        /// Peer.
        peer: PeerId,
        /// What it said.
        hello: Hello,
        /// The reader task it came from (see [`ReaderShared::next_reader`]).
        reader: u64,
    },
    /// A control message.
    Message {
        /// Peer.
        peer: PeerId,
        /// Message.
        msg: Message,
        /// Its frame's share of the frame budget, held until the actor handled it.
        bytes: FrameBytes,
    },
    /// A chunk frame: header, and the frame whose bytes from `offset` are the chunk.
    Chunk {
        /// Peer.
        peer: PeerId,
        /// Header.
        header: ChunkHeader,
        /// The whole frame body.
        frame: FrameBuf,
        /// Where the chunk bytes start.
        offset: usize,
        /// The frame's share of the frame budget, held until the chunk is written.
        bytes: FrameBytes,
    },
    /// The peer broke the protocol (oversized or malformed frame).
    Malformed {
        /// Peer.
        peer: PeerId,
        /// What was wrong.
        error: String,
    },
    /// Our outbound stream to the peer is open.
    OutboundReady {
        /// Peer.
        peer: PeerId,
        /// Its sender.
        sender: PeerSender,
        /// Generation of the connection record it was opened for.
        generation: u64,
    },
    /// A stream ended.
    StreamClosed {
        /// Peer.
        peer: PeerId,
        /// For our outbound stream: the generation of the connection record it served
        /// (a stale writer's close must not tear down a newer connection).
        writer_gen: Option<u64>,
        /// For the peer's inbound stream: its reader (a stale reader's close must not
        /// tear down a newer connection either).
        reader: Option<u64>,
    },
}

/// Something for a peer's writer.
#[derive(Debug)]
pub enum Out {
    /// A frame body (kind + payload).
    Frame(Vec<u8>),
    /// Drop a queued chunk upload.
    Cancel(u64),
}

/// A chunk to upload.
#[derive(Debug)]
pub struct ChunkJob {
    /// Request id.
    pub id: u64,
    /// The file's spec.
    pub spec: Arc<FileSpec>,
    /// Chunk index.
    pub index: u32,
    /// Counted among the uploads waiting until the writer starts it.
    pub waiting: Waiting,
}

/// A chunk upload counted in a shared count of uploads not started yet, until dropped:
/// when its writer starts it, or when it is cancelled or its peer's writer ends.
#[derive(Debug)]
pub struct Waiting(Arc<AtomicUsize>);

impl Waiting {
    /// Count one more upload waiting in `count`.
    pub fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Waiting(count.clone())
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The actor's handle on a peer's writer task.
#[derive(Clone, Debug)]
pub struct PeerSender {
    /// Control frames and cancels (send frames with [`PeerSender::send_frame`]).
    pub control: mpsc::Sender<Out>,
    /// Chunk uploads.
    pub chunks: mpsc::Sender<ChunkJob>,
    /// Is the peer on our site (set once its Hello is known).
    pub same_site: Arc<AtomicBool>,
    /// Bytes of control frames queued and not yet written.
    queued: Arc<AtomicUsize>,
}

impl PeerSender {
    /// Queue a control frame for the writer. Returns false, dropping the frame, when the
    /// queue holds [`CONTROL_QUEUE`] frames, or when the frame is over [`SMALL_FRAME`]
    /// bytes and would take the queue past [`CONTROL_BYTES`], or when the writer is gone.
    pub fn send_frame(&self, frame: Vec<u8>) -> bool {
        let len = frame.len();
        // Only the actor adds, so the check and the add cannot race with another add.
        if len > SMALL_FRAME && self.queued.load(Ordering::Relaxed) + len > CONTROL_BYTES {
            return false;
        }
        self.queued.fetch_add(len, Ordering::Relaxed);
        if self.control.try_send(Out::Frame(frame)).is_err() {
            self.queued.fetch_sub(len, Ordering::Relaxed);
            return false;
        }
        true
    }
}

/// What the writer tasks share.
#[derive(Clone, Debug)]
pub struct WriterShared {
    /// Store for reading chunks.
    pub store: Arc<Store>,
    /// Cap on uploads in progress.
    pub uploads: Arc<Semaphore>,
    /// Uploads queued and not started ([`Waiting`]).
    pub waiting: Arc<AtomicUsize>,
    /// Upload limiter.
    pub limiter: Option<Arc<RateLimiter>>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Test only: corrupt every chunk sent.
    pub corrupt: bool,
    /// Buffers for chunk frames, taken for each upload and given back once it is written
    /// (shared with the readers: what is idle stays within [`buf::POOL_BYTES`]).
    pub pool: Arc<BufPool>,
}

fn class(same: &AtomicBool) -> PeerClass {
    if same.load(Ordering::Relaxed) {
        PeerClass::SameSite
    } else {
        PeerClass::Other
    }
}

/// A frame not written within this long means the peer stopped reading: the stream is
/// closed (so it cannot hold an upload slot or the control queue forever).
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// Where an upload buffer's chunk bytes start: room for the frame's length (4 bytes), kind
/// and largest header in front of them.
const UPLOAD_HEAD: usize = 4 + 1 + wire::MAX_CHUNK_HEADER;

/// Put the length and header of a chunk frame in front of the `len` chunk bytes at
/// `buf[UPLOAD_HEAD..]`; returns the whole frame, length prefix included.
fn chunk_frame_in<'a>(buf: &'a mut [u8], header: &ChunkHeader, len: usize) -> &'a [u8] {
    let prefix = wire::encode_chunk_prefix(header);
    let start = UPLOAD_HEAD - prefix.len() - 4;
    buf[start..start + 4].copy_from_slice(&((prefix.len() + len) as u32).to_be_bytes());
    buf[start + 4..UPLOAD_HEAD].copy_from_slice(&prefix);
    &buf[start..UPLOAD_HEAD + len]
}

/// Write a whole frame (its length prefix included) and flush.
async fn write_raw(stream: &mut libp2p::Stream, frame: &[u8]) -> std::io::Result<usize> {
    let write = async {
        stream.write_all(frame).await?;
        stream.flush().await?;
        Ok(frame.len())
    };
    match tokio::time::timeout(WRITE_TIMEOUT, write).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "peer stopped reading",
        )),
    }
}

/// Write a frame body (length-prefixed here) in one write: each write to a yamux stream
/// becomes at least one yamux frame, so the 4-byte length is not written on its own.
async fn write_frame(stream: &mut libp2p::Stream, body: &[u8]) -> std::io::Result<usize> {
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(body);
    write_raw(stream, &frame).await
}

/// Tell the actor that the writer of connection record `generation` ended.
async fn closed(events: &mpsc::Sender<NetEvent>, peer: PeerId, generation: u64) {
    let _ = events
        .send(NetEvent::StreamClosed {
            peer,
            writer_gen: Some(generation),
            reader: None,
        })
        .await;
}

/// Open our stream to `peer`, send `hello`, and run the writer until the actor drops the
/// sender or the stream fails. Reports `OutboundReady` then `StreamClosed`; reports nothing
/// if `peer` does not speak the protocol (the actor's Hello timeout disconnects it).
pub async fn run_writer(
    mut control: libp2p_stream::Control,
    peer: PeerId,
    hello: Hello,
    shared: WriterShared,
    events: mpsc::Sender<NetEvent>,
    generation: u64,
) {
    let mut stream = match tokio::time::timeout(
        Duration::from_secs(20),
        control.open_stream(peer, PROTOCOL_ID),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(libp2p_stream::OpenStreamError::UnsupportedProtocol(_))) => {
            // A plain libp2p peer (a DHT client, a crawler): it may still be using the
            // node's Kademlia or identify. Its connection is left to the actor's Hello
            // timeout instead of being cut while its queries are in flight.
            tracing::debug!(%peer, "does not speak {PROTOCOL_ID}");
            return;
        }
        Ok(Err(e)) => {
            tracing::debug!(%peer, "cannot open pollen stream: {e}");
            closed(&events, peer, generation).await;
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "opening pollen stream timed out");
            closed(&events, peer, generation).await;
            return;
        }
    };
    if write_frame(&mut stream, &Message::Hello(hello).encode())
        .await
        .is_err()
    {
        closed(&events, peer, generation).await;
        return;
    }
    let (ctx, mut crx) = mpsc::channel(CONTROL_QUEUE);
    let (jtx, mut jrx) = mpsc::channel::<ChunkJob>(CHUNK_QUEUE);
    let same_site = Arc::new(AtomicBool::new(false));
    let queued = Arc::new(AtomicUsize::new(0));
    let sender = PeerSender {
        control: ctx,
        chunks: jtx,
        same_site: same_site.clone(),
        queued: queued.clone(),
    };
    if events
        .send(NetEvent::OutboundReady {
            peer,
            sender,
            generation,
        })
        .await
        .is_err()
    {
        return;
    }
    let mut cancelled: BTreeSet<u64> = BTreeSet::new();
    let result: std::io::Result<()> = async {
        loop {
            tokio::select! {
                biased;
                out = crx.recv() => match out {
                    None => return Ok(()),
                    Some(Out::Frame(f)) => {
                        let written = write_frame(&mut stream, &f).await;
                        queued.fetch_sub(f.len(), Ordering::Relaxed);
                        shared.metrics.bytes_out(class(&same_site), written? as u64);
                    }
                    Some(Out::Cancel(id)) => {
                        if cancelled.len() >= 1024 {
                            cancelled.pop_first();
                        }
                        cancelled.insert(id);
                    }
                },
                job = jrx.recv() => match job {
                    None => return Ok(()),
                    Some(job) => {
                        if cancelled.remove(&job.id) {
                            continue;
                        }
                        let Ok(_permit) = shared.uploads.clone().acquire_owned().await else { return Ok(()) };
                        drop(job.waiting);
                        let store = shared.store.clone();
                        let spec = job.spec.clone();
                        let index = job.index;
                        // The chunk is read into a pooled buffer at `UPLOAD_HEAD`, the
                        // frame's length and header go in front, and the frame leaves in
                        // one write (pages used before; no small writes for the header).
                        let chunk_len = job.spec.chunk_len(u64::from(index)).unwrap_or(0) as usize;
                        let mut buf = shared.pool.take(UPLOAD_HEAD + chunk_len);
                        let read = tokio::task::spawn_blocking(move || {
                            let r = store.read_chunk_into(&spec, index, &mut buf, UPLOAD_HEAD);
                            (r, buf)
                        })
                        .await;
                        let (len, mut upload) = match read {
                            Ok((Ok(len), buf)) => (len, buf),
                            Ok((Err(e), buf)) => {
                                shared.pool.give(buf);
                                tracing::warn!(%peer, "cannot read chunk {index} of {}: {e}", job.spec.content_id.short());
                                continue;
                            }
                            Err(e) => {
                                tracing::warn!("chunk read task failed: {e}");
                                continue;
                            }
                        };
                        if shared.corrupt && len > 0 {
                            upload[UPLOAD_HEAD] ^= 0xff;
                        }
                        if let Some(l) = &shared.limiter {
                            l.acquire(len).await;
                        }
                        let header = ChunkHeader { id: job.id, file: job.spec.content_id, index };
                        let frame = chunk_frame_in(&mut upload, &header, len);
                        let n = write_raw(&mut stream, frame).await?;
                        shared.pool.give(upload);
                        shared.metrics.bytes_out(class(&same_site), n as u64);
                        shared.metrics.chunks_uploaded.fetch_add(1, Ordering::Relaxed);
                    }
                },
            }
        }
    }
    .await;
    if let Err(e) = result {
        tracing::debug!(%peer, "pollen stream write failed: {e}");
    }
    let _ = stream.close().await;
    closed(&events, peer, generation).await;
}

/// Largest first frame on an inbound stream, which must be the peer's Hello. A Hello is a
/// site name of at most 64 bytes and a node certificate (a body of about 190 bytes with a
/// label of at most 128, and at most 16 signatures of 96 bytes): under 2 KiB encoded
/// (checked by a test); the cap leaves twice that.
pub const MAX_HELLO_FRAME: usize = 4096;
/// Frame bytes all readers together may hold: bodies being read, and frames handed to the
/// actor until it is done with them (a chunk until it is written). Sixteen of the largest
/// chunk frames at once; past it, readers wait (the peers' yamux windows then fill).
pub const FRAME_BUDGET: usize = 256 << 20;
/// A frame's buffer starts at this size (or the frame's length, if smaller) and doubles as
/// bytes arrive, never beyond the length the peer claimed.
const FIRST_ALLOC: usize = 64 << 10;
/// Most bytes zeroed ahead of the bytes received (safe Rust reads into initialised memory).
const READ_PIECE: usize = 64 << 10;

/// How long a peer may take to send what it starts sending on its stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadDeadlines {
    /// From the stream's arrival to the end of its first frame (the Hello). Honest peers
    /// write their Hello as soon as the stream is open.
    pub hello: Duration,
    /// A later frame must be whole `grace + length / min_rate` after its first byte, and
    /// no two of its reads may be more than `grace` apart (a stalled peer). There is no
    /// limit on the wait for that first byte: a quiet peer is not a stalled one.
    pub grace: Duration,
    /// Bytes per second (see `grace`).
    pub min_rate: u64,
}
// A frame's deadline runs on while its reader waits for the frame budget: that ends the
// standoff in which every reader holds part of the budget and waits for more.

impl ReadDeadlines {
    /// The defaults: 10 s for the Hello; `grace` the core's chunk request timeout, so a
    /// chunk that answers a request in time always meets its deadline; a minimum rate of
    /// 16 KiB/s on top. A frame's buffer grows only as its bytes arrive, so a slow frame
    /// holds little of the budget and the rate can be low: a 1 MiB chunk frame may take
    /// 94 s, enough for one of several connections sharing a 2 Mbit/s uplink with 5% loss
    /// (the core stretches its request deadlines on such links too); a stalled one is cut
    /// after `grace` without a byte.
    pub fn new(request_timeout: Duration) -> Self {
        ReadDeadlines {
            hello: Duration::from_secs(10),
            grace: request_timeout,
            min_rate: 16 << 10,
        }
    }

    /// How long a frame of `len` bytes may take from its first byte.
    pub fn frame(&self, len: usize) -> Duration {
        self.grace + Duration::from_secs_f64(len as f64 / self.min_rate.max(1) as f64)
    }
}

/// What every reader task shares.
#[derive(Clone, Debug)]
pub struct ReaderShared {
    /// Where frames go.
    pub events: mpsc::Sender<NetEvent>,
    /// Download limiter.
    pub limiter: Option<Arc<RateLimiter>>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// This node's site (to class the bytes received).
    pub my_site: Option<String>,
    /// Deadlines.
    pub deadlines: ReadDeadlines,
    /// The global budget of frame bytes, in permits of one byte (see [`FRAME_BUDGET`]).
    pub budget: Arc<Semaphore>,
    /// Inbound pollen streams read at once per peer.
    pub streams_per_peer: usize,
    /// Peers with inbound pollen streams at once.
    pub max_peers: usize,
    /// Numbers the reader tasks, so the actor can tell a stream's reader from an older
    /// one of the same peer.
    pub next_reader: Arc<AtomicU64>,
    /// Buffers for large frames, reused once the frame is dropped.
    pub pool: Arc<BufPool>,
}

impl ReaderShared {
    /// Readers for a node with `max_connections` connections in all and
    /// `max_connections_per_peer` per peer. A peer writes on one stream of its own per
    /// connection record; one more per peer lets a reconnecting peer in while the stream
    /// of its old connection is still being torn down. `pool` is the node's one pool of
    /// chunk-sized buffers, shared with the writers ([`WriterShared::pool`]).
    pub fn new(
        events: mpsc::Sender<NetEvent>,
        metrics: Arc<Metrics>,
        cfg: &NodeConfig,
        deadlines: ReadDeadlines,
        pool: Arc<BufPool>,
    ) -> Self {
        ReaderShared {
            events,
            limiter: RateLimiter::new(cfg.download_limit),
            metrics,
            my_site: cfg.site.clone(),
            deadlines,
            budget: Arc::new(Semaphore::new(FRAME_BUDGET)),
            streams_per_peer: cfg.max_connections_per_peer as usize + 1,
            max_peers: cfg.max_connections.max(1) as usize,
            next_reader: Arc::new(AtomicU64::new(0)),
            pool,
        }
    }
}

/// Frame bytes taken from the global budget; given back when dropped.
#[derive(Debug)]
pub struct FrameBytes {
    _permit: OwnedSemaphorePermit,
}

/// Why a reader stopped.
#[derive(Debug, PartialEq, Eq)]
enum ReadEnd {
    /// The stream ended or failed, or the actor is gone.
    Closed,
    /// The peer broke the protocol.
    Malformed(String),
    /// The Hello or a frame did not arrive in time.
    TimedOut(&'static str),
}

fn io_end(e: std::io::Error) -> ReadEnd {
    tracing::trace!("pollen stream read: {e}");
    ReadEnd::Closed
}

/// Read `len` bytes of frame body (kind byte first, given) into a buffer whose bytes are
/// taken from `budget` as they arrive (doubling from [`FIRST_ALLOC`]). A frame of
/// [`buf::POOLED_MIN`] bytes or more is read into a buffer from `pool`, whose bytes from
/// an earlier frame are read over without being zeroed again.
async fn read_body<S: AsyncRead + Unpin>(
    stream: &mut S,
    kind: u8,
    len: usize,
    budget: &Arc<Semaphore>,
    stall: Duration,
    pool: &Arc<BufPool>,
) -> Result<(FrameBuf, FrameBytes), ReadEnd> {
    let take = |n: usize| {
        let budget = budget.clone();
        async move {
            // The budget is never closed; each request is at most one frame (u32 length).
            budget
                .acquire_many_owned(n as u32)
                .await
                .map_err(|_| ReadEnd::Closed)
        }
    };
    let first = len.min(FIRST_ALLOC);
    let mut permit = take(first).await?;
    let mut allowed = first;
    let pooled = (len >= buf::POOLED_MIN).then(|| pool.clone());
    let mut buf = match &pooled {
        Some(pool) => pool.take(len),
        None => Vec::with_capacity(first),
    };
    // `buf[..buf.len()]` is initialised: read over it; zero only past it.
    match buf.first_mut() {
        Some(b) => *b = kind,
        None => buf.push(kind),
    }
    let mut filled = 1;
    while filled < len {
        if filled == allowed {
            let target = (allowed * 2).min(len);
            permit.merge(take(target - allowed).await?);
            allowed = target;
        }
        if filled >= buf.len() {
            if buf.capacity() < allowed {
                buf.reserve_exact(allowed - buf.len());
            }
            buf.resize((filled + READ_PIECE).min(allowed), 0);
        }
        let upto = buf.len().min(allowed);
        let n = tokio::time::timeout(stall, stream.read(&mut buf[filled..upto]))
            .await
            .map_err(|_| ReadEnd::TimedOut("frame"))?
            .map_err(io_end)?;
        if n == 0 {
            return Err(ReadEnd::Closed);
        }
        filled += n;
    }
    Ok((
        FrameBuf::new(buf, len, pooled),
        FrameBytes { _permit: permit },
    ))
}

/// Read one frame: header and body. The first frame of a stream must be whole by
/// `hello_by` and at most [`MAX_HELLO_FRAME`]; a later one may take as long as it likes to
/// start, then gets [`ReadDeadlines::frame`] from its first byte.
async fn read_frame<S: AsyncRead + Unpin>(
    stream: &mut S,
    shared: &ReaderShared,
    hello_by: Option<tokio::time::Instant>,
) -> Result<(FrameBuf, FrameBytes), ReadEnd> {
    let mut head = [0u8; 5];
    let mut read = 0;
    if hello_by.is_none() {
        stream.read_exact(&mut head[..1]).await.map_err(io_end)?;
        read = 1;
    }
    let started = tokio::time::Instant::now();
    // Until its length is known, a frame gets the grace alone.
    let header_by = hello_by.unwrap_or(started + shared.deadlines.grace);
    let what = if hello_by.is_some() { "Hello" } else { "frame" };
    match tokio::time::timeout_at(header_by, stream.read_exact(&mut head[read..])).await {
        Ok(r) => r.map_err(io_end)?,
        Err(_) => return Err(ReadEnd::TimedOut(what)),
    }
    let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
    let kind = head[4];
    let cap = match hello_by {
        Some(_) => MAX_HELLO_FRAME,
        None => frame_cap(kind),
    };
    if len == 0 || len > cap {
        return Err(ReadEnd::Malformed(format!(
            "{what} frame of {len} bytes (kind {kind:#x}) exceeds its cap of {cap}"
        )));
    }
    let body_by = hello_by.unwrap_or(started + shared.deadlines.frame(len));
    let stall = shared.deadlines.grace;
    let body = read_body(stream, kind, len, &shared.budget, stall, &shared.pool);
    tokio::time::timeout_at(body_by, body)
        .await
        .unwrap_or(Err(ReadEnd::TimedOut(what)))
}

/// Read frames from a peer's stream and hand them to the actor, until the stream ends,
/// the peer breaks the protocol or misses a deadline.
async fn read_frames<S: AsyncRead + Unpin>(
    peer: PeerId,
    reader: u64,
    stream: &mut S,
    shared: &ReaderShared,
) -> ReadEnd {
    let hello_by = tokio::time::Instant::now() + shared.deadlines.hello;
    let mut first = true;
    let mut same = PeerClass::Other;
    loop {
        let (frame, bytes) = match read_frame(stream, shared, first.then_some(hello_by)).await {
            Ok(f) => f,
            Err(end) => return end,
        };
        let len = frame.len();
        shared.metrics.bytes_in(same, 4 + len as u64);
        if frame[0] == KIND_CHUNK
            && let Some(l) = &shared.limiter
        {
            l.acquire(len).await;
        }
        let event = match wire::decode_frame(&frame) {
            Err(e) => return ReadEnd::Malformed(e.to_string()),
            Ok(Frame::Control(Message::Hello(hello))) if first => {
                if shared.my_site.is_some() && hello.site == shared.my_site {
                    same = PeerClass::SameSite;
                }
                NetEvent::Hello {
                    peer,
                    hello,
                    reader,
                }
            }
            Ok(_) if first => return ReadEnd::Malformed("the first frame must be a Hello".into()),
            Ok(Frame::Chunk(header, data)) => {
                let offset = len - data.len();
                NetEvent::Chunk {
                    peer,
                    header,
                    frame,
                    offset,
                    bytes,
                }
            }
            Ok(Frame::Control(msg)) => NetEvent::Message { peer, msg, bytes },
        };
        first = false;
        if shared.events.send(event).await.is_err() {
            return ReadEnd::Closed;
        }
    }
}

/// Read a peer's inbound stream until it ends; `slot` is its place in the per-peer count,
/// given back before the actor hears that the stream closed.
async fn run_reader(
    peer: PeerId,
    mut stream: libp2p::Stream,
    shared: ReaderShared,
    slot: StreamSlot,
) {
    let reader = shared.next_reader.fetch_add(1, Ordering::Relaxed);
    match read_frames(peer, reader, &mut stream, &shared).await {
        ReadEnd::Closed => {}
        ReadEnd::Malformed(error) => {
            let _ = shared
                .events
                .send(NetEvent::Malformed { peer, error })
                .await;
        }
        ReadEnd::TimedOut(what) => {
            tracing::debug!(%peer, "{what} not received in time: closing the pollen stream");
            shared
                .metrics
                .streams_timed_out
                .fetch_add(1, Ordering::Relaxed);
        }
    }
    // Closing sends a FIN; a peer that no longer reads must not hold the task.
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.close()).await;
    drop(slot);
    let _ = shared
        .events
        .send(NetEvent::StreamClosed {
            peer,
            writer_gen: None,
            reader: Some(reader),
        })
        .await;
}

/// Inbound pollen streams being read, per peer (at most [`ReaderShared::max_peers`]
/// entries, each at most [`ReaderShared::streams_per_peer`]).
type StreamCounts = Arc<std::sync::Mutex<BTreeMap<PeerId, usize>>>;

/// A reader's place in [`StreamCounts`]; dropping it gives the place back.
#[derive(Debug)]
struct StreamSlot {
    counts: StreamCounts,
    peer: PeerId,
}

impl StreamSlot {
    /// A place for one more stream of `peer`, if it has fewer than `per_peer` and, for a
    /// peer with none yet, fewer than `max_peers` peers have streams.
    fn take(
        counts: &StreamCounts,
        peer: PeerId,
        per_peer: usize,
        max_peers: usize,
    ) -> Option<Self> {
        let mut m = counts.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.get(&peer).copied().unwrap_or(0);
        if n >= per_peer || (n == 0 && m.len() >= max_peers) {
            return None;
        }
        m.insert(peer, n + 1);
        Some(StreamSlot {
            counts: counts.clone(),
            peer,
        })
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut m = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.peer);
            }
        }
    }
}

/// Accept inbound pollen streams and start a reader for each, up to
/// [`ReaderShared::streams_per_peer`] per peer; further ones are closed at once.
pub async fn run_acceptor(mut control: libp2p_stream::Control, shared: ReaderShared) -> Result<()> {
    let mut incoming = control
        .accept(PROTOCOL_ID)
        .context("pollen protocol already registered")?;
    let counts = StreamCounts::default();
    while let Some((peer, stream)) = incoming.next().await {
        match StreamSlot::take(&counts, peer, shared.streams_per_peer, shared.max_peers) {
            Some(slot) => {
                tokio::spawn(run_reader(peer, stream, shared.clone(), slot));
            }
            None => {
                tracing::debug!(%peer, "too many inbound pollen streams: closing one more");
                shared
                    .metrics
                    .streams_refused
                    .fetch_add(1, Ordering::Relaxed);
                drop(stream);
            }
        }
    }
    Ok(())
}

/// The content id a chunk event is about (for logs).
pub fn short(c: &ContentId) -> String {
    c.short()
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::TryStreamExt;
    use futures::channel::mpsc as fmpsc;
    use pollen_protocol::signing::Signed;
    use pollen_protocol::trust::NodeCertBody;
    use std::time::Instant;

    /// An upload counts as waiting from its queuing until its ticket is dropped (started,
    /// cancelled, or its writer gone with the queue), so the Busy rule never sees a
    /// count that only grows.
    #[test]
    fn waiting_uploads_are_counted_until_their_ticket_drops() {
        let count = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = mpsc::channel::<Waiting>(4);
        let a = Waiting::new(&count);
        tx.try_send(Waiting::new(&count)).unwrap();
        tx.try_send(Waiting::new(&count)).unwrap();
        assert_eq!(count.load(Ordering::Relaxed), 3);
        drop(a);
        assert_eq!(count.load(Ordering::Relaxed), 2);
        // A writer that ends drops what its queue still holds.
        drop(rx);
        assert_eq!(count.load(Ordering::Relaxed), 0);
        drop(tx);
    }

    type Feed = fmpsc::UnboundedSender<std::io::Result<Vec<u8>>>;

    /// A stream whose bytes the test sends, as they would arrive from a peer.
    fn stream() -> (Feed, impl AsyncRead + Unpin) {
        let (tx, rx) = fmpsc::unbounded();
        (tx, rx.into_async_read())
    }

    /// `f`, or a test failure after 5 s (rather than a hang).
    async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(5), f)
            .await
            .expect("no answer in 5 s")
    }

    fn hello() -> Vec<u8> {
        wire::length_prefixed(
            &Message::Hello(Hello {
                site: None,
                cert: None,
            })
            .encode(),
        )
    }

    fn shared(deadlines: ReadDeadlines, budget: usize) -> (ReaderShared, mpsc::Receiver<NetEvent>) {
        let (events, rx) = mpsc::channel(16);
        let s = ReaderShared {
            events,
            limiter: None,
            metrics: Arc::new(Metrics::default()),
            my_site: None,
            deadlines,
            budget: Arc::new(Semaphore::new(budget)),
            streams_per_peer: 3,
            max_peers: 2,
            next_reader: Arc::new(AtomicU64::new(0)),
            pool: BufPool::new(),
        };
        (s, rx)
    }

    /// A reader task on a test stream, once it has handed the peer's Hello to the actor:
    /// the stream's feed and the task.
    async fn reader_past_hello(
        s: ReaderShared,
        rx: &mut mpsc::Receiver<NetEvent>,
    ) -> (Feed, tokio::task::JoinHandle<ReadEnd>) {
        let (tx, mut st) = stream();
        tx.unbounded_send(Ok(hello())).unwrap();
        let reader =
            tokio::spawn(async move { read_frames(PeerId::random(), 0, &mut st, &s).await });
        assert!(matches!(
            within(rx.recv()).await,
            Some(NetEvent::Hello { .. })
        ));
        (tx, reader)
    }

    fn quick() -> ReadDeadlines {
        ReadDeadlines {
            hello: Duration::from_millis(200),
            grace: Duration::from_millis(200),
            min_rate: u64::MAX,
        }
    }

    #[test]
    fn the_largest_honest_hello_fits_its_cap_twice() {
        let keys: Vec<_> = (0..pollen_protocol::signing::MAX_SIGNATURES as u8)
            .map(|i| pollen_protocol::SigningKey::from_bytes(&[i + 1; 32]))
            .collect();
        let body = NodeCertBody {
            node: NodeId([7; 32]),
            issued: pollen_protocol::UnixTime(u64::MAX - 1),
            expires: pollen_protocol::UnixTime(u64::MAX),
            label: "l".repeat(128),
        };
        let cert = Signed::sign(&body, &keys.iter().collect::<Vec<_>>());
        let h = Message::Hello(Hello {
            site: Some("s".repeat(64)),
            cert: Some(cert),
        });
        let len = h.encode().len();
        assert!(2 * len <= MAX_HELLO_FRAME, "{len}");
    }

    #[tokio::test]
    async fn the_first_frame_must_be_a_small_hello() {
        let peer = PeerId::random();
        let (s, _rx) = shared(quick(), FRAME_BUDGET);
        // A claim past the Hello cap is refused at once, before any body byte.
        let (tx, mut st) = stream();
        tx.unbounded_send(Ok(vec![0, 0x10, 0, 0, 0x01])).unwrap();
        let end = within(read_frames(peer, 0, &mut st, &s)).await;
        assert!(
            matches!(&end, ReadEnd::Malformed(e) if e.contains("exceeds")),
            "{end:?}"
        );
        // Any other message first, or a chunk frame, is refused too.
        let chunk = wire::encode_chunk_frame(
            &ChunkHeader {
                id: 1,
                file: ContentId([0; 32]),
                index: 0,
            },
            b"x",
        );
        for first in [
            wire::length_prefixed(&Message::Cancel { id: 1 }.encode()),
            wire::length_prefixed(&chunk),
        ] {
            let (tx, mut st) = stream();
            tx.unbounded_send(Ok(first)).unwrap();
            let end = within(read_frames(peer, 0, &mut st, &s)).await;
            assert_eq!(
                end,
                ReadEnd::Malformed("the first frame must be a Hello".into())
            );
        }
    }

    #[tokio::test]
    async fn a_stream_silent_before_its_hello_is_closed() {
        let (s, _rx) = shared(quick(), FRAME_BUDGET);
        let (_tx, mut st) = stream();
        let t = Instant::now();
        assert_eq!(
            within(read_frames(PeerId::random(), 0, &mut st, &s)).await,
            ReadEnd::TimedOut("Hello")
        );
        assert!(t.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn a_stalled_frame_is_closed_and_gives_its_budget_back() {
        let (s, mut rx) = shared(quick(), FRAME_BUDGET);
        let (tx, mut st) = stream();
        tx.unbounded_send(Ok(hello())).unwrap();
        let mut claim = (wire::MAX_CHUNK_FRAME as u32).to_be_bytes().to_vec();
        claim.push(KIND_CHUNK);
        tx.unbounded_send(Ok(claim)).unwrap();
        tx.unbounded_send(Ok(vec![0; 300 << 10])).unwrap();
        let budget = s.budget.clone();
        let reader =
            tokio::spawn(async move { read_frames(PeerId::random(), 0, &mut st, &s).await });
        assert!(matches!(
            within(rx.recv()).await,
            Some(NetEvent::Hello { .. })
        ));
        // The buffer follows the bytes received (300 KiB), not the 16 MiB claimed.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let held = FRAME_BUDGET - budget.available_permits();
        assert!((300 << 10..=600 << 10).contains(&held), "{held}");
        assert_eq!(within(reader).await.unwrap(), ReadEnd::TimedOut("frame"));
        assert_eq!(budget.available_permits(), FRAME_BUDGET);
        drop(tx);
    }

    /// A frame that arrives slowly but steadily is read whole, past the grace alone; one
    /// whose bytes stop for longer than the grace is cut though its rate deadline is far.
    #[tokio::test]
    async fn a_slow_frame_is_read_and_a_stalled_one_cut_before_its_rate_deadline() {
        let deadlines = ReadDeadlines {
            hello: Duration::from_millis(200),
            grace: Duration::from_millis(300),
            min_rate: 16 << 10,
        };
        let chunk = wire::encode_chunk_frame(
            &ChunkHeader {
                id: 1,
                file: ContentId([0; 32]),
                index: 0,
            },
            &vec![7; 64 << 10],
        );
        let framed_chunk = wire::length_prefixed(&chunk);
        for stalled in [false, true] {
            let (s, mut rx) = shared(deadlines, FRAME_BUDGET);
            let (tx, reader) = reader_past_hello(s, &mut rx).await;
            // 64 KiB in 16 pieces 60 ms apart: about 1 s, past the grace (0.3 s), inside
            // grace + length / rate (4.3 s). Stalled: 0.5 s without a byte halfway.
            let t = Instant::now();
            for (k, piece) in framed_chunk.chunks(framed_chunk.len() / 16 + 1).enumerate() {
                if stalled && k == 8 {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    break;
                }
                tx.unbounded_send(Ok(piece.to_vec())).unwrap();
                tokio::time::sleep(Duration::from_millis(60)).await;
            }
            if stalled {
                assert_eq!(within(reader).await.unwrap(), ReadEnd::TimedOut("frame"));
                assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
            } else {
                assert!(matches!(
                    within(rx.recv()).await,
                    Some(NetEvent::Chunk { .. })
                ));
                assert!(t.elapsed() > deadlines.grace * 2, "{:?}", t.elapsed());
                drop(tx);
                assert_eq!(within(reader).await.unwrap(), ReadEnd::Closed);
            }
        }
    }

    #[tokio::test]
    async fn a_quiet_peer_after_its_hello_is_not_closed() {
        let (s, mut rx) = shared(quick(), FRAME_BUDGET);
        let (tx, reader) = reader_past_hello(s, &mut rx).await;
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(
            !reader.is_finished(),
            "closed a stream with no frame in progress"
        );
        // A frame sent slowly within its deadline is read.
        let f = wire::length_prefixed(&Message::Cancel { id: 9 }.encode());
        tx.unbounded_send(Ok(f[..2].to_vec())).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        tx.unbounded_send(Ok(f[2..].to_vec())).unwrap();
        assert!(matches!(
            within(rx.recv()).await,
            Some(NetEvent::Message {
                msg: Message::Cancel { id: 9 },
                ..
            })
        ));
        drop(tx);
        assert_eq!(within(reader).await.unwrap(), ReadEnd::Closed);
    }

    #[tokio::test]
    async fn frames_hold_the_budget_until_handled_and_readers_wait_for_it() {
        let chunk = wire::length_prefixed(&wire::encode_chunk_frame(
            &ChunkHeader {
                id: 1,
                file: ContentId([0; 32]),
                index: 0,
            },
            &vec![0; 1 << 20],
        ));
        // Room for one chunk frame and the first piece of another.
        let budget = chunk.len() - 4 + FIRST_ALLOC;
        let deadlines = ReadDeadlines {
            grace: Duration::from_secs(5),
            ..quick()
        };
        let (s, mut rx) = shared(deadlines, budget);
        let mut feeds = Vec::new();
        let mut readers = Vec::new();
        for _ in 0..2 {
            let (tx, mut st) = stream();
            tx.unbounded_send(Ok(hello())).unwrap();
            let s = s.clone();
            readers.push(tokio::spawn(async move {
                read_frames(PeerId::random(), 0, &mut st, &s).await
            }));
            assert!(matches!(
                within(rx.recv()).await,
                Some(NetEvent::Hello { .. })
            ));
            feeds.push(tx);
        }
        feeds[0].unbounded_send(Ok(chunk.clone())).unwrap();
        let Some(NetEvent::Chunk { bytes, .. }) = within(rx.recv()).await else {
            panic!("no chunk")
        };
        // The second frame waits for the budget the first one holds.
        feeds[1].unbounded_send(Ok(chunk.clone())).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            rx.try_recv().is_err(),
            "a second chunk frame past the budget"
        );
        assert_eq!(s.budget.available_permits(), 0);
        drop(bytes);
        assert!(matches!(
            within(rx.recv()).await,
            Some(NetEvent::Chunk { .. })
        ));
        drop(feeds);
        for r in readers {
            assert_eq!(within(r).await.unwrap(), ReadEnd::Closed);
        }
    }

    #[test]
    fn streams_are_counted_per_peer_and_given_back() {
        let counts = StreamCounts::default();
        let (a, b, c) = (PeerId::random(), PeerId::random(), PeerId::random());
        let slots: Vec<_> = (0..3)
            .map(|_| StreamSlot::take(&counts, a, 3, 2).expect("a slot"))
            .collect();
        assert!(
            StreamSlot::take(&counts, a, 3, 2).is_none(),
            "a fourth stream of a"
        );
        let b1 = StreamSlot::take(&counts, b, 3, 2).expect("b's first");
        assert!(StreamSlot::take(&counts, c, 3, 2).is_none(), "a third peer");
        drop(b1);
        assert!(StreamSlot::take(&counts, c, 3, 2).is_some());
        drop(slots);
        assert!(
            StreamSlot::take(&counts, a, 3, 2).is_some(),
            "a reconnecting peer"
        );
        assert!(counts.lock().unwrap().is_empty());
    }

    #[test]
    fn control_queues_are_bounded_in_bytes() {
        let (control, _rx) = mpsc::channel(CONTROL_QUEUE);
        let (chunks, _jrx) = mpsc::channel(1);
        let s = PeerSender {
            control,
            chunks,
            same_site: Arc::default(),
            queued: Arc::default(),
        };
        for _ in 0..CONTROL_BYTES / (1 << 20) {
            assert!(s.send_frame(vec![0; 1 << 20]));
        }
        assert!(
            !s.send_frame(vec![0; SMALL_FRAME + 1]),
            "past the byte budget"
        );
        assert!(
            s.send_frame(vec![0; SMALL_FRAME]),
            "a small frame still goes"
        );
    }
}
