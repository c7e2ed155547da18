//! The JSON of `GET /v1/status`, shared by the node (which builds it) and `pollen status`
//! (which reads it).

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
    /// Why it is open or not: "open", "opens at <time>", "gate: 1 of 2 healthy
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
