//! The state machine's inputs, commands, outputs and events.

use crate::ids::{ContentId, ManifestId, NodeId};
use crate::manifest::{Channel, SignedManifest};
use crate::rollout::{GateFailure, HealthReport, RolloutAction, SignedInstruction};
use crate::time::UnixTime;
use crate::trust::{SignedNodeCert, SignedTrustRoot};
use crate::wire::{Bitfield, Message};
use core::time::Duration;

/// What the driver knows of a peer when it connects.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerInfo {
    /// The peer's site (LAN), if it announced one.
    pub site: Option<String>,
    /// Measured round-trip time.
    pub rtt: Option<Duration>,
    /// The peer's node certificate (fleets).
    pub cert: Option<SignedNodeCert>,
}

/// Why a chunk from a peer was not stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChunkFailure {
    /// It failed verification (length or hash): the sender is penalised.
    Corrupt,
    /// The local store failed (full disk, IO error): not the sender's fault.
    Store(String),
}

/// An input to the state machine.
#[derive(Clone, Debug)]
pub enum Input {
    /// A connection to `peer` is up (after the transport handshake).
    PeerUp {
        /// The peer.
        peer: NodeId,
        /// What is known of it.
        info: PeerInfo,
    },
    /// The last connection to `peer` closed.
    PeerDown {
        /// The peer.
        peer: NodeId,
    },
    /// A control message from a peer.
    Received {
        /// Sender.
        from: NodeId,
        /// Message.
        msg: Message,
    },
    /// A peer sent bytes that do not decode, or a frame over its cap.
    Malformed {
        /// Sender.
        from: NodeId,
        /// Decoder's description.
        error: String,
    },
    /// The driver verified and durably stored a chunk (`from` is None for local chunks).
    ChunkStored {
        /// Sender, if received.
        from: Option<NodeId>,
        /// File.
        file: ContentId,
        /// Chunk index.
        index: u32,
    },
    /// The driver verified a chunk from `from` and wrote it, but it is not durable yet:
    /// the request is done and the chunk is not asked for again. [`Input::ChunkStored`]
    /// follows once a sync covers it (or [`Input::ChunkFailed`] with a store error).
    ChunkReceived {
        /// Sender.
        from: NodeId,
        /// File.
        file: ContentId,
        /// Chunk index.
        index: u32,
    },
    /// A chunk from `from` was not stored.
    ChunkFailed {
        /// Sender.
        from: NodeId,
        /// File.
        file: ContentId,
        /// Chunk index.
        index: u32,
        /// Why.
        reason: ChunkFailure,
    },
    /// A local command; its result comes back as [`Event::CommandDone`] with the same id.
    Command {
        /// Caller's id, echoed in the result.
        id: u64,
        /// The command.
        cmd: Command,
    },
}

/// Local commands from the driver (operator, HTTP API, startup).
#[derive(Clone, Debug)]
pub enum Command {
    /// Install a trust root: the first is checked as self-signed by its root keys, later
    /// ones as a rotation of the current one.
    SetTrustRoot(SignedTrustRoot),
    /// Restore a trust root persisted before a restart (the chain in version order):
    /// signatures are checked as for [`Command::SetTrustRoot`] but not expiry, so a node
    /// offline past its root's expiry still restores what it serves.
    RestoreTrustRoot(SignedTrustRoot),
    /// Inject a manifest (checked exactly as one from a peer).
    Publish(SignedManifest),
    /// Restore a manifest accepted before a restart: signatures are checked again, but not
    /// expiry or the version order.
    Restore(SignedManifest),
    /// Restore the highest version accepted for a channel (rollback protection).
    SetHighest {
        /// Channel.
        channel: Channel,
        /// Highest version accepted before.
        version: u64,
    },
    /// Restore the version active before a restart. Send after every [`Command::Restore`]:
    /// restored releases are only trimmed to the retention bound from here on, so the
    /// active one cannot be evicted before it is marked.
    SetActive {
        /// Channel.
        channel: Channel,
        /// Manifest that was active.
        manifest: ManifestId,
    },
    /// Chunks already in the local store (startup, or a publisher's own files).
    LocalChunks {
        /// File.
        file: ContentId,
        /// Chunks present.
        chunks: Bitfield,
    },
    /// A health report signed by this node (activation result or periodic). It has a
    /// second meaning: a `Failed` report before any `Ok` for that release says its
    /// activation failed, so the core never chooses it again and makes the previous release
    /// active again (the driver kept serving it).
    ReportHealth(HealthReport),
    /// A signed rollout instruction (halt / resume).
    Instruct(SignedInstruction),
    /// This node's certificate, shown to peers on connect.
    SetCertificate(SignedNodeCert),
    /// Pin this node's channel to a version (None: follow the rollouts again). While
    /// pinned, the node serves that version as soon as it holds it, ignoring stages, gates
    /// and rollbacks, and never drops it; until it holds it, it keeps what it serves.
    /// Persisting the pin is the driver's job.
    PinVersion {
        /// Channel.
        channel: Channel,
        /// Version to stay on.
        version: Option<u64>,
    },
    /// Never trim this release (the node an operator published through keeps every
    /// version it published, so older versions stay fetchable from it).
    Pin(ManifestId),
}

/// Kinds of object that can be rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ObjectKind {
    /// A manifest.
    Manifest,
    /// A trust root.
    TrustRoot,
    /// A health report.
    Report,
    /// A rollout instruction.
    Instruction,
    /// A node certificate.
    Certificate,
}

impl ObjectKind {
    /// A stable snake_case name, for metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            ObjectKind::Manifest => "manifest",
            ObjectKind::TrustRoot => "trust_root",
            ObjectKind::Report => "health_report",
            ObjectKind::Instruction => "instruction",
            ObjectKind::Certificate => "certificate",
        }
    }
}

/// Something the application should know.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// A command finished.
    CommandDone {
        /// The command's id.
        id: u64,
        /// Ok, or a human-readable error.
        result: Result<(), String>,
    },
    /// A trust root was installed (persist it).
    TrustRootUpdated {
        /// Its version.
        version: u64,
        /// The envelope to persist.
        signed: SignedTrustRoot,
    },
    /// A manifest was accepted (persist it and the channel's highest version).
    ManifestAccepted {
        /// Id.
        id: ManifestId,
        /// Channel.
        channel: Channel,
        /// Version.
        version: u64,
        /// The envelope to persist.
        signed: SignedManifest,
    },
    /// An object was refused.
    Rejected {
        /// What kind.
        kind: ObjectKind,
        /// From which peer (None: local command).
        from: Option<NodeId>,
        /// Stable reason label (metrics).
        label: &'static str,
        /// Human-readable reason.
        reason: String,
    },
    /// Two validly signed manifests for one channel and version: a leaked key.
    Equivocation {
        /// Channel.
        channel: Channel,
        /// Version.
        version: u64,
        /// The manifest kept (lowest body hash).
        kept: ManifestId,
        /// Both manifests, as evidence.
        evidence: Box<(SignedManifest, SignedManifest)>,
    },
    /// Two trust roots of one version, each signed by the root keys in force: root keys
    /// leaked or an operator signed twice. The root in force is kept (nodes that saw the
    /// other one first keep theirs); the operator heals the split by signing the next
    /// version, which every node accepts whichever of the two it holds. Reported once per
    /// version.
    TrustRootEquivocation {
        /// The version signed twice.
        version: u64,
        /// The root in force (kept), then the other one: the evidence.
        evidence: Box<(SignedTrustRoot, SignedTrustRoot)>,
    },
    /// A stage of a release opened.
    StageOpened {
        /// Channel.
        channel: Channel,
        /// Version.
        version: u64,
        /// Stage index.
        stage: usize,
        /// When it opened (signed-time derived).
        at: UnixTime,
    },
    /// A release failed its gate: later stages stay closed, nodes on it roll back.
    RolloutFailed {
        /// Channel.
        channel: Channel,
        /// Version.
        version: u64,
        /// The failure.
        failure: GateFailure,
    },
    /// Load and switch to this release (all files are stored). Report the outcome with
    /// [`Command::ReportHealth`].
    Activate {
        /// Channel.
        channel: Channel,
        /// Version.
        version: u64,
        /// Manifest id.
        manifest: ManifestId,
        /// Chosen variant index.
        variant: usize,
        /// The version served until now.
        previous: Option<u64>,
    },
    /// Go back from `from` to `to` (kept on disk): the release failed its rollout.
    RollBack {
        /// Channel.
        channel: Channel,
        /// Version being left.
        from: u64,
        /// Manifest being left: the release a driver reports `RolledBack` for.
        from_manifest: ManifestId,
        /// Version to serve again (None: serve nothing for this channel).
        to: Option<(u64, ManifestId)>,
    },
    /// A file's download progressed.
    FileProgress {
        /// File.
        file: ContentId,
        /// Chunks held.
        have: u32,
        /// Chunks in the file.
        total: u32,
    },
    /// A file is complete.
    FileComplete {
        /// File.
        file: ContentId,
    },
    /// A rollout instruction took effect (persist it: peers also offer it again by
    /// anti-entropy, but a node restarted alone should not forget a halt).
    InstructionAccepted {
        /// Channel.
        channel: Channel,
        /// Version.
        version: u64,
        /// Action.
        action: RolloutAction,
        /// The signed instruction.
        signed: Box<SignedInstruction>,
    },
    /// A peer was penalised.
    PeerPenalised {
        /// Peer.
        peer: NodeId,
        /// Why.
        reason: String,
        /// Its score now.
        score: u32,
    },
}

/// An instruction for the driver.
#[derive(Clone, Debug, PartialEq)]
pub enum Output {
    /// Send a control message.
    Send {
        /// Recipient.
        to: NodeId,
        /// Message.
        msg: Message,
    },
    /// Read chunk `index` of `file` from the store and send it to `to` in a chunk frame
    /// with request id `id`.
    SendChunk {
        /// Recipient.
        to: NodeId,
        /// Request id.
        id: u64,
        /// File.
        file: ContentId,
        /// Chunk index.
        index: u32,
    },
    /// Drop a queued [`Output::SendChunk`] if it has not been sent yet.
    CancelChunk {
        /// Recipient.
        to: NodeId,
        /// Request id.
        id: u64,
    },
    /// Close connections to `peer` and refuse it for a while.
    Disconnect {
        /// The peer.
        peer: NodeId,
        /// Why.
        reason: String,
    },
    /// An event for the application.
    Event(Event),
}
