//! Causal language models: generation through the key-value cache on tract, for the
//! OpenAI-compatible API ([`crate::http::openai`]).
//!
//! A language-model release (its manifest's `serving.lm`) holds in each variant the ONNX
//! graph with `past_key_values.N.key/value` inputs and `present.N.key/value` outputs
//! (Hugging Face's names), `tokenizer.json` and `generation.json`. The graph is loaded
//! once like any model ([`crate::serving::LoadedModel`], symbolic lengths); [`LmModel`]
//! drives that same runnable one token per step, the cache held by the generation.
//!
//! * [`config`]: `generation.json`.
//! * [`chat`]: chat templates (Jinja, fuel-bounded).
//! * [`engine`]: [`LmModel`]: the cache, tokenisation, golden prompts.
//! * [`generate`]: one generation: sampling, stop strings, streaming, cancellation.

pub mod chat;
pub mod config;
pub mod engine;
pub mod generate;

pub use engine::{Agreement, LmModel};
