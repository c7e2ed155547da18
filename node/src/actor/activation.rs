//! Activation and health: load a release's model and run its golden checks off the actor,
//! put it in the registry, roll back, and sign the health reports the rollout gates count.

use super::{Actor, Done};
use crate::serving::classify::classify;
use crate::serving::lm::LmModel;
use crate::serving::states::{self, Phase, Served, VersionFacts, VersionState};
use crate::serving::{GoldenSet, LoadedModel, WindowStats, trial};
use crate::status::{WaitingIn, waiting_text};
use crate::store::FailedActivation;
use anyhow::Result;
use pollen_keys::time::unix_now;
use pollen_protocol::ids::ManifestId;
use pollen_protocol::io::Command;
use pollen_protocol::manifest::{LM_CONFIG_FILE, LM_TOKENIZER_FILE};
use pollen_protocol::rollout::{ErrorClass, HealthReport, HealthReportBody, HealthStatus};
use pollen_protocol::signing::Signed;
use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

/// An activation under way (see [`Actor::start_activation_of`]), for the `LOADING` state.
#[derive(Debug)]
pub(super) struct Activating {
    /// When it started.
    pub(super) since: Instant,
    /// Its current [`Phase`], set by the blocking task.
    pub(super) phase: Arc<AtomicU8>,
}

impl Actor {
    /// [`Actor::start_activation_of`] a release the core holds, with the variant the core
    /// chose for this device.
    pub(super) fn start_activation(
        &mut self,
        channel: pollen_protocol::manifest::Channel,
        version: u64,
        manifest: ManifestId,
        report: bool,
    ) {
        let Some(variant) = self
            .mesh
            .release(&channel, version)
            .filter(|r| r.id() == manifest)
            .map(|r| r.variant)
        else {
            return;
        };
        self.start_activation_of(channel, version, manifest, variant, report);
    }

    /// Load variant `variant` of a release's model (its first file) and run its golden
    /// checks (the manifest's, then the variant's golden file's) on the blocking pool; the
    /// result comes back as [`Done::Activated`].
    pub(super) fn start_activation_of(
        &mut self,
        channel: pollen_protocol::manifest::Channel,
        version: u64,
        manifest: ManifestId,
        variant: usize,
        report: bool,
    ) {
        let Some(m) = self.mesh.manifest(&manifest).cloned() else {
            return;
        };
        let Some(v) = m.body.artifact.variants.get(variant) else {
            return;
        };
        let Some(file) = v.model_file() else {
            return;
        };
        let spec = file.spec.clone();
        let golden_spec = v.golden_file().map(|f| f.spec.clone());
        let named = |name: &str| v.files.iter().skip(1).find(|f| f.name == name);
        let lm_specs = m
            .body
            .serving
            .as_ref()
            .and_then(|s| s.lm.as_ref())
            .and_then(|_| {
                Some((
                    named(LM_TOKENIZER_FILE)?.spec.clone(),
                    named(LM_CONFIG_FILE)?.spec.clone(),
                ))
            });
        let inline = m.body.golden.clone();
        let rtol = m
            .body
            .serving
            .as_ref()
            .map(|s| s.golden_rtol.clone())
            .unwrap_or_default();
        let mut serving = m.body.serving.clone().unwrap_or_default();
        if let Some(lm) = serving.lm.as_mut() {
            // The trial and the check see this variant's bound only.
            lm.min_agreement = vec![lm.min_agreement_of(variant)];
        }
        let store = self.store.clone();
        let tx = self.done_tx.clone();
        let limits = self.cfg.serving_limits();
        let budget = limits.budget;
        let timeout = self
            .cfg
            .activation_timeout()
            .unwrap_or(Duration::from_secs(600));
        let exe = std::env::current_exe().ok();
        let phase = Arc::new(AtomicU8::new(Phase::Finishing as u8));
        self.activating.insert(
            manifest,
            Activating {
                since: Instant::now(),
                phase: phase.clone(),
            },
        );
        tokio::task::spawn_blocking(move || {
            let step = |p: Phase| phase.store(p as u8, Ordering::Relaxed);
            // Whatever happens in here, the actor hears back: a panic is a failed activation.
            let attempt = std::panic::catch_unwind(AssertUnwindSafe(|| {
                let path = store.finish(&spec).map_err(|e| {
                    (
                        ErrorClass::Unavailable,
                        format!("model file not in the store: {e}"),
                    )
                })?;
                let golden_path = match &golden_spec {
                    Some(g) => Some(store.finish(g).map_err(|e| {
                        (
                            ErrorClass::Unavailable,
                            format!("golden file not in the store: {e}"),
                        )
                    })?),
                    None => None,
                };
                let lm_files = match &lm_specs {
                    Some((t, c)) => {
                        let path = |f| {
                            store.finish(f).map_err(|e| {
                                (
                                    ErrorClass::Unavailable,
                                    format!("language model file not in the store: {e}"),
                                )
                            })
                        };
                        Some((path(t)?, path(c)?))
                    }
                    None => None,
                };
                // Durable before anything risky: if the process dies from here on, the
                // next start reports this release failed instead of trying it again.
                if let Err(e) = store.mark_activating(&manifest) {
                    tracing::warn!(
                        "activation marker for {} not written: {e}",
                        manifest.short()
                    );
                }
                let started = Instant::now();
                let file = golden_path.as_deref().zip(golden_spec.map(|g| g.size));
                let golden = GoldenSet::gather(inline, file, rtol)
                    .map_err(|e| (ErrorClass::Other, format!("golden checks: {e}")))?;
                let read = started.elapsed();
                if let Some(exe) = &exe {
                    step(Phase::Trial);
                    trial::run(
                        exe,
                        &path,
                        &golden,
                        &serving,
                        lm_files.as_ref(),
                        budget,
                        timeout,
                    )?;
                }
                let trial = started.elapsed() - read;
                step(Phase::Loading);
                let mut loaded = LoadedModel::load(
                    &path,
                    channel.as_str(),
                    version,
                    manifest,
                    &serving,
                    &golden,
                    &limits,
                )
                .map_err(|(c, e)| (classify(&e, c), e))?;
                let load = started.elapsed() - read - trial;
                step(Phase::Checking);
                loaded
                    .check_golden(&golden)
                    .map_err(|(c, e)| (classify(&e, c), e))?;
                if let (Some(spec), Some((tokenizer, config))) = (&serving.lm, &lm_files) {
                    let lm = LmModel::new(&loaded, tokenizer, config, &limits)?;
                    let a = lm.check_golden(spec, 0)?;
                    tracing::info!(
                        "{channel} version {version}: a language model; its golden prompts \
                         agree on {} of {} tokens, mean log-likelihood {:.4}",
                        a.agreed,
                        a.total,
                        a.log_likelihood / a.total.max(1) as f64
                    );
                    loaded.attach_lm(lm);
                }
                tracing::info!(
                    "{channel} version {version}: golden checks read in {read:.1?}, trial run \
                     {trial:.1?}, load {load:.1?}, {} golden checks {:.1?}",
                    golden.checks.len(),
                    started.elapsed() - read - trial - load
                );
                loaded.keep_golden(golden);
                crate::serving::model::release_freed_memory();
                Ok(Arc::new(loaded))
            }));
            let result = attempt.unwrap_or_else(|_| {
                Err((ErrorClass::Panic, "the activation panicked".to_string()))
            });
            if let Err(e) = store.clear_activating(&manifest) {
                tracing::warn!(
                    "activation marker for {} not removed: {e}",
                    manifest.short()
                );
            }
            let _ = tx.blocking_send(Done::Activated {
                channel,
                version,
                manifest,
                report,
                result,
            });
        });
    }

    pub(super) fn on_activated(
        &mut self,
        channel: pollen_protocol::manifest::Channel,
        version: u64,
        manifest: ManifestId,
        report: bool,
        result: Result<Arc<LoadedModel>, (ErrorClass, String)>,
    ) {
        self.activating.remove(&manifest);
        // Two activations of a channel can overlap (a restart restores the release it
        // served while a newer one arrives): the one that finishes last must not displace
        // the release the core has moved on to since.
        let now_active = self.mesh.active(&channel);
        if result.is_ok()
            && let Some((v, id)) = now_active
            && id != manifest
        {
            tracing::info!(
                "{channel} version {version} passed its checks, but version {v} serves now: not swapped in"
            );
            return;
        }
        match result {
            Ok(model) => {
                tracing::info!("{channel} version {version} passed its checks and serves");
                self.registry.activate(model);
                // Recorded only now: a restart serves again only what passed here.
                self.state
                    .active
                    .insert(channel.to_string(), manifest.to_hex());
                self.state.failed.remove(&manifest.to_hex());
                self.save_state();
                if report {
                    self.report(&channel, version, manifest, HealthStatus::Ok);
                }
            }
            Err((class, detail)) => {
                // Whichever step found it, the same failure gets the same class.
                let class = classify(&detail, class);
                self.error(format!(
                    "{channel} version {version} failed to activate ({class:?}): {detail}"
                ));
                let detail: String = detail.chars().take(240).collect();
                self.state.failed.insert(
                    manifest.to_hex(),
                    FailedActivation {
                        class,
                        detail: detail.clone(),
                    },
                );
                self.save_state();
                self.report(
                    &channel,
                    version,
                    manifest,
                    HealthStatus::Failed { class, detail },
                );
            }
        }
    }

    /// At start, after the restore: a release whose activation was under way when the
    /// process stopped (its marker is still on disk) is tried again the first time and
    /// counts as failed here the second ([`NodeState::interrupted`]); every release that
    /// failed here is reported failed again, so the core never chooses it on this node
    /// and the previous version serves.
    ///
    /// [`NodeState::interrupted`]: crate::store::NodeState::interrupted
    pub(super) fn recover_failed_activations(&mut self) {
        match self.store.activating() {
            Ok(ids) => {
                for id in ids {
                    let times = self.state.interrupted.entry(id.to_hex()).or_insert(0);
                    *times += 1;
                    if *times >= 2 {
                        self.error(format!(
                            "release {} was being activated when the node stopped, for the second time: it counts as failed here",
                            id.short()
                        ));
                        self.state
                            .failed
                            .entry(id.to_hex())
                            .or_insert(FailedActivation {
                                class: ErrorClass::CrashLoop,
                                detail: "the node stopped twice while activating this release"
                                    .into(),
                            });
                    } else {
                        tracing::warn!(
                            "release {} was being activated when the node stopped: trying it once more \
                             (a second time counts it failed here)",
                            id.short()
                        );
                    }
                    if let Err(e) = self.store.clear_activating(&id) {
                        tracing::warn!("activation marker for {} not removed: {e}", id.short());
                    }
                }
                let mesh = &self.mesh;
                self.state.interrupted.retain(|hex, _| {
                    hex.parse::<ManifestId>()
                        .is_ok_and(|id| mesh.manifest(&id).is_some())
                });
                self.save_state();
            }
            Err(e) => tracing::warn!("activation markers unreadable: {e}"),
        }
        // Failures recorded by an older node keep one class for one failure here too.
        for f in self.state.failed.values_mut() {
            f.class = classify(&f.detail, f.class);
        }
        for (hex, f) in self.state.failed.clone() {
            let Some(m) = hex
                .parse::<ManifestId>()
                .ok()
                .and_then(|id| self.mesh.manifest(&id).cloned())
            else {
                continue;
            };
            let status = HealthStatus::Failed {
                class: f.class,
                detail: f.detail,
            };
            self.report(&m.body.channel, m.body.version, m.id, status);
        }
    }

    /// Each version this node knows of each channel (or of `only` that one), oldest first,
    /// with its state and reason (see [`crate::serving::states`]): the releases the core
    /// retains, and whatever the registry still serves.
    pub(super) fn model_states(&self, only: Option<&str>) -> Vec<(String, Vec<VersionState>)> {
        let mut facts: BTreeMap<String, BTreeMap<u64, VersionFacts>> = BTreeMap::new();
        for (channel, r) in self.mesh.releases() {
            if only.is_some_and(|o| o != channel.as_str()) {
                continue;
            }
            let name = channel.as_str();
            let current = self.registry.current(name).map(|m| m.version);
            let my_stage = r.manifest.stage_of(&self.me);
            let (mut have, mut total) = (0u64, 0u64);
            for f in r.files() {
                let n = f.spec.chunk_count() as u32;
                total += u64::from(n);
                have += (0..n)
                    .filter(|i| self.mesh.has_chunk(&f.spec.content_id, *i))
                    .count() as u64;
            }
            let fact = VersionFacts {
                version: r.version,
                served: served(&self.registry, name, r.version, current),
                activating: self.activating.get(&r.id()).map(|a| {
                    (
                        Phase::from_u8(a.phase.load(Ordering::Relaxed)),
                        a.since.elapsed(),
                    )
                }),
                failed: self
                    .state
                    .failed
                    .get(&r.id().to_hex())
                    .map(|f| (f.class, f.detail.clone())),
                rolled_back: r.decision.is_some_and(|d| d.rollback()),
                halted: r.decision.is_some_and(|d| d.halted),
                admitted: r.decision.is_some_and(|d| d.admits(my_stage)),
                my_stage,
                waiting: r
                    .decision
                    .and_then(|d| d.waiting)
                    .map(|w| waiting_text(w, WaitingIn::Stage)),
                chunks: (have, total),
                // The config file's pins win over those set at run time (see restore).
                pinned: self
                    .cfg
                    .pins
                    .get(name)
                    .or(self.state.pins.get(name))
                    .copied(),
                current,
            };
            facts
                .entry(name.to_string())
                .or_default()
                .insert(r.version, fact);
        }
        // What the registry serves, even if the core no longer retains it.
        for name in self.registry.channels() {
            if only.is_some_and(|o| o != name) {
                continue;
            }
            let current = self.registry.current(&name).map(|m| m.version);
            let entry = facts.entry(name.clone()).or_default();
            for v in self.registry.versions(&name) {
                entry.entry(v).or_insert_with(|| VersionFacts {
                    version: v,
                    served: served(&self.registry, &name, v, current),
                    activating: None,
                    failed: None,
                    rolled_back: false,
                    halted: false,
                    admitted: true,
                    my_stage: None,
                    waiting: None,
                    chunks: (0, 0),
                    pinned: None,
                    current,
                });
            }
        }
        facts
            .into_iter()
            .map(|(name, vs)| (name, vs.values().map(states::state_of).collect()))
            .collect()
    }

    /// Serve the warm previous version again (or load it), and report the rollback.
    pub(super) fn roll_back(
        &mut self,
        channel: &pollen_protocol::manifest::Channel,
        from: u64,
        from_manifest: ManifestId,
        to: Option<(u64, ManifestId)>,
    ) {
        match to {
            Some((v, id)) => {
                if !self.registry.roll_back_to(channel.as_str(), &id) {
                    self.start_activation(channel.clone(), v, id, false);
                }
            }
            None => self.registry.remove(channel.as_str()),
        }
        self.report(channel, from, from_manifest, HealthStatus::RolledBack);
    }

    /// Sign a health report with the node key and hand it to the core, which gossips it.
    pub(super) fn report(
        &mut self,
        channel: &pollen_protocol::manifest::Channel,
        version: u64,
        manifest: ManifestId,
        status: HealthStatus,
    ) {
        self.report_with(channel, version, manifest, status, WindowStats::default());
    }

    /// [`Actor::report`] with the figures of a serving window.
    pub(super) fn report_with(
        &mut self,
        channel: &pollen_protocol::manifest::Channel,
        version: u64,
        manifest: ManifestId,
        status: HealthStatus,
        w: WindowStats,
    ) {
        let body = HealthReportBody {
            node: self.me,
            channel: channel.clone(),
            version,
            manifest,
            status,
            requests: w.requests,
            errors: w.errors,
            latency_p50_us: w.p50_us,
            latency_p99_us: w.p99_us,
            timestamp: unix_now().unwrap_or_default(),
            lm: w.lm_health(),
        };
        let report = HealthReport {
            signed: Signed::sign(&body, &[&self.secret]),
            cert: self.cert.clone(),
        };
        if let Err(e) = self.core_command(Command::ReportHealth(report)) {
            tracing::debug!("health report not taken: {e}");
        }
    }

    /// Every `health_interval`: report each served release's requests, errors and latency
    /// over the window, as a failure when the window broke the plan's runtime limit or the
    /// runtime panicked `crash_loop_panics` times.
    pub(super) fn health_tick(&mut self) {
        let actives: Vec<_> = self
            .mesh
            .actives()
            .map(|(c, v, m)| (c.clone(), v, m))
            .collect();
        for (channel, version, id) in actives {
            let Some(model) = self
                .registry
                .current(channel.as_str())
                .filter(|m| m.manifest == id)
            else {
                continue;
            };
            let w = model.health.take();
            let limit = self.mesh.manifest(&id).and_then(|m| m.body.rollout.runtime);
            let status = crate::serving::window_status(&w, limit, self.cfg.crash_loop_panics);
            if let HealthStatus::Failed { detail, .. } = &status {
                self.error(format!("{channel} version {version}: {detail}"));
            }
            self.report_with(&channel, version, id, status, w);
        }
    }
}

/// Where `version` of `channel` stands in the registry, `current` being its current version.
fn served(
    registry: &crate::serving::Registry,
    channel: &str,
    version: u64,
    current: Option<u64>,
) -> Served {
    if current == Some(version) {
        Served::Current
    } else if registry.version(channel, version).is_some() {
        Served::Previous
    } else {
        Served::No
    }
}
