//! Start-up: load what the store holds into the core, and garbage collection of what no
//! retained or published release needs any more.
//!
//! The restore order matters: trust roots first (every later object is checked against
//! them), then the configured root and certificate, pins, manifests by version, highest
//! versions, active releases, instructions, and last the durable chunks of every file.

use super::{Actor, Persist};
use anyhow::Result;
use pollen_protocol::ids::ManifestId;
use pollen_protocol::io::Command;
use pollen_protocol::manifest::{Channel, Manifest};
use pollen_protocol::signing::Signed;
use pollen_protocol::state::restore::{self, Persisted};
use pollen_protocol::trust::SignedTrustRoot;
use std::collections::{BTreeMap, BTreeSet};

impl Actor {
    /// Load the trust root chain, the configured trust root, manifests, versions and
    /// durable chunks from disk into the core.
    pub(super) fn restore(&mut self) -> Result<()> {
        // Stored roots are restored whatever the time: a site offline past its root's
        // expiry keeps serving what it has.
        for bytes in self.store.trust_roots()? {
            match Signed::from_bytes(&bytes) {
                Ok((s, _)) => {
                    if let Err(e) = self.core_command(Command::RestoreTrustRoot(s)) {
                        self.restore_incomplete = true;
                        tracing::warn!("stored trust root not usable: {e}");
                    }
                }
                Err(e) => {
                    self.restore_incomplete = true;
                    tracing::warn!("stored trust root unreadable: {e}");
                }
            }
        }
        if let Some(p) = self.cfg.trust.clone() {
            let (s, body): (SignedTrustRoot, _) =
                pollen_keys::files::read_signed(&p, "trust root")?;
            let current = self.mesh.trust_root().map_or(0, |t| t.body.version);
            if body.version > current
                && let Err(e) = self.core_command(Command::SetTrustRoot(s))
            {
                if current == 0 {
                    anyhow::bail!("trust root {}: {e}", p.display());
                }
                self.error(format!(
                    "configured trust root {} not installed: {e}",
                    p.display()
                ));
            }
        }
        // The rest in the core's restore order (pins, manifests by version, highest and
        // active per channel, instructions); chunks follow as the store reads them.
        let mut manifests = Vec::new();
        for (id, bytes) in self.store.manifests()? {
            match Manifest::from_bytes(&bytes) {
                Ok(m) => manifests.push((m.body.version, m.signed)),
                Err(e) => tracing::warn!("stored manifest {} unreadable: {e}", id.short()),
            }
        }
        // Version pins: the config file's win over those set at run time.
        let mut pins = self.state.pins.clone();
        pins.extend(self.cfg.pins.clone());
        self.state.pins = pins.clone();
        let channel = |c: &str| Channel::new(c).ok();
        let mut channels: BTreeMap<Channel, (u64, Option<ManifestId>)> = BTreeMap::new();
        for (c, version) in &self.state.highest {
            if let Some(c) = channel(c) {
                channels.entry(c).or_default().0 = *version;
            }
        }
        for (c, id) in &self.state.active {
            if let (Some(c), Ok(id)) = (channel(c), id.parse::<ManifestId>()) {
                channels.entry(c).or_default().1 = Some(id);
            }
        }
        let mut instructions = Vec::new();
        for hex in self.state.instructions.values() {
            match hex::decode(hex)
                .ok()
                .and_then(|b| Signed::from_bytes(&b).ok())
            {
                Some((s, _)) => instructions.push(s),
                None => tracing::warn!("stored rollout instruction unreadable"),
            }
        }
        let persisted = Persisted {
            trust_roots: Vec::new(), // restored above, before the configured one
            certificate: self.cert.clone(),
            pinned_versions: pins
                .into_iter()
                .filter_map(|(c, v)| Some((channel(&c)?, v)))
                .collect(),
            pinned: self
                .state
                .published
                .iter()
                .filter_map(|id| id.parse().ok())
                .collect(),
            manifests,
            channels: channels
                .into_iter()
                .map(|(c, (highest, active))| (c, highest, active))
                .collect(),
            instructions,
            chunks: Vec::new(),
        };
        for cmd in restore::commands(persisted) {
            // What a refusal means depends on what was refused.
            let refused = match &cmd {
                Command::SetCertificate(_) => Refused::Fatal,
                Command::Restore(m) => Refused::Manifest(ManifestId(m.body_hash())),
                Command::Instruct(_) => Refused::Instruction,
                _ => Refused::Ignored,
            };
            if let Err(e) = self.core_command(cmd) {
                match refused {
                    Refused::Fatal => anyhow::bail!("node certificate: {e}"),
                    Refused::Manifest(id) => {
                        self.restore_incomplete = true;
                        tracing::warn!("stored manifest {} not restored: {e}", id.short());
                    }
                    Refused::Instruction => {
                        tracing::warn!("stored rollout instruction not restored: {e}")
                    }
                    Refused::Ignored => {}
                }
            }
        }
        // Durable chunks of every file of this node's variants, and the other variants'
        // files it holds whole.
        let ours: std::collections::BTreeSet<_> = self
            .mesh
            .releases()
            .flat_map(|(_, r)| r.files().map(|f| f.spec.content_id).collect::<Vec<_>>())
            .collect();
        for file in self.mesh.live_files() {
            if ours.contains(&file) || self.store.has_blob(&file) {
                self.open_file(file, true);
            }
        }
        Ok(())
    }

    /// Delete files and manifests that no retained release refers to (published ones
    /// are retained while pinned).
    pub(super) fn gc(&mut self) {
        // While restoring, the core holds only part of what is on disk; and if anything on
        // disk could not be restored, the core does not know all that must be kept.
        if self.restoring || self.restore_incomplete {
            return;
        }
        let keep = self.mesh.live_files();
        let manifests: BTreeSet<ManifestId> = self.mesh.releases().map(|(_, r)| r.id()).collect();
        // Failed activations, and what this node published, are remembered only for
        // releases still kept (the core trims published releases past `max_pinned`).
        self.state
            .failed
            .retain(|hex, _| hex.parse().is_ok_and(|id| manifests.contains(&id)));
        self.state
            .published
            .retain(|hex| hex.parse().is_ok_and(|id| manifests.contains(&id)));
        self.persist_job(Persist::Gc(keep));
        self.persist_job(Persist::PruneManifests(manifests));
    }
}

/// How [`Actor::restore`] treats a restore command the core refuses.
enum Refused {
    /// The node cannot start (its certificate).
    Fatal,
    /// A stored manifest: the core no longer knows everything on disk, so no GC.
    Manifest(ManifestId),
    /// A stored instruction: logged.
    Instruction,
    /// Pins, versions, active releases: nothing to do.
    Ignored,
}
