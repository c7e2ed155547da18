//! The libp2p swarm: listen addresses, connections opening and closing, discovery (mDNS,
//! Kademlia, identify), relays, dialling and bans of misbehaving peers.

use super::peers::{MAX_DIRECT_ADDRS, PeerConn};
use super::{Actor, HELLO_TIMEOUT};
use crate::net::{self, BehaviourEvent};
use libp2p::core::ConnectedPoint;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::{ConnectionId, SwarmEvent};
use libp2p::{Multiaddr, PeerId, identify, kad, mdns};
use pollen_protocol::ids::NodeId;
use pollen_protocol::io::Input;
use pollen_protocol::wire::Hello;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// How often a LAN peer mDNS found, and not connected, is dialled again.
const LAN_REDIAL: Duration = Duration::from_secs(10);

/// How long a disconnected misbehaving peer is refused.
const BAN: Duration = Duration::from_secs(600);
/// How long a peer that sent garbage before its Hello is refused. Short: keys cost
/// nothing, so this only stops a broken peer from reconnecting in a loop.
pub(super) const SHORT_BAN: Duration = Duration::from_secs(60);
/// Wait before the second try of a direct connection to a peer whose streams run through
/// a relay; it doubles after each try, up to [`DIRECT_RETRY_MAX`].
const DIRECT_RETRY: Duration = Duration::from_secs(10);
/// Longest wait between two tries of a direct connection.
const DIRECT_RETRY_MAX: Duration = Duration::from_secs(320);
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
                connection_id,
                num_established,
                endpoint,
                ..
            } => self.on_connected(peer_id, connection_id, num_established.get(), &endpoint),
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                ..
            } => self.on_disconnected(peer_id, connection_id, num_established),
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
    /// a relay, and start the Pollen streams on the first connection to a peer. A direct
    /// connection to a peer whose streams run through a relay takes them over.
    fn on_connected(
        &mut self,
        peer_id: PeerId,
        conn: ConnectionId,
        num_established: u32,
        endpoint: &ConnectedPoint,
    ) {
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
        let relayed = endpoint.is_relayed();
        if let Some(c) = self.peers.get_mut(&peer_id)
            && num_established > 1
        {
            if relayed {
                c.relayed_conns.push(conn);
                if !c.relayed {
                    // The streams already run direct: the relay would only carry noise.
                    let _ = self.swarm.close_connection(conn);
                }
            } else {
                c.direct_conns.push(conn);
                if c.relayed {
                    self.move_off_relay(peer_id);
                }
            }
            return;
        }
        self.peers.insert(
            peer_id,
            PeerConn {
                generation: self.next_gen,
                since: std::time::Instant::now(),
                node,
                relayed,
                relayed_conns: if relayed { vec![conn] } else { vec![] },
                direct_conns: if relayed { vec![] } else { vec![conn] },
                moving: false,
                direct_addrs: vec![],
                direct_tried: None,
                direct_tries: 0,
                sender: None,
                hello: None,
                reader: None,
                up: false,
                requested: Default::default(),
            },
        );
        self.by_node.insert(node, peer_id);
        self.next_gen += 1;
        self.spawn_writer(peer_id);
    }

    /// Open our stream to `peer` for its current connection record (a task: it reports
    /// `OutboundReady`).
    fn spawn_writer(&mut self, peer_id: PeerId) {
        let Some(c) = self.peers.get(&peer_id) else {
            return;
        };
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
            c.generation,
        ));
    }

    /// A direct connection came up to a peer whose Pollen streams run through a relay:
    /// close the relayed connections and, once they are gone, open the streams again on
    /// the direct one (the peer does the same on its side). Until then the core sees the
    /// peer down, so nothing it asks for is lost on a closing stream. Without this, a
    /// peer first reached through a relay would send every chunk through it for as long
    /// as both stay connected.
    pub(super) fn move_off_relay(&mut self, peer_id: PeerId) {
        let Some(c) = self.peers.get_mut(&peer_id) else {
            return;
        };
        tracing::info!("{peer_id}: direct connection; moving the pollen streams off the relay");
        let was_up = c.up;
        c.relayed = false;
        c.moving = true;
        c.generation = self.next_gen;
        self.next_gen += 1;
        c.since = std::time::Instant::now();
        c.sender = None;
        c.hello = None;
        c.reader = None;
        c.up = false;
        c.requested.clear();
        let node = c.node;
        let closing = c.relayed_conns.clone();
        self.metrics.moved_off_relay.fetch_add(1, Ordering::Relaxed);
        for &id in &closing {
            let _ = self.swarm.close_connection(id);
        }
        if closing.is_empty() {
            // Already gone (the peer closed it first): nothing to wait for.
            if let Some(c) = self.peers.get_mut(&peer_id) {
                c.moving = false;
            }
            self.spawn_writer(peer_id);
        }
        if was_up {
            self.count_peers();
            self.handle(Input::PeerDown { peer: node });
        }
    }

    /// A connection closed: when it was the peer's last, the core hears `PeerDown`.
    fn on_disconnected(&mut self, peer_id: PeerId, conn: ConnectionId, num_established: u32) {
        if num_established > 0 {
            let Some(c) = self.peers.get_mut(&peer_id) else {
                return;
            };
            c.relayed_conns.retain(|&id| id != conn);
            c.direct_conns.retain(|&id| id != conn);
            if c.moving && c.relayed_conns.is_empty() {
                c.moving = false;
                self.spawn_writer(peer_id);
            } else if c.relayed && c.relayed_conns.is_empty() && !c.direct_conns.is_empty() {
                // The streams' relayed connection closed (the peer moved first): move too.
                self.move_off_relay(peer_id);
            }
        }
        if num_established == 0 {
            if let Some(c) = self.peers.remove(&peer_id) {
                self.by_node.remove(&c.node);
                if c.up {
                    self.handle(Input::PeerDown { peer: c.node });
                }
            }
            self.count_peers();
        }
    }

    /// Discovery and relay events: feed the routing table and dial while below the target.
    fn on_behaviour(&mut self, ev: BehaviourEvent) {
        match ev {
            BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }) => {
                if let Some(c) = self.peers.get_mut(&peer_id) {
                    c.direct_addrs = info
                        .listen_addrs
                        .iter()
                        .filter(|a| !a.iter().any(|p| matches!(p, Protocol::P2pCircuit)))
                        .take(MAX_DIRECT_ADDRS)
                        .cloned()
                        .collect();
                }
                for a in info.listen_addrs {
                    self.swarm.behaviour_mut().kad.add_address(&peer_id, a);
                }
            }
            BehaviourEvent::Mdns(mdns::Event::Discovered(list)) => {
                // Every peer on the LAN is dialled, whatever `target_peers` says (that
                // bound is for peers found across the WAN): site peers are where chunks
                // come from cheaply, and WAN peers found first must not crowd them out.
                // `max_connections` still bounds them.
                let now = std::time::Instant::now();
                for (peer, addr) in list {
                    self.swarm
                        .behaviour_mut()
                        .kad
                        .add_address(&peer, addr.clone());
                    let connected = self.swarm.is_connected(&peer);
                    if self.lan.len() < self.cfg.max_connections as usize
                        || self.lan.contains_key(&peer)
                    {
                        self.lan
                            .insert(peer, (addr.clone(), (!connected).then_some(now)));
                    }
                    if !connected {
                        let _ = self.swarm.dial(addr);
                    }
                }
            }
            BehaviourEvent::Mdns(mdns::Event::Expired(list)) => {
                for (peer, _) in list {
                    self.lan.remove(&peer);
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
        self.try_direct();
        // LAN peers not connected (a connection that broke, a dial that failed), again
        // every LAN_REDIAL at most.
        let now = std::time::Instant::now();
        let mut redial = Vec::new();
        for (peer, (addr, last)) in &mut self.lan {
            if !self.swarm.is_connected(peer)
                && last.is_none_or(|t| now.duration_since(t) >= LAN_REDIAL)
            {
                *last = Some(now);
                redial.push(addr.clone());
            }
        }
        for addr in redial {
            let _ = self.swarm.dial(addr);
        }
        if self.peers.len() < self.cfg.target_peers && self.swarm.connected_peers().count() > 0 {
            self.swarm
                .behaviour_mut()
                .kad
                .get_closest_peers(PeerId::random());
        }
    }

    /// Dial peers whose streams run through a relay at the direct addresses they announce,
    /// backing off from [`DIRECT_RETRY`] to [`DIRECT_RETRY_MAX`] per peer (a NAT'd peer's
    /// private addresses never answer): hole punching (DCUtR) tries only when the
    /// relayed connection opens, and a path that opens later (a firewall rule lifted, a
    /// NAT that learned a mapping) would otherwise never be used. Failed dials cost a
    /// connection attempt each; a direct connection takes the streams over
    /// ([`Actor::move_off_relay`]).
    fn try_direct(&mut self) {
        let now = std::time::Instant::now();
        let due: Vec<(PeerId, Vec<Multiaddr>)> = self
            .peers
            .iter_mut()
            .filter(|(_, c)| {
                let wait = DIRECT_RETRY
                    .saturating_mul(1 << c.direct_tries.min(16))
                    .min(DIRECT_RETRY_MAX);
                c.relayed
                    && !c.direct_addrs.is_empty()
                    && c.direct_tried.is_none_or(|t| now.duration_since(t) >= wait)
            })
            .map(|(p, c)| {
                if c.direct_tried.is_some() {
                    c.direct_tries += 1;
                }
                c.direct_tried = Some(now);
                (*p, c.direct_addrs.clone())
            })
            .collect();
        for (peer, addrs) in due {
            tracing::debug!("{peer}: streams relayed; trying a direct connection");
            let opts = libp2p::swarm::dial_opts::DialOpts::peer_id(peer)
                .condition(libp2p::swarm::dial_opts::PeerCondition::Always)
                .addresses(addrs)
                .build();
            let _ = self.swarm.dial(opts);
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
