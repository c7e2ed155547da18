//! Unit-test fixtures for the parts of the state machine: a [`Mesh`] with one tracked
//! file and hand-placed peers, so a part can be tested without running a whole mesh.

use super::Mesh;
use super::exchange::{FileState, add_availability};
use super::peers::{Haves, Peer};
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
use alloc::collections::{BTreeMap, BTreeSet};
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

/// A node on `site` tracking one wanted file of `chunks` chunks, none held yet.
pub(super) fn mesh(chunks: u32, site: Option<&str>) -> (TestMesh, ContentId) {
    let config = Config {
        site: site.map(Into::into),
        ..Config::default()
    };
    let mut m = Mesh::new(peer(0), config, ChaCha8Rng::seed_from_u64(7), at(0));
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
    m.files.insert(
        cid,
        FileState {
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
        },
    );
    (m, cid)
}

/// Connect peer `i` on `site`, holding `chunks` of `file` (counted in availability).
pub(super) fn add_peer(
    m: &mut TestMesh,
    i: u8,
    site: Option<&str>,
    file: ContentId,
    chunks: &[u32],
) {
    let total = m.files[&file].total();
    let mut bits = Bitfield::new(total);
    for c in chunks {
        bits.set(*c);
    }
    add_availability(m.files.get_mut(&file).expect("tracked"), &bits);
    let mut haves = Haves::default();
    haves.insert(file, bits);
    m.peers.insert(
        peer(i),
        Peer {
            site: site.map(Into::into),
            rtt: None,
            score: 0,
            salt: u64::from(i),
            haves,
            inflight: 0,
            refused: false,
            lazy: false,
        },
    );
}

/// Drain the outputs: the chunk requests sent, as (peer, index), in order.
pub(super) fn requests(m: &mut TestMesh) -> Vec<(NodeId, u32)> {
    let mut out = Vec::new();
    while let Some(o) = m.poll_output() {
        if let Output::Send {
            to,
            msg: Message::Request { index, .. },
        } = o
        {
            out.push((to, index));
        }
    }
    out
}
