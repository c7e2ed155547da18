//! Queries: cheap narrow getters, and the status view for displays.

use super::Mesh;
use super::config::Config;
use super::releases::Release;
use crate::chunking::FileSpec;
use crate::ids::Channel;
use crate::ids::{ContentId, ManifestId, NodeId};
use crate::manifest::Manifest;
use crate::rollout::{Decision, ReportSample, SignedInstruction};
use crate::trust::TrustRoot;
use alloc::collections::BTreeSet;
use alloc::sync::Arc;
use rand_core::Rng;

/// One retained release, borrowed from the core (see [`Mesh::release`]).
#[derive(Clone, Copy, Debug)]
pub struct ReleaseRef<'a> {
    /// Its version.
    pub version: u64,
    /// The manifest.
    pub manifest: &'a Arc<Manifest>,
    /// The variant this node chose for its device (index into the artifact's variants).
    pub variant: usize,
    /// The latest rollout decision, once evaluated.
    pub decision: Option<&'a Decision>,
}

impl<'a> ReleaseRef<'a> {
    fn of(r: &'a Release) -> Self {
        ReleaseRef {
            version: r.manifest.body.version,
            manifest: &r.manifest,
            variant: r.variant,
            decision: r.decision.as_ref(),
        }
    }

    /// The manifest id.
    pub fn id(&self) -> ManifestId {
        self.manifest.id
    }

    /// The files of the chosen variant.
    pub fn files(&self) -> impl Iterator<Item = &'a crate::manifest::FileEntry> + 'a {
        self.manifest.body.artifact.variants[self.variant]
            .files
            .iter()
    }
}

/// A summary of a release for status displays.
#[derive(Clone, Debug, PartialEq)]
pub struct ReleaseView {
    /// Version.
    pub version: u64,
    /// Manifest id.
    pub manifest: ManifestId,
    /// Stages in the plan.
    pub stages: usize,
    /// Latest decision.
    pub decision: Option<Decision>,
    /// This node's stage.
    pub my_stage: Option<usize>,
    /// The variant this node chose for its device (index into the artifact's variants).
    pub variant: usize,
    /// Healthy/failed/rolled-back in the sample.
    pub counts: crate::rollout::SampleCounts,
    /// Nodes this node knows (itself and its peers) that the open stages admit, that
    /// would enter the sample, and that have not reported yet.
    pub pending: u32,
    /// Nodes in the sample whose latest report is older than `report_ttl`.
    pub stale: u32,
    /// Failure classes in the sample: (class, nodes, one node's detail), most frequent
    /// first.
    pub failures: Vec<(crate::rollout::ErrorClass, u32, String)>,
    /// Files: (content id, chunks held, chunks total).
    pub files: Vec<(ContentId, u32, u32)>,
}

/// A summary of a channel for status displays.
#[derive(Clone, Debug, PartialEq)]
pub struct ChannelView {
    /// Channel.
    pub channel: Channel,
    /// Highest version accepted.
    pub highest: u64,
    /// Active (version, manifest).
    pub active: Option<(u64, ManifestId)>,
    /// Retained releases.
    pub releases: Vec<ReleaseView>,
    /// Versions with equivocation evidence.
    pub equivocations: Vec<u64>,
    /// The local pin, if any (see [`Command::PinVersion`](crate::io::Command::PinVersion)).
    pub pinned: Option<u64>,
}

impl<R: Rng> Mesh<R> {
    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The trust root in force.
    pub fn trust_root(&self) -> Option<&TrustRoot> {
        self.trust.as_ref()
    }

    /// The version of the last trust-root equivocation seen, if any (see
    /// [`Event::TrustRootEquivocation`](crate::io::Event::TrustRootEquivocation)).
    pub fn trust_equivocation(&self) -> Option<u64> {
        self.trust_equivocation
    }

    /// Connected peers and their sites.
    pub fn peers(&self) -> impl Iterator<Item = (&NodeId, Option<&str>)> {
        self.peers.iter().map(|(id, p)| (id, p.site.as_deref()))
    }

    /// The spec of a tracked file, for verifying its chunks.
    pub fn chunk_spec(&self, file: &ContentId) -> Option<&FileSpec> {
        self.exchange.file(file).map(|f| f.spec())
    }

    /// Should the driver store this chunk? False if held already or unknown.
    pub fn needs_chunk(&self, file: &ContentId, index: u32) -> bool {
        self.exchange
            .file(file)
            .is_some_and(|f| index < f.total() && !f.have.get(index) && !f.pending.contains(&index))
    }

    /// Does this node hold the chunk?
    pub fn has_chunk(&self, file: &ContentId, index: u32) -> bool {
        self.exchange.file(file).is_some_and(|f| f.have.get(index))
    }

    /// A retained manifest by id.
    pub fn manifest(&self, id: &ManifestId) -> Option<&Arc<Manifest>> {
        let (c, v) = self.index.get(id)?;
        self.channels.get(c)?.releases.get(v).map(|r| &r.manifest)
    }

    /// The (version, manifest) active on a channel.
    pub fn active(&self, channel: &Channel) -> Option<(u64, ManifestId)> {
        self.channels.get(channel)?.active
    }

    /// Highest version accepted on a channel.
    pub fn highest(&self, channel: &Channel) -> u64 {
        self.channels.get(channel).map_or(0, |c| c.highest)
    }

    /// The report sample of a release.
    pub fn sample(&self, id: &ManifestId) -> Option<&ReportSample> {
        self.samples.get(id)
    }

    /// The signed latest operator instruction for a release (what a driver persists).
    pub fn signed_instruction(&self, id: &ManifestId) -> Option<&SignedInstruction> {
        self.instructions.get(id).map(|(s, _)| s)
    }

    /// The latest operator instruction for a release.
    pub fn instruction(&self, id: &ManifestId) -> Option<&crate::rollout::InstructionBody> {
        self.instructions.get(id).map(|(_, b)| b)
    }

    /// One retained release of a channel.
    pub fn release(&self, channel: &Channel, version: u64) -> Option<ReleaseRef<'_>> {
        self.channels
            .get(channel)?
            .releases
            .get(&version)
            .map(ReleaseRef::of)
    }

    /// Every retained release, by channel then version.
    pub fn releases(&self) -> impl Iterator<Item = (&Channel, ReleaseRef<'_>)> {
        self.channels
            .iter()
            .flat_map(|(c, s)| s.releases.values().map(move |r| (c, ReleaseRef::of(r))))
    }

    /// Every channel followed (with or without retained releases).
    pub fn channels(&self) -> impl Iterator<Item = &Channel> {
        self.channels.keys()
    }

    /// The (channel, version, manifest) of every channel with an active release.
    pub fn actives(&self) -> impl Iterator<Item = (&Channel, u64, ManifestId)> {
        self.channels
            .iter()
            .filter_map(|(c, s)| s.active.map(|(v, id)| (c, v, id)))
    }

    /// The files of every retained release, of every variant: what a driver keeps on
    /// disk. Only the files of the variant this node chose are ever fetched; the others are
    /// kept (and served) when the node holds them, as the publisher of a release does.
    pub fn live_files(&self) -> BTreeSet<ContentId> {
        self.channels
            .values()
            .flat_map(|c| c.releases.values())
            .flat_map(|r| r.manifest.body.artifact.variants.iter())
            .flat_map(|v| v.files.iter().map(|f| f.spec.content_id))
            .collect()
    }

    /// Status of every channel: a display view that counts samples and pending reporters
    /// of every release. Use the narrow queries above for anything else.
    pub fn status(&self) -> Vec<ChannelView> {
        self.channels
            .iter()
            .map(|(name, c)| ChannelView {
                channel: name.clone(),
                highest: c.highest,
                active: c.active,
                pinned: c.pinned_version,
                equivocations: c.equivocations.iter().map(|(v, _)| *v).collect(),
                releases: c
                    .releases
                    .values()
                    .map(|r| ReleaseView {
                        version: r.manifest.body.version,
                        manifest: r.manifest.id,
                        stages: r.manifest.body.rollout.stages.len(),
                        decision: r.decision.clone(),
                        my_stage: r.manifest.stage_of(&self.id),
                        variant: r.variant,
                        counts: self
                            .samples
                            .get(&r.manifest.id)
                            .map(|s| s.counts())
                            .unwrap_or_default(),
                        pending: self.pending_reporters(r),
                        stale: self.samples.get(&r.manifest.id).map_or(0, |s| {
                            let cutoff = self.last_wall.minus(self.config.report_ttl);
                            s.entries()
                                .filter(|e| e.latest_body.timestamp < cutoff)
                                .count() as u32
                        }),
                        failures: self
                            .samples
                            .get(&r.manifest.id)
                            .map(|s| s.failures())
                            .unwrap_or_default(),
                        files: r.manifest.body.artifact.variants[r.variant]
                            .files
                            .iter()
                            .map(|f| {
                                let (h, t) = self
                                    .exchange
                                    .file(&f.spec.content_id)
                                    .map_or((0, f.spec.chunk_count() as u32), |s| {
                                        (s.have.count(), s.total())
                                    });
                                (f.spec.content_id, h, t)
                            })
                            .collect(),
                    })
                    .collect(),
            })
            .collect()
    }

    pub(super) fn pending_reporters(&self, r: &Release) -> u32 {
        let (Some(d), Some(sample)) = (&r.decision, self.samples.get(&r.manifest.id)) else {
            return 0;
        };
        core::iter::once(&self.id)
            .chain(self.peers.ids())
            .filter(|n| {
                d.admits(r.manifest.stage_of(n)) && !sample.contains(n) && sample.would_keep(n)
            })
            .count() as u32
    }
}
