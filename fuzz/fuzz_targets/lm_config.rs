//! A language-model variant's JSON files from untrusted bytes (the publisher's, signed
//! through their content ids): `generation.json` (`GenerationConfig::parse`, then its chat
//! template compiled and rendered as the node does on a chat request) and
//! `golden_prompts.json` (`GoldenPromptsFile::parse`, what `pollen publish` reads). Every
//! input is tried as both.
//!
//! Checks: nothing panics, and a template cannot run away (the fuel bound; libFuzzer's
//! `-timeout` catches one that does). An accepted config has format 1, a context length
//! of 1 to 2^20, at least one end-of-sequence token and valid sampling defaults; a
//! rendered prompt is at most 4 MiB. An accepted golden-prompts file gives a spec with
//! its one agreement and its prompts in order.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pollen_node::serving::lm::chat::{ChatTemplate, Message};
use pollen_node::serving::lm::config::{GenerationConfig, GoldenPromptsFile};

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = GenerationConfig::parse(data) {
        assert_eq!(c.format, 1);
        assert!((1..=1 << 20).contains(&c.context_length));
        assert!(!c.eos_tokens.is_empty());
        let d = c.defaults;
        assert!(d.temperature.is_finite() && d.temperature >= 0.0);
        assert!(d.top_p > 0.0 && d.top_p <= 1.0 && d.max_tokens > 0);
        if let Some(src) = &c.chat_template
            && let Ok(t) = ChatTemplate::new(src)
        {
            let messages = [
                Message {
                    role: "system".into(),
                    content: "Be brief.".into(),
                },
                Message {
                    role: "user".into(),
                    content: "What is 2+2?".into(),
                },
            ];
            let bos = c.bos_token.as_deref().unwrap_or("");
            if let Ok(s) = t.render(&messages, bos, &c.eos_tokens[0]) {
                assert!(s.len() <= 4 << 20);
            }
        }
    }

    if let Ok(f) = GoldenPromptsFile::parse(data) {
        let spec = f.spec();
        assert_eq!(spec.min_agreement.len(), 1);
        assert_eq!(spec.min_agreement[0].to_bits(), f.min_agreement.to_bits());
        assert_eq!(spec.golden_prompts, f.prompts);
    }
});
