//! KServe v2 / Open Inference Protocol REST endpoints, over the models in the
//! [`crate::serving::Registry`]. The model name is the channel; `model_version` is the
//! manifest version. Triton's binary tensor data extension is supported
//! (`Inference-Header-Content-Length`).
//!
//! * `GET /v2`, `GET /v2/health/live`, `GET /v2/health/ready`
//! * `GET /v2/models/{name}[/versions/{v}]`, `…/ready`
//! * `POST /v2/models/{name}[/versions/{v}]/infer`
//! * `POST /v2/repository/index` (Triton's model repository extension, the index only)
//!
//! Errors are `{"error": "..."}`: 404 for a model or version this node does not know, 503
//! with the reason for one it knows but does not serve (it failed to activate here, is
//! loading, or is not rolled out here: see [`crate::serving::states`]), 400 for a request
//! that does not fit the model, 413 for a body over the limit, 408 for a body that does
//! not arrive within [`INFER_BODY_TIMEOUT`], 503 when the inference pool refuses admission
//! or the model is still being prepared for the request's input shapes. A request without a version goes to the version served now, even while a newer one
//! loads or after one failed.
//!
//! Model metadata adds `states` to KServe's fields: each version the node knows of the
//! model, as in the repository index (`{"name", "version", "state", "reason"}`); a 503
//! for metadata carries it too. It lists the inputs a request gives; inputs fixed by the manifest
//! (`--const`) are under `parameters.constants`, and an output that is not what the file
//! declares (a ZipMap taken out) says so in its `parameters.note`.
//!
//! # Bounds on an inference request
//!
//! In this order, each before anything of the next is spent:
//! 1. The body limit: [`MAX_INFER_BODY`] with the binary extension, [`json_body_limit`] of
//!    the model otherwise. A `Content-Length` over it is answered 413 before the body is
//!    read; a chunked body is read up to the limit.
//! 2. Admission to the pool ([`crate::serving::pool`]): a place among
//!    `inference_threads + inference_queue`, and the body's bytes (its `Content-Length`, or
//!    the limit when chunked) from [`BODY_BUDGET`]; else 503 at once, the body unread.
//! 3. The body, read into one buffer within [`INFER_BODY_TIMEOUT`].
//! 4. Parsing (JSON tensors straight into their buffers), inference and encoding, on one
//!    of the pool's own threads; the body is dropped once parsed.

// Handlers return ready-made error responses; their size does not matter here.
#![allow(clippy::result_large_err)]

use super::{ask, declared_length, error};
use crate::handle::{ActorCmd, AppState};
use crate::serving::kserve;
use crate::serving::states::{self, ModelState, VersionState};
use crate::serving::{IoSpec, LoadedModel, Outcome, ServeError};
use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::StreamExt;
use std::sync::Arc;
use std::time::Instant;

/// Largest body of a request that uses the binary tensor data extension
/// (`Inference-Header-Content-Length`): 64 MiB.
pub const MAX_INFER_BODY: usize = 64 * 1024 * 1024;
/// Smallest JSON body limit of any model: 1 MiB.
pub const MIN_JSON_BODY: usize = 1024 * 1024;
/// JSON body bytes allowed per input element of a model whose input shapes are all fixed:
/// the longest number serde_json writes is 24 characters (`-2.2250738585072014e-308`),
/// plus `", "` and room for brackets and indentation.
pub const JSON_BYTES_PER_ELEMENT: usize = 32;
/// JSON body limit of a model with a symbolic input dimension (its element count is not
/// known until a request says it): 16 MiB, a quarter of [`MAX_INFER_BODY`]; larger tensors
/// go in binary.
pub const MAX_JSON_BODY_SYMBOLIC: usize = 16 * 1024 * 1024;
/// Bytes of request bodies the admitted inference requests may hold together: 256 MiB,
/// four bodies at [`MAX_INFER_BODY`].
pub const BODY_BUDGET: usize = 4 * MAX_INFER_BODY;
// A body at the limit can always be admitted once the others are gone.
const _: () = assert!(MAX_INFER_BODY <= BODY_BUDGET && BODY_BUDGET <= u32::MAX as usize);
/// Longest time an inference request's body may take to arrive.
pub const INFER_BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The body limit of a JSON request (no binary extension) to a model with these inputs.
///
/// With every input shape fixed: [`JSON_BYTES_PER_ELEMENT`] times the total element count,
/// at least [`MIN_JSON_BODY`] and at most [`MAX_INFER_BODY`] (the digits model, 64
/// elements: 1 MiB). With a symbolic dimension: [`MAX_JSON_BODY_SYMBOLIC`]. Parsing a JSON
/// body holds the body plus its tensors, at most 4 bytes of tensor per byte of text
/// (`0,` as FP64), so a request costs at most 5 times this limit in memory.
pub fn json_body_limit(inputs: &[IoSpec]) -> usize {
    let mut elements: usize = 0;
    for input in inputs {
        let mut n: usize = 1;
        for &d in &input.shape {
            let Ok(d) = usize::try_from(d) else {
                return MAX_JSON_BODY_SYMBOLIC;
            };
            n = n.saturating_mul(d);
        }
        elements = elements.saturating_add(n);
    }
    elements
        .saturating_mul(JSON_BYTES_PER_ELEMENT)
        .clamp(MIN_JSON_BODY, MAX_INFER_BODY)
}

/// The v2 routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v2", get(server_meta))
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/v2/models/{name}", get(model_meta))
        .route("/v2/models/{name}/ready", get(model_ready))
        .route("/v2/models/{name}/infer", post(infer))
        .route("/v2/models/{name}/versions/{version}", get(version_meta))
        .route(
            "/v2/models/{name}/versions/{version}/ready",
            get(version_ready),
        )
        .route(
            "/v2/models/{name}/versions/{version}/infer",
            post(infer_version),
        )
        .route("/v2/repository/index", post(repository_index))
}

async fn server_meta() -> Response {
    Json(serde_json::json!({
        "name": "pollen",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": ["binary_tensor_data"],
    }))
    .into_response()
}

async fn live() -> Response {
    Json(serde_json::json!({ "live": true })).into_response()
}

async fn ready() -> Response {
    Json(serde_json::json!({ "ready": true })).into_response()
}

/// The version a request names: `None` for none, 400 if it is not a number.
fn parse_version(version: Option<&str>) -> Result<Option<u64>, Response> {
    version
        .map(|v| {
            v.parse::<u64>().map_err(|_| {
                error(
                    StatusCode::BAD_REQUEST,
                    format!("version '{v}' is not a number"),
                )
            })
        })
        .transpose()
}

/// The loaded model a request names: the current version, or version `v`.
fn served(h: &AppState, name: &str, version: Option<u64>) -> Option<Arc<LoadedModel>> {
    match version {
        None => h.registry.current(name),
        Some(v) => h.registry.version(name, v),
    }
}

/// Each version the node knows of channel `name`, oldest first, from the actor.
async fn channel_states(h: &AppState, name: &str) -> Result<Vec<VersionState>, Response> {
    let all = ask(h, |reply| ActorCmd::ModelStates {
        channel: Some(name.to_string()),
        reply,
    })
    .await?;
    Ok(all
        .into_iter()
        .find(|(c, _)| c == name)
        .map(|(_, vs)| vs)
        .unwrap_or_default())
}

/// Why a model (or version) that is not loaded is not: 503 and the reason if the node
/// knows it, 404 if not.
fn not_served(name: &str, version: Option<u64>, states: &[VersionState]) -> (StatusCode, String) {
    let unavailable = StatusCode::SERVICE_UNAVAILABLE;
    match version {
        None => match states::not_ready_text(name, states) {
            Some(text) => (unavailable, text),
            None => (
                StatusCode::NOT_FOUND,
                format!("unknown model '{name}' (not served on this node)"),
            ),
        },
        Some(v) => match states.iter().find(|s| s.version == v) {
            Some(s) if s.state != ModelState::Ready => {
                (unavailable, states::version_not_ready_text(name, s))
            }
            Some(_) => (
                unavailable,
                format!("model '{name}' version {v} was swapped out during this request; retry"),
            ),
            None => (
                StatusCode::NOT_FOUND,
                format!(
                    "model '{name}' version {v} is not known on this node (its versions here: {:?})",
                    states.iter().map(|s| s.version).collect::<Vec<_>>()
                ),
            ),
        },
    }
}

/// The loaded model a request names, or the error that says why it is not served.
async fn lookup(
    h: &AppState,
    name: &str,
    version: Option<&str>,
) -> Result<Arc<LoadedModel>, Response> {
    let version = parse_version(version)?;
    find(h, name, version)
        .await
        .map_err(|(status, msg)| error(status, msg))
}

/// The model `name` at `version` (or the version served now), else the status and reason
/// a client is given: 404 for a model this node does not know, 503 with the reason for
/// one it does not serve.
pub(crate) async fn find(
    h: &AppState,
    name: &str,
    version: Option<u64>,
) -> Result<Arc<LoadedModel>, (StatusCode, String)> {
    if let Some(m) = served(h, name, version) {
        return Ok(m);
    }
    let states = channel_states(h, name).await.map_err(|_| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "node is shutting down".to_string(),
        )
    })?;
    // It may have been swapped in while the actor was asked.
    if let Some(m) = served(h, name, version) {
        return Ok(m);
    }
    Err(not_served(name, version, &states))
}

fn io_json(s: &IoSpec, note: Option<&String>) -> serde_json::Value {
    let mut v = serde_json::json!({ "name": s.name, "datatype": kserve::kserve_name(s.datatype), "shape": s.shape });
    if let Some(note) = note {
        v["parameters"] = serde_json::json!({ "note": note });
    }
    v
}

/// The constant inputs of a model (`--const`), as KServe JSON tensors.
fn constants_json(m: &LoadedModel) -> Vec<serde_json::Value> {
    m.constants
        .iter()
        .map(|c| {
            let t = kserve::Tensor {
                name: c.name.clone(),
                datatype: c.dtype,
                shape: c.shape.iter().map(|d| *d as usize).collect(),
                data: c.data.clone(),
            };
            serde_json::json!({
                "name": c.name,
                "datatype": kserve::kserve_name(c.dtype),
                "shape": c.shape,
                "data": kserve::tensor_to_json_data(&t),
            })
        })
        .collect()
}

fn states_json(name: &str, states: &[VersionState]) -> serde_json::Value {
    serde_json::Value::Array(
        states
            .iter()
            .map(|s| kserve::index_entry(name, s))
            .collect(),
    )
}

/// Model metadata: KServe's fields for the version served (or named), plus `states`.
async fn metadata(h: AppState, name: String, version: Option<&str>) -> Response {
    let version = match parse_version(version) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let states = match channel_states(&h, &name).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let Some(m) = served(&h, &name, version) else {
        let (status, msg) = not_served(&name, version, &states);
        if status == StatusCode::NOT_FOUND {
            return error(status, msg);
        }
        let body = serde_json::json!({
            "error": msg,
            "name": name,
            "states": states_json(&name, &states),
        });
        return (status, Json(body)).into_response();
    };
    let mut v = serde_json::json!({
        "name": m.channel,
        "versions": h.registry.versions(&m.channel).iter().map(|v| v.to_string()).collect::<Vec<_>>(),
        "platform": "onnx_onnxv1",
        "inputs": m.inputs.iter().map(|s| io_json(s, None)).collect::<Vec<_>>(),
        "outputs": m.outputs.iter().map(|s| io_json(s, m.notes.get(&s.name))).collect::<Vec<_>>(),
        "states": states_json(&m.channel, &states),
    });
    if !m.constants.is_empty() {
        v["parameters"] = serde_json::json!({ "constants": constants_json(&m) });
    }
    Json(v).into_response()
}

async fn model_meta(State(h): State<AppState>, Path(name): Path<String>) -> Response {
    metadata(h, name, None).await
}

async fn version_meta(
    State(h): State<AppState>,
    Path((name, version)): Path<(String, String)>,
) -> Response {
    metadata(h, name, Some(&version)).await
}

async fn model_ready(State(h): State<AppState>, Path(name): Path<String>) -> Response {
    match lookup(&h, &name, None).await {
        Ok(m) => Json(
            serde_json::json!({ "name": name, "ready": true, "version": m.version.to_string() }),
        )
        .into_response(),
        Err(r) => r,
    }
}

async fn version_ready(
    State(h): State<AppState>,
    Path((name, version)): Path<(String, String)>,
) -> Response {
    match lookup(&h, &name, Some(&version)).await {
        Ok(_) => Json(serde_json::json!({ "name": name, "ready": true, "version": version }))
            .into_response(),
        Err(r) => r,
    }
}

/// `POST /v2/repository/index`: every version of every model this node knows, with its
/// state and reason (see [`kserve::index_json`]).
async fn repository_index(State(h): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    let limit = kserve::MAX_INDEX_BODY;
    let declared = declared_length(&headers);
    if declared.is_some_and(|n| n > limit as u64) {
        return too_large(limit, true, declared);
    }
    let bytes = match read_body_in_time(body, limit, declared, true).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let ready_only = match kserve::parse_index_request(&bytes) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    match ask(&h, |reply| ActorCmd::ModelStates {
        channel: None,
        reply,
    })
    .await
    {
        Ok(all) => Json(kserve::index_json(&all, ready_only)).into_response(),
        Err(r) => r,
    }
}

async fn infer(
    State(h): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    run_infer(h, name, None, headers, body).await
}

async fn infer_version(
    State(h): State<AppState>,
    Path((name, version)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    run_infer(h, name, Some(version), headers, body).await
}

async fn run_infer(
    h: AppState,
    name: String,
    version: Option<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let model = match lookup(&h, &name, version.as_deref()).await {
        Ok(m) => m,
        Err(r) => return r,
    };
    let header_len = match headers.get(kserve::HEADER_CONTENT_LENGTH) {
        None => None,
        Some(v) => match v.to_str().ok().map(kserve::parse_header_len) {
            Some(Ok(n)) => Some(n),
            _ => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "{} must be a number of bytes",
                        kserve::HEADER_CONTENT_LENGTH
                    ),
                );
            }
        },
    };
    let binary = header_len.is_some();
    let limit = if binary {
        MAX_INFER_BODY
    } else {
        json_body_limit(&model.inputs)
    };
    let declared = declared_length(&headers);
    if let Some(n) = declared
        && n > limit as u64
    {
        return too_large(limit, binary, Some(n));
    }
    // Admitted before a byte of the body is read: past the pool's bound, 503 at once.
    let admission = match h.inference.admit(declared.map_or(limit, |n| n as usize)) {
        Ok(a) => a,
        Err(busy) => {
            h.metrics
                .inference(&model.channel, model.version, 0.0, true);
            return error(StatusCode::SERVICE_UNAVAILABLE, busy.to_string());
        }
    };
    // A body that does not arrive in time gives its place and memory back.
    let bytes = match read_body_in_time(body, limit, declared, binary).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let started = Instant::now();
    let model2 = model.clone();
    // Parsing, inference and encoding all run on the pool's threads, off the async ones.
    let result = admission
        .run(move || -> Result<kserve::EncodedResponse, Response> {
            let req = kserve::parse_request(&bytes, header_len).map_err(|e| {
                error(
                    StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_REQUEST),
                    e.to_string(),
                )
            })?;
            // The tensors hold what the model needs; the body's memory goes back now.
            drop(bytes);
            let run_started = Instant::now();
            let ran = model2.infer(&req.inputs);
            // A failure is the model's only if it now fails its own golden checks;
            // otherwise this input made it fail, and that is the client's error.
            let model_at_fault = match &ran {
                Err(ServeError::Runtime(_) | ServeError::Panicked) => model2.at_fault(),
                _ => false,
            };
            let outcome = match &ran {
                Ok(_) => Outcome::Ok,
                // Not the model's fault, nor an answer: counted like a bad input.
                Err(ServeError::BadInput(_) | ServeError::Preparing(_)) => Outcome::BadInput,
                Err(_) if !model_at_fault => Outcome::BadInput,
                Err(ServeError::Panicked) => Outcome::Panic,
                Err(_) => Outcome::Error,
            };
            model2.health.record(run_started.elapsed(), outcome);
            let outputs = ran.map_err(|e| match e {
                ServeError::BadInput(m) => error(StatusCode::BAD_REQUEST, m),
                ServeError::Preparing(m) => error(StatusCode::SERVICE_UNAVAILABLE, m),
                other if !model_at_fault => error(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "{other}; the model still passes its checks, so this input is \
                         outside what it can take"
                    ),
                ),
                other => error(StatusCode::INTERNAL_SERVER_ERROR, other.to_string()),
            })?;
            kserve::encode_response(
                &model2.channel,
                &model2.version.to_string(),
                req.id.as_deref(),
                &outputs,
                &req,
            )
            .map_err(|e| {
                error(
                    StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_REQUEST),
                    e.to_string(),
                )
            })
        })
        .await;
    let elapsed = started.elapsed().as_secs_f64();
    match result {
        Err(failed) => {
            h.metrics
                .inference(&model.channel, model.version, elapsed, true);
            error(StatusCode::INTERNAL_SERVER_ERROR, failed.to_string())
        }
        Ok(Err(resp)) => {
            h.metrics
                .inference(&model.channel, model.version, elapsed, true);
            resp
        }
        Ok(Ok(enc)) => {
            h.metrics
                .inference(&model.channel, model.version, elapsed, false);
            let content_type = enc.content_type();
            let mut resp = enc.body.into_response();
            let hs = resp.headers_mut();
            hs.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
            if let Some(n) = enc.header_len
                && let Ok(v) = HeaderValue::from_str(&n.to_string())
            {
                hs.insert(kserve::HEADER_CONTENT_LENGTH, v);
            }
            resp
        }
    }
}

/// 413 for a body over `limit` (`declared` is its `Content-Length`, if it said one).
fn too_large(limit: usize, binary: bool, declared: Option<u64>) -> Response {
    let size = declared.map_or_else(String::new, |n| format!(" of {n} bytes"));
    let msg = if binary {
        format!("request body{size} over the limit of {limit} bytes")
    } else {
        format!(
            "JSON request body{size} over the limit of {limit} bytes for this model's \
             inputs; larger tensors can be sent with the binary tensor data extension \
             (Inference-Header-Content-Length), up to {MAX_INFER_BODY} bytes"
        )
    };
    error(StatusCode::PAYLOAD_TOO_LARGE, msg)
}

/// Why a request body could not be read.
#[derive(Debug)]
pub(crate) enum BodyError {
    /// Over the limit.
    TooLarge,
    /// The connection failed or the client broke off.
    Broken(axum::Error),
}

/// Read a body of at most `limit` bytes into one buffer, sized once from `declared` (its
/// `Content-Length`, which hyper holds the body to) when known.
/// Read a body of at most `limit` bytes within [`INFER_BODY_TIMEOUT`], or the answer that
/// says why not (413, 400, 408).
async fn read_body_in_time(
    body: Body,
    limit: usize,
    declared: Option<u64>,
    binary: bool,
) -> Result<Vec<u8>, Response> {
    match tokio::time::timeout(INFER_BODY_TIMEOUT, read_body(body, limit, declared)).await {
        Ok(Ok(b)) => Ok(b),
        Ok(Err(BodyError::TooLarge)) => Err(too_large(limit, binary, None)),
        Ok(Err(BodyError::Broken(e))) => Err(error(
            StatusCode::BAD_REQUEST,
            format!("request body could not be read: {e}"),
        )),
        Err(_) => Err(error(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "request body not received within {} s",
                INFER_BODY_TIMEOUT.as_secs()
            ),
        )),
    }
}

/// Read a body of at most `limit` bytes.
pub(crate) async fn read_body(
    body: Body,
    limit: usize,
    declared: Option<u64>,
) -> Result<Vec<u8>, BodyError> {
    let expected = declared.map_or(0, |n| usize::try_from(n).unwrap_or(limit).min(limit));
    let mut buf = Vec::with_capacity(expected);
    let mut frames = body.into_data_stream();
    while let Some(frame) = frames.next().await {
        let bytes = frame.map_err(BodyError::Broken)?;
        if bytes.len() > limit - buf.len() {
            return Err(BodyError::TooLarge);
        }
        buf.extend_from_slice(&bytes);
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pollen_protocol::manifest::DType;

    fn spec(shape: &[i64]) -> IoSpec {
        IoSpec {
            name: "x".into(),
            datatype: DType::F32,
            shape: shape.to_vec(),
        }
    }

    #[test]
    fn json_limits_follow_the_model_inputs() {
        const MIB: usize = 1 << 20;
        assert_eq!(json_body_limit(&[]), MIB);
        // The digits model.
        assert_eq!(json_body_limit(&[spec(&[1, 64])]), MIB);
        // An image model: 150,528 elements, 32 bytes each.
        assert_eq!(json_body_limit(&[spec(&[1, 3, 224, 224])]), 150_528 * 32);
        assert_eq!(
            json_body_limit(&[spec(&[1, 3, 224, 224]), spec(&[1, 3, 224, 224])]),
            2 * 150_528 * 32
        );
        // Never past the binary limit, even when the product overflows.
        assert_eq!(
            json_body_limit(&[spec(&[100_000, 100_000])]),
            MAX_INFER_BODY
        );
        assert_eq!(
            json_body_limit(&[spec(&[i64::MAX, i64::MAX])]),
            MAX_INFER_BODY
        );
        // A symbolic dimension anywhere.
        assert_eq!(
            json_body_limit(&[spec(&[1, 64]), spec(&[-1, 64])]),
            MAX_JSON_BODY_SYMBOLIC
        );
    }

    #[tokio::test]
    async fn a_chunked_body_is_read_up_to_the_limit() {
        let chunks = |n: usize| {
            let parts = (0..n).map(|_| Ok::<_, std::io::Error>(vec![b'0'; 400]));
            Body::from_stream(futures::stream::iter(parts))
        };
        let b = read_body(chunks(3), 1200, None)
            .await
            .expect("at the limit");
        assert_eq!(b.len(), 1200);
        assert!(matches!(
            read_body(chunks(4), 1200, None).await,
            Err(BodyError::TooLarge)
        ));
        // With a Content-Length the buffer is allocated once.
        let b = read_body(chunks(2), 1200, Some(800))
            .await
            .expect("declared");
        assert_eq!((b.len(), b.capacity()), (800, 800));
        let broken = Body::from_stream(futures::stream::iter(vec![
            Ok(vec![1u8]),
            Err(std::io::Error::other("reset")),
        ]));
        assert!(matches!(
            read_body(broken, 1200, None).await,
            Err(BodyError::Broken(_))
        ));
    }
}
