//! Hostile peers against a real node (security review H6): libp2p peers of their own keys,
//! over TCP, noise and yamux, open Pollen streams and send what an honest node never
//! would. The node must not hold memory for lengths it was only told, must keep at most a
//! few inbound streams per peer, must close streams whose Hello or frame does not come in
//! time, must ban a peer whose first frame is garbage, and must keep answering HTTP.
//!
//! The node runs with a flat frame deadline of [`FRAME_DEADLINE`] (a hidden test flag) so
//! that stalled frames are closed within the test; the Hello deadline is the real one.

use futures::io::ReadHalf;
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, Stream, StreamProtocol, noise, tcp, yamux};
use pollen_protocol::wire::{self, ChunkHeader, Hello, KIND_CHUNK, MAX_CHUNK_FRAME, Message};
use pollen_tests::mesh::{Node, Operator, test_bytes};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

const PROTOCOL: StreamProtocol = StreamProtocol::new(wire::PROTOCOL_ID);
const MIB: usize = 1 << 20;
/// The node's deadline for a frame after the Hello (`--test-frame-deadline-ms`).
const FRAME_DEADLINE: Duration = Duration::from_secs(5);
/// The node's deadline for a stream's Hello (its default).
const HELLO_DEADLINE: Duration = Duration::from_secs(10);
/// Inbound pollen streams the node reads per peer: one per connection it allows a peer
/// (two by default), and one more.
const STREAMS_PER_PEER: usize = 3;
/// Bytes each stalled frame of attack (a) really sends of the 16 MiB it claims.
const SENT: usize = 3 * MIB;

/// A libp2p peer with a key of its own, connected to the node.
struct Attacker {
    me: PeerId,
    node: PeerId,
    addr: Multiaddr,
    control: libp2p_stream::Control,
    dial: mpsc::UnboundedSender<Multiaddr>,
    /// One item per connection event: true when one opened, false when one closed.
    conns: mpsc::UnboundedReceiver<bool>,
}

impl Attacker {
    async fn connect(addr: &Multiaddr, node: PeerId) -> Attacker {
        let mut swarm = libp2p::SwarmBuilder::with_new_identity()
            .with_tokio()
            .with_tcp(
                tcp::Config::default().nodelay(true),
                noise::Config::new,
                yamux::Config::default,
            )
            .expect("tcp transport")
            .with_behaviour(|_| libp2p_stream::Behaviour::new())
            .expect("behaviour")
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(120)))
            .build();
        let me = *swarm.local_peer_id();
        let mut control = swarm.behaviour().new_control();
        // The node opens a stream of its own to every peer and drops a peer it cannot
        // open one to: take it and read it to the end.
        let mut incoming = control.accept(PROTOCOL).expect("accept pollen streams");
        tokio::spawn(async move {
            while let Some((_, mut s)) = incoming.next().await {
                tokio::spawn(async move {
                    let mut b = vec![0u8; 64 << 10];
                    while matches!(s.read(&mut b).await, Ok(n) if n > 0) {}
                });
            }
        });
        let (dial, mut dials) = mpsc::unbounded_channel::<Multiaddr>();
        let (events, conns) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    Some(a) = dials.recv() => {
                        let _ = swarm.dial(a);
                    }
                    ev = swarm.select_next_some() => match ev {
                        SwarmEvent::ConnectionEstablished { .. } => {
                            let _ = events.send(true);
                        }
                        SwarmEvent::ConnectionClosed { .. } => {
                            let _ = events.send(false);
                        }
                        _ => {}
                    },
                }
            }
        });
        let mut a = Attacker {
            me,
            node,
            addr: addr.clone(),
            control,
            dial,
            conns,
        };
        a.redial();
        let up = tokio::time::timeout(Duration::from_secs(10), a.conns.recv()).await;
        assert_eq!(up, Ok(Some(true)), "cannot connect to the node");
        a
    }

    fn redial(&mut self) {
        self.dial.send(self.addr.clone()).expect("swarm task");
    }

    /// Is a connection open after `wait`, counting the events seen since the last call?
    async fn connected_after(&mut self, mut open: i32, wait: Duration) -> bool {
        let end = tokio::time::Instant::now() + wait;
        while let Ok(Some(up)) = tokio::time::timeout_at(end, self.conns.recv()).await {
            open += if up { 1 } else { -1 };
        }
        open > 0
    }

    async fn open(&mut self) -> Stream {
        tokio::time::timeout(
            Duration::from_secs(10),
            self.control.open_stream(self.node, PROTOCOL),
        )
        .await
        .expect("opening a stream timed out")
        .expect("open a pollen stream")
    }
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

/// A frame header claiming `len` bytes of `kind`.
fn claim(len: usize, kind: u8) -> Vec<u8> {
    let mut h = (len as u32).to_be_bytes().to_vec();
    h.push(kind);
    h
}

/// Write `bytes`: true once the node took them all, false if it closed the stream.
async fn send(s: &mut (impl AsyncWriteExt + Unpin), bytes: &[u8]) -> bool {
    let w = async {
        s.write_all(bytes).await?;
        s.flush().await
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(10), w).await,
        Ok(Ok(()))
    )
}

/// Is the stream still open? The node never writes on a stream its peer opened, so any
/// answer to a read (end of stream, reset) means it closed it.
async fn is_open(s: &mut (impl AsyncReadExt + Unpin)) -> bool {
    let mut b = [0u8; 1];
    tokio::time::timeout(Duration::from_millis(300), s.read(&mut b))
        .await
        .is_err()
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Watches the node from a thread of its own while the attack runs: its peak RSS, and the
/// slowest answer to `GET /v1/status` (or a failure).
struct Watch {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(u64, Duration, Option<String>)>,
}

impl Watch {
    fn start(pid: u32, url: String) -> Watch {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .timeout_global(Some(Duration::from_secs(10)))
                .build()
                .into();
            let (mut peak, mut slowest, mut failure) = (0, Duration::ZERO, None);
            let mut polls = 0u32;
            while !s.load(Ordering::Relaxed) {
                peak = peak.max(rss_kib(pid));
                if polls.is_multiple_of(4) {
                    let t = Instant::now();
                    match agent.get(format!("{url}/v1/status")).call() {
                        Ok(_) => slowest = slowest.max(t.elapsed()),
                        Err(e) => failure = Some(e.to_string()),
                    }
                }
                polls += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            (peak, slowest, failure)
        });
        Watch { stop, thread }
    }

    fn stop(self) -> (u64, Duration, Option<String>) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("watch thread")
    }
}

/// What the attack saw.
#[derive(Debug, Default)]
struct Seen {
    /// (a) stalled 16 MiB frames whose first bytes the node read.
    stalled_held: usize,
    /// (a) of those, still open after the frame deadline.
    stalled_open_after: usize,
    /// (b) streams that only said Hello, open a second after they were opened.
    quiet_open: usize,
    /// (b) of those, still open at the end of the test.
    quiet_open_at_end: usize,
    /// (c) garbage first frame: stream still open a second after.
    garbage_open: bool,
    /// (c) the same peer could connect again and stay connected.
    garbage_peer_readmitted: bool,
    /// (c) first frame claiming 1 MiB: stream still open a second after.
    big_first_open: bool,
    /// (c) a stream that never says anything: open past the Hello deadline.
    silent_open: bool,
}

/// Three peers stall 20 frames each (a), one opens 20 streams that only say Hello (b),
/// and three send a bad first frame or none (c).
async fn attack(addr: Multiaddr, node: PeerId) -> Seen {
    let mut seen = Seen::default();
    let started = Instant::now();
    // (c) A stream that never says anything: closed after the Hello deadline.
    let mut silent_peer = Attacker::connect(&addr, node).await;
    let mut silent = silent_peer.open().await;

    // (a) 60 frames claiming 16 MiB, 3 MiB sent of each, then nothing (half of them) or a
    // byte every half second. Streams are opened one at a time (libp2p-stream drops an
    // inbound stream that arrives while the node's acceptor is still taking the last one).
    let mut stallers = Vec::new();
    for _ in 0..3 {
        stallers.push(Attacker::connect(&addr, node).await);
    }
    let mut stalled: Vec<ReadHalf<Stream>> = Vec::new();
    let mut body = claim(MAX_CHUNK_FRAME, KIND_CHUNK);
    body.extend(vec![0u8; SENT]);
    for i in 0..60 {
        let mut s = stallers[i % 3].open().await;
        if !(send(&mut s, &hello()).await && send(&mut s, &body).await) {
            continue;
        }
        let (r, mut w) = s.split();
        if i % 2 == 0 {
            tokio::spawn(async move {
                while send(&mut w, &[0]).await {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            });
        } else {
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(60)).await;
                drop(w);
            });
        }
        stalled.push(r);
    }
    let stalled_at = Instant::now();
    seen.stalled_held = stalled.len();
    eprintln!(
        "(a) {} of 60 stalled frames held, {:?} in",
        stalled.len(),
        started.elapsed()
    );

    // (b) 20 streams of one peer that say Hello and nothing more.
    let mut quiet_peer = Attacker::connect(&addr, node).await;
    let mut quiet = Vec::new();
    for _ in 0..20 {
        let mut s = quiet_peer.open().await;
        let _ = send(&mut s, &hello()).await;
        quiet.push(s);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    for s in quiet.iter_mut() {
        seen.quiet_open += is_open(s).await as usize;
    }

    // (c) Garbage as the first frame (a control kind, undecodable), then the same peer
    // connects again.
    let mut garbage_peer = Attacker::connect(&addr, node).await;
    let mut s = garbage_peer.open().await;
    let mut garbage = claim(16, 0x03);
    garbage.extend([0xff; 15]);
    let _ = send(&mut s, &garbage).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    seen.garbage_open = is_open(&mut s).await;
    let open = garbage_peer
        .connected_after(1, Duration::from_millis(500))
        .await;
    garbage_peer.redial();
    seen.garbage_peer_readmitted = garbage_peer
        .connected_after(open as i32, Duration::from_secs(3))
        .await;
    // (c) A first frame claiming the largest control frame.
    let mut big_peer = Attacker::connect(&addr, node).await;
    let mut s = big_peer.open().await;
    let _ = send(&mut s, &claim(wire::MAX_CONTROL_FRAME, 0x03)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    seen.big_first_open = is_open(&mut s).await;

    // Past the frame deadline of every stalled frame.
    let past = stalled_at + FRAME_DEADLINE + Duration::from_secs(2);
    tokio::time::sleep(past.saturating_duration_since(Instant::now())).await;
    for r in stalled.iter_mut() {
        seen.stalled_open_after += is_open(r).await as usize;
    }
    // Past the Hello deadline of the silent stream.
    let past = started + HELLO_DEADLINE + Duration::from_secs(2);
    tokio::time::sleep(past.saturating_duration_since(Instant::now())).await;
    seen.silent_open = is_open(&mut silent).await;
    for s in quiet.iter_mut() {
        seen.quiet_open_at_end += is_open(s).await as usize;
    }
    drop(silent_peer);
    seen
}

#[test]
fn hostile_peers_cannot_make_the_node_hold_memory_streams_or_its_attention() {
    let tmp = tempfile::tempdir().unwrap();
    let op = Operator::new(&tmp.path().join("op"), false);
    let mut n = Node::start(
        &tmp.path().join("n"),
        &[
            "--trust".into(),
            op.trust_file.display().to_string(),
            "--test-frame-deadline-ms".into(),
            FRAME_DEADLINE.as_millis().to_string(),
        ],
    );
    let addr: Multiaddr = n.addr().parse().expect("listen address");
    let node: PeerId = n.status().peer_id.parse().expect("peer id");
    std::thread::sleep(Duration::from_secs(1));
    let base = rss_kib(n.pid());
    let watch = Watch::start(n.pid(), n.url());
    let t = Instant::now();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let seen = rt.block_on(attack(addr, node));
    rt.shutdown_timeout(Duration::from_secs(1));
    let (peak, slowest, failure) = watch.stop();
    let grew = peak.saturating_sub(base) / 1024;
    eprintln!(
        "attack: {:?}; RSS {} MiB before, peak {} MiB (+{grew} MiB); slowest /v1/status {slowest:?}; {seen:?}",
        t.elapsed(),
        base / 1024,
        peak / 1024
    );
    eprintln!(
        "metrics: refused {} timed out {}",
        n.metric("pollen_peer_streams_refused_total"),
        n.metric("pollen_peer_streams_timed_out_total")
    );

    // The node answered throughout, promptly.
    assert_eq!(failure, None, "GET /v1/status failed during the attack");
    assert!(
        slowest < Duration::from_secs(2),
        "GET /v1/status took {slowest:?}"
    );
    // (a) At most a few streams per peer were read, each buffer holding what was sent
    // (3 MiB), not what was claimed (16 MiB): 3 peers × 3 streams × 3 MiB = 27 MiB, with
    // room for the allocator and yamux. Before: 60 streams, 180 MiB of buffers and more.
    assert!(
        seen.stalled_held <= 3 * STREAMS_PER_PEER,
        "{} stalled frames held",
        seen.stalled_held
    );
    assert!(grew < 64, "RSS grew by {grew} MiB");
    assert_eq!(
        seen.stalled_open_after, 0,
        "stalled frames past their deadline"
    );
    // (b) A peer's extra streams are closed; the ones it may have stay open while quiet.
    assert_eq!(
        seen.quiet_open, STREAMS_PER_PEER,
        "streams open of one peer"
    );
    assert_eq!(seen.quiet_open_at_end, STREAMS_PER_PEER);
    // (c) A bad or missing first frame closes the stream; garbage gets its peer banned.
    assert!(
        !seen.garbage_open,
        "stream open after a garbage first frame"
    );
    assert!(
        !seen.garbage_peer_readmitted,
        "a peer that sent garbage before its Hello connected again at once"
    );
    assert!(
        !seen.big_first_open,
        "stream open after a 1 MiB first-frame claim"
    );
    assert!(
        !seen.silent_open,
        "silent stream open past the Hello deadline"
    );
    assert!(n.metric("pollen_peer_streams_refused_total") >= 17.0);
    assert!(n.running(), "the node died:\n{}", n.log());
}

/// A chunk frame answers a request of ours or is dropped before it is hashed or written,
/// and without a penalty (review H6: any up peer could push chunk frames for any chunk the
/// node needed).
#[test]
fn chunk_frames_nobody_asked_for_are_dropped_unread() {
    let tmp = tempfile::tempdir().unwrap();
    let op = Operator::new(&tmp.path().join("op"), false);
    let n = Node::start(
        &tmp.path().join("n"),
        &["--trust".into(), op.trust_file.display().to_string()],
    );
    // A release whose file the node does not have, and no peer to fetch it from: the node
    // needs every chunk.
    let file = tmp.path().join("m.onnx");
    std::fs::write(&file, test_bytes(256 << 10, 7)).unwrap();
    let m = op.manifest(std::slice::from_ref(&file), "peer.bounds", 1, 64 << 10);
    let (code, text) = n.post_manifest(&m.signed.to_bytes());
    assert_eq!(code, 200, "{text}");
    let content = m.body.artifact.variants[0].files[0].spec.content_id;
    let addr: Multiaddr = n.addr().parse().expect("listen address");
    let node: PeerId = n.status().peer_id.parse().expect("peer id");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (me, stream, attacker) = rt.block_on(async {
        let mut a = Attacker::connect(&addr, node).await;
        let mut s = a.open().await;
        assert!(send(&mut s, &hello()).await);
        (a.me, s, a)
    });
    let me = me.to_string();
    n.wait(Duration::from_secs(10), "the attacker up", |st| {
        st.peers.iter().any(|p| p.peer_id == me)
    });
    // Chunk frames of the right size for chunks the node needs, under request ids it never
    // sent (the bytes are not the chunk's: before, each was hashed, failed, and cost the
    // sender a penalty, the third one a ban).
    let mut stream = stream;
    rt.block_on(async {
        for index in 0..4u32 {
            let header = ChunkHeader {
                id: 1000 + u64::from(index),
                file: content,
                index,
            };
            let f =
                wire::length_prefixed(&wire::encode_chunk_frame(&header, &vec![0xab; 64 << 10]));
            assert!(send(&mut stream, &f).await, "the node closed the stream");
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while n.metric("pollen_chunks_unsolicited_total") < 4.0
        && n.metric("pollen_chunks_failed_total") == 0.0
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        n.metric("pollen_chunks_failed_total"),
        0.0,
        "unsolicited chunks were hashed"
    );
    assert_eq!(n.metric("pollen_chunks_unsolicited_total"), 4.0);
    assert!(
        n.status().peers.iter().any(|p| p.peer_id == me),
        "the sender was dropped"
    );
    drop((stream, attacker));
}
