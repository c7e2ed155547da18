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
//! Hashing and disk IO of chunks never run on the async threads: the writer reads chunks
//! with `spawn_blocking`, and received chunks go to the actor, which verifies and writes
//! them on the blocking pool.

use crate::config::NodeConfig;
use crate::metrics::{Metrics, PeerClass};
use crate::store::Store;
use anyhow::{Context, Result};
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
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
use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::{Semaphore, mpsc};

/// Pollen's libp2p protocol id (the wire version is in it).
pub const PROTOCOL_ID: StreamProtocol = StreamProtocol::new(wire::PROTOCOL_ID);
/// Kademlia protocol id: Pollen's own DHT, not the IPFS one.
pub const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/pollen/kad/1.0.0");
/// Control frames queued per peer before further ones are dropped.
pub const CONTROL_QUEUE: usize = 4096;
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

/// Build the swarm.
pub fn build_swarm(key: Keypair, cfg: &NodeConfig) -> Result<Swarm<Behaviour>> {
    let mut yamux_cfg = yamux::Config::default();
    yamux_cfg.set_max_num_streams(64);
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
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            move || yamux_cfg.clone(),
        )?
        .with_quic()
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
    },
    /// A control message.
    Message {
        /// Peer.
        peer: PeerId,
        /// Message.
        msg: Message,
    },
    /// A chunk frame: header, and the frame whose bytes from `offset` are the chunk.
    Chunk {
        /// Peer.
        peer: PeerId,
        /// Header.
        header: ChunkHeader,
        /// The whole frame body.
        frame: Vec<u8>,
        /// Where the chunk bytes start.
        offset: usize,
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
}

/// The actor's handle on a peer's writer task.
#[derive(Clone, Debug)]
pub struct PeerSender {
    /// Control frames and cancels.
    pub control: mpsc::Sender<Out>,
    /// Chunk uploads.
    pub chunks: mpsc::Sender<ChunkJob>,
    /// Is the peer on our site (set once its Hello is known).
    pub same_site: Arc<AtomicBool>,
}

/// What the writer tasks share.
#[derive(Clone, Debug)]
pub struct WriterShared {
    /// Store for reading chunks.
    pub store: Arc<Store>,
    /// Cap on uploads in progress.
    pub uploads: Arc<Semaphore>,
    /// Upload limiter.
    pub limiter: Option<Arc<RateLimiter>>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Test only: corrupt every chunk sent.
    pub corrupt: bool,
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

async fn write_frame(stream: &mut libp2p::Stream, parts: &[&[u8]]) -> std::io::Result<usize> {
    match tokio::time::timeout(WRITE_TIMEOUT, write_frame_inner(stream, parts)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "peer stopped reading",
        )),
    }
}

async fn write_frame_inner(stream: &mut libp2p::Stream, parts: &[&[u8]]) -> std::io::Result<usize> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    stream.write_all(&(len as u32).to_be_bytes()).await?;
    for p in parts {
        stream.write_all(p).await?;
    }
    stream.flush().await?;
    Ok(4 + len)
}

/// Tell the actor that the writer of connection record `generation` ended.
async fn closed(events: &mpsc::Sender<NetEvent>, peer: PeerId, generation: u64) {
    let _ = events
        .send(NetEvent::StreamClosed {
            peer,
            writer_gen: Some(generation),
        })
        .await;
}

/// Open our stream to `peer`, send `hello`, and run the writer until the actor drops the
/// sender or the stream fails. Reports `OutboundReady` then `StreamClosed`.
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
    if write_frame(&mut stream, &[&Message::Hello(hello).encode()])
        .await
        .is_err()
    {
        closed(&events, peer, generation).await;
        return;
    }
    let (ctx, mut crx) = mpsc::channel(CONTROL_QUEUE);
    let (jtx, mut jrx) = mpsc::channel::<ChunkJob>(CHUNK_QUEUE);
    let same_site = Arc::new(AtomicBool::new(false));
    let sender = PeerSender {
        control: ctx,
        chunks: jtx,
        same_site: same_site.clone(),
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
                        let n = write_frame(&mut stream, &[&f]).await?;
                        shared.metrics.bytes_out(class(&same_site), n as u64);
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
                        let store = shared.store.clone();
                        let spec = job.spec.clone();
                        let index = job.index;
                        let data = tokio::task::spawn_blocking(move || store.read_chunk(&spec, index)).await;
                        let mut data = match data {
                            Ok(Ok(d)) => d,
                            Ok(Err(e)) => {
                                tracing::warn!(%peer, "cannot read chunk {index} of {}: {e}", job.spec.content_id.short());
                                continue;
                            }
                            Err(e) => {
                                tracing::warn!("chunk read task failed: {e}");
                                continue;
                            }
                        };
                        if shared.corrupt && !data.is_empty() {
                            data[0] ^= 0xff;
                        }
                        if let Some(l) = &shared.limiter {
                            l.acquire(data.len()).await;
                        }
                        let header = ChunkHeader { id: job.id, file: job.spec.content_id, index };
                        let prefix = wire::encode_chunk_prefix(&header);
                        let n = write_frame(&mut stream, &[&prefix, &data]).await?;
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

/// Read frames from a peer's stream until it ends or breaks the protocol.
pub async fn run_reader(
    peer: PeerId,
    mut stream: libp2p::Stream,
    events: mpsc::Sender<NetEvent>,
    limiter: Option<Arc<RateLimiter>>,
    metrics: Arc<Metrics>,
    my_site: Option<String>,
) {
    let mut first = true;
    let mut same = PeerClass::Other;
    loop {
        let mut head = [0u8; 5];
        if stream.read_exact(&mut head).await.is_err() {
            break;
        }
        let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let kind = head[4];
        if len == 0 || len > frame_cap(kind) {
            let error = format!("frame of {len} bytes (kind {kind:#x}) exceeds its cap");
            let _ = events.send(NetEvent::Malformed { peer, error }).await;
            break;
        }
        let mut frame = vec![0u8; len];
        frame[0] = kind;
        if stream.read_exact(&mut frame[1..]).await.is_err() {
            break;
        }
        metrics.bytes_in(same, 4 + len as u64);
        if kind == KIND_CHUNK
            && let Some(l) = &limiter
        {
            l.acquire(len).await;
        }
        let event = match wire::decode_frame(&frame) {
            Err(e) => NetEvent::Malformed {
                peer,
                error: e.to_string(),
            },
            Ok(Frame::Chunk(header, data)) => {
                let offset = len - data.len();
                NetEvent::Chunk {
                    peer,
                    header,
                    frame,
                    offset,
                }
            }
            Ok(Frame::Control(Message::Hello(hello))) if first => {
                if my_site.is_some() && hello.site == my_site {
                    same = PeerClass::SameSite;
                }
                NetEvent::Hello { peer, hello }
            }
            Ok(Frame::Control(msg)) if !first => NetEvent::Message { peer, msg },
            Ok(Frame::Control(_)) => NetEvent::Malformed {
                peer,
                error: "the first frame must be a Hello".into(),
            },
        };
        first = false;
        let stop = matches!(event, NetEvent::Malformed { .. });
        if events.send(event).await.is_err() || stop {
            break;
        }
    }
    let _ = stream.close().await;
    let _ = events
        .send(NetEvent::StreamClosed {
            peer,
            writer_gen: None,
        })
        .await;
}

/// Accept inbound pollen streams and start a reader for each.
pub async fn run_acceptor(
    mut control: libp2p_stream::Control,
    events: mpsc::Sender<NetEvent>,
    limiter: Option<Arc<RateLimiter>>,
    metrics: Arc<Metrics>,
    my_site: Option<String>,
) -> Result<()> {
    let mut incoming = control
        .accept(PROTOCOL_ID)
        .context("pollen protocol already registered")?;
    while let Some((peer, stream)) = incoming.next().await {
        tokio::spawn(run_reader(
            peer,
            stream,
            events.clone(),
            limiter.clone(),
            metrics.clone(),
            my_site.clone(),
        ));
    }
    Ok(())
}

/// The content id a chunk event is about (for logs).
pub fn short(c: &ContentId) -> String {
    c.short()
}
