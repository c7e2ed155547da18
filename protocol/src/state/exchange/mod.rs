//! Chunk exchange: per-file download state, peers' availability, requests in flight.
//!
//! [`Exchange`] owns the files and the requests; each call borrows what it needs from
//! its siblings through a [`Ctx`] (the peer table, whose entries carry each peer's
//! announced chunks and request count; the timer table; the config; the RNG) and writes
//! its outputs to the queue in it. It never penalises a peer or refreshes releases
//! itself: it returns a [`Penalty`] or a "refresh" flag, and the router acts on it.

mod schedule;
mod superseed;

pub(super) use superseed::SuperSeed;

use super::Mesh;
use super::config::{Config, PENALTY_CORRUPT, PENALTY_MINOR};
use super::peers::PeerTable;
use super::timers::{Timer, TimerTable};
use crate::bitfield::Bitfield;
use crate::chunking::FileSpec;
use crate::ids::{ContentId, NodeId};
use crate::io::{ChunkFailure, Event, Output};
use crate::manifest::Manifest;
use crate::time::{Instant, Now};
use crate::wire::{Message, RejectReason};
use alloc::collections::{BTreeMap, BTreeSet, VecDeque};
use alloc::sync::Arc;
use core::time::Duration;
use rand_core::Rng;

/// The largest chunk index remembered for a file this node does not know yet (its
/// manifest is on its way): 2^16 chunks, 8 KiB of bits per file and peer.
const MAX_UNKNOWN_BITS: u32 = 1 << 16;

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
    /// What this site holds of the file (chunks here or announced by a site peer), as last
    /// counted, and since when: the WAN share rule lifts when it stops growing.
    pub(super) site_held: (u32, Instant),
    /// The WAN share rule is lifted for this file (see `Exchange::wan_owned`).
    pub(super) wan_open: bool,
    /// Per chunk, until when (seconds of [`Instant`], rounded up) a site peer said its
    /// request for it across the WAN may run, and how many such hints were honoured
    /// ([`Exchange::on_fetching`]); empty until the first hint.
    pub(super) fetch_hints: Vec<(u32, u8)>,
    /// The latest of `fetch_hints`: until then a member is fetching for the site.
    pub(super) hints_until: u32,
    /// Per chunk, until when (seconds, as `fetch_hints`) a peer on another site said it
    /// asked for it across the WAN: asked across the WAN from here only after the chunks
    /// no other site is fetching, so two sites do not pull the same chunk through one
    /// uplink at once. Empty until the first such hint.
    pub(super) elsewhere: Vec<u32>,
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
    /// A site peer said it is fetching chunk `index` across the WAN, and its request may
    /// still be running at `now`.
    pub(super) fn hinted(&self, index: u32, now: Instant) -> bool {
        self.fetch_hints
            .get(index as usize)
            .is_some_and(|(until, _)| secs(now) < *until)
    }

    /// Another site said it is fetching chunk `index` across the WAN, lately enough.
    pub(super) fn fetched_elsewhere(&self, index: u32, now: Instant) -> bool {
        self.elsewhere
            .get(index as usize)
            .is_some_and(|until| secs(now) < *until)
    }
}

/// `t` in whole seconds, for fetch hints (136 years fit).
pub(super) fn secs(t: Instant) -> u32 {
    u32::try_from(t.as_micros() / 1_000_000).unwrap_or(u32::MAX)
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

/// A peer's chunks per file: a few files per peer, so a sorted vector (a `BTreeMap` node
/// costs ~700 bytes even for one entry, per peer, per node of a large simulation).
#[derive(Debug, Default)]
pub(super) struct Haves(Vec<(ContentId, Bitfield)>);

impl Haves {
    pub(super) fn find(&self, k: &ContentId) -> Result<usize, usize> {
        self.0.binary_search_by(|(x, _)| x.cmp(k))
    }
    pub(super) fn get(&self, k: &ContentId) -> Option<&Bitfield> {
        self.find(k).ok().map(|i| &self.0[i].1)
    }
    pub(super) fn get_mut(&mut self, k: &ContentId) -> Option<&mut Bitfield> {
        self.find(k).ok().map(|i| &mut self.0[i].1)
    }
    pub(super) fn contains_key(&self, k: &ContentId) -> bool {
        self.find(k).is_ok()
    }
    pub(super) fn insert(&mut self, k: ContentId, v: Bitfield) {
        match self.find(&k) {
            Ok(i) => self.0[i].1 = v,
            Err(i) => self.0.insert(i, (k, v)),
        }
    }
    pub(super) fn remove(&mut self, k: &ContentId) -> Option<Bitfield> {
        self.find(k).ok().map(|i| self.0.remove(i).1)
    }
    pub(super) fn get_or_insert_with(
        &mut self,
        k: ContentId,
        f: impl FnOnce() -> Bitfield,
    ) -> &mut Bitfield {
        let i = match self.find(&k) {
            Ok(i) => i,
            Err(i) => {
                self.0.insert(i, (k, f()));
                i
            }
        };
        &mut self.0[i].1
    }
    pub(super) fn len(&self) -> usize {
        self.0.len()
    }
    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<'a> IntoIterator for &'a Haves {
    type Item = (&'a ContentId, &'a Bitfield);
    type IntoIter = core::iter::Map<
        core::slice::Iter<'a, (ContentId, Bitfield)>,
        fn(&'a (ContentId, Bitfield)) -> (&'a ContentId, &'a Bitfield),
    >;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(k, v)| (k, v))
    }
}

/// The chunk exchange of one node.
///
/// Contract: it owns every tracked file's download state and the chunk requests in
/// flight, and decides what to request of whom (`schedule`), what to announce
/// (`Have`/`HaveChunk`, super-seeding shares) and what to cancel. `releases` decides
/// which files exist and which are wanted. It also owns what each connected peer
/// announced and how many requests each has in flight (only for peers in the
/// [`PeerTable`]: the router calls [`Exchange::forget_peer`] when one leaves); the
/// peers' sites, RTTs and tie-break salts are read from the [`PeerTable`] through the
/// call's [`Ctx`].
#[derive(Debug)]
pub(super) struct Exchange {
    /// Download state of every file of a retained release, at most `max_files`; part
    /// `releases` says which exist ([`Exchange::track`], [`Exchange::retain_files`]) and
    /// which are wanted ([`Exchange::want`]).
    files: BTreeMap<ContentId, FileState>,
    /// The chunks each connected peer announced, per file (no entry: nothing announced).
    haves: BTreeMap<NodeId, Haves>,
    /// Our chunk requests in flight to each connected peer (no entry: none).
    asked: BTreeMap<NodeId, usize>,
    /// Chunk requests in flight, by request id.
    requests: BTreeMap<u64, Request>,
    /// The id of the next chunk request.
    next_request: u64,
    /// How fast each connected peer has been serving us (no entry: not measured yet):
    /// sizes request deadlines ([`Exchange::request_deadline`]).
    served: BTreeMap<NodeId, Service>,
    /// Peers that answered a request `Busy`, and until when they are not asked again
    /// (connected peers only: an entry leaves with its peer).
    busy: BTreeMap<NodeId, Instant>,
}

/// How fast a peer serves our chunk requests: the time a KiB of chunk took, from when it
/// could start (its request was sent, or the peer's previous chunk arrived) to its
/// arrival, smoothed over the last few chunks.
#[derive(Debug, Clone, Copy)]
pub(super) struct Service {
    /// Nanoseconds per KiB.
    pub(super) nanos_per_kib: u64,
    /// When its last chunk arrived.
    pub(super) last: Instant,
}

/// Most a measured link stretches a request's deadline, in request timeouts.
const MAX_DEADLINE_FACTOR: u32 = 10;

/// Most fetch hints honoured per chunk ([`Exchange::on_fetching`]): each holds this node's
/// own WAN request for the chunk back for at most [`MAX_DEADLINE_FACTOR`] request
/// timeouts, so a site peer that hints and never fetches delays a chunk by a bounded time.
const MAX_FETCH_HINTS: u8 = 2;

impl Default for Exchange {
    fn default() -> Self {
        Exchange {
            files: BTreeMap::new(),
            haves: BTreeMap::new(),
            asked: BTreeMap::new(),
            requests: BTreeMap::new(),
            next_request: 1,
            served: BTreeMap::new(),
            busy: BTreeMap::new(),
        }
    }
}

/// What one exchange call borrows from its siblings, and the queue its outputs go to.
pub(super) struct Ctx<'a, R> {
    /// This node.
    pub(super) me: NodeId,
    /// The peer table (announced chunks, requests in flight per peer, sites).
    pub(super) peers: &'a mut PeerTable,
    /// Request deadlines and the store back-off.
    pub(super) timers: &'a mut TimerTable,
    /// Tunables.
    pub(super) config: &'a Config,
    /// The router's RNG (chunk start, super-seeding order): the draw order is the router's.
    pub(super) rng: &'a mut R,
    /// Where outputs go, in order.
    pub(super) out: &'a mut VecDeque<Output>,
}

impl<R> Ctx<'_, R> {
    fn send(&mut self, to: NodeId, msg: Message) {
        self.out.push_back(Output::Send { to, msg });
    }
    fn emit(&mut self, e: Event) {
        self.out.push_back(Output::Event(e));
    }
}

/// A penalty the exchange asks the router to give a peer (see `Mesh::penalise`).
pub(super) type Penalty = (NodeId, u32, String);

impl Exchange {
    /// Every tracked file, by id.
    pub(super) fn files(&self) -> &BTreeMap<ContentId, FileState> {
        &self.files
    }

    /// A tracked file.
    pub(super) fn file(&self, file: &ContentId) -> Option<&FileState> {
        self.files.get(file)
    }

    /// Direct access for tests that place state by hand.
    #[cfg(test)]
    pub(super) fn files_mut(&mut self) -> &mut BTreeMap<ContentId, FileState> {
        &mut self.files
    }

    /// Track the files of release `m` that are not tracked yet, while fewer than
    /// `max_files` are: those of variant `variant` (this node's) first, then the other
    /// variants' (never fetched, since only this node's variant is ever wanted, but
    /// announced and served when the node holds them: the publisher of a release holds
    /// every variant). Each starts unwanted and empty, with the availability the peers
    /// already announced (their bitfields, remembered before the manifest arrived, are
    /// resized to the file's chunk count).
    pub(super) fn track(&mut self, m: &Arc<Manifest>, variant: usize, max_files: usize) {
        let variants = &m.body.artifact.variants;
        let order = std::iter::once(variant).chain((0..variants.len()).filter(|v| *v != variant));
        let files = order.flat_map(|v| {
            variants[v]
                .files
                .iter()
                .enumerate()
                .map(move |(fi, f)| (v, fi, f))
        });
        for (variant, fi, f) in files {
            let cid = f.spec.content_id;
            if self.files.contains_key(&cid) || self.files.len() >= max_files {
                continue;
            }
            let total = f.spec.chunk_count() as u32;
            let mut fs = FileState {
                spec: m.clone(),
                variant,
                file: fi,
                have: Bitfield::new(total),
                avail: vec![0; total as usize],
                seeds: 0,
                inflight: BTreeMap::new(),
                wanted: false,
                pending: BTreeSet::new(),
                superseed: None,
                site_held: (0, Instant::ZERO),
                wan_open: false,
                fetch_hints: Vec::new(),
                hints_until: 0,
                elsewhere: Vec::new(),
            };
            for h in self.haves.values_mut() {
                if let Some(b) = h.get_mut(&cid) {
                    if b.len() != total {
                        *b = b.resized(total);
                    }
                    add_availability(&mut fs, b);
                }
            }
            self.files.insert(cid, fs);
        }
    }

    /// Drop the state of every file not in `live` (no retained release names it).
    pub(super) fn retain_files(&mut self, live: &BTreeSet<ContentId>) {
        self.files.retain(|k, _| live.contains(k));
    }

    /// Mark `file` wanted if `want` (a file stays wanted once it is).
    /// Returns true when this made the file wanted (it was not).
    pub(super) fn want(&mut self, file: &ContentId, want: bool) -> bool {
        if let Some(f) = self.files.get_mut(file) {
            let was = f.wanted;
            f.wanted |= want;
            return !was && f.wanted;
        }
        false
    }

    /// Tell the peers on this node's site that it wants `file` (its bitfield, maybe empty):
    /// they count it among the site's members for the WAN share rule
    /// ([`Exchange::wan_members`]) before it holds any chunk.
    pub(super) fn announce_interest<R: Rng>(&mut self, cx: &mut Ctx<'_, R>, file: ContentId) {
        let Some(f) = self.files.get(&file) else {
            return;
        };
        if cx.config.site.is_none() || f.superseed.is_some() {
            return;
        }
        let chunks = f.have.clone();
        for p in cx.peers.site_peers() {
            cx.send(
                p,
                Message::Have {
                    file,
                    chunks: chunks.clone(),
                },
            );
        }
    }

    /// `peer` was dropped from the peer table without going down (refused on a
    /// reconnect): what it announced and its request count are forgotten, but, as before
    /// this part owned them, availability still counts it and its requests run until
    /// they time out.
    pub(super) fn forget_refused(&mut self, peer: &NodeId) {
        self.haves.remove(peer);
        self.asked.remove(peer);
        self.served.remove(peer);
        self.busy.remove(peer);
    }

    /// `peer` answered a request `Busy` and is not asked again before `now` plus
    /// `busy_backoff`.
    pub(super) fn backing_off(&self, peer: &NodeId, now: Instant) -> bool {
        self.busy.get(peer).is_some_and(|until| now < *until)
    }

    /// Chunk requests in flight, to all peers.
    pub(super) fn request_count(&self) -> usize {
        self.requests.len()
    }

    /// Our chunk requests in flight to `peer`.
    pub(super) fn inflight(&self, peer: &NodeId) -> usize {
        self.asked.get(peer).copied().unwrap_or(0)
    }

    /// What `peer` announced of `file`.
    pub(super) fn announced(&self, peer: &NodeId, file: &ContentId) -> Option<&Bitfield> {
        self.haves.get(peer)?.get(file)
    }

    /// Place `peer`'s announcements by hand (tests).
    #[cfg(test)]
    pub(super) fn set_haves(&mut self, peer: NodeId, haves: Haves) {
        self.haves.insert(peer, haves);
    }

    /// Does this node hold the chunk?
    pub(super) fn has_chunk(&self, file: &ContentId, index: u32) -> bool {
        self.files.get(file).is_some_and(|f| f.have.get(index))
    }

    /// `peer` is gone (already out of the peer table): its chunks leave availability, its
    /// requests and its request count are dropped.
    pub(super) fn forget_peer<R: Rng>(&mut self, cx: &mut Ctx<'_, R>, peer: NodeId) {
        if let Some(haves) = self.haves.remove(&peer) {
            for (file, bits) in &haves {
                if let Some(f) = self.files.get_mut(file) {
                    remove_availability(f, bits);
                }
            }
        }
        let ids: Vec<u64> = self
            .requests
            .iter()
            .filter(|(_, r)| r.peer == peer)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            if let Some(r) = self.requests.remove(&id) {
                cx.timers.stop_request(r.deadline, id);
                self.forget_request(cx, id, &r);
            }
        }
        self.asked.remove(&peer);
        self.served.remove(&peer);
        self.busy.remove(&peer);
    }

    /// Bytes of chunk `index` of `file` (0 for an unknown file or chunk).
    fn chunk_bytes(&self, file: &ContentId, index: u32) -> u64 {
        self.files
            .get(file)
            .and_then(|f| f.spec().chunk_len(u64::from(index)).ok())
            .unwrap_or(0)
    }

    /// `peer` served a request sent at `sent` with `bytes` arriving at `now`: fold it into
    /// its [`Service`]. The chunk could start once it was asked and the peer's previous
    /// chunk had arrived, so requests queued behind others do not count their wait.
    fn observe(&mut self, peer: NodeId, sent: Instant, now: Instant, bytes: u64) {
        let before = self.served.get(&peer).copied();
        let start = match before {
            Some(s) if s.last > sent => s.last,
            _ => sent,
        };
        let took =
            u64::try_from(now.saturating_duration_since(start).as_nanos()).unwrap_or(u64::MAX);
        let sample = took.saturating_mul(1024) / bytes.max(1);
        let nanos_per_kib = match before {
            Some(s) => (s.nanos_per_kib.saturating_mul(3).saturating_add(sample)) / 4,
            None => sample,
        };
        self.served.insert(
            peer,
            Service {
                nanos_per_kib,
                last: now,
            },
        );
    }

    /// The deadline of a request for `bytes` sent to `peer` at `now`: the configured
    /// `request_timeout`, or, where the peer was measured slower than that allows, twice
    /// the time its measured rate needs for this chunk and the ones queued before it
    /// (at most [`MAX_DEADLINE_FACTOR`] timeouts). A seed on a slow or shared uplink is
    /// then waited for, not timed out and penalised again and again.
    pub(super) fn request_deadline(
        &self,
        config: &Config,
        peer: &NodeId,
        now: Instant,
        bytes: u64,
    ) -> Instant {
        let base = config.request_timeout;
        let Some(s) = self.served.get(peer) else {
            return now + base;
        };
        let queued = self.inflight(peer) as u64 + 1;
        let nanos = s
            .nanos_per_kib
            .saturating_mul(bytes.div_ceil(1024))
            .saturating_mul(queued)
            .saturating_mul(2);
        now + base
            .max(Duration::from_nanos(nanos))
            .min(base * MAX_DEADLINE_FACTOR)
    }

    /// Service measured for `peer`, if any.
    #[cfg(test)]
    pub(super) fn service(&self, peer: &NodeId) -> Option<Service> {
        self.served.get(peer).copied()
    }

    pub(super) fn announce_files_to<R: Rng>(&mut self, cx: &mut Ctx<'_, R>, peer: NodeId) {
        // A peer on this site also hears the files this node wants and holds nothing of
        // yet (the WAN share rule's members).
        let same_site =
            cx.config.site.is_some() && cx.peers.get(&peer).is_some_and(|p| cx.peers.on_site(p));
        let list: Vec<(ContentId, Bitfield)> = self
            .files
            .iter()
            .filter(|(_, f)| {
                (f.have.count() > 0 || (same_site && f.wanted && !f.complete()))
                    && f.superseed.is_none()
            })
            .map(|(k, f)| (*k, f.have.clone()))
            .collect();
        for (file, chunks) in list {
            cx.send(peer, Message::Have { file, chunks });
        }
        let seeding: Vec<ContentId> = self
            .files
            .iter()
            .filter(|(_, f)| f.superseed.is_some())
            .map(|(k, _)| *k)
            .collect();
        for file in seeding {
            self.announce_share(cx, peer, file);
        }
    }

    pub(super) fn announce_file<R: Rng>(&mut self, cx: &mut Ctx<'_, R>, file: ContentId) {
        let Some(f) = self.files.get(&file) else {
            return;
        };
        let chunks = f.have.clone();
        let peers: Vec<NodeId> = cx.peers.ids().copied().collect();
        for p in peers {
            cx.send(
                p,
                Message::Have {
                    file,
                    chunks: chunks.clone(),
                },
            );
        }
    }

    pub(super) fn on_have<R: Rng>(
        &mut self,
        cx: &mut Ctx<'_, R>,
        from: NodeId,
        file: ContentId,
        chunks: Bitfield,
    ) -> Option<Penalty> {
        // Not connected (any more): ignore.
        if !cx.peers.contains(&from) {
            return None;
        }
        let peer = self.haves.entry(from).or_default();
        match self.files.get_mut(&file) {
            Some(f) => {
                if chunks.len() != f.total() {
                    return Some((from, PENALTY_MINOR, "bitfield of the wrong length".into()));
                }
                if let Some(old) = peer.get(&file) {
                    remove_availability(f, old);
                }
                add_availability(f, &chunks);
                peer.insert(file, chunks);
            }
            None => {
                // Remember a bounded number of files we do not know yet, each bounded as
                // tightly as announcements of single chunks are.
                if chunks.len() <= MAX_UNKNOWN_BITS
                    && (peer.contains_key(&file) || peer.len() < cx.config.max_files)
                {
                    peer.insert(file, chunks);
                }
            }
        }
        None
    }

    /// A peer says it asked a peer on another site for chunk `index` of `file`, with a
    /// request that may run `millis`. From a site peer: this node leaves the chunk to it
    /// meanwhile (a chunk crosses the site's WAN link once, also while members see
    /// different members, or after the share rule was lifted), and the rule is not lifted
    /// while such a request may run. From a peer on another site: this node asks the WAN
    /// for that chunk after the others meanwhile (the two sites would pull it through the
    /// same uplink at once). Ignored on a node without a site, from a peer whose site is
    /// unknown, for a file not wanted here, a chunk held or out of range, and from a site
    /// peer past [`MAX_FETCH_HINTS`] for the chunk; the span is capped at
    /// [`MAX_DEADLINE_FACTOR`] request timeouts. Site peers are trusted with this as with
    /// their `Have`s, and the caps bound what a lying one can hold back; a peer on another
    /// site can only move a chunk to the end of this node's WAN order.
    pub(super) fn on_fetching<R>(
        &mut self,
        cx: &Ctx<'_, R>,
        now: Instant,
        from: NodeId,
        file: ContentId,
        index: u32,
        millis: u32,
    ) {
        // Without a site of its own, a node has no share rule (and a site-less peer would
        // count as on its site).
        let Some(p) = cx.peers.get(&from) else {
            return;
        };
        if cx.config.site.is_none() {
            return;
        }
        let on_site = cx.peers.on_site(p);
        let remote = cx.peers.remote(p);
        let Some(f) = self.files.get_mut(&file) else {
            return;
        };
        if !f.wanted || index >= f.total() || f.have.get(index) || !(on_site || remote) {
            return;
        }
        let span = Duration::from_millis(u64::from(millis))
            .min(cx.config.request_timeout * MAX_DEADLINE_FACTOR);
        let end = secs(now + span).saturating_add(1);
        if remote {
            // Another site's fetch only orders this node's picks (a lying peer can delay a
            // chunk to the end of the order, not withhold it): a time per chunk, no count.
            if f.elsewhere.is_empty() {
                f.elsewhere = alloc::vec![0; f.total() as usize];
            }
            let until = &mut f.elsewhere[index as usize];
            *until = (*until).max(end);
            return;
        }
        if f.fetch_hints.is_empty() {
            f.fetch_hints = alloc::vec![(0, 0); f.total() as usize];
        }
        let (until, count) = &mut f.fetch_hints[index as usize];
        if *count >= MAX_FETCH_HINTS {
            return;
        }
        *count += 1;
        *until = (*until).max(end);
        f.hints_until = f.hints_until.max(end);
    }

    pub(super) fn on_have_chunk<R: Rng>(
        &mut self,
        cx: &mut Ctx<'_, R>,
        from: NodeId,
        file: ContentId,
        index: u32,
    ) -> Option<Penalty> {
        // Not connected (any more): ignore.
        if !cx.peers.contains(&from) {
            return None;
        }
        let peer = self.haves.entry(from).or_default();
        let Some(f) = self.files.get_mut(&file) else {
            // A file we do not know yet (its manifest is still on its way): remember the
            // bit, growing the field up to a bound, so availability is right once we do.
            if index < MAX_UNKNOWN_BITS
                && (peer.contains_key(&file) || peer.len() < cx.config.max_files)
            {
                let bits = peer.get_or_insert_with(file, Bitfield::default);
                if index >= bits.len() {
                    *bits = bits.resized(index + 1);
                }
                bits.set(index);
            }
            return None;
        };
        if index >= f.total() {
            return Some((from, PENALTY_MINOR, "chunk index out of range".into()));
        }
        let total = f.total();
        let bits = peer.get_or_insert_with(file, || Bitfield::new(total));
        if !bits.get(index) {
            let was_seed = bits.count() == bits.len();
            bits.set(index);
            f.avail[index as usize] = f.avail[index as usize].saturating_add(1);
            if !was_seed && bits.count() == bits.len() {
                f.seeds = f.seeds.saturating_add(1);
            }
        }
        None
    }

    pub(super) fn forget_request<R: Rng>(&mut self, cx: &mut Ctx<'_, R>, id: u64, r: &Request) {
        if cx.peers.contains(&r.peer)
            && let Some(n) = self.asked.get_mut(&r.peer)
        {
            *n = n.saturating_sub(1);
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
    pub(super) fn finish_requests<R: Rng>(
        &mut self,
        cx: &mut Ctx<'_, R>,
        now: Instant,
        from: Option<NodeId>,
        file: ContentId,
        index: u32,
    ) {
        let ids: Vec<u64> = self
            .files
            .get(&file)
            .and_then(|f| f.inflight.get(&index))
            .cloned()
            .unwrap_or_default();
        for id in ids {
            if let Some(r) = self.requests.remove(&id) {
                cx.timers.stop_request(r.deadline, id);
                self.forget_request(cx, id, &r);
                if Some(r.peer) != from {
                    cx.send(r.peer, Message::Cancel { id });
                } else if cx.peers.contains(&r.peer) {
                    let bytes = self.chunk_bytes(&file, index);
                    self.observe(r.peer, r.sent, now, bytes);
                }
            }
        }
    }

    /// The driver holds `chunks` of `file` (startup, or a publisher's own files). The
    /// first holder of a whole file nobody else has starts super-seeding it. On success
    /// the router refreshes the releases (what this node holds changed).
    pub(super) fn on_local_chunks<R: Rng>(
        &mut self,
        cx: &mut Ctx<'_, R>,
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
            self.start_superseed(cx, now, file);
        } else {
            self.announce_file(cx, file);
        }
        Ok(())
    }

    /// A peer asks for a chunk: the driver sends it if held, else it is refused.
    pub(super) fn on_request<R: Rng>(
        &mut self,
        cx: &mut Ctx<'_, R>,
        from: NodeId,
        id: u64,
        file: ContentId,
        index: u32,
    ) {
        if self.has_chunk(&file, index) {
            cx.out.push_back(Output::SendChunk {
                to: from,
                id,
                file,
                index,
            });
        } else {
            cx.send(
                from,
                Message::Reject {
                    id,
                    reason: RejectReason::NotFound,
                },
            );
        }
    }

    /// A peer refused our request `id`: `Busy` (its uploads are taken and others wait)
    /// frees the request and leaves the peer alone for `busy_backoff`, its chunks still
    /// counted; any other reason means it does not have the chunk after all.
    pub(super) fn on_reject<R: Rng>(
        &mut self,
        cx: &mut Ctx<'_, R>,
        now: Instant,
        from: NodeId,
        id: u64,
        reason: RejectReason,
    ) {
        if self.requests.get(&id).is_none_or(|r| r.peer != from) {
            return;
        }
        let r = self.requests.remove(&id).expect("present");
        cx.timers.stop_request(r.deadline, id);
        if reason == RejectReason::Busy {
            // It has the chunk but no upload free: ask other holders meanwhile.
            self.busy.insert(from, now + cx.config.busy_backoff);
        } else {
            // The peer does not have it after all: stop asking it for that chunk.
            if let Some(bits) = self.haves.get_mut(&from).and_then(|h| h.get_mut(&r.file)) {
                clear_bit(bits, r.index);
            }
            if let Some(f) = self.files.get_mut(&r.file)
                && let Some(a) = f.avail.get_mut(r.index as usize)
            {
                *a = a.saturating_sub(1);
            }
        }
        self.forget_request(cx, id, &r);
    }

    /// The driver received a chunk and is writing it: no more requests for it.
    pub(super) fn on_chunk_received<R: Rng>(
        &mut self,
        cx: &mut Ctx<'_, R>,
        now: Instant,
        from: NodeId,
        file: ContentId,
        index: u32,
    ) {
        self.finish_requests(cx, now, Some(from), file, index);
        if let Some(f) = self.files.get_mut(&file)
            && index < f.total()
            && !f.have.get(index)
        {
            f.pending.insert(index);
        }
    }

    /// Request `id` passed its deadline (the router pops it from the timer table):
    /// cancelled; returns its peer, which the router penalises before the next one.
    pub(super) fn timeout_request<R: Rng>(
        &mut self,
        cx: &mut Ctx<'_, R>,
        id: u64,
    ) -> Option<NodeId> {
        let req = self.requests.remove(&id)?;
        // Slower than measured, or never measured: assume the link is at least twice as
        // slow as it would have had to be (like TCP's backed-off retransmission timer).
        let bytes = self.chunk_bytes(&req.file, req.index);
        let waited = u64::try_from(req.deadline.saturating_duration_since(req.sent).as_nanos())
            .unwrap_or(u64::MAX);
        let queued = self.inflight(&req.peer).max(1) as u64;
        let floor = waited.saturating_mul(1024) / bytes.max(1) / queued;
        if cx.peers.contains(&req.peer) {
            let s = self.served.entry(req.peer).or_insert(Service {
                nanos_per_kib: 0,
                last: req.sent,
            });
            s.nanos_per_kib = s.nanos_per_kib.saturating_mul(2).max(floor);
        }
        self.forget_request(cx, id, &req);
        cx.send(req.peer, Message::Cancel { id });
        Some(req.peer)
    }

    /// Chunk `index` of `file` is stored durably: requests for it finish, peers hear
    /// `HaveChunk`. Returns true when that completed the file: the router then refreshes
    /// the releases.
    pub(super) fn on_chunk_stored<R: Rng>(
        &mut self,
        cx: &mut Ctx<'_, R>,
        now: Instant,
        from: Option<NodeId>,
        file: ContentId,
        index: u32,
    ) -> bool {
        self.finish_requests(cx, now, from, file, index);
        let Some(f) = self.files.get_mut(&file) else {
            return false;
        };
        f.pending.remove(&index);
        if index >= f.total() || f.have.get(index) {
            return false;
        }
        f.have.set(index);
        let (have, total) = (f.have.count(), f.total());
        // A peer that announced the chunk hears nothing: it will not ask for it, so what
        // others hold of it means nothing to it.
        let peers: Vec<NodeId> = cx
            .peers
            .ids()
            .filter(|p| !self.announced(p, &file).is_some_and(|b| b.get(index)))
            .copied()
            .collect();
        for p in peers {
            cx.send(p, Message::HaveChunk { file, index });
        }
        cx.emit(Event::FileProgress { file, have, total });
        if have == total {
            cx.emit(Event::FileComplete { file });
        }
        have == total
    }

    /// The driver could not store chunk `index` of `file` from `from`: its requests end;
    /// a corrupt chunk drops the peer's announcement of the file and returns a penalty
    /// for the router to give, a failing store pauses downloads for `store_retry`.
    pub(super) fn on_chunk_failed<R: Rng>(
        &mut self,
        cx: &mut Ctx<'_, R>,
        now: Now,
        from: NodeId,
        file: ContentId,
        index: u32,
        reason: ChunkFailure,
    ) -> Option<Penalty> {
        let ids: Vec<u64> = self
            .requests
            .iter()
            .filter(|(_, r)| r.peer == from && r.file == file && r.index == index)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            if let Some(r) = self.requests.remove(&id) {
                cx.timers.stop_request(r.deadline, id);
                self.forget_request(cx, id, &r);
            }
        }
        match reason {
            ChunkFailure::Corrupt => {
                // Never ask that peer for this file again.
                if let Some(bits) = self.haves.get_mut(&from).and_then(|h| h.remove(&file))
                    && let Some(f) = self.files.get_mut(&file)
                {
                    remove_availability(f, &bits);
                }
                Some((
                    from,
                    PENALTY_CORRUPT,
                    format!("corrupt chunk {index} of {}", file.short()),
                ))
            }
            ChunkFailure::Store(_) => {
                if let Some(f) = self.files.get_mut(&file) {
                    f.pending.remove(&index);
                }
                // A full or failing disk: pause downloads rather than fetch bytes that
                // cannot be kept.
                cx.timers
                    .set(Timer::StoreBackoff, now.mono + cx.config.store_retry);
                None
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
        let Some(f) = self.exchange.file(file) else {
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
        for id in self.peers.ids() {
            let b = self.exchange.announced(id, file);
            s += &format!(
                "  peer {} inflight {} count {:?} has-missing {:?}\n",
                id.short(),
                self.exchange.inflight(id),
                b.map(|b| b.count()),
                b.map(|b| missing.iter().filter(|i| b.get(**i)).count())
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use crate::bitfield::Bitfield;
    use crate::io::{ChunkFailure, Event, Output};
    use crate::state::config::{PENALTY_CORRUPT, PENALTY_MINOR};
    use crate::state::testkit::{add_peer, at, bench, peer};
    use crate::time::Instant;
    use crate::wire::Message;

    #[test]
    fn a_bitfield_of_the_wrong_length_is_a_penalty_for_the_router_and_changes_nothing() {
        let (mut b, f) = bench(4, None);
        add_peer(&mut b, 1, None, f, &[0]);
        let (x, mut cx) = b.cx();
        let penalty = x.on_have(&mut cx, peer(1), f, Bitfield::new(5));
        assert!(matches!(penalty, Some((p, PENALTY_MINOR, _)) if p == peer(1)));
        let penalty = x.on_have_chunk(&mut cx, peer(1), f, 4);
        assert!(matches!(penalty, Some((p, PENALTY_MINOR, _)) if p == peer(1)));
        assert_eq!(b.exchange.files()[&f].avail, vec![1, 0, 0, 0]);
        assert!(b.out.is_empty(), "the exchange penalises nobody itself");
    }

    #[test]
    fn announcements_update_availability_and_seeds() {
        let (mut b, f) = bench(2, None);
        add_peer(&mut b, 1, None, f, &[]);
        let (x, mut cx) = b.cx();
        assert!(x.on_have_chunk(&mut cx, peer(1), f, 0).is_none());
        assert!(
            x.on_have_chunk(&mut cx, peer(1), f, 0).is_none(),
            "twice counts once"
        );
        assert_eq!(
            (x.files[&f].avail.clone(), x.files[&f].seeds),
            (vec![1, 0], 0)
        );
        assert!(x.on_have_chunk(&mut cx, peer(1), f, 1).is_none());
        assert_eq!(x.files[&f].seeds, 1, "the last chunk makes it a seed");
        let mut all = Bitfield::new(2);
        all.set(0);
        assert!(x.on_have(&mut cx, peer(1), f, all).is_none());
        assert_eq!(
            (x.files[&f].avail.clone(), x.files[&f].seeds),
            (vec![1, 0], 0)
        );
    }

    #[test]
    fn a_timed_out_request_is_cancelled_and_its_peer_returned() {
        let (mut b, f) = bench(4, None);
        add_peer(&mut b, 1, None, f, &[0, 1]);
        b.request(at(0), peer(1), f, 0);
        b.out.clear();
        let id = b.timers.pop_due_request(at(600_000).mono).expect("armed");
        let (x, mut cx) = b.cx();
        assert_eq!(x.timeout_request(&mut cx, id), Some(peer(1)));
        assert_eq!(x.timeout_request(&mut cx, id), None, "once");
        assert!(
            matches!(b.out.pop_front(), Some(Output::Send { to, msg: Message::Cancel { id: i } }) if to == peer(1) && i == id)
        );
        assert!(b.exchange.files()[&f].inflight.is_empty());
        assert_eq!(b.exchange.inflight(&peer(1)), 0);
    }

    /// Request deadlines follow the rate measured on the link: the configured timeout until
    /// a peer is measured, or while it is fast; for a slow one twice the measured time of
    /// this chunk and those queued before it, at most ten timeouts; a timeout at least
    /// doubles the estimate. Chunks of 16 KiB here.
    #[test]
    fn request_deadlines_follow_the_rate_measured_on_the_link() {
        use core::time::Duration;
        let (mut b, f) = bench(8, None);
        add_peer(&mut b, 1, None, f, &[0, 1, 2, 3, 4, 5, 6, 7]);
        add_peer(&mut b, 2, None, f, &[0, 1, 2, 3, 4, 5, 6, 7]);
        let timeout = b.config.request_timeout;
        let bytes = b.exchange.chunk_bytes(&f, 0);
        assert_eq!(bytes, 16 * 1024);
        let deadline = |b: &super::super::testkit::Bench, p: u8, ms: u64| {
            let t = b
                .exchange
                .request_deadline(&b.config, &peer(p), at(ms).mono, bytes);
            t.saturating_duration_since(at(ms).mono)
        };
        assert_eq!(deadline(&b, 1, 0), timeout, "not measured yet");
        // Two chunks asked at once arrive 10 s and 20 s later: 10 s each, the second
        // counted from the first's arrival.
        b.request(at(0), peer(1), f, 0);
        b.request(at(0), peer(1), f, 1);
        let (x, mut cx) = b.cx();
        x.on_chunk_received(&mut cx, at(10_000).mono, peer(1), f, 0);
        x.on_chunk_received(&mut cx, at(20_000).mono, peer(1), f, 1);
        let per_kib = b
            .exchange
            .service(&peer(1))
            .expect("measured")
            .nanos_per_kib;
        assert_eq!(per_kib, 10_000_000_000 / 16);
        assert_eq!(
            deadline(&b, 1, 20_000),
            timeout,
            "2 x 10 s is under the timeout"
        );
        // One chunk in flight ahead: 2 x (1 + 1) x 10 s.
        b.request(at(20_000), peer(1), f, 2);
        assert_eq!(deadline(&b, 1, 20_000), Duration::from_secs(40));
        // That request (sent with nothing ahead: the 30 s timeout) times out: the estimate
        // becomes at least double, and at least the 30 s the chunk was waited for.
        let id = b.timers.pop_due_request(at(600_000).mono).expect("armed");
        let (x, mut cx) = b.cx();
        assert_eq!(x.timeout_request(&mut cx, id), Some(peer(1)));
        let after = b.exchange.service(&peer(1)).unwrap().nanos_per_kib;
        assert_eq!(after, (2 * per_kib).max(30_000_000_000 / 16));
        assert_eq!(deadline(&b, 1, 60_000), Duration::from_secs(60));
        for _ in 0..4 {
            b.request(at(60_000), peer(1), f, 3);
            let id = b
                .timers
                .pop_due_request(at(10_000_000).mono)
                .expect("armed");
            let (x, mut cx) = b.cx();
            x.timeout_request(&mut cx, id);
        }
        assert_eq!(deadline(&b, 1, 60_000), timeout * 10, "capped");
        // A fast peer keeps the configured timeout.
        b.request(at(0), peer(2), f, 4);
        let (x, mut cx) = b.cx();
        x.on_chunk_received(&mut cx, at(10).mono, peer(2), f, 4);
        assert_eq!(deadline(&b, 2, 10), timeout);
    }

    #[test]
    fn a_gone_peer_leaves_availability_and_its_requests() {
        let (mut b, f) = bench(4, None);
        add_peer(&mut b, 1, None, f, &[0, 1]);
        add_peer(&mut b, 2, None, f, &[1]);
        b.request(at(0), peer(1), f, 0);
        b.request(at(0), peer(2), f, 1);
        b.peers.remove(&peer(1)).expect("connected");
        let (x, mut cx) = b.cx();
        x.forget_peer(&mut cx, peer(1));
        assert_eq!(x.files[&f].avail, vec![0, 1, 0, 0]);
        assert_eq!(x.requests.len(), 1);
        assert_eq!(
            x.files[&f].inflight.keys().copied().collect::<Vec<_>>(),
            [1]
        );
        let due = b.timers.pop_due_request(at(600_000).mono);
        assert_eq!(due.map(|id| b.exchange.requests[&id].peer), Some(peer(2)));
        assert!(
            b.timers.pop_due_request(at(600_000).mono).is_none(),
            "timer stopped"
        );
    }

    #[test]
    fn a_stored_chunk_is_announced_only_to_peers_that_did_not_announce_it() {
        let (mut b, f) = bench(4, None);
        add_peer(&mut b, 1, None, f, &[0, 1, 2, 3]);
        add_peer(&mut b, 2, None, f, &[2]);
        add_peer(&mut b, 3, None, f, &[]);
        let (x, mut cx) = b.cx();
        x.on_chunk_stored(&mut cx, Instant::ZERO, None, f, 2);
        x.on_chunk_stored(&mut cx, Instant::ZERO, None, f, 1);
        let told: Vec<(crate::ids::NodeId, u32)> = b
            .out
            .drain(..)
            .filter_map(|o| match o {
                Output::Send {
                    to,
                    msg: Message::HaveChunk { index, .. },
                } => Some((to, index)),
                _ => None,
            })
            .collect();
        assert_eq!(told, [(peer(3), 2), (peer(2), 1), (peer(3), 1)]);
    }

    #[test]
    fn a_stored_chunk_finishes_its_requests_and_the_last_one_asks_for_a_refresh() {
        let (mut b, f) = bench(2, None);
        add_peer(&mut b, 1, None, f, &[0, 1]);
        add_peer(&mut b, 2, None, f, &[0, 1]);
        b.request(at(0), peer(1), f, 0);
        b.request(at(0), peer(2), f, 0);
        b.out.clear();
        let (x, mut cx) = b.cx();
        assert!(!x.on_chunk_stored(&mut cx, Instant::ZERO, Some(peer(1)), f, 0));
        assert!(x.requests.is_empty());
        assert!(
            !x.on_chunk_stored(&mut cx, Instant::ZERO, None, f, 0),
            "a second time: nothing"
        );
        assert!(
            x.on_chunk_stored(&mut cx, Instant::ZERO, None, f, 1),
            "complete: refresh"
        );
        let out: Vec<Output> = b.out.drain(..).collect();
        assert!(
            matches!(&out[0], Output::Send { to, msg: Message::Cancel { .. } } if *to == peer(2)),
            "the duplicate is cancelled, the sender is not"
        );
        let progress = out
            .iter()
            .filter(|o| matches!(o, Output::Event(Event::FileProgress { .. })))
            .count();
        assert_eq!(progress, 2);
        assert!(matches!(
            out.last(),
            Some(Output::Event(Event::FileComplete { .. }))
        ));
    }

    #[test]
    fn a_corrupt_chunk_drops_the_peers_announcement_and_returns_a_penalty() {
        let (mut b, f) = bench(2, None);
        add_peer(&mut b, 1, None, f, &[0, 1]);
        b.request(at(0), peer(1), f, 0);
        let (x, mut cx) = b.cx();
        let penalty = x.on_chunk_failed(&mut cx, at(1), peer(1), f, 0, ChunkFailure::Corrupt);
        assert!(matches!(penalty, Some((p, PENALTY_CORRUPT, _)) if p == peer(1)));
        assert!(x.requests.is_empty());
        assert_eq!(
            (x.files[&f].avail.clone(), x.files[&f].seeds),
            (vec![0, 0], 0)
        );
        assert!(b.exchange.announced(&peer(1), &f).is_none());
    }

    #[test]
    fn releases_decide_which_files_exist_and_which_are_wanted() {
        let (mut b, f) = bench(2, None);
        b.exchange.files_mut().get_mut(&f).unwrap().wanted = false;
        b.exchange.want(&f, true);
        b.exchange.want(&f, false);
        assert!(b.exchange.files()[&f].wanted, "wanted stays wanted");
        b.exchange.retain_files(&[f].into_iter().collect());
        assert!(b.exchange.file(&f).is_some());
        b.exchange.retain_files(&Default::default());
        assert!(b.exchange.files().is_empty(), "no live release names it");
    }

    /// Review H6: a peer announcing files we do not know yet is held to
    /// `MAX_UNKNOWN_BITS` bits per file and `max_files` files, whether it announces whole
    /// bitfields or single chunks.
    #[test]
    fn announcements_of_unknown_files_are_bounded() {
        use crate::ids::ContentId;
        let (mut b, f) = bench(2, None);
        add_peer(&mut b, 1, None, f, &[0]);
        let max_files = b.config.max_files;
        let (x, mut cx) = b.cx();
        let unknown = |i: u32| ContentId(*blake3::hash(&i.to_be_bytes()).as_bytes());
        assert!(
            x.on_have(
                &mut cx,
                peer(1),
                unknown(0),
                Bitfield::new(super::MAX_UNKNOWN_BITS + 1)
            )
            .is_none()
        );
        assert!(
            x.announced(&peer(1), &unknown(0)).is_none(),
            "an oversized field is dropped"
        );
        assert!(
            x.on_have_chunk(&mut cx, peer(1), unknown(0), super::MAX_UNKNOWN_BITS)
                .is_none()
        );
        assert!(
            x.announced(&peer(1), &unknown(0)).is_none(),
            "so is a bit past the bound"
        );
        x.on_have(
            &mut cx,
            peer(1),
            unknown(1),
            Bitfield::new(super::MAX_UNKNOWN_BITS),
        );
        assert!(
            x.announced(&peer(1), &unknown(1)).is_some(),
            "at the bound: kept"
        );
        // One known file is held already; fill the rest of the table.
        for i in 2..(max_files as u32 + 5) {
            x.on_have(&mut cx, peer(1), unknown(i), Bitfield::new(8));
        }
        let held = (0..(max_files as u32 + 5))
            .filter(|i| x.announced(&peer(1), &unknown(*i)).is_some())
            .count();
        assert_eq!(held + 1, max_files, "at most max_files files per peer");
        let mut bits = Bitfield::new(8);
        bits.set(3);
        x.on_have(&mut cx, peer(1), unknown(1), bits.clone());
        assert_eq!(
            x.announced(&peer(1), &unknown(1)),
            Some(&bits),
            "a held file is still updated"
        );
    }

    #[test]
    fn announcements_are_kept_per_connected_peer_only() {
        let (mut b, f) = bench(2, None);
        add_peer(&mut b, 1, None, f, &[0]);
        let (x, mut cx) = b.cx();
        assert!(x.on_have_chunk(&mut cx, peer(7), f, 1).is_none());
        assert!(
            x.announced(&peer(7), &f).is_none(),
            "not connected: ignored"
        );
        assert_eq!(x.files()[&f].avail, vec![1, 0]);
        x.forget_refused(&peer(1));
        assert!(x.announced(&peer(1), &f).is_none());
        assert_eq!(
            x.files()[&f].avail,
            vec![1, 0],
            "a refused reconnect keeps its count, as before"
        );
    }
}
