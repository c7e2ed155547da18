//! # pollen-node: the parts of the `pollen` binary
//!
//! * [`config`]: the TOML config and its defaults.
//! * [`store`]: the on-disk store (content-addressed files, partial downloads with durable
//!   chunk records, persisted manifests, trust root and node state).
//! * [`net`]: libp2p behaviours and the per-peer stream tasks of Pollen's protocol.
//! * [`actor`]: the one task that owns the protocol state machine and the swarm.
//! * [`http`]: the local HTTP API.
//! * [`metrics`], [`status`]: what the node reports.

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

/// Run a node with `cfg` until Ctrl-C or SIGTERM.
///
/// Binds the HTTP API first (so an OS-chosen port is known), writes its address to
/// `<data_dir>/http.addr`, then starts the actor.
pub async fn run(cfg: config::NodeConfig) -> Result<()> {
    std::fs::create_dir_all(&cfg.data_dir)
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
    let app = http::router(handle);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("http server: {e}");
        }
    });
    actor.run(shutdown::shutdown_signal()).await
}
