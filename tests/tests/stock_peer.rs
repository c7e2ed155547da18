//! A plain rust-libp2p peer against a real node: libp2p's own TCP, noise and yamux
//! (`libp2p-yamux`, 16 KiB frames), identify, ping and Kademlia, nothing of Pollen's. The
//! node runs yamux from the `yamux` crate with larger frames (`net::mux`); this is what
//! any other libp2p peer sees of it: the peer must identify the node, ping it, and get an
//! answer to a Kademlia query on Pollen's DHT protocol.

use futures::StreamExt;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, StreamProtocol, identify, kad, noise, ping, tcp, yamux};
use pollen_tests::mesh::{Node, Operator};
use std::time::Duration;

#[derive(NetworkBehaviour)]
struct Plain {
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    kad: kad::Behaviour<kad::store::MemoryStore>,
}

#[tokio::test]
async fn a_plain_libp2p_peer_identifies_pings_and_queries_the_node() {
    let tmp = tempfile::tempdir().expect("tmp");
    let op = Operator::new(&tmp.path().join("op"), false);
    let node = Node::start(
        &tmp.path().join("n"),
        &["--trust".to_string(), op.trust_file.display().to_string()],
    );
    let full: Multiaddr = node.addr().parse().expect("multiaddr");
    let node_id = full
        .iter()
        .find_map(|p| match p {
            Protocol::P2p(id) => Some(id),
            _ => None,
        })
        .expect("the address names the node");
    let addr: Multiaddr = full
        .iter()
        .filter(|p| !matches!(p, Protocol::P2p(_)))
        .collect();

    let mut swarm = libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )
        .expect("tcp transport")
        .with_behaviour(|key| {
            let me = key.public().to_peer_id();
            Plain {
                identify: identify::Behaviour::new(identify::Config::new(
                    "/plain/1".into(),
                    key.public(),
                )),
                ping: ping::Behaviour::new(
                    ping::Config::new().with_interval(Duration::from_millis(300)),
                ),
                kad: kad::Behaviour::with_config(
                    me,
                    kad::store::MemoryStore::new(me),
                    kad::Config::new(StreamProtocol::new("/pollen/kad/1.0.0")),
                ),
            }
        })
        .expect("behaviour")
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
    swarm
        .behaviour_mut()
        .kad
        .add_address(&node_id, addr.clone());
    swarm.dial(full.clone()).expect("dial");

    let (mut identified, mut pinged, mut queried, mut asked) = (None, None, false, false);
    let end = tokio::time::Instant::now() + Duration::from_secs(30);
    while identified.is_none() || pinged.is_none() || !queried {
        let ev = tokio::time::timeout_at(end, swarm.select_next_some())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "after 30 s: identified {identified:?}, pinged {pinged:?}, queried {queried}"
                )
            });
        match ev {
            SwarmEvent::ConnectionEstablished { peer_id, .. } if peer_id == node_id && !asked => {
                swarm
                    .behaviour_mut()
                    .kad
                    .get_closest_peers(PeerId::random());
                asked = true;
            }
            SwarmEvent::Behaviour(PlainEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) if peer_id == node_id => identified = Some(info.agent_version),
            SwarmEvent::Behaviour(PlainEvent::Ping(ping::Event {
                peer,
                result: Ok(rtt),
                ..
            })) if peer == node_id => pinged = Some(rtt),
            SwarmEvent::Behaviour(PlainEvent::Kad(kad::Event::OutboundQueryProgressed {
                result: kad::QueryResult::GetClosestPeers(r),
                stats,
                step,
                ..
            })) if step.last => {
                assert!(
                    r.is_ok() && stats.num_successes() >= 1,
                    "the node never answered the Kademlia query: {r:?} {stats:?}\nnode log:\n{}",
                    node.log()
                );
                queried = true;
            }
            _ => {}
        }
    }
    let agent = identified.unwrap_or_default();
    assert!(agent.starts_with("pollen/"), "agent version {agent:?}");
}
