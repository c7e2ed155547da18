//! Who may call what on the local API.
//!
//! * Every mutation (`PUT`, `POST`, `DELETE` under `/v1/`: uploads, manifests,
//!   instructions, pins) needs `Authorization: Bearer <token>`, the token the node keeps
//!   in `<data-dir>/api-token` (mode 0600, created on first start): any local process may
//!   read status and run inference, only the node's operator may change it.
//! * On a loopback listener, the `Host` must be a loopback name or address, or one of
//!   `http_allowed_hosts`: a DNS-rebinding page that points its own name at 127.0.0.1 is
//!   refused.
//! * A browser's cross-origin request (an `Origin` header that is not in
//!   `http_allowed_origins`) is refused, so a web page cannot drive the node.
//! * Inference (`/v2/…` and the OpenAI routes `/v1/models`, `/v1/chat/completions`,
//!   `/v1/completions`) is open to local processes; an OpenAI client's own
//!   `Authorization` header is not checked there.
//! * With `http_public`, every route but the health checks needs the token, unless
//!   `http_public_inference` opens the inference routes.
//!
//! Refusals are `{"error": ...}` with 401 (no or wrong token), 403 (origin) or 421 (host).

use super::error;
use anyhow::{Context, Result};
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

/// The token file in the data directory.
pub const TOKEN_FILE: &str = "api-token";

/// The node's API token: read from `<data_dir>/api-token` (its mode tightened to 0600),
/// or created there (32 random bytes, hex) on first start.
pub fn ensure_token(data_dir: &Path) -> Result<String> {
    let path = data_dir.join(TOKEN_FILE);
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .with_context(|| format!("chmod 600 {}", path.display()))?;
            return Ok(t.trim().to_string());
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("randomness: {e}"))?;
    let token = hex::encode(bytes);
    let tmp = data_dir.join(format!("{TOKEN_FILE}.tmp"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(token.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path).with_context(|| format!("creating {}", path.display()))?;
    Ok(token)
}

/// The guard's settings.
#[derive(Clone, Debug)]
pub struct Guard {
    /// The bearer token.
    pub token: Arc<str>,
    /// The listener is not loopback-only (`http_public`).
    pub public: bool,
    /// Host names accepted besides loopback ones.
    pub hosts: Arc<[String]>,
    /// Origins accepted for browser requests.
    pub origins: Arc<[String]>,
    /// With `public`: inference without the token.
    pub public_inference: bool,
}

impl Guard {
    fn host_ok(&self, host: Option<&str>) -> bool {
        let Some(host) = host else {
            return true; // HTTP/1.0 without Host: not a browser
        };
        // Strip the port (and the brackets of an IPv6 literal).
        let name = match host.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => host,
        };
        let name = name.trim_start_matches('[').trim_end_matches(']');
        name.eq_ignore_ascii_case("localhost")
            || name
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
            || self.hosts.iter().any(|h| h.eq_ignore_ascii_case(name))
    }

    fn authorised(&self, req: &Request) -> bool {
        let Some(v) = req.headers().get(header::AUTHORIZATION) else {
            return false;
        };
        let Some(given) = v.to_str().ok().and_then(|v| v.strip_prefix("Bearer ")) else {
            return false;
        };
        // Constant time in the token's length.
        let (a, b) = (given.trim().as_bytes(), self.token.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

/// The middleware: refuse what the rules above refuse, pass the rest on.
pub async fn check(State(g): State<Guard>, req: Request, next: Next) -> Response {
    if !g.public
        && !g.host_ok(
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok()),
        )
    {
        return error(
            StatusCode::MISDIRECTED_REQUEST,
            "this node answers only to loopback host names (see http_allowed_hosts)",
        );
    }
    if let Some(origin) = req.headers().get(header::ORIGIN) {
        let allowed = origin
            .to_str()
            .is_ok_and(|o| g.origins.iter().any(|a| a == o));
        if !allowed {
            return error(
                StatusCode::FORBIDDEN,
                "cross-origin requests are refused (see http_allowed_origins)",
            );
        }
    }
    let path = req.uri().path();
    let inference = path.starts_with("/v2") || super::openai::is_inference_path(path);
    let mutation = path.starts_with("/v1/")
        && !inference
        && matches!(*req.method(), Method::PUT | Method::POST | Method::DELETE);
    let needs_token = mutation
        || (g.public && !path.starts_with("/v2/health/") && !(g.public_inference && inference));
    if needs_token && !g.authorised(&req) {
        return error(
            StatusCode::UNAUTHORIZED,
            "this call needs the node's API token: send `Authorization: Bearer <token>` \
             with the token in <data-dir>/api-token (the CLI takes --data-dir, \
             --token-file or POLLEN_API_TOKEN)",
        );
    }
    next.run(req).await
}
