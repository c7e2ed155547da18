//! Topology: connecting, partitioning, stopping and restarting nodes.

use super::Harness;
use crate::ids::ManifestId;
use crate::io::{Input, PeerInfo};
use crate::manifest::Channel;
use crate::state::Mesh;
use crate::state::restore::{self, Persisted};
use crate::wire::Bitfield;
use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};

impl Harness {
    /// Connect each node to `degree` random others (plus a ring, so the graph is connected).
    pub fn connect_random(&mut self, degree: usize) {
        let n = self.nodes.len();
        for i in 0..n {
            self.connect(i, (i + 1) % n);
        }
        for i in 0..n {
            let mut tries = 0;
            while self
                .edges
                .iter()
                .filter(|(a, b)| *a == i || *b == i)
                .count()
                < degree
                && tries < 10 * degree
            {
                tries += 1;
                let j = (self.rng.next_u64() % n as u64) as usize;
                self.connect(i, j);
            }
        }
    }

    /// Connect two nodes (both get `PeerUp`).
    pub fn connect(&mut self, a: usize, b: usize) {
        if a == b || !self.edges.insert((a.min(b), a.max(b))) {
            return;
        }
        if self.cut.contains(&a) || self.cut.contains(&b) {
            return;
        }
        self.peer_up(a, b);
        self.peer_up(b, a);
    }

    pub(super) fn peer_up(&mut self, a: usize, b: usize) {
        let peer = self.nodes[b].id();
        let info = PeerInfo {
            site: None,
            rtt: Some(self.link.latency * 2),
            cert: self.nodes[b].cert.clone(),
        };
        self.input(a, Input::PeerUp { peer, info });
    }

    /// Neighbours of node `i`.
    pub fn neighbours(&self, i: usize) -> Vec<usize> {
        self.edges
            .iter()
            .filter_map(|&(a, b)| {
                if a == i {
                    Some(b)
                } else if b == i {
                    Some(a)
                } else {
                    None
                }
            })
            .collect()
    }

    /// Cut node `i` off: every link goes down until [`Harness::heal`].
    pub fn partition(&mut self, i: usize) {
        if !self.cut.insert(i) {
            return;
        }
        for j in self.neighbours(i) {
            let (pi, pj) = (self.nodes[i].id(), self.nodes[j].id());
            self.input(i, Input::PeerDown { peer: pj });
            self.input(j, Input::PeerDown { peer: pi });
        }
    }

    /// Reconnect node `i`.
    pub fn heal(&mut self, i: usize) {
        if !self.cut.remove(&i) {
            return;
        }
        for j in self.neighbours(i) {
            if !self.cut.contains(&j) {
                self.peer_up(i, j);
                self.peer_up(j, i);
            }
        }
    }

    /// Stop node `i` (a process killed): it is partitioned and its timers stop; what its
    /// state machine holds now is what [`Harness::restart`] finds "on disk".
    pub fn stop(&mut self, i: usize) {
        self.partition(i);
        self.nodes[i].down = true;
    }

    /// Restart partitioned or stopped node `i`: a new state machine restores what a driver
    /// keeps on disk (trust root, retained manifests, highest versions, the active
    /// release, the latest instructions, held chunks) and nothing else; `heal` reconnects
    /// it.
    pub fn restart(&mut self, i: usize) {
        assert!(self.cut.contains(&i), "restart a partitioned node");
        self.nodes[i].down = false;
        let old = &self.nodes[i].mesh;
        let trust = old.trust_root().map(|t| t.signed.clone());
        let mut manifests = Vec::new();
        let mut instructions = Vec::new();
        let mut chunks = Vec::new();
        for (_, r) in old.releases() {
            manifests.push((r.version, r.manifest.signed.clone()));
            if let Some(s) = old.signed_instruction(&r.id()) {
                instructions.push(s.clone());
            }
            for f in r.files() {
                let (cid, total) = (f.spec.content_id, f.spec.chunk_count() as u32);
                let mut bits = Bitfield::new(total);
                for k in 0..total {
                    if old.has_chunk(&cid, k) {
                        bits.set(k);
                    }
                }
                chunks.push((cid, bits));
            }
        }
        let channels: Vec<(Channel, u64, Option<ManifestId>)> = old
            .channels()
            .map(|c| (c.clone(), old.highest(c), old.active(c).map(|a| a.1)))
            .collect();
        let persisted = Persisted {
            trust_roots: trust.into_iter().collect(),
            manifests,
            channels,
            instructions,
            chunks,
            ..Persisted::default()
        };
        let config = old.config().clone();
        let id = old.id();
        let rng = ChaCha8Rng::seed_from_u64(self.rng.next_u64());
        let now = self.clocks(i);
        self.nodes[i].mesh = Mesh::new(id, config, rng, now);
        self.nodes[i].timer_at = None;
        for cmd in restore::commands(persisted) {
            let _ = self.command(i, cmd);
        }
    }
}
