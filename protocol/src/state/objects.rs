//! Acceptance of signed objects: trust roots, manifests (with equivocation), operator
//! instructions and health reports.

use super::Mesh;
use super::config::{MAX_EQUIVOCATIONS, MAX_PENDING_INSTRUCTIONS, PENALTY_MINOR, PENALTY_SEVERE};
use crate::ids::{ManifestId, NodeId};
use crate::io::{Event, ObjectKind};
use crate::manifest::{Manifest, SignedManifest};
use crate::rollout::{HealthReport, SignedInstruction};
use crate::signing::SignedError;
use crate::time::{Now, UnixTime};
use crate::trust::{TrustError, TrustRoot};
use crate::wire::{Message, ObjectId};
use rand_core::Rng;

pub(super) fn penalty_for(e: &TrustError) -> u32 {
    match e {
        TrustError::Malformed(_) | TrustError::Forged | TrustError::OutOfScope(_) => PENALTY_SEVERE,
        TrustError::UnderThreshold { .. } => PENALTY_SEVERE,
        TrustError::BadCertificate(_) => PENALTY_SEVERE,
        // An honest peer with a skewed clock or an old view may send these.
        TrustError::Expired
        | TrustError::TrustRootExpired
        | TrustError::Stale { .. }
        | TrustError::Future { .. } => 0,
        // A bound of this node, not a fault of the sender.
        TrustError::Capacity(_) => 0,
    }
}

impl<R: Rng> Mesh<R> {
    // ----- trust roots -----------------------------------------------------------------

    pub(super) fn on_trust_root(
        &mut self,
        now: Now,
        from: Option<NodeId>,
        t: crate::trust::SignedTrustRoot,
    ) -> Result<(), TrustError> {
        let res = match &self.trust {
            None if from.is_none() => TrustRoot::bootstrap(t, now.wall),
            // A peer cannot install our first trust root: that is the operator's call.
            None => return Ok(()),
            Some(cur) => {
                let Ok(body) = t.decode_body() else {
                    return self.refuse(
                        ObjectKind::TrustRoot,
                        from,
                        TrustError::Malformed(SignedError::Invalid("bad body".into())),
                    );
                };
                if body.version < cur.body.version {
                    return Ok(());
                }
                if body.version == cur.body.version {
                    if t.body_hash() != cur.signed.body_hash()
                        && self.trust_equivocation != Some(body.version)
                        && cur.signed_by_root_keys(&t)
                    {
                        let evidence = Box::new((cur.signed.clone(), t));
                        self.trust_equivocation = Some(body.version);
                        self.emit(Event::TrustRootEquivocation {
                            version: body.version,
                            evidence,
                        });
                    }
                    return Ok(());
                }
                cur.verify_successor(t, now.wall)
            }
        };
        match res {
            Ok(root) => {
                let version = root.body.version;
                let signed = root.signed.clone();
                self.trust = Some(root);
                self.emit(Event::TrustRootUpdated {
                    version,
                    signed: signed.clone(),
                });
                for p in self.peers.random_peers(&mut self.rng, usize::MAX, from) {
                    self.send(p, Message::TrustRoot(signed.clone()));
                }
                Ok(())
            }
            Err(e) => self.refuse(ObjectKind::TrustRoot, from, e),
        }
    }

    // ----- manifests -------------------------------------------------------------------

    /// Accept or refuse a manifest. `restore`: re-accepting one persisted before a restart.
    pub(super) fn on_manifest(
        &mut self,
        now: Now,
        from: Option<NodeId>,
        signed: SignedManifest,
        restore: bool,
    ) -> Result<(), TrustError> {
        let id = ManifestId(signed.body_hash());
        if let Some((channel, version)) = self.index.get(&id) {
            // Gossip duplicates are normal; a local re-publish of an old release is a
            // replay and is refused like one.
            let highest = self.channels.get(channel).map_or(0, |c| c.highest);
            if from.is_none() && !restore && *version < highest {
                let e = TrustError::Stale {
                    got: *version,
                    highest,
                };
                return self.refuse(ObjectKind::Manifest, None, e);
            }
            return Ok(());
        }
        let m = match Manifest::decode(signed) {
            Ok(m) => m,
            Err(e) => return self.refuse(ObjectKind::Manifest, from, TrustError::Malformed(e)),
        };
        let Some(trust) = &self.trust else {
            return self
                .refuse(ObjectKind::Manifest, from, TrustError::TrustRootExpired)
                .map(|_| ());
        };
        let auth = if restore {
            trust.authorise_publisher_signed(&m.signed, &m.body.channel, UnixTime(0))
        } else {
            trust.authorise_manifest(&m, now.wall)
        };
        if let Err(e) = auth {
            return self.refuse(ObjectKind::Manifest, from, e);
        }
        let channel = m.body.channel.clone();
        let version = m.body.version;
        let max_channels = self.config.max_channels;
        if !self.channels.contains_key(&channel) && self.channels.len() >= max_channels {
            return self.refuse(
                ObjectKind::Manifest,
                from,
                TrustError::Capacity(format!(
                    "this node follows {max_channels} channels, its limit (max_channels)"
                )),
            );
        }
        let chan = self.channels.entry(channel.clone()).or_default();
        if let Some(v) = self.pending_pins.remove(&channel) {
            chan.pinned_version = Some(v);
        }
        // Same channel and version, different body: equivocation.
        if let Some(existing) = chan.releases.get(&version) {
            let existing_signed = existing.manifest.signed.clone();
            let existing_id = existing.manifest.id;
            if chan.equivocations.contains(&(version, id)) {
                return Ok(()); // seen: the evidence went out and the choice was made
            }
            // The evidence is bounded (a leaked key could sign any number of bodies for one
            // version), the convergence on the lowest id is not.
            if chan.equivocations.len() < MAX_EQUIVOCATIONS {
                chan.equivocations.insert((version, id));
                chan.equivocations.insert((version, existing_id));
                let kept = existing_id.min(id);
                self.emit(Event::Equivocation {
                    channel: channel.clone(),
                    version,
                    kept,
                    evidence: Box::new((existing_signed.clone(), m.signed.clone())),
                });
                // Spread the evidence once, so every node converges on the same choice.
                let new_signed = m.signed.clone();
                for p in self.peers.random_peers(&mut self.rng, usize::MAX, from) {
                    self.send(p, Message::Manifest(existing_signed.clone()));
                    self.send(p, Message::Manifest(new_signed.clone()));
                }
            }
            if id < existing_id {
                let signed = m.signed.clone();
                self.insert_release(now, m);
                self.index.remove(&existing_id);
                // The kept manifest replaces the other one: persist it like an accepted one.
                self.emit(Event::ManifestAccepted {
                    id,
                    channel: channel.clone(),
                    version,
                    signed,
                });
            }
            return Ok(());
        }
        if !restore && version <= chan.highest {
            let highest = chan.highest;
            return self.refuse(
                ObjectKind::Manifest,
                from,
                TrustError::Stale {
                    got: version,
                    highest,
                },
            );
        }
        if chan.equivocations.iter().any(|(v, _)| *v == version) && !restore {
            return Ok(());
        }
        chan.highest = chan.highest.max(version);
        let signed = m.signed.clone();
        self.insert_release(now, m);
        self.emit(Event::ManifestAccepted {
            id,
            channel: channel.clone(),
            version,
            signed: signed.clone(),
        });
        self.push(from, Message::Manifest(signed), ObjectId::Manifest(id));
        // While restoring, the active release is not marked yet: trim after SetActive.
        if !restore {
            self.trim_channel(&channel);
        }
        self.refresh_all(now);
        Ok(())
    }
    // ----- instructions ----------------------------------------------------------------

    pub(super) fn on_instruction(
        &mut self,
        now: Now,
        from: Option<NodeId>,
        s: SignedInstruction,
    ) -> Result<(), TrustError> {
        let hash = s.body_hash();
        if self.holds(&ObjectId::Instruction(hash)) {
            return Ok(());
        }
        let body = match s.decode_body() {
            Ok(b) => b,
            Err(e) => return self.refuse(ObjectKind::Instruction, from, TrustError::Malformed(e)),
        };
        let Some(trust) = &self.trust else {
            return Ok(());
        };
        if let Err(e) = trust.authorise_publisher_signed(&s, &body.channel, now.wall) {
            return self.refuse(ObjectKind::Instruction, from, e);
        }
        if body.issued > now.wall.plus(self.config.max_clock_skew) {
            let ahead_ms = body.issued.0 - now.wall.0;
            return self.refuse(
                ObjectKind::Instruction,
                from,
                TrustError::Future { ahead_ms },
            );
        }
        let Some(mid) = self
            .channels
            .get(&body.channel)
            .and_then(|c| c.releases.get(&body.version))
            .map(|r| r.manifest.id)
        else {
            // Unknown release (the manifest may still be on its way): hold the latest
            // instruction per release, bounded, and apply it when the manifest arrives.
            let key = (body.channel.clone(), body.version);
            let newer = self
                .pending_instructions
                .get(&key)
                .is_none_or(|(cs, cb)| (cb.issued, cs.body_hash()) < (body.issued, hash));
            let room = self.pending_instructions.len() < MAX_PENDING_INSTRUCTIONS
                || self.pending_instructions.contains_key(&key);
            let plausible = self
                .channels
                .get(&body.channel)
                .is_none_or(|c| body.version > c.highest);
            if newer && room && plausible {
                self.pending_instructions.insert(key, (s.clone(), body));
                self.push(from, Message::Instruction(s), ObjectId::Instruction(hash));
            }
            return Ok(());
        };
        self.apply_instruction(now, from, mid, s, body);
        Ok(())
    }

    /// Make an authorised instruction for the known release `mid` take effect, if it is
    /// the latest one for it (by issue time, then body hash, so every node keeps the same).
    pub(super) fn apply_instruction(
        &mut self,
        now: Now,
        from: Option<NodeId>,
        mid: ManifestId,
        s: SignedInstruction,
        body: crate::rollout::InstructionBody,
    ) {
        let hash = s.body_hash();
        if let Some((cs, cur)) = self.instructions.get(&mid)
            && (cur.issued, cs.body_hash()) >= (body.issued, hash)
        {
            return;
        }
        self.emit(Event::InstructionAccepted {
            channel: body.channel.clone(),
            version: body.version,
            action: body.action,
            signed: Box::new(s.clone()),
        });
        self.instructions.insert(mid, (s.clone(), body));
        self.push(from, Message::Instruction(s), ObjectId::Instruction(hash));
        self.refresh_all(now);
    }

    // ----- health reports --------------------------------------------------------------

    /// Returns true when the report entered or changed the sample.
    pub(super) fn on_report(&mut self, now: Now, from: Option<NodeId>, r: HealthReport) -> bool {
        let body = match r.signed.decode_body() {
            Ok(b) => b,
            Err(e) => {
                self.reject(
                    ObjectKind::Report,
                    from,
                    PENALTY_SEVERE,
                    "malformed",
                    e.to_string(),
                );
                return false;
            }
        };
        // Cheap checks before the signature: only releases we keep have a sample.
        if !self.samples.contains_key(&body.manifest) {
            return false;
        }
        if body.timestamp > now.wall.plus(self.config.max_clock_skew) {
            // An honest node with a fast clock: no penalty, anti-entropy offers it again.
            self.reject(
                ObjectKind::Report,
                from,
                0,
                "future",
                format!(
                    "timestamp {} ms ahead of this clock (tolerance {} s)",
                    body.timestamp.0 - now.wall.0,
                    self.config.max_clock_skew.as_secs()
                ),
            );
            return false;
        }
        // Exactly one signature, checked before any is verified: a frame of reports costs at
        // most one verification per report.
        if r.signed.signatures().len() != 1 {
            self.reject(
                ObjectKind::Report,
                from,
                PENALTY_SEVERE,
                "malformed",
                format!(
                    "a health report carries one signature, not {}",
                    r.signed.signatures().len()
                ),
            );
            return false;
        }
        if r.signed.valid_signers(|k| k.0 == body.node.0).is_empty() {
            self.reject(
                ObjectKind::Report,
                from,
                PENALTY_SEVERE,
                "forged",
                "not signed by the reporting node".into(),
            );
            return false;
        }
        if let Some(t) = &self.trust
            && let Err(e) = t.check_certificate(&body.node, r.cert.as_ref(), now.wall)
        {
            self.reject(
                ObjectKind::Report,
                from,
                PENALTY_MINOR,
                e.label(),
                e.to_string(),
            );
            return false;
        }
        let Some(sample) = self.samples.get_mut(&body.manifest) else {
            return false;
        };
        let ok_release = self
            .index
            .get(&body.manifest)
            .is_some_and(|(c, v)| *c == body.channel && *v == body.version);
        if !ok_release {
            self.reject(
                ObjectKind::Report,
                from,
                PENALTY_MINOR,
                "mismatch",
                "report names the wrong channel or version".into(),
            );
            return false;
        }
        let changed = sample.insert(r.clone(), body);
        if changed {
            self.gossip.queue_report(r, self.config.report_sample_size);
            self.refresh_all(now);
        }
        changed
    }

    // ----- rejection -------------------------------------------------------------------

    /// Refuse an object of `kind`: tell the driver ([`Event::Rejected`]) and, if a peer sent
    /// it, penalise that peer by `penalty` points.
    pub(super) fn reject(
        &mut self,
        kind: ObjectKind,
        from: Option<NodeId>,
        penalty: u32,
        label: &'static str,
        reason: String,
    ) {
        self.emit(Event::Rejected {
            kind,
            from,
            label,
            reason: reason.clone(),
        });
        if let Some(p) = from {
            let what = match kind {
                ObjectKind::TrustRoot => "trust root",
                ObjectKind::Manifest => "manifest",
                ObjectKind::Instruction => "instruction",
                ObjectKind::Report => "health report",
                ObjectKind::Certificate => "certificate",
            };
            self.penalise(p, penalty, format!("{what}: {reason}"));
        }
    }

    /// [`Mesh::reject`] for a [`TrustError`], with its label and penalty; returns it.
    fn refuse(
        &mut self,
        kind: ObjectKind,
        from: Option<NodeId>,
        e: TrustError,
    ) -> Result<(), TrustError> {
        self.reject(kind, from, penalty_for(&e), e.label(), e.to_string());
        Err(e)
    }

    /// Spread a newly accepted object by gossip (see [`super::gossip::Gossip::push_object`]),
    /// lending the gossip part the peer table, the RNG and the output queue.
    fn push(&mut self, from: Option<NodeId>, msg: Message, oid: ObjectId) {
        self.gossip.push_object(
            &self.peers,
            &mut self.rng,
            from,
            msg,
            oid,
            &mut self.outputs,
        );
    }
}
