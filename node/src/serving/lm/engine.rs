//! A causal language model on tract: the graph's key-value cache inputs and outputs found
//! by name, tokens fed through the cache (one step per new token), and the golden prompts.

use super::chat::ChatTemplate;
use super::config::{GenerationConfig, MAX_CONFIG_BYTES};
use crate::serving::model::{IoSpec, LoadedModel, ServeError};
use pollen_protocol::manifest::{DType, LmSpec};
use pollen_protocol::rollout::ErrorClass;
use std::path::Path;
use tokenizers::Tokenizer;
use tract::prelude::*;

/// Largest tokenizer file, bytes.
const MAX_TOKENIZER_BYTES: u64 = 64 << 20;
/// Prompt tokens fed per call: bounds the logits tensor of a long prompt
/// (`PREFILL_CHUNK × vocabulary × 4` bytes).
pub const PREFILL_CHUNK: usize = 128;

/// A past key or value input and the present output that feeds it next step.
#[derive(Clone, Debug)]
struct Past {
    input: usize,
    output: usize,
    /// `[1, heads, past, dim]`.
    heads: usize,
    dim: usize,
}

/// Where the graph's inputs and outputs are.
#[derive(Clone, Debug)]
struct Io {
    inputs: usize,
    input_ids: (usize, DType),
    position_ids: Option<(usize, DType)>,
    attention_mask: Option<(usize, DType)>,
    past: Vec<Past>,
    logits: usize,
}

/// A language model ready to generate: the runnable of its [`LoadedModel`] (one copy of
/// the weights), its tokenizer, chat template and config.
pub struct LmModel {
    runnable: tract::Runnable,
    tokenizer: Tokenizer,
    /// The generation config.
    pub config: GenerationConfig,
    template: Option<ChatTemplate>,
    /// Token ids that end a generation.
    pub eos: Vec<u32>,
    bos: Option<u32>,
    io: Io,
    /// Vocabulary size (the logits' last dimension).
    pub vocab: usize,
}

impl std::fmt::Debug for LmModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LmModel")
            .field("vocab", &self.vocab)
            .field("context_length", &self.config.context_length)
            .field("layers", &(self.io.past.len() / 2))
            .finish()
    }
}

/// The key-value cache of one generation.
#[derive(Debug)]
pub struct Cache {
    past: Vec<tract::Tensor>,
    /// Tokens in the cache.
    pub len: usize,
}

fn load_err(e: impl std::fmt::Display) -> (ErrorClass, String) {
    (ErrorClass::LoadError, e.to_string())
}

fn read_bounded(path: &Path, max: u64, what: &str) -> Result<Vec<u8>, (ErrorClass, String)> {
    let len = std::fs::metadata(path)
        .map_err(|e| (ErrorClass::Unavailable, format!("{what}: {e}")))?
        .len();
    if len > max {
        return Err(load_err(format!("{what} has {len} bytes, at most {max}")));
    }
    std::fs::read(path).map_err(|e| (ErrorClass::Unavailable, format!("{what}: {e}")))
}

/// The past input a present output feeds: `present.3.key` → `past_key_values.3.key`
/// (the names Hugging Face's exporters use).
fn past_name(present: &str) -> Option<String> {
    present
        .strip_prefix("present.")
        .or_else(|| present.strip_prefix("present_key_values."))
        .map(|rest| format!("past_key_values.{rest}"))
}

fn find_io(inputs: &[IoSpec], outputs: &[IoSpec]) -> Result<Io, String> {
    let pos = |name: &str| inputs.iter().position(|s| s.name == name);
    let int = |i: usize, what: &str| -> Result<(usize, DType), String> {
        match inputs[i].datatype {
            d @ (DType::I64 | DType::I32) => Ok((i, d)),
            d => Err(format!(
                "{what} is {d:?}: a language model takes int64 or int32"
            )),
        }
    };
    let input_ids = pos("input_ids")
        .ok_or("a language model's graph takes `input_ids`")
        .and_then(|i| int(i, "input_ids").map_err(|_| "input_ids: not an integer tensor"))?;
    let position_ids = pos("position_ids")
        .map(|i| int(i, "position_ids"))
        .transpose()?;
    let attention_mask = pos("attention_mask")
        .map(|i| int(i, "attention_mask"))
        .transpose()?;
    let logits = outputs
        .iter()
        .position(|o| o.name == "logits")
        .ok_or("a language model's graph gives `logits`")?;
    if outputs[logits].datatype != DType::F32 {
        return Err("logits must be float32".into());
    }
    let mut past = Vec::new();
    for (output, o) in outputs.iter().enumerate() {
        let Some(name) = past_name(&o.name) else {
            continue;
        };
        let input = pos(&name).ok_or_else(|| format!("output {} has no input {name}", o.name))?;
        let s = &inputs[input];
        if s.datatype != DType::F32 || s.shape.len() != 4 || s.shape[1] <= 0 || s.shape[3] <= 0 {
            return Err(format!(
                "{name} must be float32 [1, heads, past, head_dim] with fixed heads and \
                 head_dim, not {:?} {:?}",
                s.datatype, s.shape
            ));
        }
        past.push(Past {
            input,
            output,
            heads: s.shape[1] as usize,
            dim: s.shape[3] as usize,
        });
    }
    if past.is_empty() {
        return Err(
            "the graph has no key-value cache (past_key_values.N.key/value inputs and \
                    present.N.key/value outputs)"
                .into(),
        );
    }
    past.sort_by_key(|p| p.input);
    let known =
        1 + past.len() + position_ids.is_some() as usize + attention_mask.is_some() as usize;
    if known != inputs.len() {
        let names: Vec<&str> = inputs
            .iter()
            .enumerate()
            .filter(|(i, _)| {
                *i != input_ids.0
                    && position_ids.is_none_or(|p| p.0 != *i)
                    && attention_mask.is_none_or(|p| p.0 != *i)
                    && !past.iter().any(|p| p.input == *i)
            })
            .map(|(_, s)| s.name.as_str())
            .collect();
        return Err(format!(
            "the graph takes inputs a language model does not: {}",
            names.join(", ")
        ));
    }
    Ok(Io {
        inputs: inputs.len(),
        input_ids,
        position_ids,
        attention_mask,
        past,
        logits,
    })
}

fn int_tensor(dt: DType, shape: &[usize], values: impl Iterator<Item = i64>) -> tract::Tensor {
    let bytes: Vec<u8> = match dt {
        DType::I32 => values.flat_map(|v| (v as i32).to_le_bytes()).collect(),
        _ => values.flat_map(|v| v.to_le_bytes()).collect(),
    };
    let dt = if dt == DType::I32 {
        DatumType::I32
    } else {
        DatumType::I64
    };
    // The length matches the shape by construction.
    tract::Tensor::from_bytes(dt, shape, &bytes).expect("tensor of its own shape")
}

impl LmModel {
    /// Make a language model of `model` (loaded with symbolic dimensions) with its
    /// tokenizer and generation config files.
    pub fn new(
        model: &LoadedModel,
        tokenizer: &Path,
        config: &Path,
        limits: &crate::serving::ServingLimits,
    ) -> Result<Self, (ErrorClass, String)> {
        let runnable = model.symbolic_runnable().cloned().ok_or_else(|| {
            load_err(
                "tract cannot prepare this language model with symbolic sequence lengths, \
                 which generation needs",
            )
        })?;
        let io = find_io(&model.inputs, &model.outputs).map_err(load_err)?;
        let config =
            GenerationConfig::parse(&read_bounded(config, MAX_CONFIG_BYTES, "generation.json")?)
                .map_err(load_err)?;
        let tokenizer = Tokenizer::from_bytes(read_bounded(
            tokenizer,
            MAX_TOKENIZER_BYTES,
            "tokenizer.json",
        )?)
        .map_err(|e| load_err(format!("tokenizer.json: {e}")))?;
        let id = |t: &str| {
            tokenizer.token_to_id(t).ok_or_else(|| {
                load_err(format!("generation.json names {t:?}, which is not a token"))
            })
        };
        let eos = config
            .eos_tokens
            .iter()
            .map(|t| id(t))
            .collect::<Result<Vec<_>, _>>()?;
        let bos = match (&config.bos_token, config.add_bos_token) {
            (Some(t), true) => Some(id(t)?),
            (None, true) => return Err(load_err("add_bos_token without a bos_token")),
            _ => None,
        };
        let template = config
            .chat_template
            .as_deref()
            .map(ChatTemplate::new)
            .transpose()
            .map_err(load_err)?;
        let vocab = model.outputs[io.logits]
            .shape
            .last()
            .copied()
            .filter(|v| *v > 0)
            .map(|v| v as usize)
            .unwrap_or_else(|| tokenizer.get_vocab_size(true));
        let kv_bytes_per_token: u64 = io.past.iter().map(|p| (p.heads * p.dim * 4) as u64).sum();
        let full = kv_bytes_per_token.saturating_mul(config.context_length as u64);
        if full > limits.budget {
            return Err(load_err(format!(
                "a full context of {} tokens takes {full} bytes of key-value cache, over the \
                 model memory budget of {} bytes",
                config.context_length, limits.budget
            )));
        }
        Ok(LmModel {
            runnable,
            tokenizer,
            config,
            template,
            eos,
            bos,
            io,
            vocab,
        })
    }

    /// Render a chat with the model's template.
    pub fn render_chat(&self, messages: &[super::chat::Message]) -> Result<String, String> {
        let t = self
            .template
            .as_ref()
            .ok_or("this model has no chat template: use /v1/completions")?;
        let eos = self.config.eos_tokens.first().map_or("", String::as_str);
        t.render(
            messages,
            self.config.bos_token.as_deref().unwrap_or(""),
            eos,
        )
    }

    /// Token ids of a prompt: the BOS token if the config says so, then the text without
    /// added special tokens (special tokens written in the text, as a rendered chat
    /// template writes them, are still recognised).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| format!("tokenizer: {e}"))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        ids.extend(self.bos);
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Text of generated token ids, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> String {
        self.tokenizer.decode(ids, true).unwrap_or_default()
    }

    /// An empty cache.
    pub fn new_cache(&self) -> Cache {
        let past = self
            .io
            .past
            .iter()
            .map(|p| {
                // An empty tensor: no bytes for no elements.
                tract::Tensor::from_bytes(DatumType::F32, &[1, p.heads, 0, p.dim], &[])
                    .expect("empty tensor")
            })
            .collect();
        Cache { past, len: 0 }
    }

    /// Feed `tokens` after what `cache` holds, in calls of at most [`PREFILL_CHUNK`]
    /// tokens; the logits of the last one. A panic inside tract is caught.
    pub fn feed(&self, cache: &mut Cache, tokens: &[u32]) -> Result<Vec<f32>, ServeError> {
        let mut last = None;
        for chunk in tokens.chunks(PREFILL_CHUNK) {
            last = Some(self.step(cache, chunk)?);
        }
        last.ok_or_else(|| ServeError::BadInput("no tokens to feed".into()))
    }

    fn step(&self, cache: &mut Cache, tokens: &[u32]) -> Result<Vec<f32>, ServeError> {
        let (p, s) = (cache.len, tokens.len());
        if p + s > self.config.context_length {
            return Err(ServeError::BadInput(format!(
                "{} tokens are past the context length of {}",
                p + s,
                self.config.context_length
            )));
        }
        let mut inputs: Vec<Option<tract::Tensor>> = vec![None; self.io.inputs];
        let (i, dt) = self.io.input_ids;
        inputs[i] = Some(int_tensor(dt, &[1, s], tokens.iter().map(|t| *t as i64)));
        if let Some((i, dt)) = self.io.position_ids {
            inputs[i] = Some(int_tensor(dt, &[1, s], (p..p + s).map(|x| x as i64)));
        }
        if let Some((i, dt)) = self.io.attention_mask {
            inputs[i] = Some(int_tensor(dt, &[1, p + s], std::iter::repeat_n(1, p + s)));
        }
        for (k, past) in self.io.past.iter().enumerate() {
            inputs[past.input] = Some(cache.past[k].clone());
        }
        let inputs: Vec<tract::Tensor> = inputs.into_iter().flatten().collect();
        let run =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.runnable.run(inputs)));
        let outs = match run {
            Ok(Ok(o)) => o,
            Ok(Err(e)) => return Err(ServeError::Runtime(format!("{e:#}"))),
            Err(_) => return Err(ServeError::Panicked),
        };
        let bad = |what: String| ServeError::Runtime(what);
        for (k, past) in self.io.past.iter().enumerate() {
            let t = outs
                .get(past.output)
                .ok_or_else(|| bad("missing present output".into()))?;
            let shape = t.shape().map_err(|e| bad(e.to_string()))?;
            if shape != [1, past.heads, p + s, past.dim] {
                return Err(bad(format!(
                    "a present tensor has shape {shape:?}, expected [1, {}, {}, {}]",
                    past.heads,
                    p + s,
                    past.dim
                )));
            }
            cache.past[k] = t.clone();
        }
        cache.len = p + s;
        let logits = outs
            .get(self.io.logits)
            .ok_or_else(|| bad("missing logits".into()))?;
        let (dt, shape, bytes) = logits.as_bytes().map_err(|e| bad(e.to_string()))?;
        if dt != DatumType::F32 || shape.len() != 3 || shape[1] != s || shape[2] != self.vocab {
            return Err(bad(format!(
                "logits have shape {shape:?}, expected [1, {s}, {}]",
                self.vocab
            )));
        }
        let row = &bytes[(s - 1) * self.vocab * 4..];
        Ok(row
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }

    /// Run the golden prompts (teacher forcing through the cache): how many expected
    /// tokens were the model's top choice, of how many, and the mean log-likelihood of
    /// the expected tokens.
    pub fn score(&self, spec: &LmSpec) -> Result<Agreement, ServeError> {
        let mut a = Agreement::default();
        for g in &spec.golden_prompts {
            let ids = self.encode(&g.prompt).map_err(ServeError::BadInput)?;
            let mut cache = self.new_cache();
            let mut logits = self.feed(&mut cache, &ids)?;
            for (n, &want) in g.continuation.iter().enumerate() {
                if argmax(&logits) == Some(want as usize) {
                    a.agreed += 1;
                }
                a.log_likelihood += log_prob(&logits, want as usize);
                a.total += 1;
                if n + 1 < g.continuation.len() {
                    logits = self.feed(&mut cache, &[want])?;
                }
            }
        }
        Ok(a)
    }

    /// The golden check before activation of variant `variant`: refused
    /// ([`ErrorClass::GoldenMismatch`]) when fewer than its `min_agreement` of the
    /// expected tokens agree.
    pub fn check_golden(
        &self,
        spec: &LmSpec,
        variant: usize,
    ) -> Result<Agreement, (ErrorClass, String)> {
        let bound = spec.min_agreement_of(variant);
        let a = self
            .score(spec)
            .map_err(|e| (ErrorClass::GoldenMismatch, format!("golden prompts: {e}")))?;
        if a.total > 0 && a.fraction() < bound {
            return Err((
                ErrorClass::GoldenMismatch,
                format!(
                    "the model agrees with {} of {} expected tokens of its golden prompts \
                     ({:.3}), below the bound of {:.3}",
                    a.agreed,
                    a.total,
                    a.fraction(),
                    bound
                ),
            ));
        }
        Ok(a)
    }
}

/// A language model's variant directory (`model.onnx`, `tokenizer.json`,
/// `generation.json`) loaded as the node loads a release of it, outside any release: the
/// graph with the language model attached (for tools, benchmarks and tests).
pub fn load_dir(
    dir: &Path,
    limits: &crate::serving::ServingLimits,
) -> Result<LoadedModel, (ErrorClass, String)> {
    let mut m = LoadedModel::load(
        &dir.join("model.onnx"),
        "lm",
        1,
        pollen_protocol::ids::ManifestId([0; 32]),
        &pollen_protocol::manifest::ServingSpec {
            lm: Some(Default::default()),
            ..Default::default()
        },
        &crate::serving::GoldenSet::default(),
        limits,
    )?;
    let lm = LmModel::new(
        &m,
        &dir.join(pollen_protocol::manifest::LM_TOKENIZER_FILE),
        &dir.join(pollen_protocol::manifest::LM_CONFIG_FILE),
        limits,
    )?;
    m.attach_lm(lm);
    Ok(m)
}

/// What the golden prompts showed.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Agreement {
    /// Expected tokens that were the model's top choice.
    pub agreed: usize,
    /// Expected tokens.
    pub total: usize,
    /// Sum of the natural-log probabilities of the expected tokens.
    pub log_likelihood: f64,
}

impl Agreement {
    /// `agreed / total` (1 with no tokens).
    pub fn fraction(&self) -> f32 {
        if self.total == 0 {
            1.0
        } else {
            self.agreed as f32 / self.total as f32
        }
    }
}

/// Index of the largest logit (the first of equals; NaN never wins).
pub fn argmax(logits: &[f32]) -> Option<usize> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &l) in logits.iter().enumerate() {
        if !l.is_nan() && best.is_none_or(|(_, b)| l > b) {
            best = Some((i, l));
        }
    }
    best.map(|(i, _)| i)
}

/// `log softmax(logits)[i]`.
fn log_prob(logits: &[f32], i: usize) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    logits
        .get(i)
        .map_or(f64::NEG_INFINITY, |&l| l as f64 - max - sum.ln())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serving::ServingLimits;

    /// A language model's variant directory (`model.onnx`, `tokenizer.json`,
    /// `generation.json`, `golden_prompts.json`), loaded as the node loads it and checked
    /// against its golden prompts: `POLLEN_LM_DIR=DIR cargo test -p pollen-node --lib
    /// lm_dir -- --ignored --nocapture`.
    #[test]
    #[ignore = "needs POLLEN_LM_DIR"]
    fn lm_dir_loads_and_agrees_with_its_golden_prompts() {
        let dir = std::path::PathBuf::from(std::env::var("POLLEN_LM_DIR").expect("POLLEN_LM_DIR"));
        let limits = ServingLimits::new(8 << 30);
        let started = std::time::Instant::now();
        let m = load_dir(&dir, &limits).expect("a language model");
        let lm = m.lm().expect("attached");
        println!("loaded in {:.2?}: {lm:?}", started.elapsed());
        let golden = crate::serving::lm::config::GoldenPromptsFile::read(
            &dir.join(crate::serving::lm::config::GOLDEN_PROMPTS_FILE),
        )
        .expect("golden prompts");
        let spec = golden.spec();
        let started = std::time::Instant::now();
        let a = lm.check_golden(&spec, 0).expect("agrees");
        println!(
            "golden prompts: {} of {} agree, mean log-likelihood {:.4}, in {:.2?}",
            a.agreed,
            a.total,
            a.log_likelihood / a.total as f64,
            started.elapsed()
        );
    }
}
