//! The driver's health policy: what a node reports after `Activate` and `RollBack`.

use super::{Ev, Harness};
use crate::ids::ManifestId;
use crate::io::Event;
use crate::manifest::Channel;
use crate::rollout::{HealthReport, HealthReportBody, HealthStatus};
use crate::signing::Signed;
use crate::time::UnixTime;
use core::time::Duration;

/// What a node reports after activating a release.
#[derive(Clone, Debug, PartialEq)]
pub struct HealthPlan {
    /// Reported at activation. A `Failed` status means activation failed (the node stays
    /// on its previous version).
    pub at_activation: HealthStatus,
    /// Optionally, a later report (e.g. runtime errors after some time serving).
    pub later: Option<(Duration, HealthStatus)>,
}

impl HealthPlan {
    /// Healthy, nothing more.
    pub fn ok() -> Self {
        HealthPlan {
            at_activation: HealthStatus::Ok,
            later: None,
        }
    }
}

pub(super) type Policy = Box<dyn FnMut(usize, &Channel, u64) -> HealthPlan>;

impl Harness {
    pub(super) fn report(
        &self,
        i: usize,
        channel: &Channel,
        version: u64,
        manifest: ManifestId,
        status: HealthStatus,
        at: UnixTime,
    ) -> HealthReport {
        let body = HealthReportBody {
            node: self.nodes[i].id(),
            channel: channel.clone(),
            version,
            manifest,
            status,
            requests: 100,
            errors: 0,
            latency_p50_us: 200,
            latency_p99_us: 900,
            timestamp: at,
            lm: None,
        };
        HealthReport {
            signed: Signed::sign(&body, &[&self.nodes[i].key]),
            cert: self.nodes[i].cert.clone(),
        }
    }

    pub(super) fn on_event(&mut self, i: usize, e: &Event) {
        match e {
            Event::Activate {
                channel,
                version,
                manifest,
                ..
            } => {
                let plan = (self.policy)(i, channel, *version);
                let wall = self.wall_of(i);
                let ok = plan.at_activation == HealthStatus::Ok;
                if ok {
                    self.nodes[i]
                        .active
                        .insert(channel.clone(), (*version, *manifest));
                    self.nodes[i].served.insert((channel.clone(), *version));
                }
                let r = self.report(i, channel, *version, *manifest, plan.at_activation, wall);
                // The driver reports after loading: a little later, never inside the call.
                self.push(
                    self.now + Duration::from_millis(1),
                    Ev::Report { node: i, report: r },
                );
                if let (true, Some((after, status))) = (ok, plan.later) {
                    let r = self.report(i, channel, *version, *manifest, status, wall.plus(after));
                    self.push(self.now + after, Ev::Report { node: i, report: r });
                }
            }
            Event::RollBack {
                channel,
                from,
                from_manifest,
                to,
            } => {
                match to {
                    Some((v, m)) => {
                        self.nodes[i].active.insert(channel.clone(), (*v, *m));
                    }
                    None => {
                        self.nodes[i].active.remove(channel);
                    }
                }
                let wall = self.wall_of(i);
                let r = self.report(
                    i,
                    channel,
                    *from,
                    *from_manifest,
                    HealthStatus::RolledBack,
                    wall,
                );
                self.push(
                    self.now + Duration::from_millis(1),
                    Ev::Report { node: i, report: r },
                );
            }
            _ => {}
        }
    }
}
