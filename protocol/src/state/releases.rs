//! Releases per channel: retention, garbage collection, and the rollout decision of which
//! release this node serves.

use super::exchange::FileState;
use super::{Interner, Mesh};
use crate::ids::Channel;
use crate::ids::{ContentId, ManifestId, NodeId};
use crate::io::Event;
use crate::manifest::Manifest;
use crate::rollout::{
    Decision, HealthReportBody, HealthStatus, InstructionBody, ReportSample, RolloutAction,
    SignedInstruction, evaluate,
};
use crate::time::Now;
use alloc::collections::{BTreeMap, BTreeSet};
use alloc::sync::Arc;
use core::time::Duration;
use rand_core::Rng;

/// A retained release.
#[derive(Debug)]
pub(super) struct Release {
    /// Its manifest (shared through the interner, if any).
    pub(super) manifest: Arc<Manifest>,
    /// The variant this node chose for its device.
    pub(super) variant: usize,
    /// The latest rollout decision (None until first evaluated).
    pub(super) decision: Option<Decision>,
    /// Stages already announced with [`Event::StageOpened`].
    pub(super) announced_stages: usize,
    /// [`Event::RolloutFailed`] already emitted.
    pub(super) announced_failure: bool,
}

/// One followed channel.
#[derive(Debug, Default)]
pub(super) struct ChannelState {
    /// Highest version accepted (a replay or older version is refused).
    pub(super) highest: u64,
    /// Retained releases by version, at most `retained_versions` (plus protected ones).
    pub(super) releases: BTreeMap<u64, Release>,
    /// (version, manifest) the driver was told to serve.
    pub(super) active: Option<(u64, ManifestId)>,
    /// What was active before the current activation (fallback if it fails).
    pub(super) previous: Option<(u64, ManifestId)>,
    /// Releases this node failed to activate.
    pub(super) failed_local: BTreeSet<ManifestId>,
    /// Releases this node reported healthy at least once.
    pub(super) reported_ok: BTreeSet<ManifestId>,
    /// Manifest ids seen per version beyond the kept one (equivocation evidence).
    pub(super) equivocations: BTreeSet<(u64, ManifestId)>,
    /// Local pin: serve this version whatever the rollouts say (see
    /// [`Command::PinVersion`]).
    pub(super) pinned_version: Option<u64>,
}

impl<R: Rng> Mesh<R> {
    pub(super) fn channel_entry(&mut self, channel: &Channel) -> Result<&mut ChannelState, String> {
        if !self.channels.contains_key(channel) && self.channels.len() >= self.config.max_channels {
            return Err("too many channels".into());
        }
        let c = self.channels.entry(channel.clone()).or_default();
        if let Some(v) = self.pending_pins.remove(channel) {
            c.pinned_version = Some(v);
        }
        Ok(c)
    }

    pub(super) fn insert_release(&mut self, now: Now, m: Manifest) {
        let m = match &self.interner {
            Some(Interner(f)) => f(Arc::new(m)),
            None => Arc::new(m),
        };
        let variant = m.body.artifact.choose(&self.config.device);
        let channel = m.body.channel.clone();
        let version = m.body.version;
        self.index.insert(m.id, (channel.clone(), version));
        let chan = self
            .channels
            .get_mut(&channel)
            .expect("channel entry exists");
        chan.releases.insert(
            version,
            Release {
                manifest: m.clone(),
                variant,
                decision: None,
                announced_stages: 0,
                announced_failure: false,
            },
        );
        self.samples
            .entry(m.id)
            .or_insert_with(|| ReportSample::new(m.id, self.config.report_sample_size));
        self.exchange.track(&m, variant, self.config.max_files);
        if let Some((s, body)) = self.pending_instructions.remove(&(channel, version)) {
            self.apply_instruction(now, None, m.id, s, body);
        }
    }

    /// This node reports on its own release: a `Failed` before any `Ok` is a failed
    /// activation (the driver kept serving what it served before), so the release is
    /// never chosen again here and the previous one is active again. After an `Ok`, a
    /// failure is a runtime failure, which the rollout gate handles.
    pub(super) fn note_own_report(&mut self, body: &HealthReportBody) {
        let Some(c) = self.channels.get_mut(&body.channel) else {
            return;
        };
        match body.status {
            HealthStatus::Ok => {
                c.reported_ok.insert(body.manifest);
            }
            HealthStatus::Failed { .. } if !c.reported_ok.contains(&body.manifest) => {
                c.failed_local.insert(body.manifest);
                if c.active.map(|a| a.1) == Some(body.manifest) {
                    c.active = c.previous.take();
                }
            }
            _ => {}
        }
    }

    /// Keep at most `retained_versions` releases per channel, never the active or the
    /// previous one, nor the newest (a publisher pins what it publishes only after the
    /// publish: with every older release pinned, the release just published was the one
    /// trimmed).
    pub(super) fn trim_channel(&mut self, channel: &Channel) {
        let keep = self.config.retained_versions.max(2);
        let Some(c) = self.channels.get_mut(channel) else {
            return;
        };
        let mut protected: BTreeSet<u64> = c
            .active
            .iter()
            .chain(c.previous.iter())
            .map(|a| a.0)
            .chain(c.pinned_version)
            .chain(c.releases.keys().next_back().copied())
            .collect();
        protected.extend(
            c.releases
                .iter()
                .filter(|(_, r)| self.pinned.contains(&r.manifest.id))
                .map(|(v, _)| *v),
        );
        let mut removed = Vec::new();
        while c.releases.len() > keep {
            let Some(v) = c.releases.keys().find(|v| !protected.contains(v)).copied() else {
                break;
            };
            if let Some(r) = c.releases.remove(&v) {
                removed.push(r.manifest);
            }
        }
        // Evidence goes with the versions it is about.
        let kept = &c.releases;
        c.equivocations.retain(|(v, _)| kept.contains_key(v));
        for m in removed {
            self.index.remove(&m.id);
            self.samples.remove(&m.id);
            self.instructions.remove(&m.id);
            self.gc_files();
        }
    }

    /// Drop file state no retained release refers to.
    pub(super) fn gc_files(&mut self) {
        let live = self.live_files();
        self.exchange.retain_files(&live);
    }
    // ----- rollout ---------------------------------------------------------------------

    pub(super) fn refresh_all(&mut self, now: Now) {
        let names: Vec<Channel> = self.channels.keys().cloned().collect();
        for c in names {
            self.refresh_channel(now, &c);
        }
    }

    /// Re-decide what this node serves on channel `name`, in four steps: evaluate every
    /// release's rollout, choose the target release, mark the files to download, and
    /// switch the active release once the target is complete.
    pub(super) fn refresh_channel(&mut self, now: Now, name: &Channel) {
        let catching_up = self.catch_up_until.is_some();
        let Some(chan) = self.channels.get_mut(name) else {
            return;
        };
        let mut events = Vec::new();
        let skew = self.config.max_clock_skew;
        chan.evaluate(
            name,
            &self.instructions,
            &self.samples,
            now,
            skew,
            &mut events,
        );
        let target = chan.target(&self.id);
        let mut newly = Vec::new();
        for (cid, want) in chan.wanted_files(target, self.config.prefetch) {
            if self.exchange.want(&cid, want) {
                newly.push(cid);
            }
        }
        chan.switch_active(
            name,
            target,
            self.exchange.files(),
            catching_up,
            &mut events,
        );
        for e in events {
            self.emit(e);
        }
        for cid in newly {
            let (x, mut cx) = self.exchange_cx();
            x.announce_interest(&mut cx, cid);
        }
    }
}

/// A candidate to serve: (version, manifest, chosen variant).
type Target = Option<(u64, ManifestId, usize)>;

impl ChannelState {
    /// Step 1: evaluate every release's rollout; announce newly opened stages and failures.
    fn evaluate(
        &mut self,
        name: &Channel,
        instructions: &BTreeMap<ManifestId, (SignedInstruction, InstructionBody)>,
        samples: &BTreeMap<ManifestId, ReportSample>,
        now: Now,
        skew: Duration,
        events: &mut Vec<Event>,
    ) {
        for (v, r) in self.releases.iter_mut() {
            let halt = instructions
                .get(&r.manifest.id)
                .and_then(|(_, b)| match b.action {
                    RolloutAction::Halt => Some(b.issued),
                    RolloutAction::Resume => None,
                });
            let d = evaluate(
                &r.manifest.body.rollout,
                r.manifest.body.created,
                samples.get(&r.manifest.id),
                halt,
                now.wall,
                |node| r.manifest.stage_of(node),
                skew,
            );
            while r.announced_stages < d.open_stages() {
                events.push(Event::StageOpened {
                    channel: name.clone(),
                    version: *v,
                    stage: r.announced_stages,
                    at: d.opened[r.announced_stages],
                });
                r.announced_stages += 1;
            }
            if let Some(f) = d.failure
                && !r.announced_failure
            {
                r.announced_failure = true;
                events.push(Event::RolloutFailed {
                    channel: name.clone(),
                    version: *v,
                    failure: f,
                });
            }
            r.decision = Some(d);
        }
    }

    /// Step 2: the release this node should serve: the highest one that admits it and did
    /// not fail to activate here; a local pin overrides the rollouts (the pinned version if
    /// this node has it, else whatever it serves now).
    fn target(&self, me: &NodeId) -> Target {
        let target = self
            .releases
            .iter()
            .rev()
            .find(|(_, r)| {
                !self.failed_local.contains(&r.manifest.id)
                    && r.decision
                        .as_ref()
                        .is_some_and(|d| d.admits(r.manifest.stage_of(me)))
            })
            .map(|(v, r)| (*v, r.manifest.id, r.variant));
        match self.pinned_version {
            None => target,
            Some(pv) => match self.releases.get(&pv) {
                Some(r) if !self.failed_local.contains(&r.manifest.id) => {
                    Some((pv, r.manifest.id, r.variant))
                }
                _ => self
                    .active
                    .and_then(|(v, id)| self.releases.get(&v).map(|r| (v, id, r.variant))),
            },
        }
    }

    /// Step 3: which files to download: the target's and, with prefetch, those of newer
    /// releases that have not failed. (file, wanted) for every file of every release.
    fn wanted_files(&self, target: Target, prefetch: bool) -> Vec<(ContentId, bool)> {
        let floor = target.map_or(0, |t| t.0);
        let mut wanted = Vec::new();
        for (v, r) in &self.releases {
            let failed = r.decision.as_ref().is_some_and(|d| d.rollback())
                || self.failed_local.contains(&r.manifest.id);
            let want = !failed && (*v == floor || (*v > floor && prefetch));
            for f in &r.manifest.body.artifact.variants[r.variant].files {
                wanted.push((f.spec.content_id, want));
            }
        }
        wanted
    }

    /// Step 4: switch to the target once all its files are here: `Activate` going up,
    /// `RollBack` going down or away from a rolled-back release (which never waits);
    /// promotions wait while catching up.
    fn switch_active(
        &mut self,
        name: &Channel,
        target: Target,
        files: &BTreeMap<ContentId, FileState>,
        catching_up: bool,
        events: &mut Vec<Event>,
    ) {
        let active = self.active;
        let active_rolled_back = active.is_some_and(|(v, id)| {
            self.releases.get(&v).is_some_and(|r| {
                r.manifest.id == id && r.decision.as_ref().is_some_and(|d| d.rollback())
            })
        });
        let complete = |m: &Manifest, variant: usize| {
            m.body.artifact.variants[variant]
                .files
                .iter()
                .all(|f| files.get(&f.spec.content_id).is_some_and(|s| s.complete()))
        };
        // Every rollback leaves the active release: `active` is Some wherever this is used.
        let rollback = |to: Option<(u64, ManifestId)>| {
            active.map(|(from, from_manifest)| Event::RollBack {
                channel: name.clone(),
                from,
                from_manifest,
                to,
            })
        };
        match target {
            Some((v, id, variant)) if Some((v, id)) != active => {
                if complete(&self.releases[&v].manifest, variant) {
                    let rolling_back = active.is_some_and(|(av, _)| av > v) || active_rolled_back;
                    if !rolling_back && catching_up {
                        // Promotions wait until this node has heard a peer's view.
                    } else if rolling_back {
                        events.extend(rollback(Some((v, id))));
                        self.previous = None;
                        self.active = Some((v, id));
                    } else {
                        events.push(Event::Activate {
                            channel: name.clone(),
                            version: v,
                            manifest: id,
                            variant,
                            previous: active.map(|a| a.0),
                        });
                        self.previous = active;
                        self.active = Some((v, id));
                    }
                } else if active_rolled_back {
                    events.extend(rollback(None));
                    self.active = None;
                }
            }
            None if active_rolled_back => {
                events.extend(rollback(None));
                self.active = None;
            }
            _ => {}
        }
    }
}
