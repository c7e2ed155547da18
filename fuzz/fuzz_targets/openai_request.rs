//! OpenAI-style request bodies from untrusted bytes, decoded and checked as the
//! `POST /v1/chat/completions` and `POST /v1/completions` handlers do
//! (`http::openai::fuzzing::decode`), for a model with a ChatML chat template, a context
//! of 2048 tokens and a vocabulary of 49152 (text prompts stand for one token per byte).
//!
//! Input layout: byte 0 even is a chat request, odd a completion; the rest is the body.
//!
//! Checks: nothing panics (the chat template renders whatever messages come, under its
//! fuel bound); a refused request is a 400; an accepted one asks for a prompt that leaves
//! room in the context, 1 to the room left of tokens, a finite temperature in [0, 2],
//! top_p in (0, 1], at most 4 stop strings of 1 to 256 bytes, and token ids in the
//! vocabulary.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pollen_node::http::openai::fuzzing::decode;
use pollen_node::serving::lm::chat::ChatTemplate;
use pollen_node::serving::lm::config::GenerationConfig;
use std::sync::LazyLock;

const VOCAB: usize = 49152;

/// SmolLM2's template, as its `generation.json` carries it.
const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

static MODEL: LazyLock<(GenerationConfig, ChatTemplate)> = LazyLock::new(|| {
    let config = GenerationConfig::parse(
        br#"{"format": 1, "context_length": 2048, "eos_tokens": ["<|im_end|>"],
             "defaults": {"temperature": 0.2, "top_p": 0.9, "max_tokens": 64}}"#,
    )
    .expect("config");
    (config, ChatTemplate::new(CHATML).expect("template"))
});

fuzz_target!(|input: &[u8]| {
    let Some((&mode, body)) = input.split_first() else {
        return;
    };
    let (config, template) = &*MODEL;
    let chat = mode & 1 == 0;
    match decode(body, chat, config, Some(template), VOCAB) {
        Err(status) => assert_eq!(status.as_u16(), 400, "a bad request is a 400"),
        Ok((job, _stream, _usage)) => {
            let context = config.context_length;
            assert!(job.prompt.len() < context);
            assert!(job.max_tokens >= 1 && job.max_tokens <= context - job.prompt.len());
            let s = job.sampling;
            assert!(s.temperature.is_finite() && (0.0..=2.0).contains(&s.temperature));
            assert!(s.top_p > 0.0 && s.top_p <= 1.0);
            assert!(job.stop.len() <= 4);
            assert!(job.stop.iter().all(|s| !s.is_empty() && s.len() <= 256));
            assert!(job.prompt.iter().all(|&t| (t as usize) < VOCAB));
        }
    }
});
