//! The libp2p swarm: listen addresses, connections opening and closing, discovery (mDNS,
//! Kademlia, identify), relays, dialling and bans of misbehaving peers.

use super::peers::PeerConn;
use super::{Actor, HELLO_TIMEOUT};
use crate::net::{self, BehaviourEvent};
use libp2p::core::ConnectedPoint;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, identify, kad, mdns};
use pollen_protocol::ids::NodeId;
use pollen_protocol::io::Input;
use pollen_protocol::wire::Hello;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// How long a disconnected misbehaving peer is refused.
const BAN: Duration = Duration::from_secs(600);
/// How long a peer that sent garbage before its Hello is refused. Short: keys cost
/// nothing, so this only stops a broken peer from reconnecting in a loop.
pub(super) const SHORT_BAN: Duration = Duration::from_secs(60);
/// Most banned peers remembered.
const MAX_BANS: usize = 4096;

impl Actor {
    pub(super) fn on_swarm(&mut self, ev: SwarmEvent<BehaviourEvent>) {
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
            } => self.on_connected(peer_id, num_established.get(), &endpoint),
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established,
                ..
            } => self.on_disconnected(peer_id, num_established),
            SwarmEvent::Behaviour(ev) => self.on_behaviour(ev),
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                tracing::debug!("dial {peer_id:?} failed: {error}");
            }
            other => {
                tracing::trace!("swarm: {other:?}");
            }
        }
    }

    /// A connection is up: refuse banned and non-ed25519 peers, listen through it if it is
    /// a relay, and start the Pollen streams on the first connection to a peer.
    fn on_connected(&mut self, peer_id: PeerId, num_established: u32, endpoint: &ConnectedPoint) {
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
        if num_established == 1 || !self.peers.contains_key(&peer_id) {
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
                    requested: Default::default(),
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

    /// A connection closed: when it was the peer's last, the core hears `PeerDown`.
    fn on_disconnected(&mut self, peer_id: PeerId, num_established: u32) {
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

    /// Discovery and relay events: feed the routing table and dial while below the target.
    fn on_behaviour(&mut self, ev: BehaviourEvent) {
        match ev {
            BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }) => {
                for a in info.listen_addrs {
                    self.swarm.behaviour_mut().kad.add_address(&peer_id, a);
                }
            }
            BehaviourEvent::Mdns(mdns::Event::Discovered(list)) => {
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
            BehaviourEvent::Kad(kad::Event::RoutingUpdated {
                peer, addresses, ..
            }) => {
                if !self.swarm.is_connected(&peer)
                    && self.peers.len() < self.cfg.target_peers
                    && peer != self.peer_id()
                {
                    let addrs: Vec<Multiaddr> = addresses.iter().cloned().collect();
                    self.dial(peer, addrs);
                }
            }
            BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                result: kad::QueryResult::GetClosestPeers(Ok(ok)),
                ..
            }) => {
                for p in ok.peers {
                    if !self.swarm.is_connected(&p.peer_id)
                        && self.peers.len() < self.cfg.target_peers
                        && p.peer_id != self.peer_id()
                    {
                        self.dial(p.peer_id, p.addrs);
                    }
                }
            }
            BehaviourEvent::RelayServer(libp2p::relay::Event::ReservationReqAccepted {
                src_peer_id,
                ..
            }) => {
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
            BehaviourEvent::Ping(libp2p::ping::Event { .. }) => {}
            other => tracing::trace!("swarm: Behaviour({other:?})"),
        }
    }

    pub(super) fn dial(&mut self, peer: PeerId, addrs: Vec<Multiaddr>) {
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
    pub(super) fn bootstrap(&mut self) {
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

    /// Every few seconds: drop connections whose Pollen streams never came up, and look
    /// for more peers while below the target.
    pub(super) fn discovery_tick(&mut self) {
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
            self.swarm
                .behaviour_mut()
                .kad
                .get_closest_peers(PeerId::random());
        }
    }

    /// Disconnect a misbehaving node's peer and refuse it for [`BAN`].
    pub(super) fn ban(&mut self, node: &NodeId) {
        if let Some(p) = self.by_node.get(node).copied() {
            self.ban_peer(p, BAN);
        }
    }

    /// Disconnect `peer` and refuse it for `time`.
    pub(super) fn ban_peer(&mut self, peer: PeerId, time: Duration) {
        if self.banned.len() >= MAX_BANS && !self.banned.contains_key(&peer) {
            self.banned.pop_first();
        }
        let until = std::time::Instant::now() + time;
        let t = self.banned.entry(peer).or_insert(until);
        *t = (*t).max(until);
        let _ = self.swarm.disconnect_peer_id(peer);
    }
}
