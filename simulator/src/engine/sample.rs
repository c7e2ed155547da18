//! What a run measures: counters ([`Stats`], bytes per link class in [`LinkBytes`]), the
//! time series ([`Row`], one per sample), whether every node has settled, and the facts
//! about nodes and sites the report reads ([`NodeFacts`], [`SiteFacts`]).

use super::{NEVER, Sim};
use std::collections::BTreeMap;

/// Bytes counted per link class (a count, where `units::Bytes` is a size).
#[derive(Clone, Copy, Debug, Default)]
pub struct LinkBytes {
    /// Control frames inside a site.
    pub lan_ctrl: u64,
    /// Chunk frames inside a site.
    pub lan_chunk: u64,
    /// Control frames between sites.
    pub wan_ctrl: u64,
    /// Chunk frames between sites.
    pub wan_chunk: u64,
}

/// Counters of a run.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    /// Bytes per link class.
    pub bytes: LinkBytes,
    /// Events processed.
    pub events: u64,
    /// Control messages delivered.
    pub messages: u64,
    /// Control messages lost once (and retransmitted).
    pub lost: u64,
    /// Chunk transfers completed.
    pub chunks: u64,
    /// Chunks that arrived but were no longer needed.
    pub duplicate_chunks: u64,
    /// Corrupt chunks received.
    pub corrupt_chunks: u64,
    /// Transfers cut by a cancel or a link going down.
    pub cancelled: u64,
    /// Objects rejected, by reason label.
    pub rejected: BTreeMap<String, u64>,
    /// Penalties and disconnections.
    pub penalties: u64,
    /// Equivocations detected (node-events).
    pub equivocations: u64,
    /// Peak flows in progress at once.
    pub peak_flows: usize,
    /// Chunk bytes the publisher uploaded.
    pub publisher_upload: u64,
}

/// One row of the time series.
#[derive(Clone, Debug)]
pub struct Row {
    /// Time, µs.
    pub t: u64,
    /// Per release, per stage: nodes serving it.
    pub active: Vec<Vec<u32>>,
    /// Per release: nodes holding the whole artifact.
    pub complete: Vec<u32>,
    /// Bytes so far.
    pub bytes: LinkBytes,
    /// Nodes serving each version (index: release).
    pub serving: Vec<u32>,
    /// Nodes online.
    pub online: u32,
}

/// What the report needs to know about a node.
#[derive(Clone, Copy, Debug)]
pub struct NodeFacts {
    /// Index of its site.
    pub site: u32,
    /// Online and its site powered.
    pub online: bool,
    /// A weak device.
    pub weak: bool,
    /// Misbehaves in some way.
    pub adversary: bool,
    /// Uplink capacity, bytes/s.
    pub up_bps: f64,
    /// Downlink capacity, bytes/s.
    pub down_bps: f64,
}

/// What the report needs to know about a site.
#[derive(Clone, Debug)]
pub struct SiteFacts {
    /// Its name.
    pub name: String,
    /// Bytes received over its WAN link.
    pub wan_in: u64,
    /// Bytes sent over its WAN link.
    pub wan_out: u64,
    /// WAN downlink capacity, bytes/s.
    pub wan_down_bps: f64,
    /// It holds the publisher.
    pub has_publisher: bool,
}

impl Sim {
    /// `Ev::Sample`: append a row to the time series (and move the progress bar).
    pub(super) fn sample(&mut self) {
        let n = self.nodes.len();
        let mut row = Row {
            t: self.now,
            active: Vec::new(),
            complete: Vec::new(),
            bytes: self.stats.bytes,
            serving: vec![0; self.releases.len()],
            online: self.nodes.iter().filter(|x| x.online).count() as u32,
        };
        for r in &self.releases {
            let stages = self.release_spec(r).stages.len();
            let mut per = vec![0u32; stages];
            let mut complete = 0;
            for k in 0..n {
                if r.active[k] != NEVER
                    && !r.rolled_back[k]
                    && let Some(c) = per.get_mut(r.stage[k] as usize)
                {
                    *c += 1;
                }
                if r.complete[k] != NEVER {
                    complete += 1;
                }
            }
            row.active.push(per);
            row.complete.push(complete);
        }
        for x in &self.nodes {
            if let Some(v) = x.serving
                && let Some(r) = self.release_of_version(v)
            {
                row.serving[r] += 1;
            }
        }
        self.rows.push(row);
        if let Some(b) = &self.progress {
            b.set_position(self.now / 1_000_000);
        }
    }

    /// Has every node settled: all releases published, nothing in flight, and every
    /// honest online node serving the last release (or failed on it, or out of its plan,
    /// or the release failed its gate and the node went back)?
    pub(super) fn settled(&self) -> bool {
        let sc = &self.scenario;
        let scripted = sc
            .releases
            .iter()
            .map(|r| r.at.0)
            .chain(sc.adversaries.equivocate_at.map(|d| d.0))
            .chain(sc.outages.iter().chain(&sc.partitions).map(|o| o.until.0))
            .chain(sc.late_joiners.iter().map(|l| l.at.0))
            .max()
            .unwrap_or(0);
        if self.now < scripted {
            return false;
        }
        let Some(last) = self.releases.last() else {
            return true;
        };
        if last.manifest.is_none() || self.net.active() > 0 {
            return false;
        }
        (0..self.nodes.len()).all(|k| {
            let x = &self.nodes[k];
            let honest = !x.adversary();
            !honest
                || !x.online
                || x.serving == Some(last.version)
                || last.failed[k]
                || last.stage[k] == u8::MAX
                || (last.gate_failed != NEVER && x.serving != Some(last.version))
        })
    }

    /// Facts about node `k` for the report.
    pub fn node_facts(&self, k: usize) -> NodeFacts {
        let x = &self.nodes[k];
        NodeFacts {
            site: x.site,
            online: x.online && self.sites[x.site as usize].powered,
            weak: x.weak,
            adversary: x.adversary(),
            up_bps: self.net.res[x.up as usize].cap * 1e6,
            down_bps: self.net.res[x.down as usize].cap * 1e6,
        }
    }

    /// Facts about every site for the report, by site index.
    pub fn site_facts(&self) -> Vec<SiteFacts> {
        let ps = self.nodes[self.publisher as usize].site;
        self.sites
            .iter()
            .enumerate()
            .map(|(i, s)| SiteFacts {
                name: s.name.clone(),
                wan_in: s.wan_in,
                wan_out: s.wan_out,
                wan_down_bps: self.net.res[s.wan_down as usize].cap * 1e6,
                has_publisher: i as u32 == ps,
            })
            .collect()
    }
}
