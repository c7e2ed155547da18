//! Activation and health: load a release's model and run its golden checks off the actor,
//! put it in the registry, roll back, and sign the health reports the rollout gates count.

use super::{Actor, Done};
use crate::serving::{GoldenSet, LoadedModel, WindowStats, trial};
use crate::store::FailedActivation;
use anyhow::Result;
use pollen_keys::time::unix_now;
use pollen_protocol::ids::ManifestId;
use pollen_protocol::io::Command;
use pollen_protocol::rollout::{ErrorClass, HealthReport, HealthReportBody, HealthStatus};
use pollen_protocol::signing::Signed;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

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
        let inline = m.body.golden.clone();
        let rtol = m
            .body
            .serving
            .as_ref()
            .map(|s| s.golden_rtol.clone())
            .unwrap_or_default();
        let store = self.store.clone();
        let tx = self.done_tx.clone();
        let budget = self.cfg.model_memory_budget();
        let timeout = self
            .cfg
            .activation_timeout()
            .unwrap_or(Duration::from_secs(600));
        let exe = std::env::current_exe().ok();
        tokio::task::spawn_blocking(move || {
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
                    trial::run(exe, &path, &golden, budget, timeout)?;
                }
                let trial = started.elapsed() - read;
                let mut loaded =
                    LoadedModel::load(&path, channel.as_str(), version, manifest, budget)?;
                let load = started.elapsed() - read - trial;
                loaded
                    .golden(&golden)
                    .map_err(|e| (ErrorClass::GoldenMismatch, e))?;
                tracing::info!(
                    "{channel} version {version}: golden checks read in {read:.1?}, trial run \
                     {trial:.1?}, load {load:.1?}, {} golden checks {:.1?}",
                    golden.checks.len(),
                    started.elapsed() - read - trial - load
                );
                loaded.keep_golden(golden);
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

    /// At start, after the restore: releases whose activation was under way when the
    /// process stopped (their markers are still on disk) count as failed here, and every
    /// release that failed here is reported failed again, so the core never chooses it on
    /// this node and the previous version serves.
    pub(super) fn recover_failed_activations(&mut self) {
        match self.store.activating() {
            Ok(ids) => {
                for id in ids {
                    self.error(format!(
                        "release {} was being activated when the node stopped: it counts as failed here",
                        id.short()
                    ));
                    self.state
                        .failed
                        .entry(id.to_hex())
                        .or_insert(FailedActivation {
                            class: ErrorClass::CrashLoop,
                            detail: "the node stopped while activating this release".into(),
                        });
                    if let Err(e) = self.store.clear_activating(&id) {
                        tracing::warn!("activation marker for {} not removed: {e}", id.short());
                    }
                }
                self.save_state();
            }
            Err(e) => tracing::warn!("activation markers unreadable: {e}"),
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
