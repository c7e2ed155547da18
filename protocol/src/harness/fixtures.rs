//! Test fixtures: operator keys with a trust root, single-file manifests, random files.

use crate::chunking::FileSpec;
use crate::ids::PublicKey;
use crate::manifest::{Channel, ManifestBody};
use crate::rollout::RolloutPlan;
use crate::signing::Signed;
use crate::time::UnixTime;
use crate::trust::{ChannelPattern, Publisher, SignedTrustRoot, TrustRootBody};
use ed25519_dalek::SigningKey;
use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};

/// Operator keys and a trust root for tests.
#[derive(Debug)]
pub struct Operator {
    /// Root key.
    pub root: SigningKey,
    /// Publisher keys; the trust root lets publisher 0 and 1 sign every channel and
    /// publisher 2 only `audio.*`.
    pub publishers: Vec<SigningKey>,
    /// The trust root (signed by `root`).
    pub trust: SignedTrustRoot,
}

impl Operator {
    /// Keys from `seed`; manifests need `publish_threshold` signatures.
    pub fn new(seed: u64, publish_threshold: u8, fleet_key: Option<PublicKey>) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_0f0e_7a70);
        let mut key = || {
            let mut b = [0u8; 32];
            rng.fill_bytes(&mut b);
            SigningKey::from_bytes(&b)
        };
        let root = key();
        let publishers: Vec<SigningKey> = (0..3).map(|_| key()).collect();
        let pk = |k: &SigningKey| PublicKey::from(k);
        let body = TrustRootBody {
            publishers: publishers
                .iter()
                .enumerate()
                .map(|(i, k)| Publisher {
                    key: pk(k),
                    name: format!("publisher-{i}"),
                    channels: vec![ChannelPattern(if i < 2 {
                        "*".into()
                    } else {
                        "audio.*".into()
                    })],
                })
                .collect(),
            publish_threshold,
            fleet_key,
            ..TrustRootBody::single_publisher(
                pk(&root),
                pk(&publishers[0]),
                ChannelPattern("*".into()),
                UnixTime::from_secs(1_000),
                UnixTime::from_secs(10_000_000_000),
            )
        };
        let trust = Signed::sign(&body, &[&root]);
        Operator {
            root,
            publishers,
            trust,
        }
    }

    /// The first `n` publisher keys.
    pub fn signers(&self, n: usize) -> Vec<&SigningKey> {
        self.publishers.iter().take(n).collect()
    }
}

/// A manifest body for one file.
pub fn manifest_body(
    channel: &str,
    version: u64,
    spec: FileSpec,
    plan: RolloutPlan,
    created: UnixTime,
) -> ManifestBody {
    ManifestBody::single_file(
        Channel::new(channel).expect("valid channel"),
        version,
        spec,
        plan,
        created,
    )
}

/// A file spec of `size` seeded random bytes cut at `chunk_size`.
pub fn random_file_spec(size: usize, chunk_size: u64, seed: u64) -> FileSpec {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut data = vec![0u8; size];
    rng.fill_bytes(&mut data);
    crate::chunking::spec_for_bytes(
        &data,
        crate::chunking::ChunkSize::new(chunk_size).expect("valid chunk size"),
    )
}
