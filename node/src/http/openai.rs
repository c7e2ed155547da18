//! The OpenAI-compatible API for language models, beside the node's own `/v1/…` control
//! routes (no path means two things: these are the only `/v1` routes that run models):
//!
//! * `GET /v1/models`: the language models this node serves now.
//! * `POST /v1/chat/completions`: `messages` rendered with the model's chat template.
//! * `POST /v1/completions`: a raw `prompt`.
//!
//! Both take `model` (the channel), `max_tokens` (or `max_completion_tokens`),
//! `temperature` (0 to 2), `top_p`, `seed`, `stop` (a string or up to 4) and `stream`
//! (server-sent events, ending with `data: [DONE]`; `stream_options.include_usage` adds a
//! last chunk with the usage); `/v1/completions` also takes the prompt as token ids, and
//! both take vLLM's `ignore_eos` (generate `max_tokens` whatever comes). Answers carry `usage` counts. Errors are OpenAI's shape,
//! `{"error": {"message", "type", "param", "code"}}`: 400 for a bad request (a prompt
//! past the context, bad parameters), 404 for an unknown model, 429 when every
//! generation place and queue place is taken, 503 (with the reason) for a model known but
//! not served here.
//!
//! # Bounds
//!
//! At most `max_generations` generations run at once, and `generation_queue` more wait
//! for a place; past that a request is answered 429 at once. A generation holds the
//! version it started on (a hot swap does not cut it short), and ends at the next token
//! once its client is gone: the non-streaming handler is dropped, or the streamed body is.

// Handlers return ready-made error responses; their size does not matter here.
#![allow(clippy::result_large_err)]

use crate::handle::AppState;
use crate::serving::lm;
use crate::serving::lm::chat::Message;
use crate::serving::lm::config::GenerationConfig;
use crate::serving::lm::generate::{self, Done, Finish, Job, Sampling};
use crate::serving::{LoadedModel, Outcome, ServeError};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

/// Largest request body: a prompt at the longest contexts fits many times over.
pub const MAX_BODY: usize = 4 << 20;
/// Longest time a request body may take to arrive.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// Most stop strings, and longest one (bytes), as OpenAI allows.
const MAX_STOP: usize = 4;
const MAX_STOP_LEN: usize = 256;
/// Text pieces a generation may have ahead of a slow client.
const STREAM_BUFFER: usize = 64;

/// The paths of this API: inference, open to local applications without the token.
pub fn is_inference_path(path: &str) -> bool {
    matches!(
        path,
        "/v1/models" | "/v1/chat/completions" | "/v1/completions"
    )
}

/// The OpenAI routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
}

/// Generation places: `running` at once, and `queue` more waiting; and the threads a
/// generation's matrix products share.
#[derive(Debug)]
pub struct Generations {
    admitted: Arc<Semaphore>,
    running: Arc<Semaphore>,
    executor: lm::Executor,
}

impl Generations {
    /// `running` generations at once (at least 1), `queue` waiting behind them, each
    /// generation's matrix products on `threads` threads (1: on its own thread only).
    pub fn new(running: usize, queue: usize, threads: usize) -> Self {
        let running = running.max(1);
        Generations {
            admitted: Arc::new(Semaphore::new(running + queue)),
            running: Arc::new(Semaphore::new(running)),
            executor: lm::executor(threads),
        }
    }
}

/// An error in OpenAI's shape.
fn oai_error(
    status: StatusCode,
    kind: &str,
    param: Option<&str>,
    code: Option<&str>,
    msg: impl Into<String>,
) -> Response {
    (
        status,
        axum::Json(json!({
            "error": { "message": msg.into(), "type": kind, "param": param, "code": code }
        })),
    )
        .into_response()
}

fn bad_request(param: Option<&str>, msg: impl Into<String>) -> Response {
    oai_error(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        param,
        None,
        msg,
    )
}

/// A `stop` given as one string or several.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

/// A `prompt`: one string, a list of one, or token ids (as OpenAI's API takes them).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Prompt {
    One(String),
    Many(Vec<String>),
    Tokens(Vec<u32>),
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// A chat message as clients send it: `content` a string or a list of text parts.
#[derive(Debug, Deserialize)]
struct InMessage {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

/// The fields both endpoints read; others are ignored, as OpenAI's clients send many.
#[derive(Debug, Deserialize)]
struct Params {
    model: String,
    #[serde(default)]
    messages: Option<Vec<InMessage>>,
    #[serde(default)]
    prompt: Option<Prompt>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    seed: Option<i64>,
    #[serde(default)]
    stop: Option<Stop>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    n: Option<u32>,
    /// vLLM's extension: generate `max_tokens` whatever end-of-sequence tokens come
    /// (benchmarks measure a fixed amount of work this way).
    #[serde(default)]
    ignore_eos: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Chat,
    Completion,
}

async fn models(State(h): State<AppState>) -> Response {
    let data: Vec<Value> = h
        .registry
        .channels()
        .into_iter()
        .filter_map(|c| h.registry.current(&c))
        .filter(|m| m.lm().is_some())
        .map(|m| {
            json!({
                "id": m.channel,
                "object": "model",
                "created": 0,
                "owned_by": "pollen",
                "version": m.version,
                "context_length": m.lm().map(|l| l.config.context_length),
            })
        })
        .collect();
    axum::Json(json!({ "object": "list", "data": data })).into_response()
}

async fn chat(State(h): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    complete(h, headers, body, Kind::Chat).await
}

async fn completions(State(h): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    complete(h, headers, body, Kind::Completion).await
}

/// A request's prompt: text to tokenise, or token ids.
enum PromptIn {
    Text(String),
    Tokens(Vec<u32>),
}

/// The prompt of a request: `render` is the model's chat template
/// ([`lm::LmModel::render_chat`]), `vocab` its vocabulary size.
fn prompt_of(
    render: impl FnOnce(&[Message]) -> Result<String, String>,
    vocab: usize,
    p: &mut Params,
    kind: Kind,
) -> Result<PromptIn, Response> {
    match kind {
        Kind::Chat => {
            let Some(messages) = p.messages.take() else {
                return Err(bad_request(Some("messages"), "`messages` is required"));
            };
            if messages.is_empty() {
                return Err(bad_request(Some("messages"), "`messages` is empty"));
            }
            let messages: Vec<Message> = messages
                .into_iter()
                .map(|m| {
                    let content = match m.content {
                        None => String::new(),
                        Some(Content::Text(t)) => t,
                        Some(Content::Parts(parts)) => {
                            let mut text = String::new();
                            for part in parts {
                                match (part.kind.as_str(), part.text) {
                                    ("text", Some(t)) => text.push_str(&t),
                                    (kind, _) => {
                                        return Err(bad_request(
                                            Some("messages"),
                                            format!("content parts of type {kind:?} are not supported: text only"),
                                        ));
                                    }
                                }
                            }
                            text
                        }
                    };
                    Ok(Message {
                        role: m.role,
                        content,
                    })
                })
                .collect::<Result<_, _>>()?;
            render(&messages)
                .map(PromptIn::Text)
                .map_err(|e| bad_request(Some("messages"), e))
        }
        Kind::Completion => match p.prompt.take() {
            Some(Prompt::One(s)) => Ok(PromptIn::Text(s)),
            Some(Prompt::Many(mut v)) if v.len() == 1 => Ok(PromptIn::Text(v.remove(0))),
            Some(Prompt::Tokens(ids)) if ids.is_empty() => {
                Err(bad_request(Some("prompt"), "the prompt has no tokens"))
            }
            Some(Prompt::Tokens(ids)) => match ids.iter().find(|t| **t as usize >= vocab) {
                Some(t) => Err(bad_request(
                    Some("prompt"),
                    format!("token {t} is not in the vocabulary of {vocab} tokens"),
                )),
                None => Ok(PromptIn::Tokens(ids)),
            },
            Some(Prompt::Many(_)) => Err(bad_request(
                Some("prompt"),
                "one prompt per request (a list of one is accepted)",
            )),
            None => Err(bad_request(Some("prompt"), "`prompt` is required")),
        },
    }
}

/// The generation a request asks for, checked against the model's generation config.
fn job_of(config: &GenerationConfig, p: &Params, prompt: Vec<u32>) -> Result<Job, Response> {
    let context = config.context_length;
    if p.n.is_some_and(|n| n != 1) {
        return Err(bad_request(Some("n"), "only n = 1 is supported"));
    }
    if prompt.len() >= context {
        return Err(oai_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            Some("messages"),
            Some("context_length_exceeded"),
            format!(
                "This model's maximum context length is {context} tokens; the prompt has {} \
                 tokens, leaving no room to generate.",
                prompt.len()
            ),
        ));
    }
    let room = context - prompt.len();
    let max_tokens = match p.max_completion_tokens.or(p.max_tokens) {
        Some(0) => {
            return Err(bad_request(
                Some("max_tokens"),
                "max_tokens must be at least 1",
            ));
        }
        Some(n) if n as usize > room => {
            return Err(oai_error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some("max_tokens"),
                Some("context_length_exceeded"),
                format!(
                    "This model's maximum context length is {context} tokens; you requested \
                     {} tokens ({} in the prompt, {n} to generate).",
                    (prompt.len() as u64).saturating_add(n),
                    prompt.len()
                ),
            ));
        }
        Some(n) => n as usize,
        None => config.defaults.max_tokens.min(room),
    };
    let temperature = p.temperature.unwrap_or(config.defaults.temperature);
    if !(temperature.is_finite() && (0.0..=2.0).contains(&temperature)) {
        return Err(bad_request(
            Some("temperature"),
            "temperature is from 0 to 2",
        ));
    }
    let top_p = p.top_p.unwrap_or(config.defaults.top_p);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(bad_request(Some("top_p"), "top_p is above 0 and at most 1"));
    }
    let stop = match &p.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) => v.clone(),
    };
    if stop.len() > MAX_STOP || stop.iter().any(|s| s.is_empty() || s.len() > MAX_STOP_LEN) {
        return Err(bad_request(
            Some("stop"),
            format!("up to {MAX_STOP} stop strings of 1 to {MAX_STOP_LEN} bytes"),
        ));
    }
    let seed = match p.seed {
        Some(s) => s as u64,
        None => {
            let mut b = [0u8; 8];
            let _ = getrandom::fill(&mut b);
            u64::from_le_bytes(b)
        }
    };
    Ok(Job {
        prompt,
        max_tokens,
        ignore_eos: p.ignore_eos,
        sampling: Sampling {
            temperature,
            top_p,
            seed,
        },
        stop,
    })
}

/// What the generation thread sends the handler.
enum Piece {
    Text(String),
    End(Result<Done, ServeError>),
}

async fn complete(h: AppState, headers: HeaderMap, body: Body, kind: Kind) -> Response {
    let too_large = || {
        oai_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            None,
            None,
            format!("request body over {MAX_BODY} bytes"),
        )
    };
    let declared = super::declared_length(&headers);
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return too_large();
    }
    let bytes =
        match tokio::time::timeout(BODY_TIMEOUT, super::v2::read_body(body, MAX_BODY, declared))
            .await
        {
            Ok(Ok(b)) => b,
            Ok(Err(super::v2::BodyError::TooLarge)) => return too_large(),
            Ok(Err(e)) => {
                return bad_request(None, format!("request body could not be read: {e:?}"));
            }
            Err(_) => {
                return oai_error(
                    StatusCode::REQUEST_TIMEOUT,
                    "invalid_request_error",
                    None,
                    None,
                    "request body not received in time",
                );
            }
        };
    let mut p: Params = match serde_json::from_slice(&bytes) {
        Ok(p) => p,
        Err(e) => return bad_request(None, format!("invalid request body: {e}")),
    };
    drop(bytes);
    let model = match super::v2::find(&h, &p.model, None).await {
        Ok(m) => m,
        Err((StatusCode::NOT_FOUND, _)) => {
            return oai_error(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                Some("model"),
                Some("model_not_found"),
                format!("The model `{}` does not exist on this node", p.model),
            );
        }
        Err((status, msg)) => {
            return oai_error(status, "model_unavailable", Some("model"), None, msg);
        }
    };
    let Some(lm) = model.lm() else {
        return bad_request(
            Some("model"),
            format!(
                "`{}` is not a language model: run it with KServe v2 (/v2/models/{}/infer)",
                p.model, p.model
            ),
        );
    };
    let ids = match prompt_of(|m| lm.render_chat(m), lm.vocab, &mut p, kind) {
        Ok(PromptIn::Tokens(ids)) => ids,
        Ok(PromptIn::Text(text)) => match lm.encode(&text) {
            Ok(ids) => ids,
            Err(e) => return bad_request(Some("prompt"), e),
        },
        Err(r) => return r,
    };
    let job = match job_of(&lm.config, &p, ids) {
        Ok(j) => j,
        Err(r) => {
            model.health.record(Duration::ZERO, Outcome::BadInput);
            return r;
        }
    };
    let Ok(admitted) = h.generations.admitted.clone().try_acquire_owned() else {
        return oai_error(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_exceeded",
            None,
            Some("rate_limit_exceeded"),
            "every generation place and queue place of this node is taken: retry later",
        );
    };
    // Waiting here ends when the client goes away (the handler is dropped).
    let Ok(running) = h.generations.running.clone().acquire_owned().await else {
        return oai_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            None,
            None,
            "node is shutting down",
        );
    };
    let (tx, rx) = mpsc::channel::<Piece>(STREAM_BUFFER);
    spawn_generation(h.clone(), model.clone(), job, tx, (admitted, running));
    let stream = p.stream.unwrap_or(false);
    let usage = p.stream_options.as_ref().is_some_and(|o| o.include_usage);
    let meta = Meta {
        id: format!(
            "{}-{}",
            if kind == Kind::Chat {
                "chatcmpl"
            } else {
                "cmpl"
            },
            random_id()
        ),
        created: now_secs(),
        model: model.channel.clone(),
        fingerprint: format!("pollen-v{}-{}", model.version, model.manifest.short()),
        kind,
    };
    if stream {
        streamed(meta, rx, usage)
    } else {
        whole(meta, rx).await
    }
}

/// Run the generation on a blocking thread, holding its places and the model version.
fn spawn_generation(
    h: AppState,
    model: Arc<LoadedModel>,
    job: Job,
    tx: mpsc::Sender<Piece>,
    permits: (OwnedSemaphorePermit, OwnedSemaphorePermit),
) {
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let Some(lm) = model.lm() else { return };
        let result = lm::with_executor(h.generations.executor.clone(), || {
            generate::generate(lm, &job, &mut |delta| match delta {
                Some(d) => tx.blocking_send(Piece::Text(d.to_string())).is_ok(),
                None => !tx.is_closed(),
            })
        });
        let (outcome, ttft) = match &result {
            Ok(d) => (Outcome::Ok, d.time_to_first_token),
            Err(ServeError::BadInput(_)) => (Outcome::BadInput, started.elapsed()),
            Err(ServeError::Panicked) => (Outcome::Panic, started.elapsed()),
            Err(_) => (Outcome::Error, started.elapsed()),
        };
        // A generation's health latency is its time to first token.
        model.health.record(ttft, outcome);
        if let Ok(d) = &result {
            model
                .health
                .record_generation(d.completion_tokens.saturating_sub(1) as u64, d.decode);
        }
        h.metrics
            .generation(&model.channel, model.version, result.as_ref().ok(), outcome);
        // The places are free before the client can see the end: a client that sends its
        // next request on the answer must not find its own generation still holding one.
        drop(permits);
        let _ = tx.blocking_send(Piece::End(result));
    });
}

/// What every answer of one request repeats.
struct Meta {
    id: String,
    created: u64,
    model: String,
    fingerprint: String,
    kind: Kind,
}

fn usage_json(d: &Done) -> Value {
    json!({
        "prompt_tokens": d.prompt_tokens,
        "completion_tokens": d.completion_tokens,
        "total_tokens": d.prompt_tokens + d.completion_tokens,
    })
}

fn failure(e: &ServeError) -> Response {
    match e {
        ServeError::BadInput(m) => bad_request(None, m.clone()),
        e => oai_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            None,
            None,
            e.to_string(),
        ),
    }
}

async fn whole(meta: Meta, mut rx: mpsc::Receiver<Piece>) -> Response {
    let mut text = String::new();
    let done = loop {
        match rx.recv().await {
            Some(Piece::Text(t)) => text.push_str(&t),
            Some(Piece::End(Ok(d))) => break d,
            Some(Piece::End(Err(e))) => return failure(&e),
            None => {
                return oai_error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "server_error",
                    None,
                    None,
                    "the generation ended without an answer",
                );
            }
        }
    };
    let choice = match meta.kind {
        Kind::Chat => json!({
            "index": 0,
            "message": { "role": "assistant", "content": text },
            "logprobs": null,
            "finish_reason": done.finish.reason(),
        }),
        Kind::Completion => json!({
            "index": 0,
            "text": text,
            "logprobs": null,
            "finish_reason": done.finish.reason(),
        }),
    };
    axum::Json(json!({
        "id": meta.id,
        "object": if meta.kind == Kind::Chat { "chat.completion" } else { "text_completion" },
        "created": meta.created,
        "model": meta.model,
        "system_fingerprint": meta.fingerprint,
        "choices": [choice],
        "usage": usage_json(&done),
    }))
    .into_response()
}

impl Meta {
    /// One server-sent event of a chunk with `choices` (and `usage`).
    fn chunk(&self, choices: Value, usage: Option<Value>) -> Bytes {
        let mut v = json!({
            "id": self.id,
            "object": if self.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" },
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
            "choices": choices,
        });
        if let Some(u) = usage {
            v["usage"] = u;
        }
        Bytes::from(format!("data: {v}\n\n"))
    }

    fn delta(&self, text: Option<&str>, first: bool, finish: Option<Finish>) -> Bytes {
        let finish = finish.map(Finish::reason);
        let choice = match self.kind {
            Kind::Chat => {
                let mut delta = json!({});
                if first {
                    delta["role"] = json!("assistant");
                }
                if let Some(t) = text {
                    delta["content"] = json!(t);
                }
                json!({ "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish })
            }
            Kind::Completion => json!({
                "index": 0,
                "text": text.unwrap_or(""),
                "logprobs": null,
                "finish_reason": finish,
            }),
        };
        self.chunk(json!([choice]), None)
    }
}

/// The answer as server-sent events: a chunk per piece of text, a last chunk with the
/// finish reason, the usage if asked, then `[DONE]`. An error after the stream started is
/// an `error` event (the status is already sent). Dropping the body (the client went
/// away) drops `rx`, which ends the generation.
fn streamed(meta: Meta, rx: mpsc::Receiver<Piece>, include_usage: bool) -> Response {
    let first = meta.delta(
        if meta.kind == Kind::Chat {
            Some("")
        } else {
            None
        },
        true,
        None,
    );
    let state = (meta, rx, false);
    let events = futures::stream::once(async move { Ok::<Bytes, std::convert::Infallible>(first) })
        .chain(futures::stream::unfold(state, move |(meta, mut rx, ended)| async move {
            if ended {
                return None;
            }
            let out = match rx.recv().await {
                Some(Piece::Text(t)) => meta.delta(Some(&t), false, None),
                Some(Piece::End(Ok(d))) => {
                    let mut b = meta.delta(None, false, Some(d.finish)).to_vec();
                    if include_usage {
                        b.extend_from_slice(&meta.chunk(json!([]), Some(usage_json(&d))));
                    }
                    b.extend_from_slice(b"data: [DONE]\n\n");
                    return Some((Ok(Bytes::from(b)), (meta, rx, true)));
                }
                Some(Piece::End(Err(e))) => {
                    let v = json!({ "error": { "message": e.to_string(), "type": "server_error", "param": null, "code": null } });
                    return Some((
                        Ok(Bytes::from(format!("data: {v}\n\ndata: [DONE]\n\n"))),
                        (meta, rx, true),
                    ));
                }
                None => return None,
            };
            Some((Ok(out), (meta, rx, false)))
        }));
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(events))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

fn random_id() -> String {
    let mut b = [0u8; 12];
    let _ = getrandom::fill(&mut b);
    hex::encode(b)
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The request decoding and checks of both endpoints without a loaded model, for the fuzz
/// targets in `fuzz/` (not an API: it may change with the handlers).
#[doc(hidden)]
pub mod fuzzing {
    use super::*;
    use crate::serving::lm::chat::ChatTemplate;

    /// Decode `body` as `POST /v1/chat/completions` (`chat`) or `/v1/completions` and
    /// check it as the handler does, for a model with `config`, chat `template` and `vocab`
    /// tokens; text prompts stand for one token per byte (no tokenizer here). Returns the
    /// job with the `stream` and `stream_options.include_usage` flags, or the status of the
    /// error response.
    pub fn decode(
        body: &[u8],
        chat: bool,
        config: &GenerationConfig,
        template: Option<&ChatTemplate>,
        vocab: usize,
    ) -> Result<(Job, bool, bool), StatusCode> {
        let kind = if chat { Kind::Chat } else { Kind::Completion };
        let mut p: Params = serde_json::from_slice(body).map_err(|_| StatusCode::BAD_REQUEST)?;
        let render = |m: &[Message]| match template {
            Some(t) => t.render(
                m,
                config.bos_token.as_deref().unwrap_or(""),
                config.eos_tokens.first().map_or("", String::as_str),
            ),
            None => Err("no chat template".to_string()),
        };
        let ids = match prompt_of(render, vocab, &mut p, kind).map_err(|r| r.status())? {
            PromptIn::Tokens(ids) => ids,
            PromptIn::Text(t) => t.bytes().map(u32::from).collect(),
        };
        let job = job_of(config, &p, ids).map_err(|r| r.status())?;
        let usage = p.stream_options.as_ref().is_some_and(|o| o.include_usage);
        Ok((job, p.stream.unwrap_or(false), usage))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `max_tokens` past the context is a 400 whatever its size: at `u64::MAX` the
    /// message's total overflowed (a panic with overflow checks on).
    #[test]
    fn max_tokens_past_the_context_is_refused() {
        let config = GenerationConfig::parse(
            br#"{"format": 1, "context_length": 16, "eos_tokens": ["</s>"]}"#,
        )
        .expect("config");
        for n in [15, 17, u64::MAX] {
            let body = format!(r#"{{"model": "m", "prompt": [1, 2], "max_tokens": {n}}}"#);
            let got = fuzzing::decode(body.as_bytes(), false, &config, None, 100);
            assert_eq!(got.unwrap_err(), StatusCode::BAD_REQUEST, "max_tokens {n}");
        }
        let body = br#"{"model": "m", "prompt": [1, 2], "max_tokens": 14}"#;
        let (job, stream, _) = fuzzing::decode(body, false, &config, None, 100).expect("fits");
        assert_eq!(
            (job.prompt, job.max_tokens, stream),
            (vec![1, 2], 14, false)
        );
    }
}
