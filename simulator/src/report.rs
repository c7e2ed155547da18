//! Figures of a run, and every file a run writes: `summary.json`, `timeseries.csv`,
//! `coverage.svg`, `bytes.svg` and `perf.json`, plus a table on stdout. Wall-clock figures
//! go to `perf.json` only (the command line measures them), so every other output is
//! identical for the same scenario and seed.

use crate::engine::{LinkBytes, NEVER, NodeFacts, Sim};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

/// What `summary.json` holds.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Summary {
    /// Scenario name.
    pub scenario: String,
    /// Seeds the figures come from.
    pub seeds: Vec<u64>,
    /// Nodes.
    pub nodes: usize,
    /// Figures by name (a single run: the value; several seeds: the mean).
    pub figures: BTreeMap<String, f64>,
    /// Several seeds: min and max of each figure.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub min: BTreeMap<String, f64>,
    /// Several seeds: max.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub max: BTreeMap<String, f64>,
    /// Nodes that never completed the last release, by reason.
    pub never_completed: BTreeMap<String, u64>,
    /// Hash of the run's event trace (one seed).
    pub trace_hash: String,
}

fn pct_time(mut times: Vec<u64>, total: usize, q: f64) -> Option<f64> {
    if total == 0 {
        return None;
    }
    times.sort_unstable();
    let need = ((total as f64) * q).ceil().max(1.0) as usize;
    times.get(need - 1).map(|t| *t as f64 / 1e6)
}

/// Compute every figure of a finished run.
pub fn summarize(sim: &Sim) -> Summary {
    let mut f = BTreeMap::new();
    let n = sim.node_count();
    let p = sim.publisher() as usize;
    let facts: Vec<_> = (0..n).map(|k| sim.node_facts(k)).collect();
    let honest: Vec<bool> = facts.iter().map(|x| !x.adversary).collect();
    let sites = sim.site_facts();
    let mut never = BTreeMap::new();
    let total_bytes: u64 = sim
        .releases
        .iter()
        .filter(|r| r.manifest.is_some())
        .map(|r| sim.release_spec(r).size.0)
        .sum();
    for (ri, r) in sim.releases.iter().enumerate() {
        let Some(m) = &r.manifest else { continue };
        let v = r.version;
        let spec = sim.release_spec(r);
        let size = spec.size.0 as f64;
        // Activation coverage per stage, timed from publish.
        for s in 0..spec.stages.len() {
            let members: Vec<usize> = (0..n)
                .filter(|&k| k != p && honest[k] && r.stage[k] as usize == s)
                .collect();
            let times: Vec<u64> = members
                .iter()
                .filter(|&&k| r.active[k] != NEVER)
                .map(|&k| r.active[k] - r.published)
                .collect();
            f.insert(format!("v{v}.stage{s}.nodes"), members.len() as f64);
            for (q, name) in [
                (0.5, "t50_s"),
                (0.9, "t90_s"),
                (0.99, "t99_s"),
                (1.0, "t100_s"),
            ] {
                if let Some(t) = pct_time(times.clone(), members.len(), q) {
                    f.insert(format!("v{v}.stage{s}.{name}"), t);
                }
            }
        }
        // Distribution: every honest receiver holding the artifact, against the bounds.
        let receivers: Vec<usize> = (0..n).filter(|&k| k != p && honest[k]).collect();
        let done: Vec<u64> = receivers
            .iter()
            .filter(|&&k| r.complete[k] != NEVER)
            .map(|&k| r.complete[k] - r.published)
            .collect();
        for (q, name) in [
            (0.5, "t50_s"),
            (0.9, "t90_s"),
            (0.99, "t99_s"),
            (1.0, "t100_s"),
        ] {
            if let Some(t) = pct_time(done.clone(), receivers.len(), q) {
                f.insert(format!("v{v}.complete.{name}"), t);
            }
        }
        // Per site (for comparison with the test bed): completion times of the site's
        // honest receivers. Not in the table (see `headline`).
        for (si, site) in sites.iter().enumerate() {
            let members: Vec<usize> = receivers
                .iter()
                .copied()
                .filter(|&k| facts[k].site as usize == si)
                .collect();
            let times: Vec<u64> = members
                .iter()
                .filter(|&&k| r.complete[k] != NEVER)
                .map(|&k| r.complete[k] - r.published)
                .collect();
            for (q, name) in [(0.5, "p50"), (0.9, "p90"), (1.0, "p100")] {
                if let Some(t) = pct_time(times.clone(), members.len(), q) {
                    f.insert(format!("sites.{}.v{v}.{name}", site.name), t);
                }
            }
        }
        let nn = receivers.len() as f64;
        let u_s = facts[p].up_bps;
        let d_min = receivers
            .iter()
            .map(|&k| facts[k].down_bps)
            .fold(f64::INFINITY, f64::min);
        let sum_u: f64 = receivers.iter().map(|&k| facts[k].up_bps).sum();
        let mut lower = (size / u_s)
            .max(size / d_min)
            .max(nn * size / (u_s + sum_u));
        for site in &sites {
            if !site.has_publisher && sites.len() > 1 {
                lower = lower.max(size / site.wan_down_bps);
            }
        }
        let client_server = (nn * size / u_s).max(size / d_min);
        f.insert(format!("v{v}.lower_bound_s"), lower);
        f.insert(format!("v{v}.client_server_s"), client_server);
        if let Some(t) = pct_time(done.clone(), receivers.len(), 1.0) {
            f.insert(format!("v{v}.t100_over_lower_bound"), t / lower);
            f.insert(format!("v{v}.t100_over_client_server"), t / client_server);
        }
        // Manifest dissemination.
        let reached: Vec<usize> = (0..n).filter(|&k| r.hops[k] != u16::MAX).collect();
        let last_hop = reached.iter().map(|&k| r.hops[k]).max().unwrap_or(0);
        let mean_hop = if reached.is_empty() {
            0.0
        } else {
            reached.iter().map(|&k| f64::from(r.hops[k])).sum::<f64>() / reached.len() as f64
        };
        f.insert(format!("v{v}.gossip.reached"), reached.len() as f64);
        f.insert(format!("v{v}.gossip.last_hop"), f64::from(last_hop));
        f.insert(format!("v{v}.gossip.mean_hop"), mean_hop);
        f.insert(format!("v{v}.gossip.log2n_bound"), 1.5 * (n as f64).log2());
        if reached.len() > 1 {
            let red = r.payloads as f64 / (reached.len() - 1) as f64 - 1.0;
            f.insert(format!("v{v}.gossip.redundancy"), red);
        }
        let last_accept = reached
            .iter()
            .filter(|&&k| r.accepted[k] != NEVER)
            .map(|&k| r.accepted[k] - r.published)
            .max();
        if let Some(t) = last_accept {
            f.insert(format!("v{v}.gossip.last_delivery_s"), t as f64 / 1e6);
        }
        let mut hist = [0u64; 16];
        for &k in &reached {
            hist[(r.hops[k] as usize).min(15)] += 1;
        }
        for (h, c) in hist.iter().enumerate() {
            if *c > 0 {
                f.insert(format!("v{v}.gossip.hops.{h:02}"), *c as f64);
            }
        }
        if r.gate_failed != NEVER {
            f.insert(
                format!("v{v}.gate_failed_s"),
                (r.gate_failed - r.published) as f64 / 1e6,
            );
        }
        let rolled = (0..n).filter(|&k| r.rolled_back[k]).count();
        f.insert(format!("v{v}.rolled_back_nodes"), rolled as f64);
        f.insert(
            format!("v{v}.failed_nodes"),
            (0..n).filter(|&k| r.failed[k]).count() as f64,
        );
        let served_outside = (0..n)
            .filter(|&k| r.active[k] != NEVER && r.stage[k] as usize > 0)
            .count();
        if spec.stages.len() > 1 {
            f.insert(format!("v{v}.served_outside_canary"), served_outside as f64);
        }
        // Why nodes never completed the last release.
        if ri + 1 == sim.releases.len() {
            for &k in &receivers {
                if r.complete[k] != NEVER {
                    continue;
                }
                let NodeFacts { online, weak, .. } = facts[k];
                let reason = if sim.late[k] && !online {
                    "late joiner not yet online"
                } else if !online {
                    "offline at the end"
                } else if r.stage[k] == u8::MAX {
                    "outside the plan's stages"
                } else if weak && spec.fail_on_weak {
                    "failed on its device class"
                } else if r.gate_failed != NEVER {
                    "release failed its gate"
                } else if r.accepted[k] == NEVER {
                    "never received the manifest"
                } else {
                    "download unfinished"
                };
                *never.entry(reason.to_string()).or_insert(0u64) += 1;
            }
            let _ = m;
        }
    }
    // Gossip quality over manifests 2..10 (after the overlay formed).
    let later: Vec<_> = sim.releases.iter().skip(1).take(9).collect();
    if !later.is_empty() {
        let reds: Vec<f64> = later
            .iter()
            .filter_map(|r| f.get(&format!("v{}.gossip.redundancy", r.version)).copied())
            .collect();
        let hops: Vec<f64> = later
            .iter()
            .filter_map(|r| f.get(&format!("v{}.gossip.last_hop", r.version)).copied())
            .collect();
        if !reds.is_empty() {
            f.insert(
                "gossip_2_10.redundancy_mean".into(),
                reds.iter().sum::<f64>() / reds.len() as f64,
            );
            f.insert(
                "gossip_2_10.last_hop_max".into(),
                hops.iter().copied().fold(0.0, f64::max),
            );
        }
    }
    for s in &sites {
        f.insert(format!("sites.{}.wan_in_bytes", s.name), s.wan_in as f64);
    }
    // WAN bytes per site over the artifact bytes published.
    if sites.len() > 1 && total_bytes > 0 {
        let ratios: Vec<f64> = sites
            .iter()
            .filter(|s| !s.has_publisher)
            .map(|s| s.wan_in as f64 / total_bytes as f64)
            .collect();
        if !ratios.is_empty() {
            f.insert(
                "wan_bytes_per_site_over_artifact.mean".into(),
                ratios.iter().sum::<f64>() / ratios.len() as f64,
            );
            f.insert(
                "wan_bytes_per_site_over_artifact.max".into(),
                ratios.iter().copied().fold(0.0, f64::max),
            );
        }
    }
    let b = sim.stats.bytes;
    f.insert("bytes.lan_control".into(), b.lan_ctrl as f64);
    f.insert("bytes.lan_chunk".into(), b.lan_chunk as f64);
    f.insert("bytes.wan_control".into(), b.wan_ctrl as f64);
    f.insert("bytes.wan_chunk".into(), b.wan_chunk as f64);
    f.insert("chunks.transfers".into(), sim.stats.chunks as f64);
    if total_bytes > 0 {
        f.insert(
            "publisher_upload_over_artifact".into(),
            sim.stats.publisher_upload as f64 / total_bytes as f64,
        );
    }
    f.insert(
        "chunks.duplicates".into(),
        sim.stats.duplicate_chunks as f64,
    );
    f.insert("chunks.corrupt".into(), sim.stats.corrupt_chunks as f64);
    f.insert("chunks.cancelled".into(), sim.stats.cancelled as f64);
    f.insert("messages.control".into(), sim.stats.messages as f64);
    f.insert("messages.lost".into(), sim.stats.lost as f64);
    f.insert("penalties.disconnects".into(), sim.stats.penalties as f64);
    f.insert("equivocations_seen".into(), sim.stats.equivocations as f64);
    for (label, c) in &sim.stats.rejected {
        f.insert(format!("rejected.{label}"), *c as f64);
    }
    f.insert("events".into(), sim.stats.events as f64);
    f.insert("end_s".into(), sim.now as f64 / 1e6);
    Summary {
        scenario: sim.scenario.name.clone(),
        seeds: vec![sim.seed],
        nodes: n,
        figures: f,
        min: BTreeMap::new(),
        max: BTreeMap::new(),
        never_completed: never,
        trace_hash: sim.trace_hash(),
    }
}

/// Mean, min and max of each figure over several runs.
pub fn aggregate(runs: &[Summary]) -> Summary {
    let mut names: std::collections::BTreeSet<String> = Default::default();
    for r in runs {
        names.extend(r.figures.keys().cloned());
    }
    let mut out = runs[0].clone();
    out.seeds = runs.iter().flat_map(|r| r.seeds.clone()).collect();
    out.figures.clear();
    out.never_completed.clear();
    for name in names {
        let vals: Vec<f64> = runs
            .iter()
            .filter_map(|r| r.figures.get(&name))
            .copied()
            .collect();
        let mean = vals.iter().sum::<f64>() / vals.len() as f64;
        out.figures.insert(name.clone(), mean);
        out.min.insert(
            name.clone(),
            vals.iter().copied().fold(f64::INFINITY, f64::min),
        );
        out.max
            .insert(name, vals.iter().copied().fold(f64::NEG_INFINITY, f64::max));
    }
    for r in runs {
        for (k, v) in &r.never_completed {
            *out.never_completed.entry(k.clone()).or_default() += v;
        }
    }
    out.trace_hash = runs
        .iter()
        .map(|r| r.trace_hash.as_str())
        .collect::<Vec<_>>()
        .join(",");
    out
}

/// The figures worth a line in the table, in this order.
fn headline(name: &str) -> bool {
    name.contains("t50_s")
        || name.contains("t90_s")
        || name.contains("t99_s")
        || name.contains("t100_s")
        || name.contains("lower_bound")
        || name.contains("client_server")
        || name.contains("wan_bytes")
        || name.contains("redundancy")
        || name.contains("last_hop")
        || name.contains("gate_failed")
        || name.contains("rolled_back")
        || name.contains("failed_nodes")
        || name.contains("served_outside")
        || name.starts_with("rejected.")
        || name.starts_with("chunks.")
        || name.starts_with("publisher_upload")
        || name == "equivocations_seen"
        || name == "end_s"
}

/// The summary as a table.
pub fn table(s: &Summary) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "scenario {}  nodes {}  seeds {:?}  trace {}",
        s.scenario, s.nodes, s.seeds, s.trace_hash
    );
    let multi = !s.min.is_empty();
    if multi {
        let _ = writeln!(
            out,
            "{:<44} {:>12} {:>12} {:>12}",
            "figure", "mean", "min", "max"
        );
    } else {
        let _ = writeln!(out, "{:<44} {:>12}", "figure", "value");
    }
    for (k, v) in &s.figures {
        if !headline(k) {
            continue;
        }
        if multi {
            let _ = writeln!(
                out,
                "{k:<44} {:>12.3} {:>12.3} {:>12.3}",
                v,
                s.min.get(k).copied().unwrap_or(*v),
                s.max.get(k).copied().unwrap_or(*v)
            );
        } else {
            let _ = writeln!(out, "{k:<44} {v:>12.3}");
        }
    }
    if !s.never_completed.is_empty() {
        let _ = writeln!(out, "never completed the last release:");
        for (k, v) in &s.never_completed {
            let _ = writeln!(out, "  {v:>8}  {k}");
        }
    }
    out
}

/// Write `value` to `path` as pretty JSON with a final newline.
fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(value)? + "\n")?;
    Ok(())
}

/// Write `summary.json` (one run's figures, or the aggregate over several seeds) into `dir`.
pub fn write_summary(dir: &Path, summary: &Summary) -> Result<()> {
    write_json(&dir.join("summary.json"), summary)
}

/// Write `perf.json` (one run's wall-clock and memory figures, or a list of them, one per
/// seed) into `dir`.
pub fn write_perf(dir: &Path, perf: &impl Serialize) -> Result<()> {
    write_json(&dir.join("perf.json"), perf)
}

/// Write `timeseries.csv`, `coverage.svg` and `bytes.svg` for one run.
pub fn write_series(sim: &Sim, dir: &Path) -> Result<()> {
    let mut csv = String::from("t_s");
    for r in &sim.releases {
        for s in 0..sim.release_spec(r).stages.len() {
            let _ = write!(csv, ",v{}_stage{s}_serving_pct", r.version);
        }
        let _ = write!(csv, ",v{}_complete_pct", r.version);
    }
    csv.push_str(",lan_control_bytes,lan_chunk_bytes,wan_control_bytes,wan_chunk_bytes");
    for r in &sim.releases {
        let _ = write!(csv, ",serving_v{}", r.version);
    }
    csv.push_str(",online\n");
    let n = sim.node_count();
    let stage_sizes: Vec<Vec<usize>> = sim
        .releases
        .iter()
        .map(|r| {
            (0..sim.release_spec(r).stages.len())
                .map(|s| (0..n).filter(|&k| r.stage[k] as usize == s).count().max(1))
                .collect()
        })
        .collect();
    for row in &sim.rows {
        let _ = write!(csv, "{:.3}", row.t as f64 / 1e6);
        for (ri, per) in row.active.iter().enumerate() {
            for (s, c) in per.iter().enumerate() {
                let _ = write!(
                    csv,
                    ",{:.2}",
                    100.0 * f64::from(*c) / stage_sizes[ri][s] as f64
                );
            }
            let _ = write!(
                csv,
                ",{:.2}",
                100.0 * f64::from(row.complete[ri]) / n as f64
            );
        }
        let b = row.bytes;
        let _ = write!(
            csv,
            ",{},{},{},{}",
            b.lan_ctrl, b.lan_chunk, b.wan_ctrl, b.wan_chunk
        );
        for c in &row.serving {
            let _ = write!(csv, ",{c}");
        }
        let _ = writeln!(csv, ",{}", row.online);
    }
    std::fs::write(dir.join("timeseries.csv"), csv)?;
    // Coverage over time by stage.
    let mut lines = Vec::new();
    for (ri, r) in sim.releases.iter().enumerate() {
        for (s, size) in stage_sizes[ri].iter().enumerate() {
            let pts: Vec<(f64, f64)> = sim
                .rows
                .iter()
                .map(|row| {
                    (
                        row.t as f64 / 1e6,
                        100.0 * f64::from(row.active[ri][s]) / *size as f64,
                    )
                })
                .collect();
            lines.push((format!("v{} stage {}", r.version, s + 1), pts));
        }
    }
    std::fs::write(
        dir.join("coverage.svg"),
        svg(
            &format!("{}: nodes serving, % of stage", sim.scenario.name),
            "%",
            &lines,
            Some(100.0),
        ),
    )?;
    type Get = fn(&LinkBytes) -> u64;
    let classes: [(&str, Get); 4] = [
        ("LAN chunks", |b| b.lan_chunk),
        ("LAN control", |b| b.lan_ctrl),
        ("WAN chunks", |b| b.wan_chunk),
        ("WAN control", |b| b.wan_ctrl),
    ];
    let lines: Vec<(String, Vec<(f64, f64)>)> = classes
        .iter()
        .map(|(name, get)| {
            (
                name.to_string(),
                sim.rows
                    .iter()
                    .map(|row| {
                        (
                            row.t as f64 / 1e6,
                            get(&row.bytes) as f64 / (1u64 << 20) as f64,
                        )
                    })
                    .collect(),
            )
        })
        .collect();
    std::fs::write(
        dir.join("bytes.svg"),
        svg(
            &format!("{}: bytes per link class (cumulative)", sim.scenario.name),
            "MiB",
            &lines,
            None,
        ),
    )?;
    Ok(())
}

const COLOURS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

/// A line plot: x is seconds.
fn svg(title: &str, unit: &str, lines: &[(String, Vec<(f64, f64)>)], ymax: Option<f64>) -> String {
    let (w, h, l, r, t, b) = (760.0, 420.0, 70.0, 190.0, 40.0, 50.0);
    let xmax = lines
        .iter()
        .flat_map(|(_, p)| p.iter().map(|x| x.0))
        .fold(1e-9, f64::max);
    let ymax = ymax.unwrap_or_else(|| {
        lines
            .iter()
            .flat_map(|(_, p)| p.iter().map(|x| x.1))
            .fold(1e-9, f64::max)
            * 1.05
    });
    let px = |x: f64| l + (w - l - r) * x / xmax;
    let py = |y: f64| h - b - (h - t - b) * y / ymax;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{l}\" y=\"22\" font-size=\"14\">{}</text>\n",
        xml(title)
    );
    let _ = writeln!(
        s,
        "<line x1=\"{l}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/><line x1=\"{l}\" y1=\"{t}\" x2=\"{l}\" y2=\"{}\" stroke=\"black\"/>",
        h - b,
        w - r,
        h - b,
        h - b
    );
    for k in 0..=4 {
        let xv = xmax * f64::from(k) / 4.0;
        let yv = ymax * f64::from(k) / 4.0;
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{:.0}</text><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{:.0}</text>",
            px(xv),
            h - b + 18.0,
            xv,
            l - 6.0,
            py(yv) + 4.0,
            yv
        );
    }
    let _ = writeln!(
        s,
        "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">time (s)</text><text x=\"16\" y=\"{:.1}\" transform=\"rotate(-90 16 {:.1})\" text-anchor=\"middle\">{}</text>",
        (l + w - r) / 2.0,
        h - 12.0,
        h / 2.0,
        h / 2.0,
        xml(unit)
    );
    for (i, (name, pts)) in lines.iter().enumerate() {
        let c = COLOURS[i % COLOURS.len()];
        let path: Vec<String> = pts
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y)))
            .collect();
        let _ = writeln!(
            s,
            "<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"2\" points=\"{}\"/>",
            path.join(" ")
        );
        let ly = t + 16.0 * i as f64;
        let _ = writeln!(
            s,
            "<line x1=\"{}\" y1=\"{ly:.1}\" x2=\"{}\" y2=\"{ly:.1}\" stroke=\"{c}\" stroke-width=\"2\"/><text x=\"{}\" y=\"{:.1}\">{}</text>",
            w - r + 10.0,
            w - r + 30.0,
            w - r + 36.0,
            ly + 4.0,
            xml(name)
        );
    }
    s.push_str("</svg>\n");
    s
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// `pollen-sim compare`: figure by figure, A, B and B/A.
pub fn compare(a: &Path, b: &Path) -> Result<String> {
    let read = |p: &Path| -> Result<Summary> {
        serde_json::from_slice(
            &std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?,
        )
        .with_context(|| format!("{} is not a pollen-sim summary.json", p.display()))
    };
    let (sa, sb) = (read(a)?, read(b)?);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "A: {} ({} nodes, seeds {:?})\nB: {} ({} nodes, seeds {:?})",
        sa.scenario, sa.nodes, sa.seeds, sb.scenario, sb.nodes, sb.seeds
    );
    let _ = writeln!(out, "{:<44} {:>12} {:>12} {:>9}", "figure", "A", "B", "B/A");
    let mut names: std::collections::BTreeSet<&String> = sa.figures.keys().collect();
    names.extend(sb.figures.keys());
    for k in names {
        let (x, y) = (sa.figures.get(k), sb.figures.get(k));
        let fmt = |v: Option<&f64>| v.map_or("-".to_string(), |v| format!("{v:.3}"));
        let ratio = match (x, y) {
            (Some(x), Some(y)) if *x != 0.0 => format!("{:.3}", y / x),
            _ => "-".into(),
        };
        let mark = if x != y { " *" } else { "" };
        let _ = writeln!(
            out,
            "{k:<44} {:>12} {:>12} {ratio:>9}{mark}",
            fmt(x),
            fmt(y)
        );
    }
    Ok(out)
}
