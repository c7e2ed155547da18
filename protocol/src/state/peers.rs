//! The peer table: who is connected, where, how far, how trusted, and what they hold.

use super::Mesh;
use super::exchange::remove_availability;
use super::timers::Timer;
use crate::bitfield::Bitfield;
use crate::ids::{ContentId, NodeId};
use crate::io::{Event, Output, PeerInfo};
use crate::time::{Instant, Now};
use crate::wire::Message;
use core::time::Duration;
use rand_core::Rng;

/// A connected peer.
#[derive(Debug)]
pub(super) struct Peer {
    /// Its site (LAN), as it announced: same-site peers are asked first.
    pub(super) site: Option<String>,
    /// Measured round-trip time: lower is asked first.
    pub(super) rtt: Option<Duration>,
    /// Penalty points; at `disconnect_score` it is disconnected.
    pub(super) score: u32,
    /// Random tie-break among otherwise equal peers.
    pub(super) salt: u64,
    /// The chunks it announced, per file.
    pub(super) haves: Haves,
    /// Our chunk requests in flight to it.
    pub(super) inflight: usize,
    /// Refused by fleet rules: nothing is sent to or accepted from it.
    pub(super) refused: bool,
    /// Pruned from the gossip tree: objects go to it as `IHave`s only.
    pub(super) lazy: bool,
}

/// A peer's chunks per file: a few files per peer, so a sorted vector (a `BTreeMap` node
/// costs ~700 bytes even for one entry, per peer, per node of a large simulation).
#[derive(Debug, Default)]
pub(super) struct Haves(Vec<(ContentId, Bitfield)>);

impl Haves {
    pub(super) fn find(&self, k: &ContentId) -> Result<usize, usize> {
        self.0.binary_search_by(|(x, _)| x.cmp(k))
    }
    pub(super) fn get(&self, k: &ContentId) -> Option<&Bitfield> {
        self.find(k).ok().map(|i| &self.0[i].1)
    }
    pub(super) fn get_mut(&mut self, k: &ContentId) -> Option<&mut Bitfield> {
        self.find(k).ok().map(|i| &mut self.0[i].1)
    }
    pub(super) fn contains_key(&self, k: &ContentId) -> bool {
        self.find(k).is_ok()
    }
    pub(super) fn insert(&mut self, k: ContentId, v: Bitfield) {
        match self.find(&k) {
            Ok(i) => self.0[i].1 = v,
            Err(i) => self.0.insert(i, (k, v)),
        }
    }
    pub(super) fn remove(&mut self, k: &ContentId) -> Option<Bitfield> {
        self.find(k).ok().map(|i| self.0.remove(i).1)
    }
    pub(super) fn get_or_insert_with(
        &mut self,
        k: ContentId,
        f: impl FnOnce() -> Bitfield,
    ) -> &mut Bitfield {
        let i = match self.find(&k) {
            Ok(i) => i,
            Err(i) => {
                self.0.insert(i, (k, f()));
                i
            }
        };
        &mut self.0[i].1
    }
    pub(super) fn len(&self) -> usize {
        self.0.len()
    }
    pub(super) fn is_empty(&self) -> bool {
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

impl<R: Rng> Mesh<R> {
    /// Is `p` on another site (behind a WAN link)? Unknown sites count as local.
    pub(super) fn remote(&self, p: &Peer) -> bool {
        self.config.site.is_some() && p.site.is_some() && p.site != self.config.site
    }

    /// Is `q` a usable peer on this node's site?
    pub(super) fn on_site(&self, q: &Peer) -> bool {
        q.site == self.config.site && !q.refused
    }
    // ----- peers -----------------------------------------------------------------------

    pub(super) fn on_peer_up(&mut self, now: Now, peer: NodeId, info: PeerInfo) {
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
        if self.timers.get(Timer::AntiEntropy).is_none() {
            self.timers.set(
                Timer::AntiEntropy,
                now.mono + self.config.anti_entropy_interval,
            );
        }
        if let Some(c) = self.cert.clone() {
            self.send(peer, Message::Certificate(c));
        }
        let d = self.digest(false);
        self.send(peer, Message::Digest(d));
        self.announce_files_to(peer);
    }

    pub(super) fn on_peer_down(&mut self, _now: Now, peer: NodeId) {
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
                self.timers.stop_request(r.deadline, id);
                self.forget_request(id, &r);
            }
        }
        self.pending_wants.retain(|_, (_, p)| *p != peer);
    }

    pub(super) fn penalise(&mut self, peer: NodeId, points: u32, reason: String) {
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

    pub(super) fn random_peers(&mut self, n: usize, exclude: Option<NodeId>) -> Vec<NodeId> {
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
}

#[cfg(test)]
mod tests {
    use crate::io::{Event, Output};
    use crate::state::testkit::{add_peer, mesh, peer};

    #[test]
    fn penalties_add_up_and_disconnect_at_the_threshold() {
        let (mut m, f) = mesh(4, None);
        add_peer(&mut m, 1, None, f, &[0, 1]);
        m.penalise(peer(1), 0, "nothing".into());
        assert!(m.poll_output().is_none(), "zero points: no event");
        m.penalise(peer(1), 60, "bad".into());
        assert_eq!(m.peers[&peer(1)].score, 60);
        assert!(matches!(
            m.poll_output(),
            Some(Output::Event(Event::PeerPenalised { score: 60, .. }))
        ));
        m.penalise(peer(1), 40, "worse".into());
        let out: Vec<Output> = core::iter::from_fn(|| m.poll_output()).collect();
        assert!(matches!(out[1], Output::Disconnect { peer: p, .. } if p == peer(1)));
        assert!(!m.peers.contains_key(&peer(1)), "forgotten at once");
        assert_eq!(m.files[&f].avail, vec![0; 4], "its chunks no longer count");
    }

    #[test]
    fn random_peers_is_a_bounded_sample_without_the_excluded_peer() {
        let (mut m, f) = mesh(1, None);
        for i in 1..=5 {
            add_peer(&mut m, i, None, f, &[]);
        }
        let some = m.random_peers(3, Some(peer(2)));
        assert_eq!(some.len(), 3);
        assert!(!some.contains(&peer(2)));
        let all = m.random_peers(usize::MAX, None);
        assert_eq!(all.len(), 5);
    }

    #[test]
    fn wan_and_site_predicates() {
        let (mut m, f) = mesh(1, Some("lan"));
        add_peer(&mut m, 1, Some("lan"), f, &[]);
        add_peer(&mut m, 2, Some("far"), f, &[]);
        add_peer(&mut m, 3, None, f, &[]);
        assert!(!m.remote(&m.peers[&peer(1)]) && m.on_site(&m.peers[&peer(1)]));
        assert!(m.remote(&m.peers[&peer(2)]) && !m.on_site(&m.peers[&peer(2)]));
        assert!(
            !m.remote(&m.peers[&peer(3)]),
            "an unknown site counts as local"
        );
    }
}
