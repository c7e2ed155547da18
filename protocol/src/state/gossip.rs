//! Gossip of signed objects: plumtree push, IHave/Want/Prune, anti-entropy digests.

use super::Mesh;
use crate::ids::{ManifestId, NodeId};
use crate::io::Output;
use crate::rollout::{HealthReport, ReportSample, SignedInstruction};
use crate::time::Now;
use crate::wire::{ChannelDigest, Digest, Message, ObjectId};
use alloc::collections::{BTreeMap, BTreeSet};
use rand_core::Rng;

impl<R: Rng> Mesh<R> {
    /// A peer offers objects: pull each one we lack after `ihave_delay`, unless the
    /// payload arrives meanwhile (bounded by `max_pending_wants`).
    pub(super) fn on_ihave(&mut self, now: Now, from: NodeId, ids: Vec<ObjectId>) {
        for o in ids {
            if !self.holds(&o)
                && !self.pending_wants.contains_key(&o)
                && self.pending_wants.len() < self.config.max_pending_wants
            {
                self.pending_wants
                    .insert(o, (now.mono + self.config.ihave_delay, from));
            }
        }
    }

    /// A peer got a duplicate from us: it leaves our gossip tree (IHave only).
    pub(super) fn on_prune(&mut self, from: NodeId) {
        if let Some(p) = self.peers.get_mut(&from) {
            p.lazy = true;
        }
    }

    /// Delayed pulls that are due: one `Want` per peer for what is still missing.
    pub(super) fn on_delayed_wants(&mut self, now: Now) {
        let due: Vec<ObjectId> = self
            .pending_wants
            .iter()
            .filter(|(_, (t, _))| *t <= now.mono)
            .map(|(o, _)| *o)
            .collect();
        let mut wants: BTreeMap<NodeId, Vec<ObjectId>> = BTreeMap::new();
        for o in due {
            if let Some((_, peer)) = self.pending_wants.remove(&o)
                && !self.holds(&o)
                && self.peers.contains(&peer)
            {
                wants.entry(peer).or_default().push(o);
            }
        }
        for (peer, list) in wants {
            self.send(peer, Message::Want(list));
        }
    }

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
        if let Some(p) = self.peers.get_mut(&from) {
            p.lazy = false;
        }
        // Each object once, and a bounded number per message: a Want repeating one large
        // manifest must not make us queue it thousands of times.
        const MAX_ANSWERS: usize = 64;
        let ids: BTreeSet<ObjectId> = ids.into_iter().take(crate::wire::MAX_LIST).collect();
        for o in ids.into_iter().take(MAX_ANSWERS) {
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

    pub(super) fn on_digest(&mut self, from: NodeId, d: Digest) {
        let mut wants = Vec::new();
        let my_trust = self.trust.as_ref().map_or(0, |t| t.body.version);
        if d.trust_version > my_trust {
            wants.push(ObjectId::TrustRoot(d.trust_version));
        } else if d.trust_version < my_trust
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

    /// Plumtree-style push: the payload to every peer still on the gossip tree (a peer
    /// that receives a duplicate prunes the link, one that pulls grafts it back), an
    /// `IHave` to the others so a lost branch is repaired by a pull. The first object
    /// floods; the duplicates it causes leave a spanning tree for the next ones.
    pub(super) fn push_object(&mut self, from: Option<NodeId>, msg: Message, oid: ObjectId) {
        let peers = self.peers.random_peers(&mut self.rng, usize::MAX, from);
        for p in peers {
            if self.peers.get(&p).is_some_and(|x| !x.lazy) {
                self.send(p, msg.clone());
            } else {
                self.send(p, Message::IHave(vec![oid]));
            }
        }
    }

    /// A gossip payload arrived from `from`: a duplicate prunes the link, a new one keeps
    /// (or puts) it on the tree.
    pub(super) fn tree_update(&mut self, from: NodeId, duplicate: bool) {
        let Some(p) = self.peers.get_mut(&from) else {
            return;
        };
        if duplicate {
            if !p.lazy {
                p.lazy = true;
                self.send(from, Message::Prune);
            }
        } else {
            p.lazy = false;
        }
    }

    pub(super) fn flush_reports(&mut self) {
        if self.pending_reports.is_empty() {
            return;
        }
        let batch = core::mem::take(&mut self.pending_reports);
        for p in self
            .peers
            .random_peers(&mut self.rng, self.config.eager_fanout, None)
        {
            self.send(p, Message::Reports(batch.clone()));
        }
    }
}

pub(super) fn sample_reports(s: &ReportSample) -> Vec<HealthReport> {
    s.entries().flat_map(|e| e.reports().cloned()).collect()
}
