//! One generation: sample token after token through the cache, stream the text, stop at
//! an end-of-sequence token, a stop string, the token limit or a cancelled client.

use super::engine::{Cache, LmModel, argmax};
use crate::serving::model::ServeError;
use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};
use std::time::{Duration, Instant};

/// How to pick each token.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampling {
    /// 0 is greedy; above, logits are divided by it before the softmax.
    pub temperature: f32,
    /// Nucleus: sample among the most likely tokens whose probabilities reach `top_p`.
    pub top_p: f32,
    /// Seed of the sampler: the same seed, prompt and model give the same tokens.
    pub seed: u64,
}

/// What to generate.
#[derive(Clone, Debug)]
pub struct Job {
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Go on past end-of-sequence tokens (they are generated, not shown).
    pub ignore_eos: bool,
    /// Sampling.
    pub sampling: Sampling,
    /// Text that ends the generation (not included in the answer).
    pub stop: Vec<String>,
}

/// Why a generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` reached, or the context is full.
    Length,
    /// The client went away.
    Cancelled,
}

impl Finish {
    /// OpenAI's `finish_reason`.
    pub fn reason(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length | Finish::Cancelled => "length",
        }
    }
}

/// How a generation went.
#[derive(Clone, Copy, Debug)]
pub struct Done {
    /// Why it ended.
    pub finish: Finish,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Tokens generated (an end-of-sequence token included).
    pub completion_tokens: usize,
    /// From the start to the first generated token.
    pub time_to_first_token: Duration,
    /// From the first generated token to the last.
    pub decode: Duration,
}

/// Run `job` on `model`, giving text to `sink` as it becomes final (`Some(delta)`), or
/// `None` on a step with nothing new; `sink` returns false when the client is gone, which
/// ends the generation. Blocking and CPU-bound.
pub fn generate(
    model: &LmModel,
    job: &Job,
    sink: &mut dyn FnMut(Option<&str>) -> bool,
) -> Result<Done, ServeError> {
    let started = Instant::now();
    let mut rng = ChaCha8Rng::seed_from_u64(job.sampling.seed);
    let mut cache: Cache = model.new_cache();
    let mut logits = model.feed(&mut cache, &job.prompt)?;
    let mut first = None::<Instant>;
    let mut ids: Vec<u32> = Vec::new();
    let mut text = Text::new(&job.stop);
    let limit = job
        .max_tokens
        .min(model.config.context_length.saturating_sub(job.prompt.len()));
    let mut finish = Finish::Length;
    let mut generated = 0;
    while generated < limit {
        let token = sample(&mut logits, &job.sampling, &mut rng);
        generated += 1;
        first.get_or_insert_with(Instant::now);
        let eos = model.eos.contains(&token);
        if eos && !job.ignore_eos {
            finish = Finish::Stop;
            break;
        }
        ids.push(token);
        let (delta, stopped) = text.update(model.decode(&ids));
        if !sink(delta.as_deref()) {
            finish = Finish::Cancelled;
            break;
        }
        if stopped {
            finish = Finish::Stop;
            break;
        }
        if generated == limit {
            break;
        }
        logits = model.feed(&mut cache, &[token])?;
    }
    // What was held back is final now, unless a stop string cut the text there.
    if finish != Finish::Cancelled
        && !text.stopped
        && let Some(rest) = text.flush()
    {
        sink(Some(&rest));
    }
    let first = first.unwrap_or_else(Instant::now);
    Ok(Done {
        finish,
        prompt_tokens: job.prompt.len(),
        completion_tokens: generated,
        time_to_first_token: first.duration_since(started),
        decode: first.elapsed(),
    })
}

/// The text of a generation as it grows: what has been given out, what is held back
/// because it may be the start of a stop string or of a UTF-8 character.
#[derive(Debug)]
struct Text<'a> {
    stop: &'a [String],
    /// Longest stop string, bytes.
    hold: usize,
    full: String,
    emitted: usize,
    stopped: bool,
}

impl<'a> Text<'a> {
    fn new(stop: &'a [String]) -> Self {
        Text {
            stop,
            hold: stop.iter().map(String::len).max().unwrap_or(0),
            full: String::new(),
            emitted: 0,
            stopped: false,
        }
    }

    /// The decoded text so far: the new final part, and whether a stop string ended it.
    fn update(&mut self, text: String) -> (Option<String>, bool) {
        // An incomplete character decodes as U+FFFD until its last byte comes.
        if text.ends_with('\u{FFFD}') || !text.starts_with(&self.full[..self.emitted]) {
            return (None, false);
        }
        self.full = text;
        let from = self.emitted.saturating_sub(self.hold);
        let found = self
            .stop
            .iter()
            .filter_map(|s| self.full[from..].find(s.as_str()).map(|i| from + i))
            .min();
        if let Some(at) = found {
            self.stopped = true;
            let at = at.max(self.emitted);
            let delta = self.full[self.emitted..at].to_string();
            self.emitted = at;
            return ((!delta.is_empty()).then_some(delta), true);
        }
        let mut end = self.full.len().saturating_sub(self.hold.saturating_sub(1));
        while end > self.emitted && !self.full.is_char_boundary(end) {
            end -= 1;
        }
        if end <= self.emitted {
            return (None, false);
        }
        let delta = self.full[self.emitted..end].to_string();
        self.emitted = end;
        (Some(delta), false)
    }

    /// What is still held back, at the end.
    fn flush(&mut self) -> Option<String> {
        let rest = self.full[self.emitted..].to_string();
        self.emitted = self.full.len();
        (!rest.is_empty()).then_some(rest)
    }
}

/// Pick the next token: greedy at temperature 0, else sample from the tempered softmax
/// restricted to the nucleus of `top_p`.
pub fn sample(logits: &mut [f32], s: &Sampling, rng: &mut ChaCha8Rng) -> u32 {
    let greedy = argmax(logits).unwrap_or(0);
    if s.temperature <= 1e-5 {
        return greedy as u32;
    }
    let max = logits[greedy];
    let mut total = 0f64;
    for l in logits.iter_mut() {
        let p = if l.is_nan() {
            0.0
        } else {
            (((*l - max) / s.temperature) as f64).exp()
        };
        *l = p as f32;
        total += p;
    }
    // Tokens by probability, largest first, until the nucleus is complete. Only tokens
    // within a factor of 1e-9 of the best can matter; the rest are skipped unsorted.
    let mut order: Vec<usize> = (0..logits.len())
        .filter(|&i| logits[i] as f64 > 1e-9)
        .collect();
    order.sort_unstable_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    let mut kept = 0f64;
    let mut n = 0;
    for &i in &order {
        kept += logits[i] as f64;
        n += 1;
        if kept >= s.top_p as f64 * total {
            break;
        }
    }
    let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * kept;
    let mut acc = 0f64;
    for &i in &order[..n] {
        acc += logits[i] as f64;
        if u < acc {
            return i as u32;
        }
    }
    order.get(n.saturating_sub(1)).copied().unwrap_or(greedy) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_are_held_back_and_cut() {
        let stop = vec!["\n\nUser:".to_string()];
        let mut t = Text::new(&stop);
        let mut out = String::new();
        for s in ["Par", "Paris is", "Paris is big.\n", "Paris is big.\n\nUs"] {
            let (d, stopped) = t.update(s.to_string());
            assert!(!stopped);
            out.push_str(d.as_deref().unwrap_or(""));
            assert!(!out.contains('\n') || s.len() > 14, "held back: {out:?}");
        }
        let (d, stopped) = t.update("Paris is big.\n\nUser: more".to_string());
        out.push_str(d.as_deref().unwrap_or(""));
        assert!(stopped);
        assert_eq!(out, "Paris is big.");
    }

    #[test]
    fn incomplete_characters_wait() {
        let mut t = Text::new(&[]);
        assert_eq!(t.update("a\u{FFFD}".into()), (None, false));
        assert_eq!(t.update("aé".into()), (Some("aé".into()), false));
        assert_eq!(t.flush(), None);
    }

    #[test]
    fn sampling_is_greedy_at_zero_seeded_and_respects_the_nucleus() {
        let logits = [0.0f32, 3.0, 2.9, -5.0];
        let greedy = Sampling {
            temperature: 0.0,
            top_p: 1.0,
            seed: 1,
        };
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        assert_eq!(sample(&mut logits.clone(), &greedy, &mut rng), 1);
        // Probabilities at temperature 1: about 0.025, 0.51, 0.46 and 0.0001.
        let hot = Sampling {
            temperature: 1.0,
            top_p: 0.9,
            seed: 1,
        };
        let draws = |seed| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            (0..200)
                .map(|_| sample(&mut logits.clone(), &hot, &mut rng))
                .collect::<Vec<_>>()
        };
        let a = draws(7);
        assert_eq!(a, draws(7), "same seed, same tokens");
        // The nucleus of 0.9 is the two likely tokens.
        assert!(a.iter().all(|t| *t == 1 || *t == 2), "{a:?}");
        assert!(a.contains(&1) && a.contains(&2));
        let wide = Sampling {
            temperature: 1.0,
            top_p: 1.0,
            seed: 1,
        };
        let narrow = Sampling { top_p: 0.5, ..hot };
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        assert!((0..100).all(|_| sample(&mut logits.clone(), &narrow, &mut rng) == 1));
        let all: Vec<u32> = (0..2000)
            .map(|_| sample(&mut logits.clone(), &wide, &mut rng))
            .collect();
        assert!(all.contains(&0), "a less likely token is drawn sometimes");
    }
}
