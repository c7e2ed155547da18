//! Serving: models loaded in tract, checked, swapped in and out, and answered over KServe.
//!
//! The activation story: when the core says a release is complete and active here, the
//! actor loads it on a blocking thread ([`LoadedModel::load`]: read, optimise, warm up on
//! zeros, all under `catch_unwind`), then runs the release's golden checks
//! ([`golden`]: the manifest's, then the variant's golden file's). Only a model that passed goes into the [`Registry`], atomically: new
//! requests see the new version, requests that hold the old `Arc` finish on it, and the old
//! version stays loaded (warm) as the previous one for an instant rollback. A failure at
//! any step becomes a signed `Failed` health report, and the previous version keeps
//! serving; clients asking for the failed version get 503 with its reason ([`states`]).
//!
//! While it serves, every request runs on the bounded [`pool`] (a full queue answers 503,
//! never hangs), is parsed and encoded by the [`kserve`] codec, and its [`Outcome`] is
//! counted in the model's [`HealthWindow`]. Every report interval the actor turns the
//! window into a health report ([`window_status`]); the rollout gates count those.
//!
//! * [`model`]: [`LoadedModel`] (load, warm, run), [`IoSpec`], [`ServeError`],
//!   [`ServingLimits`], the one data type ↔ tract mapping.
//! * [`shapes`]: the bounded cache of a model prepared per input shape.
//! * [`golden`]: the golden checks ([`GoldenSet`]) and the tolerance rule.
//! * [`onnx`]: the ONNX graph read and adjusted on its protobuf bytes (constant inputs,
//!   ZipMap outputs).
//! * [`health`]: [`Outcome`], [`WindowStats`], [`HealthWindow`], [`window_status`].
//! * [`registry`]: [`Registry`], current and previous version per channel.
//! * [`states`]: what clients are told of each version: `READY`, `LOADING` or
//!   `UNAVAILABLE`, and why.
//! * [`classify`]: one [`pollen_protocol::rollout::ErrorClass`] per failure, whichever
//!   step found it.
//! * [`pool`]: the bounded inference pool: admission before the body is read, and
//!   threads of its own.
//! * [`kserve`]: the KServe v2 codec (JSON and binary tensor data).
//! * [`lm`]: causal language models: generation through the key-value cache.

pub mod classify;
pub mod golden;
pub mod half;
pub mod health;
pub mod int8;
pub mod kserve;
pub mod lm;
pub mod model;
pub mod onnx;
pub mod pool;
pub mod registry;
pub mod shapes;
pub mod states;
pub mod team;
pub mod trial;

pub use golden::GoldenSet;
pub use health::{HealthWindow, Outcome, WindowStats, window_status};
pub use model::{IoSpec, LoadedModel, ServeError, ServingLimits};
pub use onnx::onnx_graph_outputs;
pub use registry::Registry;
