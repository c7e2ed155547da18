//! # pollen-node: the parts of the `pollen` binary
//!
//! [`run`] binds the HTTP API, starts the [`actor`] and serves until a
//! [`shutdown`] signal. The binary's command line (`src/cli/`) is not part of this library;
//! it reaches nodes through [`client`].
//!
//! ## Layout
//!
//! * [`config`]: the TOML config, its defaults and the flags that override it.
//! * [`store`]: the on-disk store (content-addressed files, partial downloads with durable
//!   chunk records, persisted manifests, trust roots and node state).
//! * [`net`]: libp2p behaviours and the per-peer stream tasks of Pollen's protocol.
//! * [`actor`]: the one task that owns the protocol core and the swarm (restore, persister,
//!   peers, swarm, chunk pipeline, activation and health reports).
//! * [`handle`]: [`handle::AppState`], what the HTTP server holds, and the commands it sends
//!   the actor.
//! * [`http`]: the local HTTP API: `/v1` control routes and `/v2` KServe inference.
//! * [`serving`]: models in tract, golden checks, the health window, the registry of
//!   served versions, the inference pool and the KServe codec.
//! * [`status`]: the `GET /v1/status` JSON and its conversion from the core's views.
//! * [`metrics`]: counters rendered in the Prometheus text format.
//! * [`client`]: [`client::NodeClient`], the one HTTP client of a node's API (CLI, demo,
//!   tests).
//! * [`shutdown`]: the Ctrl-C / SIGTERM future.

pub mod actor;
pub mod client;
pub mod config;
pub mod handle;
pub mod http;
pub mod metrics;
pub mod net;
pub mod serving;
pub mod shutdown;
pub mod status;
pub mod store;

use anyhow::{Context, Result};
use std::os::unix::fs::DirBuilderExt;

/// Run a node with `cfg` until Ctrl-C or SIGTERM.
///
/// Binds the HTTP API first (so an OS-chosen port is known), writes its address to
/// `<data_dir>/http.addr`, then starts the actor.
pub async fn run(cfg: config::NodeConfig) -> Result<()> {
    // Private models and the API token live here: the owner's only.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&cfg.data_dir)
        .with_context(|| format!("cannot create {}", cfg.data_dir.display()))?;
    let listener = tokio::net::TcpListener::bind(cfg.http)
        .await
        .with_context(|| format!("cannot listen for HTTP on {}", cfg.http))?;
    let http = listener.local_addr()?;
    let (actor, handle) = actor::Actor::new(cfg.clone(), http)?;
    println!("node {} (peer id {})", actor.node_id(), actor.peer_id());
    println!("http api on http://{http}");
    let addr_file = cfg.data_dir.join("http.addr");
    let tmp = cfg.data_dir.join("http.addr.tmp");
    std::fs::write(&tmp, http.to_string()).and_then(|_| std::fs::rename(&tmp, &addr_file))?;
    let guard = http::auth::Guard {
        token: http::auth::ensure_token(&cfg.data_dir)?.into(),
        public: cfg.http_public,
        hosts: cfg.http_allowed_hosts.clone().into(),
        origins: cfg.http_allowed_origins.clone().into(),
        public_inference: cfg.http_public_inference,
    };
    let app = http::router(handle, guard);
    tokio::spawn(http::server::serve(listener, app));
    actor.run(shutdown::shutdown_signal()).await
}
