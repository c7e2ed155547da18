//! Releases: what the engine tracks about each one for the report ([`ReleaseTrack`]), the
//! manifests the publisher signs (with synthetic chunk hashes but the real size and layout)
//! and publishing them.

use super::{NEVER, PublishedFile, Sim, T0};
use crate::scenario::ReleaseSpec;
use pollen_protocol::chunking::{ChunkSize, FileSpec, root_from_chaining_values};
use pollen_protocol::manifest::{Manifest, ManifestBody, SignedManifest};
use pollen_protocol::rollout::{Gate, RolloutPlan};
use pollen_protocol::signing::Signed;
use pollen_protocol::wire::{Bitfield, Message};
use pollen_protocol::{Command, ContentId, ManifestId};
use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};
use std::sync::Arc;
use std::time::Duration;

/// What happened to one release, per node (vectors are indexed by node).
#[derive(Debug)]
pub struct ReleaseTrack {
    /// Index in the scenario's releases (see [`Sim::release_spec`]).
    pub spec: usize,
    /// Version.
    pub version: u64,
    /// The signed manifest, once published.
    pub manifest: Option<Arc<Manifest>>,
    /// Publish time, µs.
    pub published: u64,
    /// Each node's stage (u8::MAX: none).
    pub stage: Vec<u8>,
    /// When each node accepted the manifest.
    pub accepted: Vec<u64>,
    /// Gossip hops to each node (u16::MAX: not reached).
    pub hops: Vec<u16>,
    /// When each node held the whole artifact.
    pub complete: Vec<u64>,
    /// When each node started serving it.
    pub active: Vec<u64>,
    /// The node failed to activate it.
    pub failed: Vec<bool>,
    /// The node rolled back from it.
    pub rolled_back: Vec<bool>,
    /// Manifest payload messages delivered (for redundancy).
    pub payloads: u64,
    /// First time any node saw the rollout fail its gate.
    pub gate_failed: u64,
    /// Gated plans make nodes send health reports.
    pub gated: bool,
}

impl ReleaseTrack {
    /// Nothing yet has happened to scenario release `index` (`spec`) on any of `n` nodes.
    pub(super) fn new(index: usize, spec: &ReleaseSpec, n: usize) -> ReleaseTrack {
        ReleaseTrack {
            spec: index,
            version: spec.version,
            manifest: None,
            published: NEVER,
            stage: vec![u8::MAX; n],
            accepted: vec![NEVER; n],
            hops: vec![u16::MAX; n],
            complete: vec![NEVER; n],
            active: vec![NEVER; n],
            failed: vec![false; n],
            rolled_back: vec![false; n],
            payloads: 0,
            gate_failed: NEVER,
            gated: spec.gate.is_some(),
        }
    }
}

impl Sim {
    /// The scenario's description of a release.
    pub fn release_spec(&self, r: &ReleaseTrack) -> &ReleaseSpec {
        &self.scenario.releases[r.spec]
    }

    /// Index of the release with version `v`.
    pub(super) fn release_of_version(&self, v: u64) -> Option<usize> {
        self.releases.iter().position(|r| r.version == v)
    }

    /// The signed manifest of release `r` at `version`; `salt` 1 gives a second, different
    /// manifest for the same version (the equivocation).
    pub(super) fn manifest_for(&mut self, r: usize, version: u64, salt: u8) -> SignedManifest {
        let spec = self.release_spec(&self.releases[r]).clone();
        let chunk = ChunkSize::new(spec.chunk.0).expect("validated");
        let count = pollen_protocol::chunking::chunk_count(spec.size.0, chunk);
        // Synthetic chaining values: chunks are never hashed in the simulator (a corrupt
        // chunk is a flag on its flow), but the manifest has the real size and layout.
        let mut seed = ChaCha8Rng::seed_from_u64(self.seed ^ version ^ (u64::from(salt) << 56));
        let cvs: Vec<[u8; 32]> = if count > 1 {
            (0..count)
                .map(|_| {
                    let mut b = [0u8; 32];
                    seed.fill_bytes(&mut b);
                    b
                })
                .collect()
        } else {
            Vec::new()
        };
        let content_id = if count > 1 {
            root_from_chaining_values(&cvs).expect("non-empty")
        } else {
            let mut b = [0u8; 32];
            seed.fill_bytes(&mut b);
            ContentId(b)
        };
        let file = FileSpec {
            content_id,
            size: spec.size.0,
            chunk_size: chunk,
            chaining_values: cvs,
        };
        let gate = spec.gate.map(|g| Gate {
            min_healthy: g.min_healthy,
            max_failure_ppm: (g.max_failure * 1e6).round().clamp(0.0, 1e6) as u32,
        });
        let plan = RolloutPlan::percent(
            &spec.stages,
            Duration::from_micros(spec.stage_interval.0),
            gate,
        );
        let created = T0.plus(Duration::from_micros(self.now));
        let body = ManifestBody {
            // A year, so that no simulated run outlives its manifest.
            expires: created.plus(Duration::from_secs(365 * 86_400)),
            ..ManifestBody::single_file(self.channel.clone(), version, file, plan, created)
        };
        Signed::sign(&body, &[&self.publisher_key])
    }

    /// `Ev::Publish`: the publisher publishes release `r`, holds all of its chunks and pins
    /// it; each node's stage in the plan is recorded.
    pub(super) fn publish(&mut self, r: usize) {
        let version = self.releases[r].version;
        let signed = self.manifest_for(r, version, 0);
        let m = Arc::new(Manifest::decode(signed.clone()).expect("own manifest decodes"));
        let spec = &m.body.artifact.variants[0].files[0].spec;
        self.files.insert(
            spec.content_id,
            PublishedFile {
                size: spec.size,
                chunk: spec.chunk_size.get(),
                release: r,
            },
        );
        let n = self.nodes.len();
        let rel = &mut self.releases[r];
        rel.published = self.now;
        for k in 0..n {
            rel.stage[k] = m
                .stage_of(&self.nodes[k].mesh.id())
                .map_or(u8::MAX, |s| s as u8);
        }
        rel.manifest = Some(m.clone());
        let p = self.publisher;
        self.cur_hop = None;
        self.command(p, Command::Publish(signed));
        let chunks = Bitfield::full(spec.chunk_count() as u32);
        self.command(
            p,
            Command::LocalChunks {
                file: spec.content_id,
                chunks,
            },
        );
        self.command(p, Command::Pin(m.id));
    }

    /// A message from `from` is about to be delivered: if it carries a published
    /// manifest, count the payload and set the hop count the receiver would record.
    pub(super) fn note_manifest_delivery(&mut self, from: u32, msg: &Message) {
        if let Message::Manifest(m) = msg {
            let id = ManifestId(m.body_hash());
            if let Some(r) = self
                .releases
                .iter()
                .position(|r| r.manifest.as_ref().is_some_and(|x| x.id == id))
            {
                self.releases[r].payloads += 1;
                let h = self.releases[r].hops[from as usize];
                self.cur_hop = Some((r, h.saturating_add(1)));
            }
        }
    }
}
