//! The peer table: who is connected, where, how far, how trusted, and what they hold.

#[cfg(doc)]
use super::Mesh;
use super::config::Config;
use crate::ids::NodeId;
use crate::io::{Event, Output, PeerInfo};
use crate::time::Instant;
use alloc::collections::{BTreeMap, VecDeque};
use alloc::string::String;
use alloc::vec::Vec;
use core::time::Duration;
use rand_core::Rng;

/// A connected peer.
#[derive(Debug)]
pub(super) struct Peer {
    /// Its site (LAN), as it announced: same-site peers are asked first.
    pub(super) site: Option<String>,
    /// `site` equals this node's site (both may be `None`): kept with `site`, because the
    /// scheduler asks it for every peer on every pass.
    pub(super) same_site: bool,
    /// Measured round-trip time: lower is asked first.
    pub(super) rtt: Option<Duration>,
    /// Penalty points; at `disconnect_score` it is disconnected.
    pub(super) score: u32,
    /// Decay of `score` is counted from here ([`Config::penalty_decay`]); `None` while
    /// the score is 0.
    pub(super) scored_at: Option<Instant>,
    /// Random tie-break among otherwise equal peers.
    pub(super) salt: u64,
    /// Refused by fleet rules: nothing is sent to or accepted from it.
    pub(super) refused: bool,
    /// When a digest of its last got our full answer (see [`PeerTable::digest_answer_due`]).
    pub(super) digest_answered: Option<Instant>,
}

/// The peer table: every connected peer and what this node knows of it.
///
/// Contract: it owns the [`Peer`] entries (site, RTT, score, tie-break salt, refusal)
/// and decides admission (`max_peers`, fleet refusal), penalties (a peer is banned at `disconnect_score`) and
/// random samples. It never reaches the other parts: it writes its outputs to the queue
/// it is handed, takes randomness from the RNG it is handed (so the draw order is the
/// router's), and tells the router, by its return value, when a peer must be forgotten
/// by every part (see [`Mesh::penalise`] and `Mesh::on_peer_down`). Iteration is in
/// `NodeId` order. What a peer announced and what we asked of it belong to `Exchange`,
/// whether it is on the gossip tree to `Gossip`.
#[derive(Debug)]
pub(super) struct PeerTable {
    /// Connected peers, at most `max_peers`.
    map: BTreeMap<NodeId, Peer>,
    /// This node's site ([`Config::site`]): same-site peers are asked first.
    site: Option<String>,
    /// [`Config::max_peers`]: a new peer past it is disconnected.
    max_peers: usize,
    /// [`Config::disconnect_score`]: penalty points at which a peer is disconnected.
    disconnect_score: u32,
    /// [`Config::penalty_decay`]: time per penalty point forgiven.
    penalty_decay: Duration,
}

impl PeerTable {
    /// An empty table with the bounds and site of `config`.
    pub(super) fn new(config: &Config) -> Self {
        PeerTable {
            map: BTreeMap::new(),
            site: config.site.clone(),
            max_peers: config.max_peers,
            disconnect_score: config.disconnect_score,
            penalty_decay: config.penalty_decay,
        }
    }

    /// Is `p` on another site (behind a WAN link)? Unknown sites count as local.
    pub(super) fn remote(&self, p: &Peer) -> bool {
        self.site.is_some() && p.site.is_some() && !p.same_site
    }

    /// Is `q` a usable peer on this node's site?
    pub(super) fn on_site(&self, q: &Peer) -> bool {
        q.same_site && !q.refused
    }

    /// The usable peers on this node's site ([`PeerTable::on_site`]), in id order.
    pub(super) fn site_peers(&self) -> Vec<NodeId> {
        self.map
            .iter()
            .filter(|(_, q)| self.on_site(q))
            .map(|(id, _)| *id)
            .collect()
    }

    /// The usable peers on other sites than this node's, but for `except` and the peers
    /// on its site, in id order.
    pub(super) fn remote_peers(&self, except: &NodeId) -> Vec<NodeId> {
        let their = self.map.get(except).and_then(|p| p.site.clone());
        self.map
            .iter()
            .filter(|(id, q)| {
                *id != except
                    && self.remote(q)
                    && !q.refused
                    && (their.is_none() || q.site != their)
            })
            .map(|(id, _)| *id)
            .collect()
    }

    /// Admit `peer` (or refresh its site and RTT if already connected). A full table, or
    /// `refused(&info)` (fleet rules), pushes a `Disconnect` and returns false; a refused
    /// peer that was connected is dropped from the table. One salt is drawn from `rng`
    /// for every call past the full-table check, admitted or not.
    pub(super) fn up<R: Rng>(
        &mut self,
        rng: &mut R,
        peer: NodeId,
        info: PeerInfo,
        refused: impl FnOnce(&PeerInfo) -> bool,
        out: &mut VecDeque<Output>,
    ) -> bool {
        if !self.map.contains_key(&peer) && self.map.len() >= self.max_peers {
            out.push_back(Output::Disconnect {
                peer,
                reason: "peer table full".into(),
            });
            return false;
        }
        let refused = refused(&info);
        let salt = rng.next_u64();
        let entry = self.map.entry(peer).or_insert(Peer {
            site: None,
            same_site: false,
            rtt: None,
            score: 0,
            scored_at: None,
            salt,
            refused,
            digest_answered: None,
        });
        entry.same_site = info.site == self.site;
        entry.site = info.site;
        entry.rtt = info.rtt;
        entry.refused = refused;
        if refused {
            out.push_back(Output::Disconnect {
                peer,
                reason: "no valid node certificate for this fleet".into(),
            });
            self.map.remove(&peer);
            return false;
        }
        true
    }

    /// At `now`, forgive what `penalty_decay` forgives of `peer`'s score since it was last
    /// counted, add `points` and push `PeerPenalised`; at `disconnect_score`, also push a
    /// `Disconnect` and return true: the caller must then forget the peer in every part at
    /// once (nothing more is sent to or accepted from it). Zero points, or an unknown peer,
    /// do nothing.
    pub(super) fn penalise(
        &mut self,
        peer: NodeId,
        points: u32,
        reason: String,
        now: Instant,
        out: &mut VecDeque<Output>,
    ) -> bool {
        if points == 0 {
            return false;
        }
        let decay = self.penalty_decay;
        let Some(p) = self.map.get_mut(&peer) else {
            return false;
        };
        if let Some(since) = p.scored_at
            && !decay.is_zero()
        {
            let forgiven = now.saturating_duration_since(since).as_nanos() / decay.as_nanos();
            let forgiven = u32::try_from(forgiven).unwrap_or(u32::MAX);
            p.score = p.score.saturating_sub(forgiven);
            if p.score > 0 {
                // The part of a step already run counts towards the next point (no
                // overflow: decay × forgiven is at most the time elapsed).
                p.scored_at = Some(since + decay * forgiven);
            }
        }
        if p.score == 0 {
            p.scored_at = Some(now);
        }
        p.score = p.score.saturating_add(points);
        let score = p.score;
        out.push_back(Output::Event(Event::PeerPenalised {
            peer,
            reason: reason.clone(),
            score,
        }));
        if score >= self.disconnect_score {
            out.push_back(Output::Disconnect { peer, reason });
            return true;
        }
        false
    }

    /// May a digest from `peer` get a full answer at `now` (our samples, instructions,
    /// trust root and digest pushed back)? At most one per `gap` per peer: a digest is a few
    /// bytes and the answer can be every report sample we hold, so a peer repeating digests
    /// must not multiply it (review M6). The answer's time is recorded when due. An
    /// unknown peer gets none.
    pub(super) fn digest_answer_due(&mut self, peer: NodeId, now: Instant, gap: Duration) -> bool {
        let Some(p) = self.map.get_mut(&peer) else {
            return false;
        };
        if p.digest_answered.is_some_and(|t| now < t + gap) {
            return false;
        }
        p.digest_answered = Some(now);
        true
    }

    /// Up to `n` distinct peers but `exclude`, drawn with `rng` (a partial Fisher-Yates
    /// over the peers in id order: `min(n, peers)` draws).
    pub(super) fn random_peers<R: Rng>(
        &self,
        rng: &mut R,
        n: usize,
        exclude: Option<NodeId>,
    ) -> Vec<NodeId> {
        let mut all: Vec<NodeId> = self
            .map
            .keys()
            .filter(|p| Some(**p) != exclude)
            .copied()
            .collect();
        // Partial Fisher-Yates.
        let n = n.min(all.len());
        for i in 0..n {
            let j = i + (rng.next_u64() % (all.len() - i) as u64) as usize;
            all.swap(i, j);
        }
        all.truncate(n);
        all
    }

    /// Take `peer` out of the table (it went down or was banned); the caller clears what
    /// the other parts hold for it.
    pub(super) fn remove(&mut self, peer: &NodeId) -> Option<Peer> {
        self.map.remove(peer)
    }

    /// Put `peer` in the table as is (tests place peers by hand).
    #[cfg(test)]
    pub(super) fn insert(&mut self, id: NodeId, mut peer: Peer) {
        peer.same_site = peer.site == self.site;
        self.map.insert(id, peer);
    }

    pub(super) fn get(&self, peer: &NodeId) -> Option<&Peer> {
        self.map.get(peer)
    }

    pub(super) fn contains(&self, peer: &NodeId) -> bool {
        self.map.contains_key(peer)
    }

    pub(super) fn len(&self) -> usize {
        self.map.len()
    }

    /// Peer ids in id order.
    pub(super) fn ids(&self) -> impl Iterator<Item = &NodeId> {
        self.map.keys()
    }

    /// Peers in id order.
    pub(super) fn iter(&self) -> impl Iterator<Item = (&NodeId, &Peer)> {
        self.map.iter()
    }
}

impl core::ops::Index<&NodeId> for PeerTable {
    type Output = Peer;
    fn index(&self, peer: &NodeId) -> &Peer {
        &self.map[peer]
    }
}

#[cfg(test)]
mod tests {
    use super::{Peer, PeerTable};
    use crate::io::{Event, Output, PeerInfo};
    use crate::state::Config;
    use crate::state::testkit::{add_mesh_peer, mesh, peer};
    use crate::time::Instant;
    use alloc::collections::VecDeque;
    use core::time::Duration;
    use rand_chacha::ChaCha8Rng;
    use rand_core::SeedableRng;

    fn table(site: Option<&str>, max_peers: usize) -> PeerTable {
        PeerTable::new(&Config {
            site: site.map(Into::into),
            max_peers,
            ..Config::default()
        })
    }

    fn info(site: Option<&str>) -> PeerInfo {
        PeerInfo {
            site: site.map(Into::into),
            rtt: None,
            cert: None,
        }
    }

    fn up(t: &mut PeerTable, rng: &mut ChaCha8Rng, i: u8, site: Option<&str>) -> bool {
        let mut out = VecDeque::new();
        let ok = t.up(rng, peer(i), info(site), |_| false, &mut out);
        assert_eq!(out.is_empty(), ok, "a Disconnect exactly when not admitted");
        ok
    }

    #[test]
    fn penalties_add_up_and_ask_for_a_ban_at_the_threshold() {
        let mut t = table(None, 8);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        up(&mut t, &mut rng, 1, None);
        let mut out = VecDeque::new();
        let t0 = Instant::ZERO;
        assert!(!t.penalise(peer(1), 0, "nothing".into(), t0, &mut out));
        assert!(!t.penalise(peer(9), 50, "unknown".into(), t0, &mut out));
        assert!(out.is_empty(), "zero points or unknown peer: nothing");
        let limit = Config::default().disconnect_score;
        assert!(!t.penalise(peer(1), limit - 1, "bad".into(), t0, &mut out));
        assert_eq!(t[&peer(1)].score, limit - 1);
        assert!(matches!(
            out.pop_front(),
            Some(Output::Event(Event::PeerPenalised { score, .. })) if score == limit - 1
        ));
        let soon = t0 + Config::default().penalty_decay / 2;
        assert!(
            t.penalise(peer(1), 1, "worse".into(), soon, &mut out),
            "banned"
        );
        assert!(matches!(
            out.pop_front(),
            Some(Output::Event(Event::PeerPenalised { .. }))
        ));
        assert!(
            matches!(out.pop_front(), Some(Output::Disconnect { peer: p, .. }) if p == peer(1))
        );
        assert!(t.contains(&peer(1)), "the router forgets it, in every part");
    }

    /// A point is forgiven per `penalty_decay`: a peer timing out (2 points) once a minute
    /// for hours is never banned, one timing out 50 times in a minute is, and a spread of
    /// penalties decays evenly (part of a step carries over).
    #[test]
    fn penalties_decay_so_a_rate_bans_and_a_trickle_does_not() {
        let decay = Config::default().penalty_decay;
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut t = table(None, 8);
        up(&mut t, &mut rng, 1, None);
        up(&mut t, &mut rng, 2, None);
        let mut out = VecDeque::new();
        let mut now = Instant::ZERO;
        for _ in 0..600 {
            assert!(!t.penalise(peer(1), 2, "timed out".into(), now, &mut out));
            now = now + decay * 2;
        }
        assert!(t[&peer(1)].score <= 2, "{}", t[&peer(1)].score);
        let burst = (0..50).map(|i| {
            t.penalise(
                peer(2),
                2,
                "timed out".into(),
                now + decay * i / 100,
                &mut out,
            )
        });
        assert_eq!(
            burst.filter(|b| *b).count(),
            1,
            "banned once the burst reaches 100"
        );
        // 10 points, then 1.5 steps later 1 more: 9 + 1 = 10, and the half step carries.
        let mut t = table(None, 8);
        up(&mut t, &mut rng, 3, None);
        t.penalise(peer(3), 10, "a".into(), Instant::ZERO, &mut out);
        t.penalise(
            peer(3),
            1,
            "b".into(),
            Instant::ZERO + decay * 3 / 2,
            &mut out,
        );
        assert_eq!(t[&peer(3)].score, 10);
        t.penalise(peer(3), 1, "c".into(), Instant::ZERO + decay * 2, &mut out);
        assert_eq!(
            t[&peer(3)].score,
            10,
            "the carried half step made a whole one"
        );
        // Zero decay: a lifetime total, as before.
        let mut t = PeerTable::new(&Config {
            penalty_decay: Duration::ZERO,
            ..Config::default()
        });
        up(&mut t, &mut rng, 4, None);
        t.penalise(peer(4), 10, "a".into(), Instant::ZERO, &mut out);
        t.penalise(
            peer(4),
            1,
            "b".into(),
            Instant::ZERO + decay * 1000,
            &mut out,
        );
        assert_eq!(t[&peer(4)].score, 11);
    }

    #[test]
    fn a_full_table_or_a_refused_peer_is_disconnected() {
        let mut t = table(None, 2);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        assert!(up(&mut t, &mut rng, 1, None));
        assert!(up(&mut t, &mut rng, 2, Some("lan")));
        assert!(!up(&mut t, &mut rng, 3, None), "table full");
        assert!(
            up(&mut t, &mut rng, 2, Some("far")),
            "a known peer is refreshed"
        );
        assert_eq!(t[&peer(2)].site.as_deref(), Some("far"));
        let mut out = VecDeque::new();
        assert!(!t.up(&mut rng, peer(1), info(None), |_| true, &mut out));
        assert!(
            matches!(out.pop_front(), Some(Output::Disconnect { peer: p, .. }) if p == peer(1))
        );
        assert!(
            !t.contains(&peer(1)) && t.len() == 1,
            "a refused peer is dropped"
        );
    }

    #[test]
    fn one_salt_per_admission_from_the_rng_handed_in() {
        let mut t = table(None, 8);
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut same = ChaCha8Rng::seed_from_u64(3);
        up(&mut t, &mut rng, 1, None);
        up(&mut t, &mut rng, 1, None);
        up(&mut t, &mut rng, 2, None);
        let salts: Vec<u64> = (0..3)
            .map(|_| rand_core::Rng::next_u64(&mut same))
            .collect();
        assert_eq!(t[&peer(1)].salt, salts[0], "a refresh keeps the first salt");
        assert_eq!(t[&peer(2)].salt, salts[2], "but still draws one");
    }

    #[test]
    fn random_peers_is_a_bounded_sample_without_the_excluded_peer() {
        let mut t = table(None, 8);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for i in 1..=5 {
            up(&mut t, &mut rng, i, None);
        }
        let some = t.random_peers(&mut rng, 3, Some(peer(2)));
        assert_eq!(some.len(), 3);
        assert!(!some.contains(&peer(2)));
        let mut all = t.random_peers(&mut rng, usize::MAX, None);
        assert_eq!(all.len(), 5);
        all.sort();
        assert_eq!(all, t.ids().copied().collect::<Vec<_>>());
    }

    #[test]
    fn wan_and_site_predicates() {
        let mut t = table(Some("lan"), 8);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        up(&mut t, &mut rng, 1, Some("lan"));
        up(&mut t, &mut rng, 2, Some("far"));
        up(&mut t, &mut rng, 3, None);
        assert!(!t.remote(&t[&peer(1)]) && t.on_site(&t[&peer(1)]));
        assert!(t.remote(&t[&peer(2)]) && !t.on_site(&t[&peer(2)]));
        assert!(!t.remote(&t[&peer(3)]), "an unknown site counts as local");
        let refused = Peer {
            refused: true,
            ..t.remove(&peer(1)).expect("connected")
        };
        assert!(!t.on_site(&refused), "a refused peer is not usable");
        let no_site = table(None, 8);
        assert!(
            !no_site.remote(&t[&peer(2)]),
            "a node without a site sees no WAN"
        );
    }

    #[test]
    fn a_ban_forgets_the_peer_in_every_part() {
        let (mut m, f) = mesh(4, None);
        add_mesh_peer(&mut m, 1, None, f, &[0, 1]);
        m.penalise(peer(1), 60, "bad".into());
        m.penalise(peer(1), 40, "worse".into());
        let out: Vec<Output> = core::iter::from_fn(|| m.poll_output()).collect();
        assert!(matches!(out[2], Output::Disconnect { peer: p, .. } if p == peer(1)));
        assert!(!m.peers.contains(&peer(1)), "forgotten at once");
        assert_eq!(
            m.exchange.files()[&f].avail,
            vec![0; 4],
            "its chunks no longer count"
        );
    }
}
