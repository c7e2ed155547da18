//! The node's local HTTP API (127.0.0.1 by default): the router, and what its two halves
//! share.
//!
//! * [`v1`]: the control API (`/v1/…`, `/metrics`), which talks to the actor.
//! * [`v2`]: KServe v2 inference (`/v2/…`), which uses the registry and the pool, and asks
//!   the actor only why a model is not served, for metadata and the repository index.
//! * [`openai`]: the OpenAI-compatible API for language models (`/v1/models`,
//!   `/v1/chat/completions`, `/v1/completions`), beside the control API.
//! * [`auth`]: the token, Host and Origin rules every request passes first.
//! * [`server`]: the accept loop, with a connection cap and header timeouts.
//!
//! Errors are `{"error": "..."}` with a 4xx or 5xx status.

pub mod auth;
pub mod openai;
pub mod server;
pub mod v1;
pub mod v2;

use crate::handle::{ActorCmd, AppState};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use tokio::sync::oneshot;

/// The API's routes, behind the [`auth`] guard.
pub fn router(state: AppState, guard: auth::Guard) -> Router {
    Router::new()
        .merge(v1::routes())
        .merge(v2::routes())
        .merge(openai::routes())
        .with_state(state)
        .layer(axum::middleware::from_fn_with_state(guard, auth::check))
}

/// An error response: `{"error": msg}`.
pub fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": msg.into() }))).into_response()
}

/// The `Content-Length` a request declared, if any.
pub(crate) fn declared_length(headers: &axum::http::HeaderMap) -> Option<u64> {
    headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

/// Send a command to the actor and wait for its answer; 503 if the actor is gone.
pub(crate) async fn ask<T>(
    h: &AppState,
    cmd: impl FnOnce(oneshot::Sender<T>) -> ActorCmd,
) -> Result<T, Response> {
    let (tx, rx) = oneshot::channel();
    if h.cmds.send(cmd(tx)).await.is_err() {
        return Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "node is shutting down",
        ));
    }
    rx.await
        .map_err(|_| error(StatusCode::SERVICE_UNAVAILABLE, "node is shutting down"))
}
