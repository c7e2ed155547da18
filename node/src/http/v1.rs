//! The node's control API, `/v1/…` and `/metrics`: status, metrics, file uploads,
//! manifests, rollout instructions and pins. Mutations go to the actor as
//! [`ActorCmd`]s; uploads go straight to the store on a blocking thread.
//!
//! * `GET /v1/status`: this node and what it knows of the mesh (JSON, see [`crate::status`]).
//! * `GET /metrics`: Prometheus text format.
//! * `PUT /v1/files/{content_id}?chunk_size=N`: upload a file for publishing; the body is
//!   hashed as it is stored and refused unless its BLAKE3 equals `content_id`.
//! * `POST /v1/manifests`: inject a signed manifest (envelope bytes); the node checks it as
//!   any peer would. Its files must have been uploaded first.
//! * `GET /v1/manifests/{channel}/{version}`: the signed manifest of a release this node
//!   keeps (envelope bytes), e.g. for `pollen rollout rollback`.
//! * `POST /v1/instructions`: inject a signed rollout instruction (halt / resume); checked
//!   against the trust root like one from a peer, then gossiped.
//! * `PUT /v1/pins/{channel}` with a version number as the body: pin this node's channel
//!   to that version; `DELETE /v1/pins/{channel}` unpins. Local only, persisted.

use super::{ask, declared_length, error};
use crate::handle::{ActorCmd, AppState, Refusal};
use crate::store::StoreError;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use futures::StreamExt;
use pollen_protocol::chunking::ChunkSize;
use pollen_protocol::ids::ContentId;
use serde::Deserialize;
use std::io::Read;

/// Largest body of a control request (manifests, instructions, pins; uploads stream).
const MAX_CONTROL_BODY: usize = 2 * 1024 * 1024;

/// The control routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/status", get(status))
        .route("/metrics", get(metrics))
        .route("/v1/manifests", post(publish))
        .route("/v1/files/{cid}", put(upload))
        .route("/v1/manifests/{channel}/{version}", get(manifest))
        .route("/v1/instructions", post(instruct))
        .route("/v1/pins/{channel}", put(pin).delete(unpin))
        .layer(DefaultBodyLimit::max(MAX_CONTROL_BODY))
}

async fn status(State(h): State<AppState>) -> Response {
    match ask(&h, |reply| ActorCmd::Status { reply }).await {
        Ok(s) => Json(s).into_response(),
        Err(r) => r,
    }
}

async fn metrics(State(h): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        h.metrics.render() + &crate::metrics::render_specialisations(&h.registry.loaded()),
    )
        .into_response()
}

async fn publish(State(h): State<AppState>, body: Bytes) -> Response {
    match ask(&h, |reply| ActorCmd::Publish {
        bytes: body.to_vec(),
        reply,
    })
    .await
    {
        Ok(Ok(id)) => Json(serde_json::json!({ "manifest": id })).into_response(),
        Ok(Err(r)) => refused(r),
        Err(r) => r,
    }
}

async fn manifest(
    State(h): State<AppState>,
    Path((channel, version)): Path<(String, u64)>,
) -> Response {
    let ch = channel.clone();
    match ask(&h, |reply| ActorCmd::Manifest {
        channel: ch,
        version,
        reply,
    })
    .await
    {
        Ok(Some(bytes)) => {
            ([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response()
        }
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            format!("this node keeps no release {version} of {channel}"),
        ),
        Err(r) => r,
    }
}

async fn instruct(State(h): State<AppState>, body: Bytes) -> Response {
    match ask(&h, |reply| ActorCmd::Instruct {
        bytes: body.to_vec(),
        reply,
    })
    .await
    {
        Ok(Ok(_)) => Json(serde_json::json!({ "result": "accepted" })).into_response(),
        Ok(Err(r)) => refused(r),
        Err(r) => r,
    }
}

async fn pin(State(h): State<AppState>, Path(channel): Path<String>, body: Bytes) -> Response {
    let Some(version) = std::str::from_utf8(&body)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .filter(|v| *v > 0)
    else {
        return error(
            StatusCode::BAD_REQUEST,
            "the body must be a version number (at least 1)",
        );
    };
    set_pin(h, channel, Some(version)).await
}

async fn unpin(State(h): State<AppState>, Path(channel): Path<String>) -> Response {
    set_pin(h, channel, None).await
}

async fn set_pin(h: AppState, channel: String, version: Option<u64>) -> Response {
    let ch = channel.clone();
    match ask(&h, |reply| ActorCmd::Pin {
        channel: ch,
        version,
        reply,
    })
    .await
    {
        Ok(Ok(_)) => {
            Json(serde_json::json!({ "channel": channel, "pinned": version })).into_response()
        }
        Ok(Err(e)) => error(StatusCode::BAD_REQUEST, e),
        Err(r) => r,
    }
}

/// Chunks in the largest uploadable file (a manifest's chaining values must fit a 1 MiB
/// control frame).
const MAX_UPLOAD_CHUNKS: u64 = 32 * 1024;
/// Uploads in progress at once (see [`AppState::uploads`]).
pub const UPLOADS: usize = 2;
/// Longest pause in an upload's body.
const UPLOAD_IDLE: std::time::Duration = std::time::Duration::from_secs(30);

#[derive(Deserialize)]
struct UploadQuery {
    chunk_size: Option<u64>,
}

/// A `Read` over body pieces sent from the async side (used on a blocking thread).
struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<Bytes>,
    cur: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(b) => self.cur = b,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        self.cur = self.cur.slice(n..);
        Ok(n)
    }
}

async fn upload(
    State(h): State<AppState>,
    Path(cid): Path<String>,
    Query(q): Query<UploadQuery>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let Ok(expected) = cid.parse::<ContentId>() else {
        return error(
            StatusCode::BAD_REQUEST,
            "the path must end in a 64-hex-digit content id",
        );
    };
    let chunk = match ChunkSize::new(
        q.chunk_size
            .unwrap_or(u64::from(pollen_protocol::chunking::DEFAULT_CHUNK_SIZE)),
    ) {
        Ok(c) => c,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    // At most UPLOADS at once: each holds a blocking thread for as long as its body lasts.
    let Ok(_slot) = h.uploads.clone().try_acquire_owned() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "other uploads are in progress; try again when they are done",
        );
    };
    // The quota of unreferenced bytes: what is stored but not referred to by a retained
    // release (earlier uploads waiting for their manifest) plus this body.
    let room = match quota_room(&h, &expected).await {
        Ok(room) => room,
        Err(r) => return r,
    };
    if let Some(len) = declared_length(&headers)
        && len > room
    {
        return over_quota(h.upload_quota, room);
    }
    // Hash and write on a blocking thread; the body streams to it through a small channel.
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(8);
    let store = h.store.clone();
    let job = tokio::task::spawn_blocking(move || {
        // Cap the body: the largest artifact a manifest can describe at this chunk size.
        let cap = chunk.bytes().saturating_mul(MAX_UPLOAD_CHUNKS);
        store.import_reader(
            ChannelReader {
                rx,
                cur: Bytes::new(),
            }
            .take(cap),
            chunk,
            Some(&expected),
        )
    });
    let mut stream = body.into_data_stream();
    let mut received = 0u64;
    loop {
        // A client that stops sending gives up its slot.
        let Ok(next) = tokio::time::timeout(UPLOAD_IDLE, stream.next()).await else {
            return error(
                StatusCode::REQUEST_TIMEOUT,
                format!("upload stalled: no bytes for {} s", UPLOAD_IDLE.as_secs()),
            );
        };
        let Some(piece) = next else { break };
        match piece {
            Ok(b) => {
                received = received.saturating_add(b.len() as u64);
                if received > room {
                    // Dropping the sender mid-file makes the import fail and remove its
                    // temporary file.
                    return over_quota(h.upload_quota, room);
                }
                if tx.send(b).await.is_err() {
                    break;
                }
            }
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("upload interrupted: {e}")),
        }
    }
    drop(tx);
    match job.await {
        Ok(Ok((spec, _))) => {
            Json(serde_json::json!({ "content_id": spec.content_id.to_hex(), "size": spec.size }))
                .into_response()
        }
        Ok(Err(e @ StoreError::Input(_))) => error(StatusCode::BAD_REQUEST, e.to_string()),
        Ok(Err(e @ StoreError::DiskFull { .. })) => {
            error(StatusCode::INSUFFICIENT_STORAGE, e.to_string())
        }
        Ok(Err(e @ StoreError::ContentMismatch { .. })) => {
            error(StatusCode::UNPROCESSABLE_ENTITY, e.to_string())
        }
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// Bytes an upload of `expected` may still bring under the quota: the quota less the
/// stored bytes no retained release refers to (not counting `expected` itself, so a
/// retried upload is not charged twice). Concurrent uploads each see the same room, so
/// at most [`UPLOADS`] bodies pass it together.
async fn quota_room(h: &AppState, expected: &ContentId) -> Result<u64, Response> {
    let keep = ask(h, |reply| ActorCmd::LiveFiles { reply }).await?;
    let store = h.store.clone();
    let except = *expected;
    let used = tokio::task::spawn_blocking(move || store.unreferenced_bytes(&keep, &except))
        .await
        .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(h.upload_quota.saturating_sub(used))
}

fn over_quota(quota: u64, room: u64) -> Response {
    error(
        StatusCode::INSUFFICIENT_STORAGE,
        format!(
            "upload quota: at most {quota} bytes of uploaded files may wait for a manifest, and {room} are left; publish the manifest of the files uploaded so far, or wait for unreferenced files to be collected (10 minutes after upload)"
        ),
    )
}

/// A refused manifest or instruction: 422 with `{"error": message}`, plus `"code": label`
/// when the core labelled the refusal.
fn refused(r: Refusal) -> Response {
    let mut body = serde_json::json!({ "error": r.message });
    if let Some(code) = r.code {
        body["code"] = code.into();
    }
    (StatusCode::UNPROCESSABLE_ENTITY, Json(body)).into_response()
}
