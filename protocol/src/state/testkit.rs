//! Unit-test fixtures for the parts of the state machine: a [`Bench`] holding an
//! [`Exchange`] with one tracked file and the siblings it borrows (a [`PeerTable`] of
//! hand-placed peers, timers, config, RNG, and the `VecDeque` its outputs go to), so the
//! part is driven directly; and a [`Mesh`] with the same file, for what the router does.

use super::Mesh;
use super::exchange::Haves;
use super::exchange::{Ctx, Exchange, FileState, add_availability};
use super::peers::{Peer, PeerTable};
use super::timers::TimerTable;
use crate::bitfield::Bitfield;
use crate::chunking::{ChunkSize, spec_for_bytes};
use crate::ids::Channel;
use crate::ids::{ContentId, NodeId};
use crate::io::Output;
use crate::manifest::{Manifest, ManifestBody};
use crate::rollout::RolloutPlan;
use crate::signing::Signed;
use crate::state::Config;
use crate::time::{Instant, Now, UnixTime};
use crate::wire::Message;
use alloc::collections::{BTreeMap, BTreeSet, VecDeque};
use alloc::sync::Arc;
use core::time::Duration;
use ed25519_dalek::SigningKey;
use rand_chacha::ChaCha8Rng;
use rand_core::SeedableRng;

pub(super) type TestMesh = Mesh<ChaCha8Rng>;

/// Time `ms` milliseconds after the start.
pub(super) fn at(ms: u64) -> Now {
    Now::new(
        Instant::ZERO + Duration::from_millis(ms),
        UnixTime::from_secs(1_000),
    )
}

/// Peer `i`'s id.
pub(super) fn peer(i: u8) -> NodeId {
    NodeId::from(&SigningKey::from_bytes(&[i; 32]))
}

/// A wanted file of `chunks` chunks, none held yet, and its id.
fn tracked_file(chunks: u32) -> (ContentId, FileState) {
    let data = vec![7u8; chunks as usize * 16 * 1024];
    let spec = spec_for_bytes(&data, ChunkSize::new(16 * 1024).expect("valid"));
    let cid = spec.content_id;
    let body = ManifestBody::single_file(
        Channel::new("test.model").expect("valid"),
        1,
        spec,
        RolloutPlan::immediate(),
        UnixTime::from_secs(1_000),
    );
    let key = SigningKey::from_bytes(&[200; 32]);
    let manifest = Arc::new(Manifest::decode(Signed::sign(&body, &[&key])).expect("valid"));
    let state = FileState {
        spec: manifest,
        variant: 0,
        file: 0,
        have: Bitfield::new(chunks),
        avail: vec![0; chunks as usize],
        seeds: 0,
        inflight: BTreeMap::new(),
        wanted: true,
        pending: BTreeSet::new(),
        superseed: None,
        site_held: (0, Instant::ZERO),
        wan_open: false,
        fetch_hints: Vec::new(),
        hints_until: 0,
        elsewhere: Vec::new(),
    };
    (cid, state)
}

fn config(site: Option<&str>) -> Config {
    Config {
        site: site.map(Into::into),
        ..Config::default()
    }
}

/// A node on `site` tracking one wanted file of `chunks` chunks, none held yet.
pub(super) fn mesh(chunks: u32, site: Option<&str>) -> (TestMesh, ContentId) {
    let mut m = Mesh::new(peer(0), config(site), ChaCha8Rng::seed_from_u64(7), at(0));
    let (cid, state) = tracked_file(chunks);
    m.exchange.files_mut().insert(cid, state);
    (m, cid)
}

/// An [`Exchange`] and what it borrows from its siblings, owned here so a test drives
/// the part directly and reads its outputs from `out`.
pub(super) struct Bench {
    pub(super) exchange: Exchange,
    pub(super) peers: PeerTable,
    pub(super) timers: TimerTable,
    pub(super) config: Config,
    pub(super) rng: ChaCha8Rng,
    pub(super) out: VecDeque<Output>,
}

/// An exchange on `site` tracking one wanted file of `chunks` chunks, none held yet.
pub(super) fn bench(chunks: u32, site: Option<&str>) -> (Bench, ContentId) {
    let config = config(site);
    let mut exchange = Exchange::default();
    let (cid, state) = tracked_file(chunks);
    exchange.files_mut().insert(cid, state);
    let b = Bench {
        exchange,
        peers: PeerTable::new(&config),
        timers: TimerTable::default(),
        config,
        rng: ChaCha8Rng::seed_from_u64(7),
        out: VecDeque::new(),
    };
    (b, cid)
}

impl Bench {
    /// The exchange and its borrows, as the router hands them over.
    pub(super) fn cx(&mut self) -> (&mut Exchange, Ctx<'_, ChaCha8Rng>) {
        let cx = Ctx {
            me: peer(0),
            peers: &mut self.peers,
            timers: &mut self.timers,
            config: &self.config,
            rng: &mut self.rng,
            out: &mut self.out,
        };
        (&mut self.exchange, cx)
    }

    pub(super) fn pick_chunk(&mut self, now: Now, peer: &NodeId, file: &ContentId) -> Option<u32> {
        let (x, mut cx) = self.cx();
        x.pick_chunk(&mut cx, now, peer, file)
    }

    pub(super) fn request(&mut self, now: Now, peer: NodeId, file: ContentId, index: u32) {
        let (x, mut cx) = self.cx();
        x.request(&mut cx, now, peer, file, index);
    }

    pub(super) fn schedule(&mut self, now: Now) {
        let (x, mut cx) = self.cx();
        x.schedule(&mut cx, now);
    }

    pub(super) fn schedule_one(&mut self, now: Now, peer: NodeId, file: ContentId, index: u32) {
        let (x, mut cx) = self.cx();
        x.schedule_one(&mut cx, now, peer, file, index);
    }

    pub(super) fn announce_share(&mut self, peer: NodeId, file: ContentId) {
        let (x, mut cx) = self.cx();
        x.announce_share(&mut cx, peer, file);
    }

    pub(super) fn reveal(&mut self, file: ContentId) {
        let (x, mut cx) = self.cx();
        x.reveal(&mut cx, file);
    }

    /// The next output the exchange wrote.
    pub(super) fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }
}

/// Place peer `i` on `site` in `peers`, holding `chunks` of `file` (counted in the
/// availability of `files`).
fn place_peer(
    exchange: &mut Exchange,
    peers: &mut PeerTable,
    i: u8,
    site: Option<&str>,
    file: ContentId,
    chunks: &[u32],
) {
    let total = exchange.files()[&file].total();
    let mut bits = Bitfield::new(total);
    for c in chunks {
        bits.set(*c);
    }
    add_availability(exchange.files_mut().get_mut(&file).expect("tracked"), &bits);
    let mut haves = Haves::default();
    haves.insert(file, bits);
    exchange.set_haves(peer(i), haves);
    peers.insert(
        peer(i),
        Peer {
            site: site.map(Into::into),
            same_site: false, // set by insert
            rtt: None,
            score: 0,
            scored_at: None,
            salt: u64::from(i),
            refused: false,
            digest_answered: None,
        },
    );
}

/// Connect peer `i` on `site`, holding `chunks` of `file` (counted in availability).
pub(super) fn add_peer(b: &mut Bench, i: u8, site: Option<&str>, file: ContentId, chunks: &[u32]) {
    place_peer(&mut b.exchange, &mut b.peers, i, site, file, chunks);
}

/// [`add_peer`] for a whole [`Mesh`].
pub(super) fn add_mesh_peer(
    m: &mut TestMesh,
    i: u8,
    site: Option<&str>,
    file: ContentId,
    chunks: &[u32],
) {
    place_peer(&mut m.exchange, &mut m.peers, i, site, file, chunks);
}

/// Drain the outputs: the chunk requests sent, as (peer, index), in order.
pub(super) fn requests(m: &mut Bench) -> Vec<(NodeId, u32)> {
    requests_with_ids(m)
        .into_iter()
        .map(|(to, _, index)| (to, index))
        .collect()
}

/// Drain the outputs: the chunk requests sent, as (peer, request id, index), in order.
pub(super) fn requests_with_ids(m: &mut Bench) -> Vec<(NodeId, u64, u32)> {
    let mut out = Vec::new();
    while let Some(o) = m.poll_output() {
        if let Output::Send {
            to,
            msg: Message::Request { id, index, .. },
        } = o
        {
            out.push((to, id, index));
        }
    }
    out
}
