//! Gossip of signed objects: plumtree push, IHave/Want/Prune, anti-entropy digests.
//!
//! [`Gossip`] owns the tree state (which peers are lazy), the delayed pulls and the
//! report batch. What answers from the object tables (does this node hold an object,
//! `Want` answers, digests) stays on [`Mesh`]: those tables belong to `objects` and
//! `releases`, which are not parts of their own yet.

use super::Mesh;
use super::config::Config;
use super::peers::PeerTable;
use crate::ids::{ManifestId, NodeId};
use crate::io::Output;
use crate::rollout::{HealthReport, ReportSample, SignedInstruction};
use crate::time::{Instant, Now};
use crate::wire::{ChannelDigest, Digest, Message, ObjectId};
use alloc::collections::{BTreeMap, BTreeSet, VecDeque};
use core::time::Duration;
use rand_core::Rng;

/// Plumtree-style gossip state of one node.
///
/// Contract: it owns which peers are off the gossip tree (lazy: they get `IHave`s, not
/// payloads), the pulls waiting for `ihave_delay`, and the health reports waiting for
/// the next tick. It reads the peer table it is handed, draws from the RNG it is handed
/// (so the draw order is the router's), and writes its outputs to the queue it is
/// handed. It does not know the objects: the router tells it what this node lacks
/// ([`Gossip::on_ihave`]) and filters the due pulls ([`Gossip::take_due`]). The router
/// calls [`Gossip::forget_peer`] whenever a peer leaves the peer table, so `lazy` only
/// names connected peers.
#[derive(Debug)]
pub(super) struct Gossip {
    /// Peers pruned from the tree (they received a duplicate from us, or sent us one).
    lazy: BTreeSet<NodeId>,
    /// Delayed pulls: object -> (when to pull, the peer that offered it), at most
    /// `max_pending_wants`.
    pending_wants: BTreeMap<ObjectId, (Instant, NodeId)>,
    /// Reports that changed the sample since the last tick, pushed then.
    pending_reports: Vec<HealthReport>,
    /// [`Config::ihave_delay`]: how long an `IHave` waits for the payload before a pull.
    ihave_delay: Duration,
    /// [`Config::max_pending_wants`].
    max_pending_wants: usize,
    /// [`Config::eager_fanout`]: how many random peers get each report batch.
    eager_fanout: usize,
}

impl Gossip {
    /// No tree state, nothing pending, the delays and bounds of `config`.
    pub(super) fn new(config: &Config) -> Self {
        Gossip {
            lazy: BTreeSet::new(),
            pending_wants: BTreeMap::new(),
            pending_reports: Vec::new(),
            ihave_delay: config.ihave_delay,
            max_pending_wants: config.max_pending_wants,
            eager_fanout: config.eager_fanout,
        }
    }

    /// The earliest delayed pull.
    pub(super) fn next_timeout(&self) -> Option<Instant> {
        self.pending_wants.values().map(|(t, _)| *t).min()
    }

    /// Is `peer` on the gossip tree (it gets payloads)?
    pub(super) fn eager(&self, peer: &NodeId) -> bool {
        !self.lazy.contains(peer)
    }

    /// A peer offers objects, of which this node lacks `missing` (the router filters):
    /// pull each after `ihave_delay`, unless the payload arrives meanwhile or a pull is
    /// already waiting (bounded by `max_pending_wants`).
    pub(super) fn on_ihave(
        &mut self,
        now: Now,
        from: NodeId,
        missing: impl IntoIterator<Item = ObjectId>,
    ) {
        for o in missing {
            if !self.pending_wants.contains_key(&o)
                && self.pending_wants.len() < self.max_pending_wants
            {
                self.pending_wants
                    .insert(o, (now.mono + self.ihave_delay, from));
            }
        }
    }

    /// The delayed pulls due at `now`, taken out, in object order: (object, offering peer).
    pub(super) fn take_due(&mut self, now: Now) -> Vec<(ObjectId, NodeId)> {
        let due: Vec<ObjectId> = self
            .pending_wants
            .iter()
            .filter(|(_, (t, _))| *t <= now.mono)
            .map(|(o, _)| *o)
            .collect();
        due.into_iter()
            .filter_map(|o| self.pending_wants.remove(&o).map(|(_, peer)| (o, peer)))
            .collect()
    }

    /// Send the pulls (those of [`Gossip::take_due`] still wanted): one `Want` per peer,
    /// peers in id order, objects in the order given.
    pub(super) fn send_wants(
        pulls: impl IntoIterator<Item = (ObjectId, NodeId)>,
        out: &mut VecDeque<Output>,
    ) {
        let mut wants: BTreeMap<NodeId, Vec<ObjectId>> = BTreeMap::new();
        for (o, peer) in pulls {
            wants.entry(peer).or_default().push(o);
        }
        for (peer, list) in wants {
            out.push_back(Output::Send {
                to: peer,
                msg: Message::Want(list),
            });
        }
    }

    /// A peer got a duplicate from us: it leaves our gossip tree (IHave only).
    pub(super) fn on_prune(&mut self, peers: &PeerTable, from: NodeId) {
        if peers.contains(&from) {
            self.lazy.insert(from);
        }
    }

    /// A peer pulled from us: the link goes back onto the tree.
    pub(super) fn graft(&mut self, from: NodeId) {
        self.lazy.remove(&from);
    }

    /// Plumtree-style push: the payload to every peer still on the gossip tree (a peer
    /// that receives a duplicate prunes the link, one that pulls grafts it back), an
    /// `IHave` to the others so a lost branch is repaired by a pull. The first object
    /// floods; the duplicates it causes leave a spanning tree for the next ones. Peers in
    /// a random order (every peer but `from`, one draw each from `rng`).
    pub(super) fn push_object<R: Rng>(
        &self,
        peers: &PeerTable,
        rng: &mut R,
        from: Option<NodeId>,
        msg: Message,
        oid: ObjectId,
        out: &mut VecDeque<Output>,
    ) {
        for p in peers.random_peers(rng, usize::MAX, from) {
            let msg = if self.eager(&p) {
                msg.clone()
            } else {
                Message::IHave(vec![oid])
            };
            out.push_back(Output::Send { to: p, msg });
        }
    }

    /// A gossip payload arrived from `from`: a duplicate prunes the link (and tells the
    /// peer, once), a new one keeps (or puts) it on the tree.
    pub(super) fn tree_update(
        &mut self,
        peers: &PeerTable,
        from: NodeId,
        duplicate: bool,
        out: &mut VecDeque<Output>,
    ) {
        if !peers.contains(&from) {
            return;
        }
        if duplicate {
            if self.lazy.insert(from) {
                out.push_back(Output::Send {
                    to: from,
                    msg: Message::Prune,
                });
            }
        } else {
            self.lazy.remove(&from);
        }
    }

    /// A report changed the local sample: push it at the next tick (at most `bound`
    /// waiting).
    pub(super) fn queue_report(&mut self, r: HealthReport, bound: usize) {
        if self.pending_reports.len() < bound {
            self.pending_reports.push(r);
        }
    }

    /// The tick: the waiting reports, as one batch, to `eager_fanout` random peers.
    pub(super) fn flush_reports<R: Rng>(
        &mut self,
        peers: &PeerTable,
        rng: &mut R,
        out: &mut VecDeque<Output>,
    ) {
        if self.pending_reports.is_empty() {
            return;
        }
        let batch = core::mem::take(&mut self.pending_reports);
        for p in peers.random_peers(rng, self.eager_fanout, None) {
            out.push_back(Output::Send {
                to: p,
                msg: Message::Reports(batch.clone()),
            });
        }
    }

    /// `peer` went down: its pending offers and its tree state go.
    pub(super) fn forget_peer(&mut self, peer: NodeId) {
        self.pending_wants.retain(|_, (_, p)| *p != peer);
        self.leave_tree(peer);
    }

    /// `peer` left the peer table without going down (refused on a reconnect): it leaves
    /// the tree state only, so it is eager again if it comes back.
    pub(super) fn leave_tree(&mut self, peer: NodeId) {
        self.lazy.remove(&peer);
    }
}

impl<R: Rng> Mesh<R> {
    /// Anti-entropy: send our digest to one random peer.
    pub(super) fn on_anti_entropy_timer(&mut self) {
        if let Some(peer) = self
            .peers
            .random_peers(&mut self.rng, 1, None)
            .first()
            .copied()
        {
            let d = self.digest(false);
            self.send(peer, Message::Digest(d));
        }
    }

    pub(super) fn holds(&self, o: &ObjectId) -> bool {
        match o {
            ObjectId::Manifest(id) => self.index.contains_key(id),
            ObjectId::TrustRoot(v) => self.trust.as_ref().is_some_and(|t| t.body.version >= *v),
            ObjectId::Instruction(h) => self
                .instructions
                .values()
                .chain(self.pending_instructions.values())
                .any(|(s, _)| s.body_hash() == *h),
        }
    }

    /// A peer pulls objects: answer each one we hold. A pull grafts the link back onto
    /// the gossip tree.
    pub(super) fn on_want(&mut self, from: NodeId, ids: Vec<ObjectId>) {
        self.gossip.graft(from);
        // Each object once, and a bounded number per message: a Want repeating one large
        // manifest must not make us queue it thousands of times.
        const MAX_ANSWERS: usize = 64;
        let ids: BTreeSet<ObjectId> = ids.into_iter().take(crate::wire::MAX_LIST).collect();
        // The trust root first: a manifest signed by a publisher the newest root adds must
        // not reach the peer before that root does (it would be refused as forged).
        let (roots, rest): (Vec<ObjectId>, Vec<ObjectId>) = ids
            .into_iter()
            .partition(|o| matches!(o, ObjectId::TrustRoot(_)));
        for o in roots.into_iter().chain(rest).take(MAX_ANSWERS) {
            match o {
                ObjectId::Manifest(id) => {
                    if let Some(m) = self.manifest(&id).map(|m| m.signed.clone()) {
                        self.send(from, Message::Manifest(m));
                    }
                }
                ObjectId::TrustRoot(_) => {
                    if let Some(t) = self.trust.as_ref().map(|t| t.signed.clone()) {
                        self.send(from, Message::TrustRoot(t));
                    }
                }
                ObjectId::Instruction(h) => {
                    if let Some(s) = self
                        .instructions
                        .values()
                        .find(|(s, _)| s.body_hash() == h)
                        .map(|(s, _)| s.clone())
                    {
                        self.send(from, Message::Instruction(s));
                    }
                }
            }
        }
    }

    pub(super) fn digest(&self, reply: bool) -> Digest {
        Digest {
            trust_version: self.trust.as_ref().map_or(0, |t| t.body.version),
            channels: self
                .channels
                .iter()
                .map(|(c, s)| ChannelDigest {
                    channel: c.clone(),
                    highest: s.highest,
                    manifests: s
                        .releases
                        .iter()
                        .map(|(v, r)| (*v, r.manifest.id))
                        .collect(),
                })
                .collect(),
            reports: self
                .samples
                .iter()
                .map(|(id, s)| (*id, s.digest()))
                .collect(),
            instructions: self
                .instructions
                .values()
                .chain(self.pending_instructions.values())
                .map(|(s, _)| s.body_hash())
                .collect(),
            reply,
        }
    }

    /// A peer's digest: pull what it has and we lack (a Want, always: it costs the peer
    /// no more than it asked for). With `answer` (see `PeerTable::digest_answer_due`), also
    /// push what we have and it lacks: our trust root, report samples and instructions,
    /// and our own digest when it asked for one.
    pub(super) fn on_digest(&mut self, from: NodeId, d: Digest, answer: bool) {
        let mut wants = Vec::new();
        let my_trust = self.trust.as_ref().map_or(0, |t| t.body.version);
        if d.trust_version > my_trust {
            wants.push(ObjectId::TrustRoot(d.trust_version));
        } else if answer
            && d.trust_version < my_trust
            && let Some(t) = self.trust.as_ref().map(|t| t.signed.clone())
        {
            self.send(from, Message::TrustRoot(t));
        }
        for cd in &d.channels {
            let mine = self.channels.get(&cd.channel);
            let highest = mine.map_or(0, |c| c.highest);
            let mut list: Vec<(u64, ManifestId)> = cd
                .manifests
                .iter()
                .filter(|(v, id)| {
                    let known = self.index.contains_key(id);
                    let same_version_other_id = mine
                        .and_then(|c| c.releases.get(v))
                        .is_some_and(|r| r.manifest.id != *id)
                        && !mine.is_some_and(|c| c.equivocations.contains(&(*v, *id)));
                    !known && (*v > highest || same_version_other_id)
                })
                .copied()
                .collect();
            list.sort();
            wants.extend(list.into_iter().map(|(_, id)| ObjectId::Manifest(id)));
        }
        if !wants.is_empty() {
            wants.truncate(crate::wire::MAX_LIST);
            self.send(from, Message::Want(wants));
        }
        if !answer {
            return;
        }
        // Reports: push our sample where it differs.
        let reported: BTreeMap<ManifestId, [u8; 32]> = d.reports.iter().copied().collect();
        for (id, dig) in &reported {
            if let Some(s) = self.samples.get(id)
                && s.digest() != *dig
                && !s.is_empty()
            {
                let list = sample_reports(s);
                self.send(from, Message::Reports(list));
            }
        }
        for (id, s) in &self.samples {
            if !s.is_empty() && !d.reports.iter().any(|(i, _)| i == id) {
                let list = sample_reports(s);
                self.outputs.push_back(Output::Send {
                    to: from,
                    msg: Message::Reports(list),
                });
            }
        }
        let ours: Vec<SignedInstruction> = self
            .instructions
            .values()
            .filter(|(s, _)| !d.instructions.contains(&s.body_hash()))
            .map(|(s, _)| s.clone())
            .collect();
        for s in ours {
            self.send(from, Message::Instruction(s));
        }
        if !d.reply {
            let mine = self.digest(true);
            self.send(from, Message::Digest(mine));
        }
    }
}

pub(super) fn sample_reports(s: &ReportSample) -> Vec<HealthReport> {
    s.entries().flat_map(|e| e.reports().cloned()).collect()
}

#[cfg(test)]
mod tests {
    use super::Gossip;
    use crate::ids::{Channel, ManifestId, NodeId};
    use crate::io::{Output, PeerInfo};
    use crate::rollout::{HealthReport, HealthReportBody, HealthStatus};
    use crate::signing::Signed;
    use crate::state::Config;
    use crate::state::peers::PeerTable;
    use crate::state::testkit::{at, peer};
    use crate::time::UnixTime;
    use crate::wire::{Message, ObjectId};
    use alloc::collections::VecDeque;
    use ed25519_dalek::SigningKey;
    use rand_chacha::ChaCha8Rng;
    use rand_core::SeedableRng;

    /// A gossip layer and a table of peers 1..=n.
    fn parts(n: u8) -> (Gossip, PeerTable, ChaCha8Rng) {
        let config = Config::default();
        let mut peers = PeerTable::new(&config);
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let mut out = VecDeque::new();
        for i in 1..=n {
            let info = PeerInfo {
                site: None,
                rtt: None,
                cert: None,
            };
            assert!(peers.up(&mut rng, peer(i), info, |_| false, &mut out));
        }
        (Gossip::new(&config), peers, rng)
    }

    fn sample_report() -> HealthReport {
        let key = SigningKey::from_bytes(&[9; 32]);
        let body = HealthReportBody {
            node: NodeId::from(&key),
            channel: Channel::new("test.model").expect("valid"),
            version: 1,
            manifest: ManifestId([1; 32]),
            status: HealthStatus::Ok,
            requests: 1,
            errors: 0,
            latency_p50_us: 1,
            latency_p99_us: 1,
            timestamp: UnixTime::from_secs(1),
            lm: None,
        };
        HealthReport {
            signed: Signed::sign(&body, &[&key]),
            cert: None,
        }
    }

    fn obj(i: u8) -> ObjectId {
        ObjectId::Instruction([i; 32])
    }

    fn sends(out: &mut VecDeque<Output>) -> Vec<(NodeId, Message)> {
        out.drain(..)
            .map(|o| match o {
                Output::Send { to, msg } => (to, msg),
                o => panic!("{o:?}"),
            })
            .collect()
    }

    /// Review L1: a Want naming a manifest and the trust root is answered root first, so
    /// a manifest signed by a publisher the newest root adds never reaches the peer before
    /// that root (it would be refused as forged, and the honest relayer banned).
    #[test]
    fn want_answers_send_the_trust_root_before_manifests() {
        use crate::chunking::{ChunkSize, spec_for_bytes};
        use crate::io::{Command, Input};
        use crate::manifest::ManifestBody;
        use crate::rollout::RolloutPlan;
        use crate::state::testkit::mesh;
        use crate::trust::{ChannelPattern, TrustRootBody};
        let (mut m, _) = mesh(1, None);
        let root = SigningKey::from_bytes(&[11; 32]);
        let publisher = SigningKey::from_bytes(&[12; 32]);
        let now = at(0);
        let trust = TrustRootBody::single_publisher(
            (&root).into(),
            (&publisher).into(),
            ChannelPattern("*".into()),
            UnixTime::from_secs(1),
            UnixTime::from_secs(1_000_000),
        );
        let spec = spec_for_bytes(&[7; 1000], ChunkSize::new(16_384).expect("valid"));
        let body = ManifestBody::single_file(
            Channel::new("test.model").expect("valid"),
            1,
            spec,
            RolloutPlan::immediate(),
            UnixTime::from_secs(900),
        );
        let manifest = Signed::sign(&body, &[&publisher]);
        for (id, cmd) in [
            (1, Command::SetTrustRoot(Signed::sign(&trust, &[&root]))),
            (2, Command::Publish(manifest.clone())),
        ] {
            m.handle(now, Input::Command { id, cmd });
        }
        let info = PeerInfo {
            site: None,
            rtt: None,
            cert: None,
        };
        m.handle(
            now,
            Input::PeerUp {
                peer: peer(1),
                info,
            },
        );
        while m.poll_output().is_some() {}
        let want = alloc::vec![
            ObjectId::Manifest(ManifestId(manifest.body_hash())),
            ObjectId::TrustRoot(1),
        ];
        m.handle(
            now,
            Input::Received {
                from: peer(1),
                msg: Message::Want(want),
            },
        );
        let kinds: alloc::vec::Vec<&str> = core::iter::from_fn(|| m.poll_output())
            .filter_map(|o| match o {
                Output::Send {
                    msg: Message::TrustRoot(_),
                    ..
                } => Some("root"),
                Output::Send {
                    msg: Message::Manifest(_),
                    ..
                } => Some("manifest"),
                _ => None,
            })
            .collect();
        assert_eq!(kinds, ["root", "manifest"]);
    }

    /// Review M6: a digest of a few bytes asking for an answer gets our digest (and our
    /// samples) back at most once per half anti-entropy interval per peer; a repeat in
    /// between is still read for what we lack, but answered with nothing.
    #[test]
    fn digest_answers_are_rate_limited_per_peer() {
        use crate::io::Input;
        use crate::state::testkit::mesh;
        use crate::wire::Digest;
        let (mut m, _) = mesh(1, None);
        let info = PeerInfo {
            site: None,
            rtt: None,
            cert: None,
        };
        let replies = |m: &mut crate::state::testkit::TestMesh, ms: u64, from: u8| {
            while m.poll_output().is_some() {}
            let d = Digest {
                trust_version: 0,
                channels: alloc::vec::Vec::new(),
                reports: alloc::vec::Vec::new(),
                instructions: alloc::vec::Vec::new(),
                reply: false,
            };
            m.handle(
                at(ms),
                Input::Received {
                    from: peer(from),
                    msg: Message::Digest(d),
                },
            );
            core::iter::from_fn(|| m.poll_output())
                .filter(|o| matches!(o, Output::Send { msg: Message::Digest(d), .. } if d.reply))
                .count()
        };
        for i in [1, 2] {
            m.handle(
                at(0),
                Input::PeerUp {
                    peer: peer(i),
                    info: info.clone(),
                },
            );
        }
        let gap = Config::default().anti_entropy_interval.as_millis() as u64 / 2;
        assert_eq!(replies(&mut m, 1_000, 1), 1, "the first digest is answered");
        for k in 1..50 {
            assert_eq!(replies(&mut m, 1_000 + k, 1), 0, "repeats are not");
        }
        assert_eq!(
            replies(&mut m, 1_001, 2),
            1,
            "another peer has its own budget"
        );
        assert_eq!(replies(&mut m, 1_000 + gap - 1, 1), 0);
        assert_eq!(
            replies(&mut m, 1_000 + gap, 1),
            1,
            "answered again after the gap"
        );
    }

    #[test]
    fn a_duplicate_prunes_once_and_a_new_payload_or_a_pull_grafts_back() {
        let (mut g, peers, _) = parts(2);
        let mut out = VecDeque::new();
        g.tree_update(&peers, peer(1), true, &mut out);
        g.tree_update(&peers, peer(1), true, &mut out);
        assert_eq!(sends(&mut out), [(peer(1), Message::Prune)], "Prune once");
        assert!(!g.eager(&peer(1)) && g.eager(&peer(2)));
        g.tree_update(&peers, peer(1), false, &mut out);
        assert!(g.eager(&peer(1)), "a new payload grafts");
        g.on_prune(&peers, peer(2));
        assert!(!g.eager(&peer(2)));
        g.graft(peer(2));
        assert!(g.eager(&peer(2)), "a pull grafts");
        g.on_prune(&peers, peer(9));
        g.tree_update(&peers, peer(9), true, &mut out);
        assert!(
            g.eager(&peer(9)) && out.is_empty(),
            "unknown peers leave no state"
        );
    }

    #[test]
    fn push_sends_payloads_on_the_tree_and_ihaves_off_it_never_to_the_source() {
        let (mut g, peers, mut rng) = parts(3);
        let mut out = VecDeque::new();
        g.on_prune(&peers, peer(2));
        let msg = Message::Prune; // any payload
        g.push_object(&peers, &mut rng, Some(peer(3)), msg, obj(1), &mut out);
        let mut got = sends(&mut out);
        got.sort_by_key(|(to, _)| *to);
        let mut want = vec![
            (peer(1), Message::Prune),
            (peer(2), Message::IHave(vec![obj(1)])),
        ];
        want.sort_by_key(|(to, _)| *to);
        assert_eq!(got, want);
    }

    #[test]
    fn offers_wait_ihave_delay_once_each_and_pulls_go_one_want_per_peer() {
        let (mut g, _, _) = parts(2);
        let delay = Config::default().ihave_delay;
        g.on_ihave(at(0), peer(1), [obj(2), obj(1)]);
        g.on_ihave(at(5), peer(2), [obj(1), obj(3)]);
        assert_eq!(g.next_timeout(), Some(at(0).mono + delay));
        assert!(g.take_due(at(1)).is_empty(), "not yet");
        let late = at(delay.as_millis() as u64 + 5);
        let due = g.take_due(late);
        assert_eq!(
            due,
            [(obj(1), peer(1)), (obj(2), peer(1)), (obj(3), peer(2))],
            "the first offer wins, object order"
        );
        assert_eq!(g.next_timeout(), None);
        let mut out = VecDeque::new();
        Gossip::send_wants(due, &mut out);
        let mut want = vec![
            (peer(1), Message::Want(vec![obj(1), obj(2)])),
            (peer(2), Message::Want(vec![obj(3)])),
        ];
        want.sort_by_key(|(to, _)| *to);
        assert_eq!(sends(&mut out), want, "peers in id order");
    }

    #[test]
    fn a_gone_peer_takes_its_offers_and_tree_state_with_it() {
        let (mut g, peers, _) = parts(2);
        g.on_ihave(at(0), peer(1), [obj(1)]);
        g.on_ihave(at(0), peer(2), [obj(2)]);
        g.on_prune(&peers, peer(1));
        g.forget_peer(peer(1));
        assert!(g.eager(&peer(1)));
        assert_eq!(g.take_due(at(3_600_000)), [(obj(2), peer(2))]);
    }

    #[test]
    fn reports_wait_for_the_tick_and_go_to_eager_fanout_peers() {
        let (mut g, peers, mut rng) = parts(8);
        let mut out = VecDeque::new();
        g.flush_reports(&peers, &mut rng, &mut out);
        assert!(out.is_empty(), "nothing waiting: nothing sent");
        g.queue_report(sample_report(), 1);
        g.queue_report(sample_report(), 1);
        g.flush_reports(&peers, &mut rng, &mut out);
        let got = sends(&mut out);
        assert_eq!(got.len(), Config::default().eager_fanout.min(8));
        assert!(
            got.iter()
                .all(|(_, m)| matches!(m, Message::Reports(l) if l.len() == 1)),
            "bounded batch"
        );
        g.flush_reports(&peers, &mut rng, &mut out);
        assert!(out.is_empty(), "sent once");
    }
}
