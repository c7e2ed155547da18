//! Staged rollouts: plans, cohorts, health reports, the deterministic report sample, operator
//! instructions, and the pure function that decides which stages are open.
//!
//! Every node evaluates the same rule on the same inputs: the signed plan (anchored at the
//! manifest's signed `created` time), the bounded report sample (the K reports whose node
//! has the smallest `hash(node, version)`, so every node that has heard enough holds the same
//! sample), the latest signed instruction, and its wall clock. Stage opening times derive
//! from those signed timestamps, not from when a node heard something, so nodes converge on
//! the same decision without a coordinator.

use crate::cert::SignedNodeCert;
use crate::ids::{Channel, ManifestId, NodeId};
use crate::signing::{Domain, Signed, SignedBody, SignedError};
use crate::time::UnixTime;
use alloc::collections::BTreeMap;
use core::time::Duration;
use serde::{Deserialize, Serialize};

extern crate alloc;

/// One million: shares and rates are in parts per million.
pub const PPM: u32 = 1_000_000;
/// Most stages in a plan.
pub const MAX_STAGES: usize = 16;

/// When a stage may open at the earliest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StageStart {
    /// As soon as the previous stage opened (for the first stage: at the manifest's
    /// `created` time).
    Immediately,
    /// At an absolute wall-clock time (or when the previous stage opened, if later).
    At(UnixTime),
    /// This many milliseconds after the previous stage opened (the first stage: after
    /// `created`).
    AfterPreviousMs(u64),
}

/// A health gate on a stage: while the stage is open, the failure rate of reports for the
/// version must stay at or below `max_failure_ppm` (over at least `min_healthy` reports),
/// and the next stage opens only after `min_healthy` nodes reported healthy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gate {
    /// Healthy reports needed before the next stage opens.
    pub min_healthy: u32,
    /// Largest tolerated failure rate, in parts per million.
    pub max_failure_ppm: u32,
}

/// One stage: the share of nodes in it (cumulative), when it may start, and its gate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stage {
    /// Cumulative share of nodes, parts per million (stages are nested).
    pub share_ppm: u32,
    /// Earliest start.
    pub start: StageStart,
    /// Optional health gate.
    pub gate: Option<Gate>,
}

/// Limits on a version while it serves: a node whose inference error rate over a report
/// window exceeds `max_error_ppm` (with at least `min_requests` requests in the window)
/// reports a runtime failure, which counts against the stage gates like a failed golden
/// check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeLimit {
    /// Largest tolerated share of failed inferences, parts per million.
    pub max_error_ppm: u32,
    /// Fewer requests than this in a window prove nothing either way.
    pub min_requests: u32,
}

impl RuntimeLimit {
    /// Does a window of `requests` with `errors` break the limit?
    pub fn broken(&self, requests: u64, errors: u64) -> bool {
        requests >= u64::from(self.min_requests.max(1))
            && u128::from(errors) * u128::from(PPM)
                > u128::from(self.max_error_ppm) * u128::from(requests)
    }
}

/// A rollout plan: a list of nested stages, and the runtime limit nodes hold the version to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutPlan {
    /// Stages in order; shares strictly increase.
    pub stages: Vec<Stage>,
    /// Inference error limit while serving (None: only load and golden failures count).
    pub runtime: Option<RuntimeLimit>,
}

impl RolloutPlan {
    /// One stage of 100%, open at once, no gate.
    pub fn immediate() -> Self {
        RolloutPlan {
            stages: vec![Stage {
                share_ppm: PPM,
                start: StageStart::Immediately,
                gate: None,
            }],
            runtime: None,
        }
    }

    /// Stages at the given percentages, `interval` apart, each with `gate` (but the last).
    pub fn percent(shares: &[f64], interval: Duration, gate: Option<Gate>) -> Self {
        let n = shares.len();
        RolloutPlan {
            stages: shares
                .iter()
                .enumerate()
                .map(|(i, s)| Stage {
                    share_ppm: ((s / 100.0) * f64::from(PPM))
                        .round()
                        .clamp(0.0, f64::from(PPM)) as u32,
                    start: if i == 0 {
                        StageStart::Immediately
                    } else {
                        StageStart::AfterPreviousMs(interval.as_millis() as u64)
                    },
                    gate: if i + 1 < n { gate } else { None },
                })
                .collect(),
            runtime: None,
        }
    }

    /// Field rules.
    pub fn validate(&self) -> Result<(), String> {
        if self.stages.is_empty() || self.stages.len() > MAX_STAGES {
            return Err(format!("a plan has 1 to {MAX_STAGES} stages"));
        }
        let mut prev = 0;
        for s in &self.stages {
            if s.share_ppm <= prev || s.share_ppm > PPM {
                return Err("stage shares must strictly increase and stay within 100%".into());
            }
            prev = s.share_ppm;
            if let Some(g) = s.gate
                && g.max_failure_ppm > PPM
            {
                return Err("failure rate above 100%".into());
            }
        }
        if self.runtime.is_some_and(|r| r.max_error_ppm > PPM) {
            return Err("runtime error rate above 100%".into());
        }
        Ok(())
    }

    /// The first stage whose share exceeds `point` (a cohort point), if any.
    pub fn stage_of(&self, point: u64) -> Option<usize> {
        self.stages
            .iter()
            .position(|s| u128::from(point) < share_threshold(s.share_ppm))
    }
}

/// `share * 2^64`, the exclusive upper bound on cohort points inside the share.
fn share_threshold(share_ppm: u32) -> u128 {
    (u128::from(share_ppm) << 64) / u128::from(PPM)
}

/// A node's cohort point for a release: a hash of (node id, channel, version) read as a
/// fraction of 2^64.
pub fn cohort_point(node: &NodeId, channel: &Channel, version: u64) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(b"pollen/v1/cohort\0");
    h.update(&node.0);
    h.update(&(channel.as_str().len() as u64).to_le_bytes());
    h.update(channel.as_str().as_bytes());
    h.update(&version.to_le_bytes());
    let out = h.finalize();
    u64::from_le_bytes(out.as_bytes()[..8].try_into().expect("8 bytes"))
}

/// Classes of failure a node reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ErrorClass {
    /// The model failed to load or optimise.
    LoadError,
    /// An operator the runtime does not support.
    UnsupportedOp,
    /// A golden check produced the wrong output.
    GoldenMismatch,
    /// The runtime panicked.
    Panic,
    /// Too many inference errors while serving.
    RuntimeErrors,
    /// The model keeps crashing.
    CrashLoop,
    /// No variant fits the device, or a file could not be stored.
    Unavailable,
    /// Anything else.
    Other,
}

/// The state a health report announces.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HealthStatus {
    /// Serving the version.
    Ok,
    /// Failed to activate or serve.
    Failed {
        /// Class of the failure.
        class: ErrorClass,
        /// A short human-readable detail.
        detail: String,
    },
    /// Was serving, went back to the previous version because the rollout failed.
    RolledBack,
}

/// The signed body of a node's health report for one release.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthReportBody {
    /// Reporting node (its key signs the report).
    pub node: NodeId,
    /// Channel.
    pub channel: Channel,
    /// Version.
    pub version: u64,
    /// Manifest id of the release.
    pub manifest: ManifestId,
    /// Status.
    pub status: HealthStatus,
    /// Requests served in the window.
    pub requests: u64,
    /// Errors in the window.
    pub errors: u64,
    /// Median latency, microseconds.
    pub latency_p50_us: u32,
    /// 99th percentile latency, microseconds.
    pub latency_p99_us: u32,
    /// Node's wall clock when it made the report.
    pub timestamp: UnixTime,
    /// For a language model: its generations over the window (format 2; `None` encodes
    /// exactly as reports did before, so older nodes still read them). Its latencies
    /// above are then times to first token.
    pub lm: Option<LmHealth>,
}

/// What a language model's generations did over a report window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LmHealth {
    /// Generations that ran.
    pub generations: u64,
    /// Tokens generated after each generation's first (decode steps).
    pub decode_tokens: u64,
    /// Decode speed over the window, thousandths of a token per second.
    pub decode_millitokens_per_s: u64,
}

/// Format 1 of [`HealthReportBody`], as it is encoded.
#[derive(Serialize)]
struct HealthReportBodyV1Ref<'a> {
    node: &'a NodeId,
    channel: &'a Channel,
    version: u64,
    manifest: &'a ManifestId,
    status: &'a HealthStatus,
    requests: u64,
    errors: u64,
    latency_p50_us: u32,
    latency_p99_us: u32,
    timestamp: UnixTime,
}

/// Format 1 of [`HealthReportBody`], as it is decoded.
#[derive(Deserialize)]
struct HealthReportBodyV1 {
    node: NodeId,
    channel: Channel,
    version: u64,
    manifest: ManifestId,
    status: HealthStatus,
    requests: u64,
    errors: u64,
    latency_p50_us: u32,
    latency_p99_us: u32,
    timestamp: UnixTime,
}

impl SignedBody for HealthReportBody {
    const DOMAIN: Domain = Domain::HealthReport;
    fn validate(&self) -> Result<(), String> {
        if let HealthStatus::Failed { detail, .. } = &self.status
            && detail.len() > 256
        {
            return Err("failure detail too long".into());
        }
        Ok(())
    }

    /// Format 1 bytes without `lm`, format 2 with it.
    fn encode(&self) -> Vec<u8> {
        let bytes = match &self.lm {
            Some(_) => postcard::to_allocvec(self),
            None => postcard::to_allocvec(&HealthReportBodyV1Ref {
                node: &self.node,
                channel: &self.channel,
                version: self.version,
                manifest: &self.manifest,
                status: &self.status,
                requests: self.requests,
                errors: self.errors,
                latency_p50_us: self.latency_p50_us,
                latency_p99_us: self.latency_p99_us,
                timestamp: self.timestamp,
            }),
        };
        // postcard encoding of our own types into a Vec cannot fail.
        bytes.expect("postcard encoding into a Vec")
    }

    /// Format 2, else format 1; the bytes must be exactly what `encode` gives.
    fn decode(bytes: &[u8]) -> Result<Self, SignedError> {
        let body = match postcard::from_bytes::<HealthReportBody>(bytes) {
            Ok(b) => b,
            Err(_) => {
                let v1: HealthReportBodyV1 = postcard::from_bytes(bytes)
                    .map_err(|e| SignedError::Malformed(e.to_string()))?;
                HealthReportBody {
                    node: v1.node,
                    channel: v1.channel,
                    version: v1.version,
                    manifest: v1.manifest,
                    status: v1.status,
                    requests: v1.requests,
                    errors: v1.errors,
                    latency_p50_us: v1.latency_p50_us,
                    latency_p99_us: v1.latency_p99_us,
                    timestamp: v1.timestamp,
                    lm: None,
                }
            }
        };
        if body.encode() != bytes {
            return Err(SignedError::NonCanonical);
        }
        Ok(body)
    }
}

/// A health report as it travels: the signed report and, in fleets, the node's certificate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthReport {
    /// Signed by the node key.
    pub signed: Signed<HealthReportBody>,
    /// The node's certificate (needed when the trust root names a fleet key).
    pub cert: Option<SignedNodeCert>,
}

/// The rank of a node in a version's sample: smaller ranks are kept.
pub fn sample_rank(node: &NodeId, version_id: &ManifestId) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(b"pollen/v1/sample\0");
    h.update(&node.0);
    h.update(&version_id.0);
    *h.finalize().as_bytes()
}

/// What the sample knows of one node: the merge of every report heard from it. The merge
/// is commutative, so the order reports arrive in does not matter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SampleEntry {
    /// The node.
    pub node: NodeId,
    /// Latest report (largest timestamp, then largest body hash).
    pub latest: HealthReport,
    /// Its body.
    pub latest_body: HealthReportBody,
    /// Earliest timestamp of an Ok report.
    pub first_ok: Option<UnixTime>,
    /// Earliest failure: timestamp and class.
    pub first_failure: Option<(UnixTime, ErrorClass)>,
    /// The report that set `first_ok`.
    pub ok_report: Option<HealthReport>,
    /// The report that set `first_failure`.
    pub failure_report: Option<HealthReport>,
}

impl SampleEntry {
    /// Every report needed to rebuild this entry elsewhere: the latest, plus the ones that
    /// set the earliest Ok and failure times when they differ from it.
    pub fn reports(&self) -> impl Iterator<Item = &HealthReport> {
        let latest = &self.latest;
        core::iter::once(latest).chain(
            self.ok_report
                .iter()
                .chain(self.failure_report.iter())
                .filter(move |r| *r != latest),
        )
    }
}

/// The bounded deterministic sample of reports for one release: at most `k` nodes, those
/// with the smallest [`sample_rank`].
#[derive(Clone, Debug)]
pub struct ReportSample {
    k: usize,
    manifest: ManifestId,
    entries: BTreeMap<[u8; 32], SampleEntry>,
}

impl ReportSample {
    /// An empty sample of at most `k` nodes for the release `manifest`.
    pub fn new(manifest: ManifestId, k: usize) -> Self {
        ReportSample {
            k: k.max(1),
            manifest,
            entries: BTreeMap::new(),
        }
    }

    /// Merge a report whose signature and certificate the caller has checked. Returns true
    /// when the sample changed (the report is then worth relaying).
    pub fn insert(&mut self, report: HealthReport, body: HealthReportBody) -> bool {
        let rank = sample_rank(&body.node, &self.manifest);
        if !self.entries.contains_key(&rank) && self.entries.len() >= self.k {
            match self.entries.last_key_value() {
                Some((worst, _)) if *worst > rank => {}
                _ => return false,
            }
        }
        let hash = report.signed.body_hash();
        let ts = body.timestamp;

        match self.entries.get_mut(&rank) {
            None => {
                let mut e = SampleEntry {
                    node: body.node,
                    latest: report,
                    latest_body: body.clone(),
                    first_ok: None,
                    first_failure: None,
                    ok_report: None,
                    failure_report: None,
                };
                let latest = e.latest.clone();
                merge_status(&mut e, &body, &latest);
                self.entries.insert(rank, e);
                while self.entries.len() > self.k {
                    self.entries.pop_last();
                }
                true
            }
            Some(e) => {
                let mut changed = merge_status(e, &body, &report);
                let cur = (e.latest_body.timestamp, e.latest.signed.body_hash());
                if (ts, hash) > cur {
                    e.latest = report;
                    e.latest_body = body;
                    changed = true;
                }
                changed
            }
        }
    }

    /// Does the sample hold a report of `node`?
    pub fn contains(&self, node: &NodeId) -> bool {
        self.entries
            .contains_key(&sample_rank(node, &self.manifest))
    }

    /// Would a report of `node` enter the sample (it has room, or `node` ranks above the
    /// worst entry)?
    pub fn would_keep(&self, node: &NodeId) -> bool {
        self.entries.len() < self.k
            || self
                .entries
                .last_key_value()
                .is_some_and(|(worst, _)| sample_rank(node, &self.manifest) < *worst)
    }

    /// The failure classes in the sample, most frequent first, each with its count and the
    /// detail of one failure (the lowest-ranked node's).
    pub fn failures(&self) -> Vec<(ErrorClass, u32, String)> {
        let mut by: BTreeMap<ErrorClass, (u32, String)> = BTreeMap::new();
        for e in self.entries.values() {
            let Some((_, class)) = e.first_failure else {
                continue;
            };
            let detail = e
                .failure_report
                .as_ref()
                .and_then(|r| r.signed.decode_body().ok())
                .and_then(|b| match b.status {
                    HealthStatus::Failed { detail, .. } => Some(detail),
                    _ => None,
                })
                .unwrap_or_default();
            by.entry(class).or_insert((0, detail)).0 += 1;
        }
        let mut v: Vec<(ErrorClass, u32, String)> =
            by.into_iter().map(|(c, (n, d))| (c, n, d)).collect();
        v.sort_by_key(|(c, n, _)| (core::cmp::Reverse(*n), *c));
        v
    }

    /// Entries in rank order.
    pub fn entries(&self) -> impl Iterator<Item = &SampleEntry> {
        self.entries.values()
    }

    /// Number of nodes in the sample.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Is the sample empty?
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The bound.
    pub fn capacity(&self) -> usize {
        self.k
    }

    /// A digest of the sample's content, equal on two nodes holding the same sample.
    pub fn digest(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new();
        for (rank, e) in &self.entries {
            h.update(rank);
            h.update(&e.latest.signed.body_hash());
            h.update(&e.first_ok.map_or(0, |t| t.0).to_le_bytes());
            h.update(&e.first_failure.map_or(0, |t| t.0.0).to_le_bytes());
        }
        *h.finalize().as_bytes()
    }

    /// Counts of healthy, failed and rolled-back nodes in the sample.
    pub fn counts(&self) -> SampleCounts {
        let mut c = SampleCounts::default();
        for e in self.entries.values() {
            if e.first_failure.is_some() {
                c.failed += 1;
            } else if e.latest_body.status == HealthStatus::RolledBack {
                c.rolled_back += 1;
            } else if e.first_ok.is_some() {
                c.healthy += 1;
            }
        }
        c
    }
}

/// Healthy / failed / rolled-back counts of a sample.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SampleCounts {
    /// Nodes that reported Ok and never a failure.
    pub healthy: u32,
    /// Nodes that reported a failure.
    pub failed: u32,
    /// Nodes that rolled back (and never failed).
    pub rolled_back: u32,
}

fn merge_status(e: &mut SampleEntry, body: &HealthReportBody, report: &HealthReport) -> bool {
    let ts = body.timestamp;
    let hash = report.signed.body_hash();
    match &body.status {
        HealthStatus::Ok => {
            let better = match (&e.first_ok, &e.ok_report) {
                (Some(t), Some(r)) => (ts, hash) < (*t, r.signed.body_hash()),
                _ => true,
            };
            if better {
                e.first_ok = Some(ts);
                e.ok_report = Some(report.clone());
            }
            better
        }
        // A rolled-back node had been healthy: its Ok time is what it reported earlier.
        HealthStatus::RolledBack => false,
        HealthStatus::Failed { class, .. } => {
            let better = match (&e.first_failure, &e.failure_report) {
                (Some(f), Some(r)) => (ts, *class, hash) < (f.0, f.1, r.signed.body_hash()),
                _ => true,
            };
            if better {
                e.first_failure = Some((ts, *class));
                e.failure_report = Some(report.clone());
            }
            better
        }
    }
}

/// An operator action on a rollout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RolloutAction {
    /// No further stage opens.
    Halt,
    /// Undo a halt.
    Resume,
}

/// The signed body of a rollout instruction (publisher keys of the channel sign it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstructionBody {
    /// Channel.
    pub channel: Channel,
    /// Version the instruction applies to.
    pub version: u64,
    /// What to do.
    pub action: RolloutAction,
    /// When it was issued; the latest instruction wins.
    pub issued: UnixTime,
}

impl SignedBody for InstructionBody {
    const DOMAIN: Domain = Domain::RolloutInstruction;
    fn validate(&self) -> Result<(), String> {
        if self.version == 0 {
            return Err("version must be at least 1".into());
        }
        Ok(())
    }
}

/// A signed rollout instruction.
pub type SignedInstruction = Signed<InstructionBody>;

/// Why the next stage has not opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Waiting {
    /// Its time has not come.
    Until(UnixTime),
    /// Its gate needs more healthy reports.
    Healthy {
        /// Healthy reports in the sample.
        have: u32,
        /// Needed.
        need: u32,
    },
    /// The rollout is halted.
    Halted,
    /// The rollout failed its gate.
    Failed,
}

/// A gate failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GateFailure {
    /// The open stage whose gate failed.
    pub stage: usize,
    /// Failed nodes in the sample.
    pub failed: u32,
    /// Nodes with any report in the sample.
    pub reported: u32,
    /// Most common failure class.
    pub class: Option<ErrorClass>,
}

/// What the rule says about a release at a given time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Opening time of each open stage; `opened.len()` stages are open.
    pub opened: Vec<UnixTime>,
    /// Why the next stage is not open (None when all are).
    pub waiting: Option<Waiting>,
    /// Set when an open stage failed its gate: nodes on this version roll back.
    pub failure: Option<GateFailure>,
    /// The latest instruction halts the rollout.
    pub halted: bool,
}

impl Decision {
    /// Number of open stages.
    pub fn open_stages(&self) -> usize {
        self.opened.len()
    }

    /// Must nodes on this version roll back?
    pub fn rollback(&self) -> bool {
        self.failure.is_some()
    }

    /// May a node in `stage` run this version?
    pub fn admits(&self, stage: Option<usize>) -> bool {
        !self.rollback() && stage.is_some_and(|s| s < self.open_stages())
    }
}

/// Decide which stages of `plan` are open at `now`.
///
/// `anchor` is the manifest's signed `created` time; `halt` the issue time of the latest
/// instruction if it is a halt; `stage_of` gives a reporting node's stage in the plan (its
/// cohort point, see [`cohort_point`]); `skew` is the clock skew tolerated. Pure: the same
/// inputs give the same decision on every node.
///
/// Only reports that could be honest count. A node outside every stage never counts. A
/// node's Ok counts toward opening stage `i` only if the node is in a stage before `i` and
/// its Ok is stamped no earlier than its own stage opened (less `skew`): an Ok back-dated
/// to before its node could have activated would otherwise open the next stage early. A
/// failure counts toward a gate only from a node in an open stage.
pub fn evaluate(
    plan: &RolloutPlan,
    anchor: UnixTime,
    sample: Option<&ReportSample>,
    halt: Option<UnixTime>,
    now: UnixTime,
    stage_of: impl Fn(&NodeId) -> Option<usize>,
    skew: Duration,
) -> Decision {
    // Per reporting node in some stage: (stage, earliest Ok, earliest failure class).
    let mut entries: Vec<(usize, Option<UnixTime>, Option<ErrorClass>)> = Vec::new();
    if let Some(s) = sample {
        for e in s.entries() {
            if let Some(stage) = stage_of(&e.node) {
                entries.push((stage, e.first_ok, e.first_failure.map(|(_, c)| c)));
            }
        }
    }
    let mut d = Decision {
        opened: Vec::new(),
        waiting: None,
        failure: None,
        halted: halt.is_some(),
    };
    for (i, stage) in plan.stages.iter().enumerate() {
        let prev = d.opened.last().copied();
        let earliest = match (stage.start, prev) {
            (StageStart::Immediately, None) => anchor,
            (StageStart::Immediately, Some(p)) => p,
            (StageStart::At(t), p) => p.map_or(t, |p| p.max(t)),
            (StageStart::AfterPreviousMs(ms), p) => {
                p.unwrap_or(anchor).plus(Duration::from_millis(ms))
            }
        };
        let mut open_at = earliest;
        if i > 0
            && let Some(g) = plan.stages[i - 1].gate
        {
            let need = g.min_healthy;
            if need > 0 {
                // Earliest Oks, sorted, of healthy nodes in the stages open so far: the
                // k-th is when k nodes had reported healthy.
                let mut ok_times: Vec<UnixTime> = entries
                    .iter()
                    .filter(|(stage, _, failure)| *stage < i && failure.is_none())
                    .filter_map(|(stage, ok, _)| ok.filter(|t| t.plus(skew) >= d.opened[*stage]))
                    .collect();
                ok_times.sort();
                match ok_times.get(need as usize - 1) {
                    Some(&t) => open_at = open_at.max(t),
                    None => {
                        d.waiting = Some(Waiting::Healthy {
                            have: ok_times.len() as u32,
                            need,
                        });
                        break;
                    }
                }
            }
        }
        if let Some(h) = halt
            && open_at >= h
        {
            d.waiting = Some(Waiting::Halted);
            break;
        }
        if open_at > now {
            d.waiting = Some(Waiting::Until(open_at));
            break;
        }
        d.opened.push(open_at);
    }
    // Reports of nodes in the open stages: healthy ones (an Ok, no failure) and failures.
    let open = d.opened.len();
    let (mut failed, mut reported) = (0u32, 0u32);
    let mut classes: BTreeMap<ErrorClass, u32> = BTreeMap::new();
    for (stage, ok, failure) in &entries {
        if *stage >= open {
            continue;
        }
        match failure {
            Some(class) => {
                reported += 1;
                failed += 1;
                *classes.entry(*class).or_default() += 1;
            }
            None if ok.is_some_and(|t| t.plus(skew) >= d.opened[*stage]) => reported += 1,
            None => {}
        }
    }
    let class = classes
        .iter()
        .max_by_key(|(c, n)| (**n, core::cmp::Reverse(**c)))
        .map(|(c, _)| *c);
    // Any open stage's gate that the failure rate violates fails the rollout.
    for (i, stage) in plan.stages.iter().enumerate().take(d.opened.len()) {
        if let Some(g) = stage.gate {
            let denom = u64::from(reported.max(g.min_healthy).max(1));
            if u64::from(failed) * u64::from(PPM) > u64::from(g.max_failure_ppm) * denom {
                d.failure = Some(GateFailure {
                    stage: i,
                    failed,
                    reported,
                    class,
                });
                d.waiting = Some(Waiting::Failed);
                // No stage opens after the one that failed.
                d.opened.truncate(i + 1);
                break;
            }
        }
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;

    fn ch() -> Channel {
        Channel::new("vision.defects").unwrap()
    }

    #[test]
    fn stage_shares_match_plan_over_100k_nodes() {
        let plan = RolloutPlan::percent(&[5.0, 25.0, 60.0, 100.0], Duration::from_secs(1), None);
        let mut counts = [0u32; 4];
        for i in 0u64..100_000 {
            let mut id = [0u8; 32];
            id[..8].copy_from_slice(&i.to_le_bytes());
            id[8..16].copy_from_slice(&i.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_le_bytes());
            let p = cohort_point(&NodeId(id), &ch(), 7);
            counts[plan.stage_of(p).unwrap()] += 1;
        }
        let mut cum = 0.0;
        for (i, want) in [5.0, 25.0, 60.0, 100.0].iter().enumerate() {
            cum += f64::from(counts[i]) / 1000.0;
            assert!((cum - want).abs() < 1.0, "stage {i}: {cum}% vs {want}%");
        }
    }

    /// Reports without language-model figures keep the bytes older nodes read; with them
    /// they round trip; spelling out `lm: None` is not canonical.
    #[test]
    fn health_reports_without_lm_figures_keep_format_1() {
        let key = SigningKey::from_bytes(&[5; 32]);
        let (_, v1) = report(&key, ManifestId([1; 32]), HealthStatus::Ok, 7);
        let bytes = v1.encode();
        let derived = postcard::to_allocvec(&v1).expect("encode");
        assert_eq!(derived.len(), bytes.len() + 1, "format 2 adds only the tag");
        assert_eq!(HealthReportBody::decode(&bytes).expect("format 1"), v1);
        assert!(matches!(
            HealthReportBody::decode(&derived),
            Err(SignedError::NonCanonical)
        ));
        let v2 = HealthReportBody {
            lm: Some(LmHealth {
                generations: 3,
                decode_tokens: 381,
                decode_millitokens_per_s: 25_400,
            }),
            ..v1
        };
        let signed = Signed::sign(&v2, &[&key]);
        assert_eq!(signed.decode_body().expect("format 2"), v2);
    }

    fn report(
        key: &SigningKey,
        version_id: ManifestId,
        status: HealthStatus,
        ts: u64,
    ) -> (HealthReport, HealthReportBody) {
        let body = HealthReportBody {
            node: NodeId::from(key),
            channel: ch(),
            version: 2,
            manifest: version_id,
            status,
            requests: 10,
            errors: 0,
            latency_p50_us: 100,
            latency_p99_us: 300,
            timestamp: UnixTime(ts),
            lm: None,
        };
        (
            HealthReport {
                signed: Signed::sign(&body, &[key]),
                cert: None,
            },
            body,
        )
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]
        /// Two nodes that hear the same reports in different orders, one of them also hearing
        /// extra reports that fall outside the sample, hold the same sample and decide alike.
        #[test]
        fn order_and_extras_do_not_change_the_decision(seed in 0u64..1_000_000, nfail in 0usize..20) {
            use rand_core::{Rng, SeedableRng};
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let mid = ManifestId([9; 32]);
            let k = 16;
            let mut reports = Vec::new();
            for i in 0..60usize {
                let mut sk = [0u8; 32];
                rng.fill_bytes(&mut sk);
                let key = SigningKey::from_bytes(&sk);
                let st = if i < nfail { HealthStatus::Failed { class: ErrorClass::GoldenMismatch, detail: "x".into() } } else { HealthStatus::Ok };
                reports.push(report(&key, mid, st, 1_000 + rng.next_u64() % 10_000));
                if i % 3 == 0 {
                    reports.push(report(&key, mid, HealthStatus::Ok, 20_000 + rng.next_u64() % 100));
                }
            }
            let mut a = ReportSample::new(mid, k);
            for (r, b) in reports.iter().cloned() { a.insert(r, b); }
            let mut shuffled = reports.clone();
            for i in (1..shuffled.len()).rev() { let j = (rng.next_u64() % (i as u64 + 1)) as usize; shuffled.swap(i, j); }
            let mut b = ReportSample::new(mid, k);
            for (r, body) in shuffled { b.insert(r, body); }
            proptest::prop_assert_eq!(a.digest(), b.digest());
            proptest::prop_assert_eq!(a.len(), k);
            let plan = RolloutPlan::percent(&[10.0, 50.0, 100.0], Duration::from_secs(5), Some(Gate { min_healthy: 5, max_failure_ppm: 200_000 }));
            for now in [0u64, 3_000, 9_000, 30_000] {
                proptest::prop_assert_eq!(
                    evaluate(&plan, UnixTime(0), Some(&a), None, UnixTime(now), |_| Some(0), Duration::ZERO),
                    evaluate(&plan, UnixTime(0), Some(&b), None, UnixTime(now), |_| Some(0), Duration::ZERO)
                );
            }
        }
    }

    #[test]
    fn stages_open_in_time_and_gate_failure_rolls_back() {
        let plan = RolloutPlan::percent(
            &[20.0, 50.0, 100.0],
            Duration::from_secs(10),
            Some(Gate {
                min_healthy: 2,
                max_failure_ppm: 100_000,
            }),
        );
        let mid = ManifestId([1; 32]);
        let keys: Vec<SigningKey> = (0..4u8)
            .map(|i| SigningKey::from_bytes(&[i + 1; 32]))
            .collect();
        let mut s = ReportSample::new(mid, 256);
        let d = evaluate(
            &plan,
            UnixTime(0),
            Some(&s),
            None,
            UnixTime(5_000),
            |_| Some(0),
            Duration::ZERO,
        );
        assert_eq!(d.open_stages(), 1);
        assert_eq!(d.waiting, Some(Waiting::Healthy { have: 0, need: 2 }));
        for (i, k) in keys.iter().take(2).enumerate() {
            let (r, b) = report(k, mid, HealthStatus::Ok, 1_000 + i as u64);
            s.insert(r, b);
        }
        let d = evaluate(
            &plan,
            UnixTime(0),
            Some(&s),
            None,
            UnixTime(5_000),
            |_| Some(0),
            Duration::ZERO,
        );
        assert_eq!(d.waiting, Some(Waiting::Until(UnixTime(10_000))));
        let d = evaluate(
            &plan,
            UnixTime(0),
            Some(&s),
            None,
            UnixTime(25_000),
            |_| Some(0),
            Duration::ZERO,
        );
        assert_eq!(
            d.opened,
            vec![UnixTime(0), UnixTime(10_000), UnixTime(20_000)]
        );
        // Halt issued at 15s: the third stage never opens.
        let d = evaluate(
            &plan,
            UnixTime(0),
            Some(&s),
            Some(UnixTime(15_000)),
            UnixTime(25_000),
            |_| Some(0),
            Duration::ZERO,
        );
        assert_eq!(d.open_stages(), 2);
        assert_eq!(d.waiting, Some(Waiting::Halted));
        // A failure: 1 of 3 > 10%.
        let (r, b) = report(
            &keys[2],
            mid,
            HealthStatus::Failed {
                class: ErrorClass::LoadError,
                detail: "bad op".into(),
            },
            2_000,
        );
        s.insert(r, b);
        let d = evaluate(
            &plan,
            UnixTime(0),
            Some(&s),
            None,
            UnixTime(25_000),
            |_| Some(0),
            Duration::ZERO,
        );
        assert!(d.rollback());
        assert_eq!(d.failure.unwrap().class, Some(ErrorClass::LoadError));
        assert_eq!(d.open_stages(), 1);
    }

    #[test]
    fn only_reports_that_could_be_honest_count() {
        let plan = RolloutPlan::percent(
            &[20.0, 100.0],
            Duration::from_secs(10),
            Some(Gate {
                min_healthy: 1,
                max_failure_ppm: 100_000,
            }),
        );
        let mid = ManifestId([2; 32]);
        let canary = SigningKey::from_bytes(&[1; 32]);
        let outsider = SigningKey::from_bytes(&[2; 32]);
        let canary_id = NodeId::from(&canary);
        let stage = move |n: &NodeId| Some(usize::from(*n != canary_id));
        let skew = Duration::from_secs(1);
        let anchor = UnixTime(10_000);
        let failed = HealthStatus::Failed {
            class: ErrorClass::Panic,
            detail: "x".into(),
        };
        // A node of the second stage reports a failure and an Ok while only the canary
        // stage is open: neither fails the canary's gate nor opens the next stage.
        let mut s = ReportSample::new(mid, 256);
        let (r, b) = report(&outsider, mid, failed.clone(), 11_000);
        s.insert(r, b);
        let d = evaluate(&plan, anchor, Some(&s), None, UnixTime(25_000), stage, skew);
        assert_eq!(d.failure, None);
        assert_eq!(d.waiting, Some(Waiting::Healthy { have: 0, need: 1 }));
        // The canary's Ok back-dated to before its stage opened (less the skew) does not
        // count either.
        let (r, b) = report(&canary, mid, HealthStatus::Ok, 8_000);
        s.insert(r, b);
        let d = evaluate(&plan, anchor, Some(&s), None, UnixTime(25_000), stage, skew);
        assert_eq!(d.waiting, Some(Waiting::Healthy { have: 0, need: 1 }));
        // Within the skew it does: stage 2 opens at its earliest time, and then the second
        // stage's failure counts (1 of 2 > 10%).
        let mut s = ReportSample::new(mid, 256);
        let (r, b) = report(&canary, mid, HealthStatus::Ok, 9_500);
        s.insert(r, b);
        let d = evaluate(&plan, anchor, Some(&s), None, UnixTime(25_000), stage, skew);
        assert_eq!(d.opened, vec![anchor, UnixTime(20_000)]);
        let (r, b) = report(&outsider, mid, failed, 21_000);
        s.insert(r, b);
        let d = evaluate(&plan, anchor, Some(&s), None, UnixTime(25_000), stage, skew);
        assert!(d.failure.is_some(), "{d:?}");
        // A node in no stage at all never counts.
        let d = evaluate(
            &plan,
            anchor,
            Some(&s),
            None,
            UnixTime(25_000),
            |_| None,
            skew,
        );
        assert_eq!(d.waiting, Some(Waiting::Healthy { have: 0, need: 1 }));
    }
}
