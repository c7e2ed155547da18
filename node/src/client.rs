//! [`NodeClient`]: the one HTTP client of a node's own API (`/v1/…`, and JSON inference on
//! `/v2`), used by the CLI, the
//! demo and the end-to-end tests. Blocking (ureq); a refusal comes back as
//! [`ApiError::Refused`] with the node's message and, where the node gave one, the stable
//! `code` label of the refusal (e.g. `"forged"`, `"out_of_scope"`, `"stale"`).

use crate::status::Status;
use anyhow::{Context, Result, bail};
use pollen_protocol::ContentId;
use std::time::Duration;

/// A call the node did not answer with success.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The node could not be reached, or the connection broke.
    #[error("{0}")]
    Transport(ureq::Error),
    /// The node answered with an error status.
    #[error("{error}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// The node's `error` message (or the body, if it was not the JSON error).
        error: String,
        /// The node's stable `code` label, if it gave one.
        code: Option<String>,
    },
}

/// A client of one node's HTTP API.
#[derive(Clone, Debug)]
pub struct NodeClient {
    agent: ureq::Agent,
    base: String,
    /// Sent as `Authorization: Bearer` on every call (mutations need it).
    token: Option<String>,
}

impl NodeClient {
    /// A client of the node at `base` (e.g. `http://127.0.0.1:7411`), whose calls may take
    /// up to `timeout` (uploads of large files take long).
    pub fn new(base: &str, timeout: Duration) -> Self {
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .build()
            .into();
        NodeClient {
            agent,
            base: base.trim_end_matches('/').to_string(),
            token: None,
        }
    }

    /// The same client, sending `token` (the node's `<data-dir>/api-token`).
    pub fn with_token(mut self, token: Option<String>) -> Self {
        self.token = token;
        self
    }

    fn bearer(&self) -> String {
        format!("Bearer {}", self.token.as_deref().unwrap_or(""))
    }

    /// The node's base URL, without a trailing `/`.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// `GET /v1/status`.
    pub fn status(&self) -> Result<Status> {
        let node = &self.base;
        let url = format!("{node}/v1/status");
        let mut resp = self.agent.get(&url).call().with_context(|| {
            format!("cannot reach the node at {node} (is `pollen run` running there?)")
        })?;
        if resp.status() != 200 {
            bail!("the node at {node} answered {} to {url}", resp.status());
        }
        resp.body_mut()
            .read_json()
            .context("the node's status is not valid JSON")
    }

    /// `GET /v1/status`, or `None` if the node does not answer it.
    pub fn try_status(&self) -> Option<Status> {
        self.agent
            .get(format!("{}/v1/status", self.base))
            .call()
            .ok()
            .filter(|r| r.status() == 200)?
            .body_mut()
            .read_json()
            .ok()
    }

    /// `PUT /v1/files/{content_id}?chunk_size=N` with the file's bytes.
    pub fn put_file(
        &self,
        content_id: &ContentId,
        chunk_size: u32,
        file: impl std::io::Read + Send + 'static,
    ) -> Result<(), ApiError> {
        let url = format!(
            "{}/v1/files/{content_id}?chunk_size={chunk_size}",
            self.base
        );
        let resp = self
            .agent
            .put(&url)
            .header("content-type", "application/octet-stream")
            .header("authorization", self.bearer())
            .send(ureq::SendBody::from_owned_reader(file));
        check(resp).map(|_| ())
    }

    /// `POST /v1/manifests` with a signed manifest; the manifest id the node answers.
    pub fn post_manifest(&self, envelope: &[u8]) -> Result<String, ApiError> {
        let v: serde_json::Value = self.post("/v1/manifests", envelope)?;
        Ok(v["manifest"].as_str().unwrap_or_default().to_string())
    }

    /// `POST /v1/instructions` with a signed rollout instruction.
    pub fn post_instruction(&self, envelope: &[u8]) -> Result<(), ApiError> {
        self.post::<serde_json::Value>("/v1/instructions", envelope)
            .map(|_| ())
    }

    /// `GET /v1/manifests/{channel}/{version}`: the envelope bytes.
    pub fn manifest(&self, channel: &str, version: u64) -> Result<Vec<u8>, ApiError> {
        let url = format!("{}/v1/manifests/{channel}/{version}", self.base);
        let mut resp = check(self.agent.get(&url).call())?;
        resp.body_mut()
            .with_config()
            .limit(2 << 20)
            .read_to_vec()
            .map_err(ApiError::Transport)
    }

    /// `PUT /v1/pins/{channel}` (Some) or `DELETE` (None).
    pub fn pin(&self, channel: &str, version: Option<u64>) -> Result<(), ApiError> {
        let url = format!("{}/v1/pins/{channel}", self.base);
        let resp = match version {
            Some(v) => self
                .agent
                .put(&url)
                .header("authorization", self.bearer())
                .send(v.to_string().as_bytes()),
            None => self
                .agent
                .delete(&url)
                .header("authorization", self.bearer())
                .call(),
        };
        check(resp).map(|_| ())
    }

    /// `POST /v2/models/{model}/infer` with a KServe JSON request: the node's JSON
    /// answer, the inference result or its `{"error": ...}`.
    pub fn infer(
        &self,
        model: &str,
        request: &serde_json::Value,
    ) -> Result<serde_json::Value, ApiError> {
        self.agent
            .post(format!("{}/v2/models/{model}/infer", self.base))
            .send_json(request)
            .and_then(|mut r| r.body_mut().read_json())
            .map_err(ApiError::Transport)
    }

    fn post<T: serde::de::DeserializeOwned>(&self, path: &str, body: &[u8]) -> Result<T, ApiError> {
        let resp = self
            .agent
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/octet-stream")
            .header("authorization", self.bearer())
            .send(body);
        check(resp)?
            .body_mut()
            .read_json()
            .map_err(ApiError::Transport)
    }
}

/// The API token for a CLI call: `--token-file`, else `POLLEN_API_TOKEN`, else
/// `<data_dir>/api-token` (the `--data-dir` given, else the default data directory).
pub fn find_token(
    token_file: Option<&std::path::Path>,
    data_dir: Option<&std::path::Path>,
) -> Option<String> {
    let read = |p: &std::path::Path| {
        std::fs::read_to_string(p)
            .ok()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
    };
    if let Some(f) = token_file {
        return read(f);
    }
    if let Ok(t) = std::env::var("POLLEN_API_TOKEN")
        && !t.trim().is_empty()
    {
        return Some(t.trim().to_string());
    }
    let dir = data_dir.map_or_else(crate::config::default_data_dir, |d| d.to_path_buf());
    read(&dir.join(crate::http::auth::TOKEN_FILE))
}

type Response = ureq::http::Response<ureq::Body>;

/// The response if it is a success, else the node's refusal.
fn check(resp: Result<Response, ureq::Error>) -> Result<Response, ApiError> {
    let mut resp = resp.map_err(ApiError::Transport)?;
    let status = resp.status().as_u16();
    if status == 200 {
        return Ok(resp);
    }
    let text = resp.body_mut().read_to_string().unwrap_or_default();
    let json = serde_json::from_str::<serde_json::Value>(&text).ok();
    let field = |k: &str| {
        json.as_ref()
            .and_then(|v| v.get(k))
            .and_then(|e| e.as_str())
            .map(String::from)
    };
    Err(ApiError::Refused {
        status,
        error: field("error").unwrap_or(text),
        code: field("code"),
    })
}
