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
use pollen_protocol::manifest::Manifest;
use pollen_protocol::signing::Signed;
use pollen_protocol::trust::SignedTrustRoot;
use std::collections::BTreeSet;

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
        if let Some(c) = self.cert.clone()
            && let Err(e) = self.core_command(Command::SetCertificate(c))
        {
            anyhow::bail!("node certificate: {e}");
        }
        let mut manifests: Vec<Manifest> = Vec::new();
        for (id, bytes) in self.store.manifests()? {
            match Manifest::from_bytes(&bytes) {
                Ok(m) => manifests.push(m),
                Err(e) => tracing::warn!("stored manifest {} unreadable: {e}", id.short()),
            }
        }
        manifests.sort_by_key(|m| m.body.version);
        // Version pins (the config file's win over those set at run time), then release
        // pins: restored releases are trimmed only once the active one is marked.
        let mut pins = self.state.pins.clone();
        pins.extend(self.cfg.pins.clone());
        self.state.pins = pins.clone();
        for (channel, version) in pins {
            if let Ok(channel) = pollen_protocol::manifest::Channel::new(&channel) {
                let _ = self.core_command(Command::PinVersion {
                    channel,
                    version: Some(version),
                });
            }
        }
        for id in self.state.published.clone() {
            if let Ok(id) = id.parse::<ManifestId>() {
                let _ = self.core_command(Command::Pin(id));
            }
        }
        for m in manifests {
            let id = m.id;
            if let Err(e) = self.core_command(Command::Restore(m.signed)) {
                self.restore_incomplete = true;
                tracing::warn!("stored manifest {} not restored: {e}", id.short());
            }
        }
        for (channel, version) in self.state.highest.clone() {
            if let Ok(channel) = pollen_protocol::manifest::Channel::new(&channel) {
                let _ = self.core_command(Command::SetHighest { channel, version });
            }
        }
        for (channel, id) in self.state.active.clone() {
            if let (Ok(channel), Ok(manifest)) = (
                pollen_protocol::manifest::Channel::new(&channel),
                id.parse::<ManifestId>(),
            ) {
                let _ = self.core_command(Command::SetActive { channel, manifest });
            }
        }
        for hex in self
            .state
            .instructions
            .values()
            .cloned()
            .collect::<Vec<_>>()
        {
            let parsed = hex::decode(&hex)
                .ok()
                .and_then(|b| Signed::from_bytes(&b).ok());
            match parsed {
                Some((s, _)) => {
                    if let Err(e) = self.core_command(Command::Instruct(s)) {
                        tracing::warn!("stored rollout instruction not restored: {e}");
                    }
                }
                None => tracing::warn!("stored rollout instruction unreadable"),
            }
        }
        // Durable chunks of every tracked file.
        for file in self.mesh.live_files() {
            self.open_file(file, true);
        }
        Ok(())
    }

    /// Delete files that no retained or published release refers to.
    pub(super) fn gc(&mut self) {
        // While restoring, the core holds only part of what is on disk; and if anything on
        // disk could not be restored, the core does not know all that must be kept.
        if self.restoring || self.restore_incomplete {
            return;
        }
        let keep = self.mesh.live_files();
        let mut manifests: BTreeSet<ManifestId> =
            self.mesh.releases().map(|(_, r)| r.id()).collect();
        let _ = self.persist.try_send(Persist::Gc(keep));
        manifests.extend(
            self.state
                .published
                .iter()
                .filter_map(|h| h.parse::<ManifestId>().ok()),
        );
        let _ = self.persist.try_send(Persist::PruneManifests(manifests));
    }
}
