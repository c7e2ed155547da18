//! # pollen-protocol: the sans-IO core of Pollen
//!
//! Every protocol decision of a Pollen node lives here, with no IO: no sockets, files,
//! clocks, threads or OS randomness. The real node (`pollen run`) and the simulator
//! (`pollen-sim`) drive the very same [`state::Mesh`], so what the simulator reports is
//! what the mesh does.
//!
//! ## Layout (one concept per module)
//!
//! * [`time`]: the core's monotonic [`time::Instant`] and wall-clock [`time::UnixTime`].
//! * [`ids`]: node ids (ed25519 public keys), content ids, manifest ids, channel names.
//! * [`bitfield`]: sets of chunk indices.
//! * [`chunking`]: content ids, chunk layout, chaining values, chunk verification.
//! * [`signing`]: canonical signed envelopes with a domain per kind of object.
//! * [`cert`]: node certificates (the fleet key vouches for a node key).
//! * [`manifest`]: version manifests (channel, version, artifact, model, golden checks).
//! * [`trust`]: trust roots, rotation, manifest authorisation, certificate checks.
//! * [`rollout`]: plans, cohorts, health reports, the bounded report sample, the stage rule.
//! * [`wire`]: frames and messages with hard size caps.
//! * [`io`]: inputs, commands, outputs, events of the state machine.
//! * [`state`]: the mesh state machine, one folder of parts (config, timers, peers,
//!   gossip, objects, releases, exchange, status) composed by [`state::Mesh`].
//! * `harness/` (feature `test-utils`): N state machines over virtual time and seeded
//!   links (event loop, topology, link, health policy, fixtures).
//!
//! ## Driving it
//!
//! ```text
//! loop {
//!     mesh.handle(now, input)          // or mesh.handle_timeout(now) at the deadline
//!     while let Some(out) = mesh.poll_output() { act on it }
//!     sleep until mesh.poll_timeout()
//! }
//! ```

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

extern crate alloc;

pub mod bitfield;
pub mod cert;
pub mod chunking;
pub mod ids;
pub mod io;
pub mod manifest;
pub mod rollout;
pub mod signing;
pub mod state;
pub mod time;
pub mod trust;
pub mod wire;

#[cfg(feature = "test-utils")]
pub mod harness;

pub use ids::{ContentId, ManifestId, NodeId, PublicKey};
pub use io::{Command, Event, Input, Output, PeerInfo};
pub use state::{Config, Mesh, QUEUED_UPLOADS};
pub use time::{Instant, Now, UnixTime};

/// Re-exported so drivers use the same signing-key type as the core.
pub use ed25519_dalek::SigningKey;
