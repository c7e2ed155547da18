//! Adversaries: nodes chosen at build time replay the first manifest, forge manifests
//! with an unknown key or flood announcements of objects that do not exist (once a
//! second, while online), and one node sends a second manifest for the last published
//! version (the equivocation). Corrupt chunks are a flag on the sender's flows
//! (`transfer`).

use super::rand::key_from;
use super::{Ev, Sim};
use pollen_protocol::ManifestId;
use pollen_protocol::manifest::SignedManifest;
use pollen_protocol::signing::Signed;
use pollen_protocol::wire::{Message, ObjectId};
use rand_core::Rng;

impl Sim {
    /// `Ev::Attack`: one round of replays and forgeries (in the first second of each
    /// minute) and floods (every second); schedules the next round.
    pub(super) fn attack(&mut self) {
        let n = self.nodes.len();
        let first = self.releases.first().and_then(|r| r.manifest.clone());
        let forger = key_from(&mut self.rng);
        for i in 0..n as u32 {
            let (replay, forge, flood) = {
                let x = &self.nodes[i as usize];
                (x.replay, x.forge, x.flood)
            };
            if !(replay || forge || flood) || !self.nodes[i as usize].online {
                continue;
            }
            let peers = self.up_peers(i);
            let minute = self.now % 60_000_000 < 1_000_000;
            if replay
                && minute
                && let Some(m) = &first
            {
                for &j in &peers {
                    self.send(i, j, Message::Manifest(m.signed.clone()));
                }
            }
            if forge && minute && !self.releases.is_empty() {
                let mut body = self.releases[0].manifest.as_ref().map(|m| m.body.clone());
                if let Some(b) = body.as_mut() {
                    b.version = 1_000_000 + self.now / 1_000_000;
                    let s: SignedManifest = Signed::sign(b, &[&forger]);
                    for &j in &peers {
                        self.send(i, j, Message::Manifest(s.clone()));
                    }
                }
            }
            if flood {
                for &j in &peers {
                    let ids: Vec<ObjectId> = (0..100)
                        .map(|_| {
                            let mut b = [0u8; 32];
                            self.rng.fill_bytes(&mut b);
                            ObjectId::Manifest(ManifestId(b))
                        })
                        .collect();
                    self.send(i, j, Message::IHave(ids));
                }
            }
        }
        self.push(self.now + 1_000_000, Ev::Attack);
    }

    /// `Ev::Equivocate`: the first adversary (or the node after the publisher) sends its
    /// peers a second, validly signed manifest for the last published version.
    pub(super) fn equivocate(&mut self) {
        let Some(r) = self.releases.iter().rposition(|r| r.manifest.is_some()) else {
            return;
        };
        let version = self.releases[r].version;
        let signed = self.manifest_for(r, version, 1);
        let i = (0..self.nodes.len() as u32)
            .find(|&i| self.nodes[i as usize].adversary())
            .unwrap_or((self.publisher + 1) % self.nodes.len() as u32);
        let peers = self.up_peers(i);
        for j in peers {
            self.send(i, j, Message::Manifest(signed.clone()));
        }
    }
}
