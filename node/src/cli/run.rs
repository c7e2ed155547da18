//! `pollen run`: start a node from its config file and flags.

use anyhow::{Context, Result};
use clap::Args;
use pollen_node::config::NodeConfig;
use std::net::SocketAddr;
use std::path::PathBuf;

/// `pollen run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// TOML config file (every option is documented in `pollen_node::config`); flags
    /// override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Data directory (identity key, store, state).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// libp2p listen address (repeatable), e.g. /ip4/0.0.0.0/tcp/4001.
    #[arg(long, value_name = "MULTIADDR")]
    listen: Vec<String>,
    /// Bootstrap peer (repeatable), e.g. /ip4/10.0.0.2/tcp/4001/p2p/12D3Koo...
    #[arg(long, value_name = "MULTIADDR")]
    bootstrap: Vec<String>,
    /// An address others can reach this node at (repeatable).
    #[arg(long, value_name = "MULTIADDR")]
    external: Vec<String>,
    /// Local HTTP API address (127.0.0.1 only unless --http-public).
    #[arg(long, value_name = "ADDR")]
    http: Option<SocketAddr>,
    /// Allow the HTTP API on a non-loopback address.
    #[arg(long)]
    http_public: bool,
    /// This node's site (LAN) name.
    #[arg(long, value_name = "NAME")]
    site: Option<String>,
    /// Trust root file to install.
    #[arg(long, value_name = "FILE")]
    trust: Option<PathBuf>,
    /// This node's certificate (fleets).
    #[arg(long, value_name = "FILE")]
    cert: Option<PathBuf>,
    /// Turn LAN discovery by mDNS off.
    #[arg(long)]
    no_mdns: bool,
    /// Serve as a circuit relay for nodes behind NAT.
    #[arg(long)]
    relay_server: bool,
    /// Listen through this relay (repeatable; multiaddr ending in /p2p/<id>).
    #[arg(long, value_name = "MULTIADDR")]
    relay: Vec<String>,
    /// Upload limit in bytes per second.
    #[arg(long, value_name = "BYTES")]
    upload_limit: Option<u64>,
    /// Download limit in bytes per second.
    #[arg(long, value_name = "BYTES")]
    download_limit: Option<u64>,
    /// Seed for the protocol core's RNG.
    #[arg(long)]
    seed: Option<u64>,
    /// Device class, for choosing a model variant (e.g. weak-cpu).
    #[arg(long, value_name = "CLASS")]
    device_class: Option<String>,
    /// How often a serving node sends a health report (e.g. 30s).
    #[arg(long, value_name = "DURATION")]
    health_interval: Option<String>,
    /// Bytes a model may take while it is tried and loaded (default: half of the
    /// machine's memory).
    #[arg(long, value_name = "BYTES")]
    model_memory_budget: Option<u64>,
    /// Test only: serve corrupt chunks.
    #[arg(long, hide = true)]
    test_corrupt_chunks: bool,
    /// Test only: a flat deadline in milliseconds for every frame after a peer's Hello.
    #[arg(long, hide = true, value_name = "MS")]
    test_frame_deadline_ms: Option<u64>,
}

/// `pollen run`: start a node and serve until Ctrl-C or SIGTERM.
pub fn run(a: RunArgs) -> Result<()> {
    pollen_node::serving::model::restart_with_huge_pages();
    let mut cfg = match &a.config {
        Some(p) => NodeConfig::from_file(p)?,
        None => NodeConfig::default(),
    };
    if let Some(d) = a.data_dir {
        cfg.data_dir = d;
    }
    if !a.listen.is_empty() {
        cfg.listen = a.listen;
    }
    cfg.bootstrap.extend(a.bootstrap);
    cfg.external.extend(a.external);
    if let Some(h) = a.http {
        cfg.http = h;
    }
    cfg.http_public |= a.http_public;
    if a.site.is_some() {
        cfg.site = a.site;
    }
    if a.trust.is_some() {
        cfg.trust = a.trust;
    }
    if a.cert.is_some() {
        cfg.cert = a.cert;
    }
    if a.no_mdns {
        cfg.mdns = false;
    }
    cfg.relay_server |= a.relay_server;
    cfg.relays.extend(a.relay);
    if let Some(u) = a.upload_limit {
        cfg.upload_limit = u;
    }
    if let Some(d) = a.download_limit {
        cfg.download_limit = d;
    }
    if a.seed.is_some() {
        cfg.seed = a.seed;
    }
    if a.device_class.is_some() {
        cfg.device_class = a.device_class;
    }
    if let Some(h) = a.health_interval {
        cfg.health_interval = h;
    }
    if let Some(b) = a.model_memory_budget {
        cfg.model_memory_budget = b;
    }
    cfg.test_corrupt_chunks = a.test_corrupt_chunks;
    cfg.test_frame_deadline = a
        .test_frame_deadline_ms
        .map(std::time::Duration::from_millis);
    cfg.validate()?;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,libp2p_mdns=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(pollen_node::run(cfg))
}
