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

pub use tract_linalg::multithread::Executor;
use tract_linalg::multithread::multithread_tract_scope;

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

/// Run `f` (a generation, a golden check) with its matrix products shared by `executor`'s
/// threads.
///
/// `f` runs on one of the pool's own threads, so a product splits by work stealing from
/// the thread that runs the step; run from outside, every product would be handed to the
/// pool and its result handed back, two thread wake-ups per product, some 200 products a
/// token (SmolLM2-135M at two threads: 22–25 tokens/s run from outside, 26–27 inside).
/// The caller blocks until `f` returns (behind the pool's running generations when all
/// its threads hold one); a panic in `f` resumes in the caller.
pub fn with_executor<R: Send>(executor: Executor, f: impl FnOnce() -> R + Send) -> R {
    match &executor {
        Executor::MultiThread(pool) => {
            let pool = pool.clone();
            pool.install(move || multithread_tract_scope(executor, f))
        }
        _ => multithread_tract_scope(executor, f),
    }
}
