//! Chunk exchange: per-file download state, peers' availability, requests in flight.

mod schedule;
mod superseed;

pub(super) use superseed::SuperSeed;

use super::Mesh;
use super::config::{PENALTY_CORRUPT, PENALTY_MINOR, PENALTY_TIMEOUT};
use super::timers::Timer;
use crate::bitfield::Bitfield;
use crate::chunking::FileSpec;
use crate::ids::{ContentId, NodeId};
use crate::io::{ChunkFailure, Event, Output};
use crate::manifest::Manifest;
use crate::time::{Instant, Now};
use crate::wire::{Message, RejectReason};
use alloc::collections::{BTreeMap, BTreeSet};
use alloc::sync::Arc;
use rand_core::Rng;

/// A file of a retained release: what this node holds and who else holds what.
#[derive(Debug)]
pub(super) struct FileState {
    /// The manifest that named it first (its spec is `variants[variant].files[file]`).
    pub(super) spec: Arc<Manifest>,
    /// Index of the variant in that manifest's artifact.
    pub(super) variant: usize,
    /// Index of the file in that variant.
    pub(super) file: usize,
    /// Chunks stored durably here.
    pub(super) have: Bitfield,
    /// Peers holding each chunk.
    pub(super) avail: Vec<u16>,
    /// Peers holding the whole file.
    pub(super) seeds: u16,
    /// Request ids in flight per chunk.
    pub(super) inflight: BTreeMap<u32, Vec<u64>>,
    /// Download it (a release this node serves or prefetches); set by `releases`.
    pub(super) wanted: bool,
    /// Received and written, waiting for the sync that makes them durable.
    pub(super) pending: BTreeSet<u32>,
    /// Initial seeding of a file nobody else has (see [`SuperSeed`]).
    pub(super) superseed: Option<SuperSeed>,
}

impl FileState {
    pub(super) fn spec(&self) -> &FileSpec {
        &self.spec.body.artifact.variants[self.variant].files[self.file].spec
    }
    pub(super) fn total(&self) -> u32 {
        self.have.len()
    }
    pub(super) fn complete(&self) -> bool {
        self.have.count() == self.have.len()
    }
}

/// A chunk request in flight: chunk `index` of `file`, asked of `peer`.
#[derive(Debug)]
pub(super) struct Request {
    pub(super) peer: NodeId,
    pub(super) file: ContentId,
    pub(super) index: u32,
    /// When it was sent (the endgame duplicates old requests).
    pub(super) sent: Instant,
    /// When it times out (armed in the timer table).
    pub(super) deadline: Instant,
}

impl<R: Rng> Mesh<R> {
    // ----- chunk exchange --------------------------------------------------------------

    pub(super) fn announce_files_to(&mut self, peer: NodeId) {
        let list: Vec<(ContentId, Bitfield)> = self
            .files
            .iter()
            .filter(|(_, f)| f.have.count() > 0 && f.superseed.is_none())
            .map(|(k, f)| (*k, f.have.clone()))
            .collect();
        for (file, chunks) in list {
            self.send(peer, Message::Have { file, chunks });
        }
        let seeding: Vec<ContentId> = self
            .files
            .iter()
            .filter(|(_, f)| f.superseed.is_some())
            .map(|(k, _)| *k)
            .collect();
        for file in seeding {
            self.announce_share(peer, file);
        }
    }

    pub(super) fn announce_file(&mut self, file: ContentId) {
        let Some(f) = self.files.get(&file) else {
            return;
        };
        let chunks = f.have.clone();
        let peers: Vec<NodeId> = self.peers.ids().copied().collect();
        for p in peers {
            self.send(
                p,
                Message::Have {
                    file,
                    chunks: chunks.clone(),
                },
            );
        }
    }

    pub(super) fn on_have(&mut self, from: NodeId, file: ContentId, chunks: Bitfield) {
        let Some(peer) = self.peers.get_mut(&from) else {
            return;
        };
        match self.files.get_mut(&file) {
            Some(f) => {
                if chunks.len() != f.total() {
                    self.penalise(from, PENALTY_MINOR, "bitfield of the wrong length".into());
                    return;
                }
                if let Some(old) = peer.haves.get(&file) {
                    remove_availability(f, old);
                }
                add_availability(f, &chunks);
                peer.haves.insert(file, chunks);
            }
            None => {
                // Remember a bounded number of files we do not know yet.
                if peer.haves.len() < self.config.max_files {
                    peer.haves.insert(file, chunks);
                }
            }
        }
    }

    pub(super) fn on_have_chunk(&mut self, from: NodeId, file: ContentId, index: u32) {
        let Some(peer) = self.peers.get_mut(&from) else {
            return;
        };
        let Some(f) = self.files.get_mut(&file) else {
            // A file we do not know yet (its manifest is still on its way): remember the
            // bit, growing the field up to a bound, so availability is right once we do.
            const MAX_UNKNOWN_BITS: u32 = 1 << 16;
            if index < MAX_UNKNOWN_BITS
                && (peer.haves.contains_key(&file) || peer.haves.len() < self.config.max_files)
            {
                let bits = peer.haves.get_or_insert_with(file, Bitfield::default);
                if index >= bits.len() {
                    *bits = bits.resized(index + 1);
                }
                bits.set(index);
            }
            return;
        };
        if index >= f.total() {
            self.penalise(from, PENALTY_MINOR, "chunk index out of range".into());
            return;
        }
        let total = f.total();
        let bits = peer.haves.get_or_insert_with(file, || Bitfield::new(total));
        if !bits.get(index) {
            let was_seed = bits.count() == bits.len();
            bits.set(index);
            f.avail[index as usize] = f.avail[index as usize].saturating_add(1);
            if !was_seed && bits.count() == bits.len() {
                f.seeds = f.seeds.saturating_add(1);
            }
        }
    }

    pub(super) fn forget_request(&mut self, id: u64, r: &Request) {
        if let Some(p) = self.peers.get_mut(&r.peer) {
            p.inflight = p.inflight.saturating_sub(1);
        }
        if let Some(f) = self.files.get_mut(&r.file)
            && let Some(list) = f.inflight.get_mut(&r.index)
        {
            list.retain(|x| *x != id);
            if list.is_empty() {
                f.inflight.remove(&r.index);
            }
        }
    }

    /// Clear every request for this chunk; cancel the ones still running elsewhere.
    pub(super) fn finish_requests(&mut self, from: Option<NodeId>, file: ContentId, index: u32) {
        let ids: Vec<u64> = self
            .files
            .get(&file)
            .and_then(|f| f.inflight.get(&index))
            .cloned()
            .unwrap_or_default();
        for id in ids {
            if let Some(r) = self.requests.remove(&id) {
                self.timers.stop_request(r.deadline, id);
                self.forget_request(id, &r);
                if Some(r.peer) != from {
                    self.send(r.peer, Message::Cancel { id });
                }
            }
        }
    }

    /// The driver holds `chunks` of `file` (startup, or a publisher's own files). The
    /// first holder of a whole file nobody else has starts super-seeding it.
    pub(super) fn on_local_chunks(
        &mut self,
        now: Now,
        file: ContentId,
        chunks: Bitfield,
    ) -> Result<(), String> {
        let Some(f) = self.files.get_mut(&file) else {
            return Err(format!(
                "file {} is not in any retained manifest",
                file.short()
            ));
        };
        if chunks.len() != f.total() || !chunks.is_valid() {
            return Err("bitfield length does not match the file".into());
        }
        let was_complete = f.complete();
        for i in 0..chunks.len() {
            if chunks.get(i) {
                f.have.set(i);
            }
        }
        // Nobody we know has any of it: we are its first seed.
        if !was_complete && f.complete() && f.total() > 1 && f.avail.iter().all(|a| *a == 0) {
            self.start_superseed(now, file);
        } else {
            self.announce_file(file);
        }
        self.refresh_all(now);
        Ok(())
    }

    /// A peer asks for a chunk: the driver sends it if held, else it is refused.
    pub(super) fn on_request(&mut self, from: NodeId, id: u64, file: ContentId, index: u32) {
        if self.has_chunk(&file, index) {
            self.outputs.push_back(Output::SendChunk {
                to: from,
                id,
                file,
                index,
            });
        } else {
            self.send(
                from,
                Message::Reject {
                    id,
                    reason: RejectReason::NotFound,
                },
            );
        }
    }

    /// A peer refused our request `id`.
    pub(super) fn on_reject(&mut self, from: NodeId, id: u64) {
        if let Some(r) = self.requests.get(&id)
            && r.peer == from
        {
            let r = self.requests.remove(&id).expect("present");
            self.timers.stop_request(r.deadline, id);
            // The peer does not have it after all: stop asking it for that chunk.
            if let Some(p) = self.peers.get_mut(&from)
                && let Some(bits) = p.haves.get_mut(&r.file)
            {
                clear_bit(bits, r.index);
            }
            if let Some(f) = self.files.get_mut(&r.file)
                && let Some(a) = f.avail.get_mut(r.index as usize)
            {
                *a = a.saturating_sub(1);
            }
            self.forget_request(id, &r);
        }
    }

    /// The driver received a chunk and is writing it: no more requests for it.
    pub(super) fn on_chunk_received(&mut self, from: NodeId, file: ContentId, index: u32) {
        self.finish_requests(Some(from), file, index);
        if let Some(f) = self.files.get_mut(&file)
            && index < f.total()
            && !f.have.get(index)
        {
            f.pending.insert(index);
        }
    }

    /// Requests past their deadline: cancelled, and their peer penalised.
    pub(super) fn on_request_timeouts(&mut self, now: Now) {
        while let Some(id) = self.timers.pop_due_request(now.mono) {
            if let Some(req) = self.requests.remove(&id) {
                self.forget_request(id, &req);
                self.send(req.peer, Message::Cancel { id });
                self.penalise(req.peer, PENALTY_TIMEOUT, "chunk request timed out".into());
            }
        }
    }

    pub(super) fn on_chunk_stored(
        &mut self,
        now: Now,
        from: Option<NodeId>,
        file: ContentId,
        index: u32,
    ) {
        self.finish_requests(from, file, index);
        let Some(f) = self.files.get_mut(&file) else {
            return;
        };
        f.pending.remove(&index);
        if index >= f.total() || f.have.get(index) {
            return;
        }
        f.have.set(index);
        let (have, total) = (f.have.count(), f.total());
        let peers: Vec<NodeId> = self.peers.ids().copied().collect();
        for p in peers {
            self.send(p, Message::HaveChunk { file, index });
        }
        self.emit(Event::FileProgress { file, have, total });
        if have == total {
            self.emit(Event::FileComplete { file });
            self.refresh_all(now);
        }
    }

    pub(super) fn on_chunk_failed(
        &mut self,
        now: Now,
        from: NodeId,
        file: ContentId,
        index: u32,
        reason: ChunkFailure,
    ) {
        let ids: Vec<u64> = self
            .requests
            .iter()
            .filter(|(_, r)| r.peer == from && r.file == file && r.index == index)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            if let Some(r) = self.requests.remove(&id) {
                self.timers.stop_request(r.deadline, id);
                self.forget_request(id, &r);
            }
        }
        match reason {
            ChunkFailure::Corrupt => {
                // Never ask that peer for this file again.
                if let Some(p) = self.peers.get_mut(&from)
                    && let Some(bits) = p.haves.remove(&file)
                    && let Some(f) = self.files.get_mut(&file)
                {
                    remove_availability(f, &bits);
                }
                self.penalise(
                    from,
                    PENALTY_CORRUPT,
                    format!("corrupt chunk {index} of {}", file.short()),
                );
            }
            ChunkFailure::Store(_) => {
                if let Some(f) = self.files.get_mut(&file) {
                    f.pending.remove(&index);
                }
                // A full or failing disk: pause downloads rather than fetch bytes that
                // cannot be kept.
                self.timers
                    .set(Timer::StoreBackoff, now.mono + self.config.store_retry);
            }
        }
    }
}

fn clear_bit(bits: &mut Bitfield, i: u32) {
    if bits.get(i) {
        let mut fresh = Bitfield::new(bits.len());
        for j in 0..bits.len() {
            if j != i && bits.get(j) {
                fresh.set(j);
            }
        }
        *bits = fresh;
    }
}

pub(super) fn add_availability(f: &mut FileState, bits: &Bitfield) {
    if bits.len() != f.total() {
        return;
    }
    for i in 0..bits.len() {
        if bits.get(i) {
            f.avail[i as usize] = f.avail[i as usize].saturating_add(1);
        }
    }
    if bits.count() == bits.len() {
        f.seeds = f.seeds.saturating_add(1);
    }
}

pub(super) fn remove_availability(f: &mut FileState, bits: &Bitfield) {
    if bits.len() != f.total() {
        return;
    }
    for i in 0..bits.len() {
        if bits.get(i) {
            f.avail[i as usize] = f.avail[i as usize].saturating_sub(1);
        }
    }
    if bits.count() == bits.len() {
        f.seeds = f.seeds.saturating_sub(1);
    }
}

impl<R: Rng> Mesh<R> {
    /// Debug dump of the exchange state of one file (tests).
    #[doc(hidden)]
    pub fn debug_file(&self, file: &ContentId) -> String {
        let Some(f) = self.files.get(file) else {
            return "unknown file".into();
        };
        let missing: Vec<u32> = (0..f.total()).filter(|i| !f.have.get(*i)).collect();
        let mut s = format!(
            "wanted {} have {}/{} seeds {} missing {:?} inflight {:?}\n",
            f.wanted,
            f.have.count(),
            f.total(),
            f.seeds,
            missing,
            f.inflight
        );
        for i in &missing {
            s += &format!("  avail[{i}]={}\n", f.avail[*i as usize]);
        }
        for (id, p) in self.peers.iter() {
            let b = p.haves.get(file);
            s += &format!(
                "  peer {} inflight {} count {:?} has-missing {:?}\n",
                id.short(),
                p.inflight,
                b.map(|b| b.count()),
                b.map(|b| missing.iter().filter(|i| b.get(**i)).count())
            );
        }
        s
    }
}
