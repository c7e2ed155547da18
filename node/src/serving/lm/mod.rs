//! Causal language models: generation through the key-value cache on tract, for the
//! OpenAI-compatible API ([`crate::http::openai`]).
//!
//! A language-model release (its manifest's `serving.lm`) holds in each variant the ONNX
//! graph with `past_key_values.N.key/value` inputs and `present.N.key/value` outputs
//! (Hugging Face's names), `tokenizer.json` and `generation.json`. The graph is loaded
//! once like any model ([`crate::serving::LoadedModel`], symbolic lengths); [`LmModel`]
//! drives that same runnable one token per step, the cache held by the generation.
//!
//! * [`config`]: the generation config, `generation.json`.
//! * [`chat`]: chat templates (Jinja, fuel-bounded).
//! * [`engine`]: [`LmModel`]: the cache, tokenisation, golden prompts.
//! * [`generate`]: one generation: sampling, stop strings, streaming, cancellation.

pub mod chat;
pub mod config;
pub mod engine;
pub mod generate;

pub use engine::{Agreement, LmModel};

pub use tract_linalg::multithread::{Executor, multithread_tract_scope as with_executor};

/// Multiply-accumulates from which tract splits a matrix-vector product across the
/// generation threads (its default, 2^21, keeps every product of a 135M model but the
/// output layer on one thread).
const THREADED_MACS: usize = 1 << 17;

/// The executor of generations whose matrix products share `threads` threads (1: each
/// on its own thread only); run a generation under it with [`with_executor`].
pub fn executor(threads: usize) -> Executor {
    if threads > 1 {
        tract_linalg::multithread::set_threading_mac_threshold(THREADED_MACS);
        Executor::multithread_with_name(threads, "pollen-lm")
    } else {
        Executor::SingleThread
    }
}
