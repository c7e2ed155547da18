//! The JSON of `GET /v1/status`, shared by the node (which builds it) and `pollen status`
//! (which reads it), and the conversions from the core's channel and release views.
//!
//! The conversions read the core ([`Mesh`]) only for the signed manifest and the latest
//! instruction of a release; they never change it.

use pollen_keys::manifest::format_ppm;
use pollen_protocol::rollout::{RolloutAction, Waiting};
use pollen_protocol::{Mesh, UnixTime, state};
use rand_core::Rng;
use serde::{Deserialize, Serialize};

/// This node and what it knows of the mesh.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Status {
    /// Node id (ed25519 public key, hex).
    pub node_id: String,
    /// libp2p peer id.
    pub peer_id: String,
    /// Site name.
    pub site: Option<String>,
    /// Listen addresses, each ending in `/p2p/<peer id>`.
    pub listen: Vec<String>,
    /// The HTTP API address.
    pub http: String,
    /// Trust root version in force (0: none).
    pub trust_version: u64,
    /// Does the trust root require node certificates?
    pub fleet: bool,
    /// A retained release has a gated stage but the trust root has no fleet key: anyone
    /// can make node keys, so the gates are open to Sybil reporters and only advisory.
    #[serde(default)]
    pub gates_open_to_sybils: bool,
    /// Connected peers speaking the pollen protocol.
    pub peers: Vec<PeerStatus>,
    /// Channels.
    pub channels: Vec<ChannelStatus>,
    /// Recent errors (newest last, bounded).
    pub errors: Vec<String>,
}

/// A connected peer.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PeerStatus {
    /// Node id (hex).
    pub node_id: String,
    /// Peer id.
    pub peer_id: String,
    /// Site.
    pub site: Option<String>,
    /// Chunks received from it.
    pub chunks_from: u64,
    /// The connection runs through a relay (/p2p-circuit).
    pub relayed: bool,
}

/// A channel.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ChannelStatus {
    /// Channel name.
    pub channel: String,
    /// Highest version accepted.
    pub highest: u64,
    /// Version served now.
    pub active_version: Option<u64>,
    /// Manifest id served now (hex).
    pub active_manifest: Option<String>,
    /// Retained releases.
    pub releases: Vec<ReleaseStatus>,
    /// Versions with equivocation evidence.
    pub equivocations: Vec<u64>,
    /// Expired manifest still served because no newer one could be fetched.
    pub serving_expired: bool,
    /// Local pin: the version this node stays on whatever the rollouts say.
    pub pinned: Option<u64>,
}

/// A release of a channel.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ReleaseStatus {
    /// Version.
    pub version: u64,
    /// Manifest id (hex).
    pub manifest: String,
    /// Stages in the plan.
    pub stages: usize,
    /// Stages open.
    pub open_stages: usize,
    /// Why the next stage is not open.
    pub waiting: Option<String>,
    /// Rolled back after a gate failure.
    pub rolled_back: bool,
    /// Halted by an operator.
    pub halted: bool,
    /// This node's stage (None: not in any stage).
    pub my_stage: Option<usize>,
    /// The model variant this node chose for its device.
    pub variant: String,
    /// Healthy nodes in the report sample.
    pub healthy: u32,
    /// Failed nodes in the report sample.
    pub failed: u32,
    /// Nodes in the sample that went back to an older version after a gate failure.
    pub rolled_back_nodes: u32,
    /// Nodes this node knows of that the open stages admit and that have not reported.
    pub pending: u32,
    /// Nodes whose latest report is older than the report time-to-live.
    pub stale: u32,
    /// Failure reasons in the report sample, most frequent first.
    pub failures: Vec<FailureStatus>,
    /// The plan's stages and where each stands.
    pub stage_list: Vec<StageStatus>,
    /// The plan's runtime error limit, if any (e.g. "5% of ≥20 requests").
    pub runtime_limit: Option<String>,
    /// Latest operator instruction: "halt" or "resume", with its issue time (unix ms).
    pub instruction: Option<(String, u64)>,
    /// Files.
    pub files: Vec<FileStatus>,
    /// This release on this node, as clients see it on `/v2`: `READY`, `LOADING` or
    /// `UNAVAILABLE` (see [`crate::serving::states`]).
    #[serde(default)]
    pub state: String,
    /// Why it is in that state (empty for the version served).
    #[serde(default)]
    pub reason: String,
    /// The error class of its failed activation here, if that is why (e.g.
    /// "UnsupportedOp": the same label as in its health report).
    #[serde(default)]
    pub error_class: Option<String>,
}

/// One stage of a release's rollout plan.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StageStatus {
    /// Cumulative share of nodes, percent.
    pub share_percent: f64,
    /// Is it open?
    pub open: bool,
    /// When it opened (unix ms; derived from signed times, equal on every node).
    pub opened_at_ms: Option<u64>,
    /// Why it is open or not: "open", "opens at `<time>`", "gate: 1 of 2 healthy
    /// reports", "halted by the operator", "closed: the rollout failed its gate", or
    /// "after stage N".
    pub why: String,
    /// Its gate, if any (e.g. "2 healthy, at most 10% failed").
    pub gate: Option<String>,
}

/// One failure class in a release's report sample.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct FailureStatus {
    /// Error class (e.g. "GoldenMismatch").
    pub class: String,
    /// Nodes in the sample that reported it.
    pub nodes: u32,
    /// One node's detail.
    pub detail: String,
}

/// Download progress of a file.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct FileStatus {
    /// Content id (hex).
    pub content_id: String,
    /// Chunks held.
    pub have: u32,
    /// Chunks in the file.
    pub total: u32,
}

/// Where a [`Waiting`] is shown: the two places word it differently.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitingIn {
    /// A release's `waiting` field (a line of `pollen status`).
    Release,
    /// The `why` of the next stage in a release's `stage_list`.
    Stage,
}

/// Why the next stage of a release is not open, as text.
pub fn waiting_text(w: Waiting, place: WaitingIn) -> String {
    match (w, place) {
        (Waiting::Until(t), WaitingIn::Release) => {
            format!("stage time at unix {} ms", t.as_millis())
        }
        (Waiting::Until(t), WaitingIn::Stage) => {
            format!("opens at {}", pollen_keys::time::format_unix(t))
        }
        (Waiting::Healthy { have, need }, _) => format!("gate: {have} of {need} healthy reports"),
        (Waiting::Halted, _) => "halted by the operator".into(),
        (Waiting::Failed, WaitingIn::Release) => "failed its gate".into(),
        (Waiting::Failed, WaitingIn::Stage) => ROLLOUT_FAILED.into(),
    }
}

/// The `why` of a stage that will not open because the rollout failed.
const ROLLOUT_FAILED: &str = "closed: the rollout failed its gate";

/// A channel of the core's view, as shown. `now` decides whether the active release's
/// manifest has expired.
pub fn channel<R: Rng>(c: state::ChannelView, mesh: &Mesh<R>, now: UnixTime) -> ChannelStatus {
    let active = c.active;
    let serving_expired = active
        .and_then(|(v, _)| c.releases.iter().find(|r| r.version == v))
        .and_then(|r| mesh.manifest(&r.manifest))
        .is_some_and(|m| m.body.expires <= now);
    ChannelStatus {
        channel: c.channel.to_string(),
        highest: c.highest,
        active_version: active.map(|a| a.0),
        active_manifest: active.map(|a| a.1.to_hex()),
        equivocations: c.equivocations.clone(),
        serving_expired,
        pinned: c.pinned,
        releases: c.releases.iter().map(|r| release(r, mesh)).collect(),
    }
}

/// A release of the core's view, as shown.
pub fn release<R: Rng>(r: &state::ReleaseView, mesh: &Mesh<R>) -> ReleaseStatus {
    let d = r.decision.as_ref();
    let manifest = mesh.manifest(&r.manifest);
    ReleaseStatus {
        version: r.version,
        manifest: r.manifest.to_hex(),
        stages: r.stages,
        open_stages: d.map_or(0, |d| d.open_stages()),
        waiting: d
            .and_then(|d| d.waiting)
            .map(|w| waiting_text(w, WaitingIn::Release)),
        rolled_back: d.is_some_and(|d| d.rollback()),
        halted: d.is_some_and(|d| d.halted),
        my_stage: r.my_stage,
        variant: manifest
            .and_then(|m| m.body.artifact.variants.get(r.variant))
            .map(|v| v.name.clone())
            .unwrap_or_default(),
        healthy: r.counts.healthy,
        failed: r.counts.failed,
        rolled_back_nodes: r.counts.rolled_back,
        pending: r.pending,
        stale: r.stale,
        failures: r
            .failures
            .iter()
            .map(|(class, nodes, detail)| FailureStatus {
                class: crate::serving::classify::label(*class),
                nodes: *nodes,
                detail: detail.clone(),
            })
            .collect(),
        stage_list: stage_list(r, mesh),
        runtime_limit: manifest.and_then(|m| m.body.rollout.runtime).map(|l| {
            format!(
                "{} of ≥{} requests",
                format_ppm(l.max_error_ppm),
                l.min_requests
            )
        }),
        instruction: mesh.instruction(&r.manifest).map(|i| {
            (
                match i.action {
                    RolloutAction::Halt => "halt".to_string(),
                    RolloutAction::Resume => "resume".to_string(),
                },
                i.issued.as_millis(),
            )
        }),
        files: r
            .files
            .iter()
            .map(|(cid, have, total)| FileStatus {
                content_id: cid.to_hex(),
                have: *have,
                total: *total,
            })
            .collect(),
        // Filled by the node, which knows what it serves and what failed here.
        state: String::new(),
        reason: String::new(),
        error_class: None,
    }
}

/// Each stage of a release's plan and where it stands on this node.
pub fn stage_list<R: Rng>(r: &state::ReleaseView, mesh: &Mesh<R>) -> Vec<StageStatus> {
    let Some(m) = mesh.manifest(&r.manifest) else {
        return Vec::new();
    };
    let d = r.decision.as_ref();
    let open = d.map_or(0, |d| d.open_stages());
    m.body
        .rollout
        .stages
        .iter()
        .enumerate()
        .map(|(i, st)| {
            let why = if i < open {
                "open".to_string()
            } else if i == open {
                match d.and_then(|d| d.waiting) {
                    Some(w) => waiting_text(w, WaitingIn::Stage),
                    None => "not evaluated yet".into(),
                }
            } else if d.is_some_and(|d| d.rollback()) {
                ROLLOUT_FAILED.into()
            } else {
                format!("after stage {i}")
            };
            StageStatus {
                share_percent: f64::from(st.share_ppm) / 10_000.0,
                open: i < open,
                opened_at_ms: d.and_then(|d| d.opened.get(i)).map(|t| t.as_millis()),
                why,
                gate: st.gate.map(|g| {
                    format!(
                        "{} healthy, at most {} failed",
                        g.min_healthy,
                        format_ppm(g.max_failure_ppm)
                    )
                }),
            }
        })
        .collect()
}
