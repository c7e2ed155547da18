//! A language model's generation config (`generation.json` in each variant): special
//! tokens, the chat template, the context length and the default sampling; and the
//! variant's golden prompts (`golden_prompts.json`).

use pollen_protocol::manifest::{GoldenPrompt, LmSpec};
use serde::Deserialize;
use std::path::Path;

/// The golden prompts of a variant's directory, which `pollen publish` puts in the
/// manifest: `{"min_agreement": F, "prompts": [{"prompt", "continuation"}]}`.
pub const GOLDEN_PROMPTS_FILE: &str = "golden_prompts.json";

/// `golden_prompts.json`, read.
#[derive(Debug)]
pub struct GoldenPromptsFile {
    /// Share of the expected tokens this variant must agree on.
    pub min_agreement: f32,
    /// The prompts and their expected greedy continuations.
    pub prompts: Vec<GoldenPrompt>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GoldenPromptsJson {
    min_agreement: f32,
    prompts: Vec<GoldenPromptJson>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GoldenPromptJson {
    prompt: String,
    continuation: Vec<u32>,
}

impl GoldenPromptsFile {
    /// Read and parse `path`; the error names the file.
    pub fn read(path: &Path) -> Result<Self, String> {
        let bytes =
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Self::parse(&bytes).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parse the bytes of a `golden_prompts.json` (the error does not name the file).
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        let f: GoldenPromptsJson = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        Ok(GoldenPromptsFile {
            min_agreement: f.min_agreement,
            prompts: f
                .prompts
                .into_iter()
                .map(|p| GoldenPrompt {
                    prompt: p.prompt,
                    continuation: p.continuation,
                })
                .collect(),
        })
    }

    /// The spec of a release of this one variant.
    pub fn spec(&self) -> LmSpec {
        LmSpec {
            golden_prompts: self.prompts.clone(),
            min_agreement: vec![self.min_agreement],
        }
    }
}

/// Largest generation config, bytes (the chat template is the large part).
pub const MAX_CONFIG_BYTES: u64 = 256 * 1024;

/// `generation.json`, format 1.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationConfig {
    /// Format of the file: 1.
    pub format: u32,
    /// Most tokens (prompt and generated) the model attends to.
    pub context_length: usize,
    /// Prepended to every prompt when `add_bos_token`.
    #[serde(default)]
    pub bos_token: Option<String>,
    /// Whether prompts start with `bos_token`.
    #[serde(default)]
    pub add_bos_token: bool,
    /// Generation ends at any of these (each a single token of the vocabulary).
    pub eos_tokens: Vec<String>,
    /// A Hugging Face chat template (Jinja), rendered with `messages`,
    /// `add_generation_prompt`, `bos_token` and `eos_token`.
    #[serde(default)]
    pub chat_template: Option<String>,
    /// Sampling when a request does not say.
    #[serde(default)]
    pub defaults: Defaults,
}

/// Sampling defaults of a model.
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Defaults {
    /// 0 is greedy.
    #[serde(default)]
    pub temperature: f32,
    /// Nucleus sampling: the smallest set of tokens whose probabilities reach `top_p`.
    #[serde(default = "one")]
    pub top_p: f32,
    /// Tokens generated when a request does not say.
    #[serde(default = "default_max_tokens")]
    pub max_tokens: usize,
}

fn one() -> f32 {
    1.0
}

fn default_max_tokens() -> usize {
    256
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults {
            temperature: 0.0,
            top_p: 1.0,
            max_tokens: default_max_tokens(),
        }
    }
}

impl GenerationConfig {
    /// Parse and check a config file's bytes.
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        let c: GenerationConfig =
            serde_json::from_slice(bytes).map_err(|e| format!("generation.json: {e}"))?;
        if c.format != 1 {
            return Err(format!(
                "generation.json: format {} (this node reads format 1)",
                c.format
            ));
        }
        if c.context_length == 0 || c.context_length > 1 << 20 {
            return Err("generation.json: context_length is 1 to 1048576".into());
        }
        if c.eos_tokens.is_empty() {
            return Err("generation.json: eos_tokens names at least one token".into());
        }
        let d = c.defaults;
        let temperature_ok = d.temperature.is_finite() && d.temperature >= 0.0;
        let top_p_ok = d.top_p > 0.0 && d.top_p <= 1.0;
        if !temperature_ok || !top_p_ok || d.max_tokens == 0 {
            return Err("generation.json: bad sampling defaults".into());
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A golden-prompts file reads into the spec of its variant; an unknown field, a
    /// token id that is not one, or a missing file is an error naming the file.
    #[test]
    fn golden_prompts_files_are_read_strictly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(GOLDEN_PROMPTS_FILE);
        std::fs::write(
            &path,
            r#"{"min_agreement": 0.9, "prompts": [{"prompt": "Hi", "continuation": [1, 2]}]}"#,
        )
        .unwrap();
        let spec = GoldenPromptsFile::read(&path).unwrap().spec();
        assert_eq!(spec.min_agreement, vec![0.9]);
        assert_eq!(
            spec.golden_prompts,
            vec![GoldenPrompt {
                prompt: "Hi".into(),
                continuation: vec![1, 2]
            }]
        );
        for bad in [
            r#"{"min_agreement": 0.9, "prompts": [{"prompt": "Hi", "continuation": [1], "x": 1}]}"#,
            r#"{"min_agreement": 0.9, "prompts": [{"prompt": "Hi", "continuation": [-1]}]}"#,
            r#"{"min_agreement": 0.9}"#,
        ] {
            std::fs::write(&path, bad).unwrap();
            let e = GoldenPromptsFile::read(&path).unwrap_err();
            assert!(e.starts_with(&path.display().to_string()), "{e}");
        }
        let e = GoldenPromptsFile::read(&dir.path().join("none.json")).unwrap_err();
        assert!(
            e.starts_with("cannot read") && e.contains("none.json"),
            "{e}"
        );
    }

    #[test]
    fn configs_are_checked() {
        let ok = br#"{"format":1,"context_length":512,"eos_tokens":["<|im_end|>"],
                      "chat_template":"{{ messages[0].content }}"}"#;
        let c = GenerationConfig::parse(ok).expect("valid");
        assert_eq!(c.defaults.max_tokens, 256);
        assert_eq!(c.defaults.top_p, 1.0);
        for bad in [
            &br#"{"format":2,"context_length":512,"eos_tokens":["x"]}"#[..],
            br#"{"format":1,"context_length":0,"eos_tokens":["x"]}"#,
            br#"{"format":1,"context_length":512,"eos_tokens":[]}"#,
            br#"{"format":1,"context_length":512,"eos_tokens":["x"],"defaults":{"top_p":0}}"#,
            br#"{"format":1,"context_length":512,"eos_tokens":["x"],"surprise":1}"#,
        ] {
            assert!(GenerationConfig::parse(bad).is_err());
        }
    }
}
