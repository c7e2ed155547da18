//! Moving bytes: which links are up ([`Sim::refresh_links`], bans), control messages
//! (latency, loss and retransmission, delivery), chunk transfers as flows over the
//! [`Net`](crate::net::Net) model with a bounded number of upload slots per node, and the
//! byte counts per link class and per site.
//!
//! Everything a transfer changes in a node's core goes through the driver's `input`.

use super::rand::chance;
use super::world::{Edge, QueuedChunk};
use super::{Ev, PublishedFile, Sim};
use crate::net::{Flow, FlowId, Reschedule};
use pollen_protocol::io::ChunkFailure;
use pollen_protocol::wire::Message;
use pollen_protocol::{ContentId, Input, PeerInfo};
use std::time::Duration;

/// Bytes of a chunk frame besides the chunk (length prefix, kind, header).
const CHUNK_OVERHEAD: u64 = 4 + 1 + 64;
/// TCP's retransmission timeout after a lost control message.
const RTO_US: u64 = 200_000;
/// Chunk sends a node queues for an upload slot at most; more are dropped (the
/// requester's timeout asks again).
const UPLOAD_QUEUE_MAX: usize = 4096;

impl Sim {
    /// Can `a` and `b` exchange bytes now?
    pub(super) fn linked(&self, a: u32, b: u32) -> bool {
        let (na, nb) = (&self.nodes[a as usize], &self.nodes[b as usize]);
        if !na.online || !nb.online {
            return false;
        }
        let (sa, sb) = (&self.sites[na.site as usize], &self.sites[nb.site as usize]);
        if !sa.powered || !sb.powered {
            return false;
        }
        na.site == nb.site || (sa.wan_on && sb.wan_on && !sa.cut && !sb.cut)
    }

    /// One-way latency between `a` and `b`, µs.
    fn latency(&self, a: u32, b: u32) -> u64 {
        let (sa, sb) = (self.nodes[a as usize].site, self.nodes[b as usize].site);
        if sa == sb {
            self.sites[sa as usize].lan_latency
        } else {
            self.sites[sa as usize].wan_latency + self.sites[sb as usize].wan_latency
        }
    }

    /// Bring node `i`'s links in line with who can reach whom: PeerUp / PeerDown on both
    /// ends, and transfers over links that went down are cut.
    pub(super) fn refresh_links(&mut self, i: u32) {
        for k in 0..self.nodes[i as usize].adj.len() {
            let Edge {
                peer: j,
                up: was,
                banned,
            } = self.nodes[i as usize].adj[k];
            let now_up = !banned && self.linked(i, j);
            if now_up == was {
                continue;
            }
            self.set_edge(i, j, now_up);
            if now_up {
                let rtt = Duration::from_micros(2 * self.latency(i, j));
                for (x, y) in [(i, j), (j, i)] {
                    let info = PeerInfo {
                        site: Some(
                            self.sites[self.nodes[y as usize].site as usize]
                                .name
                                .clone(),
                        ),
                        rtt: Some(rtt),
                        cert: None,
                    };
                    let peer = self.nodes[y as usize].mesh.id();
                    self.input(x, Input::PeerUp { peer, info });
                }
            } else {
                self.cancel_flows_between(i, j);
                for (x, y) in [(i, j), (j, i)] {
                    let peer = self.nodes[y as usize].mesh.id();
                    self.input(x, Input::PeerDown { peer });
                }
            }
        }
    }

    /// Mark the edge `i`–`j` up or down on both ends.
    fn set_edge(&mut self, i: u32, j: u32, up: bool) {
        for (a, b) in [(i, j), (j, i)] {
            if let Some(e) = self.nodes[a as usize].adj.iter_mut().find(|e| e.peer == b) {
                e.up = up;
            }
        }
    }

    /// Cut the transfers between `i` and `j` (over `i`'s uplink or downlink).
    fn cancel_flows_between(&mut self, i: u32, j: u32) {
        for f in self.net.between(
            i,
            j,
            [self.nodes[i as usize].up, self.nodes[i as usize].down],
        ) {
            self.cancel_flow(f);
        }
    }

    /// Node `i`'s core disconnected `j`: ban the edge on both ends; if it was up, take it
    /// down, cut its transfers and tell `j`.
    pub(super) fn ban(&mut self, i: u32, j: u32) {
        for (a, b) in [(i, j), (j, i)] {
            if let Some(e) = self.nodes[a as usize].adj.iter_mut().find(|e| e.peer == b) {
                e.banned = true;
            }
        }
        let was_up = self.nodes[i as usize]
            .adj
            .iter()
            .any(|e| e.peer == j && e.up);
        if was_up {
            self.set_edge(i, j, false);
            self.cancel_flows_between(i, j);
            let me = self.nodes[i as usize].mesh.id();
            self.input(j, Input::PeerDown { peer: me });
        }
    }

    /// Neighbours node `i` is connected to now.
    pub(super) fn up_peers(&self, i: u32) -> Vec<u32> {
        self.nodes[i as usize]
            .adj
            .iter()
            .filter(|e| e.up)
            .map(|e| e.peer)
            .collect()
    }

    /// Count `bytes` sent from `from` to `to` on their link class (and on both sites' WAN
    /// counters between sites).
    fn count_bytes(&mut self, from: u32, to: u32, bytes: u64, chunk: bool) {
        let (sa, sb) = (self.nodes[from as usize].site, self.nodes[to as usize].site);
        let b = &mut self.stats.bytes;
        match (sa == sb, chunk) {
            (true, false) => b.lan_ctrl += bytes,
            (true, true) => b.lan_chunk += bytes,
            (false, false) => b.wan_ctrl += bytes,
            (false, true) => b.wan_chunk += bytes,
        }
        if sa != sb {
            self.sites[sa as usize].wan_out += bytes;
            self.sites[sb as usize].wan_in += bytes;
        }
    }

    /// Send a control message: it arrives after the link's latency plus one retransmission
    /// timeout per loss (each loss costs its bytes again). Nothing if the link is down.
    pub(super) fn send(&mut self, from: u32, to: u32, msg: Message) {
        if !self.linked(from, to) {
            return;
        }
        let len = msg.wire_len() as u64;
        self.count_bytes(from, to, len, false);
        let mut delay = self.latency(from, to);
        let site = self.nodes[from as usize].site as usize;
        let loss = self.sites[site].loss;
        while chance(&mut self.rng, loss) {
            self.stats.lost += 1;
            self.count_bytes(from, to, len, false);
            delay += RTO_US;
        }
        self.push(
            self.now + delay,
            Ev::Deliver {
                to,
                from,
                msg: Box::new(msg),
            },
        );
    }

    /// `Ev::Deliver`: hand a control message to `to`'s core if the link is still up.
    pub(super) fn deliver(&mut self, to: u32, from: u32, msg: Message) {
        if !self.linked(from, to) {
            return;
        }
        self.stats.messages += 1;
        self.cur_hop = None;
        self.note_manifest_delivery(from, &msg);
        let peer = self.nodes[from as usize].mesh.id();
        self.input(to, Input::Received { from: peer, msg });
        self.cur_hop = None;
    }

    /// Node `i`'s core sends chunk `index` of `file` to `j`: start it if an upload slot is
    /// free and nothing is on its way to `j`; else answer `Busy` if every slot is taken
    /// and `queued_uploads` sends wait; else queue it. (The node writes the chunks for
    /// one peer one after the other on its stream, up to `max_concurrent_uploads` peers at
    /// once: a receiver's requests are served in turn, not side by side.)
    pub(super) fn send_chunk(&mut self, i: u32, j: u32, req: u64, file: ContentId, index: u32) {
        let node = &mut self.nodes[i as usize];
        if node.uploads < self.upload_slots && !node.sending_to.contains(&j) {
            self.start_flow(i, j, req, file, index);
        } else if (node.uploads >= self.upload_slots
            && node.upload_queue.len() >= self.queued_uploads)
            || node.upload_queue.len() >= UPLOAD_QUEUE_MAX
        {
            // As the node does: with every upload taken and `queued_uploads` waiting, a
            // request is answered `Busy` and goes to a peer with an upload free.
            let msg = Message::Reject {
                id: req,
                reason: pollen_protocol::wire::RejectReason::Busy,
            };
            self.send(i, j, msg);
        } else {
            node.upload_queue.push_back(QueuedChunk {
                to: j,
                req,
                file,
                index,
            });
        }
    }

    /// Node `i`'s core cancels its upload `req` to `j`: dropped if it waits in the queue.
    /// One already on its way runs to its end, as on the node, whose writer cannot call
    /// back a chunk frame it started (the receiver takes it if it still needs the chunk).
    /// (Matched by the receiver too: request ids are the receiver's own.)
    pub(super) fn cancel_upload(&mut self, i: u32, j: u32, req: u64) {
        self.nodes[i as usize]
            .upload_queue
            .retain(|q| !(q.req == req && q.to == j));
    }

    /// Start the flow carrying a chunk from `from` to `to` (over both sites' WAN links
    /// between sites). Nothing if the link is down or the chunk does not exist.
    fn start_flow(&mut self, from: u32, to: u32, req: u64, file: ContentId, index: u32) {
        if !self.linked(from, to) {
            return;
        }
        let Some(&PublishedFile { size, chunk, .. }) = self.files.get(&file) else {
            return;
        };
        let start = u64::from(index) * u64::from(chunk);
        if start >= size {
            return;
        }
        let len = (size - start).min(u64::from(chunk)) + CHUNK_OVERHEAD;
        let (a, b) = (&self.nodes[from as usize], &self.nodes[to as usize]);
        let mut res = [a.up, b.down, 0, 0];
        let mut nres = 2;
        if a.site != b.site {
            res[2] = self.sites[a.site as usize].wan_up;
            res[3] = self.sites[b.site as usize].wan_down;
            nres = 4;
        }
        let flow = Flow {
            from,
            to,
            req,
            file,
            index,
            total: len as f64,
            done: 0.0,
            rate: 0.0,
            last: self.now,
            res,
            nres,
            ver: 0,
            latency: self.latency(from, to),
            corrupt: a.corrupt,
        };
        let mut out = Vec::new();
        self.net.start(self.now, flow, &mut out);
        let node = &mut self.nodes[from as usize];
        node.uploads += 1;
        node.sending_to.push(to);
        self.stats.peak_flows = self.stats.peak_flows.max(self.net.active());
        self.reschedule(out);
    }

    /// Schedule the new completion times the network model computed. A time computed
    /// before a later change to the same flow (a cancel's reschedules come after the next
    /// upload it started) is stale: it must not replace the flow's newer entry.
    fn reschedule(&mut self, out: Vec<Reschedule>) {
        for (id, ver, at) in out {
            if self.net.is_current(id, ver) {
                self.queue.set(id, at, Ev::FlowDone { id, ver });
            }
        }
    }

    /// `node`'s upload to `to` ended: start the queued sends that can go now (oldest
    /// first, each to a receiver nothing is on its way to), while slots are free; sends
    /// to peers it can no longer reach are dropped.
    fn next_upload(&mut self, node: u32, to: u32) {
        let x = &mut self.nodes[node as usize];
        x.uploads = x.uploads.saturating_sub(1);
        if let Some(p) = x.sending_to.iter().position(|&r| r == to) {
            x.sending_to.swap_remove(p);
        }
        let mut k = 0;
        while self.nodes[node as usize].uploads < self.upload_slots {
            let x = &self.nodes[node as usize];
            let Some(q) = x
                .upload_queue
                .iter()
                .skip(k)
                .position(|q| !x.sending_to.contains(&q.to))
            else {
                break;
            };
            let at = k + q;
            let q = self.nodes[node as usize]
                .upload_queue
                .remove(at)
                .expect("found above");
            if self.linked(node, q.to) {
                self.start_flow(node, q.to, q.req, q.file, q.index);
            }
            k = at;
        }
    }

    /// Cut flow `id`: the bytes it moved so far are counted.
    fn cancel_flow(&mut self, id: FlowId) {
        let mut out = Vec::new();
        if let Some(f) = self.net.finish(self.now, id, &mut out) {
            self.queue.unset(id);
            self.next_upload(f.from, f.to);
            self.stats.cancelled += 1;
            self.count_bytes(f.from, f.to, f.done as u64, true);
            if f.from == self.publisher {
                self.stats.publisher_upload += f.done as u64;
            }
        }
        self.reschedule(out);
    }

    /// `Ev::FlowDone`: the chunk arrived: the receiver's core gets it as stored, or as
    /// failed if the sender corrupts chunks. (A queued completion is always its flow's
    /// latest; the version is checked all the same.)
    pub(super) fn flow_done(&mut self, id: FlowId, ver: u32) {
        if !self.net.is_current(id, ver) {
            return;
        }
        let mut out = Vec::new();
        let Some(f) = self.net.finish(self.now, id, &mut out) else {
            return;
        };
        self.reschedule(out);
        self.next_upload(f.from, f.to);
        self.count_bytes(f.from, f.to, f.total as u64, true);
        if f.from == self.publisher {
            self.stats.publisher_upload += f.total as u64;
        }
        self.stats.chunks += 1;
        let from = self.nodes[f.from as usize].mesh.id();
        if f.corrupt {
            self.stats.corrupt_chunks += 1;
            self.input(
                f.to,
                Input::ChunkFailed {
                    from,
                    file: f.file,
                    index: f.index,
                    reason: ChunkFailure::Corrupt,
                },
            );
            return;
        }
        if !self.nodes[f.to as usize].mesh.needs_chunk(&f.file, f.index) {
            self.stats.duplicate_chunks += 1;
        }
        self.input(
            f.to,
            Input::ChunkStored {
                from: Some(from),
                file: f.file,
                index: f.index,
            },
        );
    }
}
