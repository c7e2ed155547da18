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
    /// Files.
    pub files: Vec<FileStatus>,
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
