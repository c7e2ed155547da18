//! What the HTTP layer holds: [`AppState`], the shared parts of a running node, and
//! [`ActorCmd`], the commands the control routes send to the actor.
//!
//! The inference routes use the registry, the pool and the metrics; they ask the actor
//! (through `cmds`) only for the states of versions the registry does not serve, and for
//! model metadata and the repository index. The `/v1` control routes talk to the actor.

use crate::metrics::Metrics;
use crate::serving::Registry;
use crate::status::Status;
use crate::store::Store;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// Commands from the HTTP API.
#[derive(Debug)]
pub enum ActorCmd {
    /// Inject a signed manifest (its files must already be in the store).
    Publish {
        /// Envelope bytes.
        bytes: Vec<u8>,
        /// The manifest id (hex), or why it was refused.
        reply: oneshot::Sender<Result<String, Refusal>>,
    },
    /// A snapshot of the status.
    Status {
        /// The snapshot.
        reply: oneshot::Sender<Status>,
    },
    /// Inject a signed rollout instruction (halt / resume).
    Instruct {
        /// Envelope bytes.
        bytes: Vec<u8>,
        /// "accepted", or why it was refused.
        reply: oneshot::Sender<Result<String, Refusal>>,
    },
    /// Pin a channel to a version (None: unpin); persisted.
    Pin {
        /// Channel.
        channel: String,
        /// Version.
        version: Option<u64>,
        /// Outcome.
        reply: oneshot::Sender<Result<String, String>>,
    },
    /// The files retained releases refer to (what garbage collection keeps).
    LiveFiles {
        /// Their content ids.
        reply: oneshot::Sender<std::collections::BTreeSet<pollen_protocol::ContentId>>,
    },
    /// Each version this node knows of every channel (or of one), with its state and
    /// reason (see [`crate::serving::states`]).
    ModelStates {
        /// Only this channel.
        channel: Option<String>,
        /// (channel, its versions oldest first), by channel.
        reply: oneshot::Sender<Vec<(String, Vec<crate::serving::states::VersionState>)>>,
    },
    /// The signed manifest of a retained release.
    Manifest {
        /// Channel.
        channel: String,
        /// Version.
        version: u64,
        /// Envelope bytes, if the node keeps the release.
        reply: oneshot::Sender<Option<Vec<u8>>>,
    },
}

/// The HTTP server's state: cheap to clone (every field is shared).
#[derive(Clone, Debug)]
pub struct AppState {
    /// Commands to the actor.
    pub cmds: mpsc::Sender<ActorCmd>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The store.
    pub store: Arc<Store>,
    /// Models being served.
    pub registry: Arc<Registry>,
    /// The bounded inference pool.
    pub inference: Arc<crate::serving::pool::Pool>,
    /// Upload slots (`PUT /v1/files`): at most [`crate::http::v1::UPLOADS`] at once.
    pub uploads: Arc<tokio::sync::Semaphore>,
    /// [`crate::config::NodeConfig::max_unreferenced_bytes`].
    pub upload_quota: u64,
    /// Language-model generation places (`max_generations`, `generation_queue`).
    pub generations: Arc<crate::http::openai::Generations>,
}

/// Why the node refused a manifest or an instruction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The reason, for people (the `error` of the JSON answer).
    pub message: String,
    /// The stable label of the refusal (`TrustError::label()`, e.g. `"forged"`), when the
    /// core gave one: the `code` of the JSON answer, for programs.
    pub code: Option<&'static str>,
}

impl Refusal {
    /// A refusal without a label (e.g. bytes that do not decode).
    pub fn new(message: String) -> Self {
        Refusal {
            message,
            code: None,
        }
    }
}
