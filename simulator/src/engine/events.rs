//! What the engine does with the events a node's core emits: bookkeeping in the release
//! tracks and counters, and the driver policy a real node follows ("on Activate, load and
//! report Ok or Failed; on RollBack, report RolledBack"), with a weak device failing a
//! release marked `fail_on_weak`.

use super::{NEVER, PublishedFile, Sim, T0};
use pollen_protocol::rollout::{ErrorClass, HealthReport, HealthReportBody, HealthStatus};
use pollen_protocol::signing::Signed;
use pollen_protocol::{Command, Event};
use std::time::Duration;

impl Sim {
    /// Node `i` reports `status` for release `r` (signed with its key, through its core).
    fn report(&mut self, i: u32, r: usize, status: HealthStatus) {
        let Some(m) = self.releases[r].manifest.clone() else {
            return;
        };
        let node = &self.nodes[i as usize];
        let body = HealthReportBody {
            node: node.mesh.id(),
            channel: self.channel.clone(),
            version: m.body.version,
            manifest: m.id,
            status,
            requests: 0,
            errors: 0,
            latency_p50_us: 0,
            latency_p99_us: 0,
            timestamp: T0.plus(Duration::from_micros(self.now)),
            lm: None,
        };
        let report = HealthReport {
            signed: Signed::sign(&body, &[&node.key]),
            cert: None,
        };
        self.command(i, Command::ReportHealth(report));
    }

    /// Node `i`'s core emitted `e`.
    pub(super) fn on_event(&mut self, i: u32, e: Event) {
        let iu = i as usize;
        match e {
            Event::ManifestAccepted { version, .. } => {
                if let Some(r) = self.release_of_version(version) {
                    let rel = &mut self.releases[r];
                    if rel.accepted[iu] == NEVER {
                        rel.accepted[iu] = self.now;
                        rel.hops[iu] = match self.cur_hop {
                            Some((cr, h)) if cr == r => h,
                            _ => 0,
                        };
                    }
                }
            }
            Event::FileComplete { file } => {
                if let Some(&PublishedFile { release: r, .. }) = self.files.get(&file)
                    && self.releases[r].complete[iu] == NEVER
                {
                    self.releases[r].complete[iu] = self.now;
                }
            }
            Event::Activate { version, .. } => {
                let Some(r) = self.release_of_version(version) else {
                    return;
                };
                if self.release_spec(&self.releases[r]).fail_on_weak && self.nodes[iu].weak {
                    self.releases[r].failed[iu] = true;
                    self.report(
                        i,
                        r,
                        HealthStatus::Failed {
                            class: ErrorClass::GoldenMismatch,
                            detail: "golden check failed on this device class".into(),
                        },
                    );
                    return;
                }
                self.nodes[iu].serving = Some(version);
                if self.releases[r].active[iu] == NEVER {
                    self.releases[r].active[iu] = self.now;
                }
                if self.releases[r].gated {
                    self.report(i, r, HealthStatus::Ok);
                }
            }
            Event::RollBack { from, to, .. } => {
                self.nodes[iu].serving = to.map(|t| t.0);
                if let Some(r) = self.release_of_version(from) {
                    self.releases[r].rolled_back[iu] = true;
                    if self.releases[r].gated {
                        self.report(i, r, HealthStatus::RolledBack);
                    }
                }
            }
            Event::RolloutFailed { version, .. } => {
                if let Some(r) = self.release_of_version(version)
                    && self.releases[r].gate_failed == NEVER
                {
                    self.releases[r].gate_failed = self.now;
                }
            }
            Event::Rejected { label, .. } => {
                *self.stats.rejected.entry(label.to_string()).or_default() += 1;
            }
            Event::Equivocation { .. } => self.stats.equivocations += 1,
            _ => {}
        }
    }
}
