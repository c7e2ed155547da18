//! Per-peer connection records: a connection is "up" once its outbound stream is ready
//! and the peer's Hello arrived; then the core hears `PeerUp`. Frames from the stream
//! tasks enter the core here.

use super::Actor;
use super::swarm::SHORT_BAN;
use crate::net::{NetEvent, PeerSender};
use libp2p::PeerId;
use libp2p::swarm::ConnectionId;
use pollen_protocol::ids::{ContentId, NodeId};
use pollen_protocol::io::{Input, PeerInfo};
use pollen_protocol::wire::Hello;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

/// Chunk requests remembered per peer (see [`PeerConn::requested`]). The core has a few
/// in flight per peer; the rest are recent ones it gave up on, whose late answers are
/// still worth taking.
const MAX_REQUESTED: usize = 256;
/// Direct addresses remembered per peer (see [`PeerConn::direct_addrs`]).
pub(super) const MAX_DIRECT_ADDRS: usize = 8;

/// One connected peer (however many libp2p connections it has).
pub(super) struct PeerConn {
    /// Distinguishes this record from earlier ones of the same peer.
    pub(super) generation: u64,
    /// When the connection came up (a peer that never says Hello is dropped).
    pub(super) since: std::time::Instant,
    /// The peer's node id (from its ed25519 peer id).
    pub(super) node: NodeId,
    /// The Pollen streams run through a relay.
    pub(super) relayed: bool,
    /// The peer's relayed connections (at most `max_connections_per_peer`).
    pub(super) relayed_conns: Vec<ConnectionId>,
    /// The peer's direct connections (at most `max_connections_per_peer`).
    pub(super) direct_conns: Vec<ConnectionId>,
    /// Moving off the relay: the relayed connections are closing, and the writer starts
    /// on the direct one once they are gone (see `Actor::move_off_relay`).
    pub(super) moving: bool,
    /// The peer's direct (non-relay) addresses, from identify (at most
    /// [`MAX_DIRECT_ADDRS`]): dialled now and then while the streams are relayed.
    pub(super) direct_addrs: Vec<libp2p::Multiaddr>,
    /// When a direct connection was last tried.
    pub(super) direct_tried: Option<std::time::Instant>,
    /// Direct connections tried after the first (the wait between tries doubles).
    pub(super) direct_tries: u32,
    /// Queues to the peer's writer task, once its outbound stream is open.
    pub(super) sender: Option<PeerSender>,
    /// The peer's Hello, once received.
    pub(super) hello: Option<Hello>,
    /// The reader task the Hello came from: only its close ends the connection.
    pub(super) reader: Option<u64>,
    /// Both of the above arrived and the core heard `PeerUp`.
    pub(super) up: bool,
    /// Chunk requests sent to the peer and not answered yet, by request id (the most
    /// recent [`MAX_REQUESTED`]): a chunk frame is taken only as the answer to one.
    pub(super) requested: BTreeMap<u64, (ContentId, u32)>,
}

impl Actor {
    pub(super) fn on_net(&mut self, ev: NetEvent) {
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
            NetEvent::Hello {
                peer,
                hello,
                reader,
            } => {
                if let Some(c) = self.peers.get_mut(&peer) {
                    c.hello = Some(hello);
                    c.reader = Some(reader);
                    self.maybe_up(peer);
                }
            }
            NetEvent::Message { peer, msg, .. } => {
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
                bytes,
            } => self.on_chunk(peer, header, frame, offset, bytes),
            NetEvent::Malformed { peer, error } => match self.peers.get(&peer) {
                Some(c) if c.up => {
                    let from = c.node;
                    self.handle(Input::Malformed { from, error });
                }
                // The core knows only peers that came up: garbage before that is ours
                // to answer.
                _ => {
                    tracing::warn!(
                        "{peer}: malformed frame before its Hello ({error}); banning it"
                    );
                    self.ban_peer(peer, SHORT_BAN);
                }
            },
            NetEvent::StreamClosed {
                peer,
                writer_gen,
                reader,
            } => {
                // The writer of an older connection record, or a reader other than the one
                // the record's Hello came from (an older stream, one that closed before
                // its Hello): nothing to do with this record.
                let current = self.peers.get(&peer).is_some_and(|c| {
                    writer_gen.is_none_or(|g| c.generation == g)
                        && reader.is_none_or(|r| c.reader == Some(r))
                });
                if !current {
                    return;
                }
                if self
                    .peers
                    .get(&peer)
                    .is_some_and(|c| c.relayed && !c.direct_conns.is_empty())
                {
                    // The relayed connection went first while a direct one is up.
                    self.move_off_relay(peer);
                    return;
                }
                if self.peers.contains_key(&peer) && self.swarm.is_connected(&peer) {
                    // One direction broke: drop the connection, discovery reconnects.
                    let _ = self.swarm.disconnect_peer_id(peer);
                }
            }
        }
    }

    pub(super) fn maybe_up(&mut self, peer: PeerId) {
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
        self.count_peers();
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

    /// Publish the number of peers that are up in `/metrics`.
    pub(super) fn count_peers(&self) {
        self.metrics.peers.store(
            self.peers.values().filter(|p| p.up).count() as u64,
            Ordering::Relaxed,
        );
    }

    /// Remember that chunk request `id` for chunk `index` of `file` went to `node`.
    pub(super) fn requested(&mut self, node: &NodeId, id: u64, file: ContentId, index: u32) {
        let Some(c) = self.by_node.get(node).and_then(|p| self.peers.get_mut(p)) else {
            return;
        };
        if c.requested.len() >= MAX_REQUESTED {
            c.requested.pop_first();
        }
        c.requested.insert(id, (file, index));
    }

    pub(super) fn sender(&self, node: &NodeId) -> Option<PeerSender> {
        let p = self.by_node.get(node)?;
        self.peers.get(p)?.sender.clone()
    }
}
