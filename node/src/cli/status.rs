//! `pollen status`: what a node knows of itself and the mesh, per channel and release.

use anyhow::Result;
use clap::Args;
use pollen_node::config::DEFAULT_HTTP;
use std::io::Write;

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
    let s = super::client(&a.node, &super::AuthArgs::default()).status()?;
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
    if s.gates_open_to_sybils {
        writeln!(
            out,
            "warning  no fleet key: anyone can make node keys, so rollout gates are open to \
             Sybil reporters and only advisory (add a fleet key to the trust root)"
        )?;
    }
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
    if !r.state.is_empty() {
        let why = if r.reason.is_empty() {
            String::new()
        } else {
            format!(": {}", r.reason)
        };
        writeln!(out, "           here: {}{why}", r.state)?;
    }
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
