//! KServe v2 / Open Inference Protocol REST endpoints, over the models in the
//! [`crate::serving::Registry`]. The model name is the channel; `model_version` is the
//! manifest version. Triton's binary tensor data extension is supported
//! (`Inference-Header-Content-Length`).
//!
//! * `GET /v2`, `GET /v2/health/live`, `GET /v2/health/ready`
//! * `GET /v2/models/{name}[/versions/{v}]`, `…/ready`
//! * `POST /v2/models/{name}[/versions/{v}]/infer`
//!
//! Errors are `{"error": "..."}`: 404 for an unknown model or version, 400 for a request
//! that does not fit the model, 413 for a body over the limit, 503 when the inference
//! queue is full.

// Handlers return ready-made error responses; their size does not matter here.
#![allow(clippy::result_large_err)]

use super::error;
use crate::handle::AppState;
use crate::serving::kserve;
use crate::serving::{IoSpec, LoadedModel, Outcome, ServeError};
use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use std::sync::Arc;
use std::time::Instant;

/// Largest inference request body.
pub const MAX_INFER_BODY: usize = 64 * 1024 * 1024;
/// Longest time an inference request's body may take to arrive.
const INFER_BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

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

fn lookup(h: &AppState, name: &str, version: Option<&str>) -> Result<Arc<LoadedModel>, Response> {
    match version {
        None => h.registry.current(name).ok_or_else(|| {
            error(
                StatusCode::NOT_FOUND,
                format!("unknown model '{name}' (not served on this node)"),
            )
        }),
        Some(v) => {
            let v: u64 = v.parse().map_err(|_| {
                error(
                    StatusCode::BAD_REQUEST,
                    format!("version '{v}' is not a number"),
                )
            })?;
            h.registry.version(name, v).ok_or_else(|| {
                error(
                    StatusCode::NOT_FOUND,
                    format!(
                        "model '{name}' version {v} is not loaded here (loaded: {:?})",
                        h.registry.versions(name)
                    ),
                )
            })
        }
    }
}

fn io_json(s: &IoSpec) -> serde_json::Value {
    serde_json::json!({ "name": s.name, "datatype": kserve::kserve_name(s.datatype), "shape": s.shape })
}

fn meta(h: &AppState, m: &LoadedModel) -> Response {
    Json(serde_json::json!({
        "name": m.channel,
        "versions": h.registry.versions(&m.channel).iter().map(|v| v.to_string()).collect::<Vec<_>>(),
        "platform": "onnx_onnxv1",
        "inputs": m.inputs.iter().map(io_json).collect::<Vec<_>>(),
        "outputs": m.outputs.iter().map(io_json).collect::<Vec<_>>(),
    }))
    .into_response()
}

async fn model_meta(State(h): State<AppState>, Path(name): Path<String>) -> Response {
    match lookup(&h, &name, None) {
        Ok(m) => meta(&h, &m),
        Err(r) => r,
    }
}

async fn version_meta(
    State(h): State<AppState>,
    Path((name, version)): Path<(String, String)>,
) -> Response {
    match lookup(&h, &name, Some(&version)) {
        Ok(m) => meta(&h, &m),
        Err(r) => r,
    }
}

async fn model_ready(State(h): State<AppState>, Path(name): Path<String>) -> Response {
    match lookup(&h, &name, None) {
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
    match lookup(&h, &name, Some(&version)) {
        Ok(_) => Json(serde_json::json!({ "name": name, "ready": true, "version": version }))
            .into_response(),
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
    let model = match lookup(&h, &name, version.as_deref()) {
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
    // A body that does not arrive in time gives its memory back.
    let read = tokio::time::timeout(
        INFER_BODY_TIMEOUT,
        axum::body::to_bytes(body, MAX_INFER_BODY),
    );
    let bytes = match read.await {
        Ok(Ok(b)) => b,
        Ok(Err(_)) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body over {MAX_INFER_BODY} bytes"),
            );
        }
        Err(_) => {
            return error(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "request body not received within {} s",
                    INFER_BODY_TIMEOUT.as_secs()
                ),
            );
        }
    };
    let started = Instant::now();
    let h2 = h.clone();
    let model2 = model.clone();
    // Parsing, inference and encoding all run on the bounded pool, off the async threads.
    let result = h
        .inference
        .run(move || -> Result<kserve::EncodedResponse, Response> {
            let req = kserve::parse_request(&bytes, header_len).map_err(|e| {
                error(
                    StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_REQUEST),
                    e.to_string(),
                )
            })?;
            let run_started = Instant::now();
            let ran = model2.run(&req.inputs);
            // A failure is the model's only if it now fails its own golden checks;
            // otherwise this input made it fail, and that is the client's error.
            let model_at_fault = match &ran {
                Err(ServeError::Runtime(_) | ServeError::Panicked) => model2.at_fault(),
                _ => false,
            };
            let outcome = match &ran {
                Ok(_) => Outcome::Ok,
                Err(ServeError::BadInput(_)) => Outcome::BadInput,
                Err(_) if !model_at_fault => Outcome::BadInput,
                Err(ServeError::Panicked) => Outcome::Panic,
                Err(_) => Outcome::Error,
            };
            model2.health.record(run_started.elapsed(), outcome);
            let outputs = ran.map_err(|e| match e {
                ServeError::BadInput(m) => error(StatusCode::BAD_REQUEST, m),
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
        Err(busy) => {
            h2.metrics
                .inference(&model.channel, model.version, elapsed, true);
            error(StatusCode::SERVICE_UNAVAILABLE, busy.to_string())
        }
        Ok(Err(resp)) => {
            h2.metrics
                .inference(&model.channel, model.version, elapsed, true);
            resp
        }
        Ok(Ok(enc)) => {
            h2.metrics
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
