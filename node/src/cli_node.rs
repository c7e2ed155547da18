//! `pollen run`, `pollen publish` and `pollen status`.

use crate::cli_keys::{ReleaseArgs, build_release};
use anyhow::{Context, Result, bail};
use clap::Args;
use pollen_keys::time::unix_now;
use pollen_node::config::{DEFAULT_HTTP, NodeConfig};
use pollen_node::status::Status;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

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
    /// Test only: serve corrupt chunks.
    #[arg(long, hide = true)]
    test_corrupt_chunks: bool,
}

/// `pollen run`: start a node and serve until Ctrl-C or SIGTERM.
pub fn run(a: RunArgs) -> Result<()> {
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
    cfg.test_corrupt_chunks = a.test_corrupt_chunks;
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

/// `pollen publish`.
#[derive(Debug, Args)]
pub struct PublishArgs {
    #[command(flatten)]
    release: ReleaseArgs,
    /// The node to publish through.
    #[arg(long, value_name = "URL", default_value = concat!("http://", "127.0.0.1:7411"))]
    node: String,
}

pub(crate) fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(3600)))
        .http_status_as_error(false)
        .build()
        .into()
}

pub(crate) fn get_status(agent: &ureq::Agent, node: &str) -> Result<Status> {
    let url = format!("{}/v1/status", node.trim_end_matches('/'));
    let mut resp = agent.get(&url).call().with_context(|| {
        format!("cannot reach the node at {node} (is `pollen run` running there?)")
    })?;
    if resp.status() != 200 {
        bail!("the node at {node} answered {} to {url}", resp.status());
    }
    resp.body_mut()
        .read_json()
        .context("the node's status is not valid JSON")
}

pub(crate) fn error_of(resp: &mut ureq::http::Response<ureq::Body>) -> String {
    let text = resp.body_mut().read_to_string().unwrap_or_default();
    serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(String::from))
        .unwrap_or(text)
}

/// `pollen publish`: hash and sign locally, upload the files, inject the manifest.
pub fn publish(a: PublishArgs, out: &mut dyn Write) -> Result<()> {
    let agent = agent();
    let node = a.node.trim_end_matches('/').to_string();
    let status = get_status(&agent, &node)?;
    if status.trust_version == 0 {
        bail!("the node at {node} has no trust root: start it with --trust FILE");
    }
    if let Some(c) = status
        .channels
        .iter()
        .find(|c| c.channel == a.release.channel)
        && a.release.version <= c.highest
    {
        bail!(
            "version {} is not above the current version {} of channel {}",
            a.release.version,
            c.highest,
            c.channel
        );
    }
    let total: u64 = a
        .release
        .files
        .iter()
        .map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0))
        .sum();
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg:>10} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message("hashing");
    let mut base = 0u64;
    let mut last_file = None::<PathBuf>;
    let m = build_release(&a.release, unix_now()?, &mut |path, n| {
        if last_file.as_deref() != Some(path) {
            if let Some(prev) = &last_file {
                base += std::fs::metadata(prev).map(|m| m.len()).unwrap_or(0);
            }
            last_file = Some(path.to_path_buf());
        }
        bar.set_position(base + n);
    })?;
    bar.finish_and_clear();
    let files = &m.body.artifact.variants[0].files;
    for (path, f) in a.release.files.iter().zip(files) {
        let url = format!(
            "{node}/v1/files/{}?chunk_size={}",
            f.spec.content_id,
            f.spec.chunk_size.get()
        );
        let file =
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let mut resp = agent
            .put(&url)
            .header("content-type", "application/octet-stream")
            .send(ureq::SendBody::from_owned_reader(file))
            .with_context(|| format!("uploading {} to {node}", path.display()))?;
        if resp.status() != 200 {
            bail!(
                "the node refused {}: {}",
                path.display(),
                error_of(&mut resp)
            );
        }
    }
    let mut resp = agent
        .post(format!("{node}/v1/manifests"))
        .header("content-type", "application/octet-stream")
        .send(&m.signed.to_bytes()[..])
        .with_context(|| format!("sending the manifest to {node}"))?;
    if resp.status() != 200 {
        let e = error_of(&mut resp);
        let hint = if e.contains("forged") || e.contains("no valid signature from a known key") {
            "unknown key: none of the signing keys is a publisher in the node's trust root"
        } else if e.contains("not allowed to sign channel") {
            "channel not allowed for that key"
        } else if e.contains("is not above the highest") {
            "version not above the current one"
        } else {
            "refused"
        };
        bail!("the node refused the manifest ({hint}): {e}");
    }
    writeln!(
        out,
        "published {} version {} as manifest {} through {node}",
        m.body.channel, m.body.version, m.id
    )?;
    Ok(())
}

/// `pollen status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The node to ask.
    #[arg(long, value_name = "URL", default_value = concat!("http://", "127.0.0.1:7411"))]
    node: String,
    /// Print the raw JSON.
    #[arg(long)]
    json: bool,
}

/// `pollen status`: print what the node knows.
pub fn status(a: StatusArgs, out: &mut dyn Write) -> Result<()> {
    let agent = agent();
    let s = get_status(&agent, &a.node)?;
    if a.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&s)?)?;
        return Ok(());
    }
    let _ = DEFAULT_HTTP;
    writeln!(out, "node     {}", s.node_id)?;
    writeln!(out, "peer id  {}", s.peer_id)?;
    writeln!(out, "site     {}", s.site.as_deref().unwrap_or("-"))?;
    writeln!(out, "http     {}", s.http)?;
    writeln!(
        out,
        "trust    {}",
        if s.trust_version == 0 {
            "none".to_string()
        } else {
            format!(
                "version {}{}",
                s.trust_version,
                if s.fleet {
                    " (fleet: certificates required)"
                } else {
                    ""
                }
            )
        }
    )?;
    for l in &s.listen {
        writeln!(out, "listen   {l}")?;
    }
    writeln!(out, "\npeers ({})", s.peers.len())?;
    writeln!(out, "  {:<18} {:<12} {:>8}", "node", "site", "chunks")?;
    for p in &s.peers {
        writeln!(
            out,
            "  {:<18} {:<12} {:>8}",
            &p.node_id[..16],
            p.site.as_deref().unwrap_or("-"),
            p.chunks_from
        )?;
    }
    writeln!(out, "\nchannels ({})", s.channels.len())?;
    for c in &s.channels {
        writeln!(
            out,
            "  {}  highest {}  active {}{}{}",
            c.channel,
            c.highest,
            c.active_version.map_or("-".to_string(), |v| v.to_string()),
            c.pinned
                .map(|v| format!("  PINNED to {v} (rollouts ignored)"))
                .unwrap_or_default(),
            if c.serving_expired {
                "  (manifest expired; still serving the last verified model)"
            } else {
                ""
            }
        )?;
        for r in &c.releases {
            write_release(out, r)?;
        }
        if !c.equivocations.is_empty() {
            writeln!(out, "    equivocation on versions {:?}", c.equivocations)?;
        }
    }
    if !s.errors.is_empty() {
        writeln!(out, "\nerrors")?;
        for e in &s.errors {
            writeln!(out, "  {e}")?;
        }
    }
    Ok(())
}

/// One release of `pollen status`: download, this node's stage, the stages mesh-wide and
/// the health picture of the report sample.
fn write_release(out: &mut dyn Write, r: &pollen_node::status::ReleaseStatus) -> Result<()> {
    let have: u32 = r.files.iter().map(|f| f.have).sum();
    let total: u32 = r.files.iter().map(|f| f.total).sum();
    let state = if r.rolled_back {
        "  ROLLED BACK (failed its gate)"
    } else if r.halted {
        "  HALTED"
    } else {
        ""
    };
    writeln!(
        out,
        "    v{:<5} {}  chunks {have}/{total}  variant {}  my stage {}{state}",
        r.version,
        &r.manifest[..16.min(r.manifest.len())],
        if r.variant.is_empty() {
            "-"
        } else {
            &r.variant
        },
        r.my_stage
            .map_or("none".to_string(), |s| (s + 1).to_string()),
    )?;
    for (i, st) in r.stage_list.iter().enumerate() {
        writeln!(
            out,
            "           stage {} {:>6.1}%  {:<6} {}{}",
            i + 1,
            st.share_percent,
            if st.open { "open" } else { "closed" },
            match (st.open, st.opened_at_ms) {
                (true, Some(t)) => format!(
                    "since {}",
                    pollen_keys::time::format_unix(pollen_protocol::UnixTime(t))
                ),
                _ => st.why.clone(),
            },
            st.gate
                .as_ref()
                .map(|g| format!("  [gate: {g}]"))
                .unwrap_or_default()
        )?;
    }
    writeln!(
        out,
        "           nodes: {} healthy, {} failed, {} rolled back, {} pending{}",
        r.healthy,
        r.failed,
        r.rolled_back_nodes,
        r.pending,
        if r.stale > 0 {
            format!(", {} not heard from lately", r.stale)
        } else {
            String::new()
        }
    )?;
    for f in &r.failures {
        writeln!(
            out,
            "           failure {} x{}: {}",
            f.class, f.nodes, f.detail
        )?;
    }
    if let Some(l) = &r.runtime_limit {
        writeln!(out, "           runtime limit: {l}")?;
    }
    if let Some((action, at)) = &r.instruction {
        writeln!(
            out,
            "           operator: {action} at {}",
            pollen_keys::time::format_unix(pollen_protocol::UnixTime(*at))
        )?;
    }
    Ok(())
}
