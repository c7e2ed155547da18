//! Signed objects, trust roots and manifests: canonical encoding, domains, thresholds,
//! rotation, certificates, and the size of a large manifest.

use core::time::Duration;
use pollen_protocol::chunking::{ChunkSize, FileSpec, root_from_chaining_values};
use pollen_protocol::ids::{ContentId, NodeId, PublicKey};
use pollen_protocol::manifest::{Channel, Manifest, ManifestBody};
use pollen_protocol::rollout::RolloutPlan;
use pollen_protocol::signing::{Domain, Signed, SignedError, signing_message, verify};
use pollen_protocol::trust::{
    ChannelPattern, NodeCertBody, Publisher, TrustError, TrustRoot, TrustRootBody,
};
use pollen_protocol::wire::{MAX_CONTROL_FRAME, Message};
use pollen_protocol::{SigningKey, UnixTime};

const NOW: UnixTime = UnixTime::from_secs(1_700_000_000);

fn key(i: u8) -> SigningKey {
    SigningKey::from_bytes(&[i; 32])
}

fn pk(k: &SigningKey) -> PublicKey {
    PublicKey::from(k)
}

fn root_body(
    version: u64,
    roots: &[&SigningKey],
    threshold: u8,
    publishers: &[(&SigningKey, &str)],
) -> TrustRootBody {
    TrustRootBody {
        version,
        created: NOW.minus(Duration::from_secs(60)),
        expires: NOW.plus(Duration::from_secs(365 * 86400)),
        root_keys: roots.iter().map(|k| pk(k)).collect(),
        root_threshold: threshold,
        publishers: publishers
            .iter()
            .map(|(k, p)| Publisher {
                key: pk(k),
                name: "p".into(),
                channels: vec![ChannelPattern(p.to_string())],
            })
            .collect(),
        publish_threshold: 1,
        fleet_key: None,
    }
}

fn body(channel: &str, version: u64, cvs: usize) -> ManifestBody {
    let chaining_values: Vec<[u8; 32]> = (0..cvs)
        .map(|i| *blake3::hash(&(i as u64).to_le_bytes()).as_bytes())
        .collect();
    let content_id = root_from_chaining_values(&chaining_values).unwrap();
    let spec = FileSpec {
        content_id,
        size: cvs as u64 * (1 << 20),
        chunk_size: ChunkSize::DEFAULT,
        chaining_values,
    };
    ManifestBody {
        expires: NOW.plus(Duration::from_secs(86400)),
        ..ManifestBody::single_file(
            Channel::new(channel).unwrap(),
            version,
            spec,
            RolloutPlan::percent(&[5.0, 25.0, 100.0], Duration::from_secs(600), None),
            NOW,
        )
    }
}

#[test]
fn manifest_for_1_gib_at_1_mib_chunks_fits_a_control_frame() {
    let m = Signed::sign(&body("vision.defects", 1, 1024), &[&key(1)]);
    let bytes = m.to_bytes();
    let frame = Message::Manifest(m).encode().len();
    eprintln!(
        "1 GiB single-file manifest: {} bytes signed envelope, {} bytes as a frame",
        bytes.len(),
        frame
    );
    assert!(frame < 40 * 1024, "1 GiB manifest is {frame} bytes");
    // The largest artifact at 1 MiB chunks whose manifest fits the 1 MiB frame cap.
    let big = Signed::sign(&body("vision.defects", 1, 32_000), &[&key(1)]);
    assert!(Message::Manifest(big).encode().len() <= MAX_CONTROL_FRAME);
}

#[test]
fn domains_separate_kinds() {
    let k = key(1);
    let m = Signed::sign(&body("vision.defects", 1, 4), &[&k]);
    let sig = &m.signatures()[0];
    assert!(verify(
        &sig.key,
        &signing_message(Domain::Manifest, m.body_bytes()),
        &sig.sig
    ));
    for d in [
        Domain::TrustRoot,
        Domain::RolloutInstruction,
        Domain::HealthReport,
        Domain::NodeCertificate,
    ] {
        assert!(
            !verify(&sig.key, &signing_message(d, m.body_bytes()), &sig.sig),
            "{d:?}"
        );
    }
}

#[test]
fn non_canonical_bodies_are_rejected() {
    let k = key(1);
    let m = Signed::sign(&body("vision.defects", 1, 4), &[&k]);
    let mut b = m.body_bytes().to_vec();
    b.push(0);
    let padded: Signed<ManifestBody> = Signed::from_parts(b, m.signatures().to_vec());
    assert_eq!(padded.decode_body().unwrap_err(), SignedError::NonCanonical);
    // Envelope bytes with trailing garbage.
    let mut env = m.to_bytes();
    env.push(1);
    assert!(Manifest::from_bytes(&env).is_err());
    // Any single-byte change of a valid envelope either fails to decode or fails the
    // signature (never both decodes and verifies).
    let env = m.to_bytes();
    for i in 0..env.len() {
        let mut e = env.clone();
        e[i] ^= 0x01;
        if let Ok(mm) = Manifest::from_bytes(&e) {
            assert!(
                mm.signed.valid_signers(|x| *x == pk(&k)).is_empty()
                    || mm.signed.body_bytes() == m.body_bytes(),
                "byte {i}"
            );
        }
    }
}

#[test]
fn manifest_acceptance_rules() {
    let (p1, p2, audio, stranger) = (key(1), key(2), key(3), key(9));
    let mut rb = root_body(
        1,
        &[&key(20)],
        1,
        &[(&p1, "*"), (&p2, "vision.*"), (&audio, "audio.*")],
    );
    rb.publish_threshold = 2;
    let root = TrustRoot::bootstrap(Signed::sign(&rb, &[&key(20)]), NOW).unwrap();
    let m = |keys: &[&SigningKey]| {
        Manifest::decode(Signed::sign(&body("vision.defects", 3, 4), keys)).unwrap()
    };
    root.authorise_manifest(&m(&[&p1, &p2]), NOW).unwrap();
    assert_eq!(
        root.authorise_manifest(&m(&[&p1]), NOW),
        Err(TrustError::UnderThreshold { have: 1, need: 2 })
    );
    // The same key twice counts once.
    let one = m(&[&p1]);
    let mut sigs = one.signed.signatures().to_vec();
    sigs.push(sigs[0].clone());
    let doubled =
        Manifest::decode(Signed::from_parts(one.signed.body_bytes().to_vec(), sigs)).unwrap();
    assert!(matches!(
        root.authorise_manifest(&doubled, NOW),
        Err(TrustError::UnderThreshold { .. })
    ));
    assert_eq!(
        root.authorise_manifest(&m(&[&stranger]), NOW),
        Err(TrustError::Forged)
    );
    assert!(matches!(
        root.authorise_manifest(&m(&[&audio]), NOW),
        Err(TrustError::OutOfScope(_))
    ));
    // Out-of-scope key plus one in scope: still under threshold.
    assert!(matches!(
        root.authorise_manifest(&m(&[&audio, &p1]), NOW),
        Err(TrustError::UnderThreshold { .. })
    ));
    assert_eq!(
        root.authorise_manifest(&m(&[&p1, &p2]), NOW.plus(Duration::from_secs(2 * 86400))),
        Err(TrustError::Expired)
    );
    // Offline co-signing reaches the threshold.
    let mut s = Signed::sign(&body("vision.defects", 3, 4), &[&p1]);
    s.add_signature(&p2);
    root.authorise_manifest(&Manifest::decode(s).unwrap(), NOW)
        .unwrap();
}

#[test]
fn trust_root_rotation_and_revocation() {
    let (r1, r2, r3, new1) = (key(11), key(12), key(13), key(14));
    let v1 = Signed::sign(
        &root_body(1, &[&r1, &r2, &r3], 2, &[(&key(1), "*")]),
        &[&r1, &r2],
    );
    let root = TrustRoot::bootstrap(v1.clone(), NOW).unwrap();
    // Self-signed below its own threshold: refused.
    assert!(
        TrustRoot::bootstrap(
            Signed::sign(&root_body(1, &[&r1, &r2, &r3], 2, &[]), &[&r1]),
            NOW
        )
        .is_err()
    );
    // Rotation to new keys, signed by two current root keys: accepted.
    let v2 = Signed::sign(&root_body(2, &[&new1], 1, &[(&key(2), "*")]), &[&r1, &r3]);
    let root2 = root.verify_successor(v2.clone(), NOW).unwrap();
    // Only one current root key: refused.
    let weak = Signed::sign(&root_body(2, &[&new1], 1, &[]), &[&r1]);
    assert!(matches!(
        root.verify_successor(weak, NOW),
        Err(TrustError::UnderThreshold { .. })
    ));
    // Signed by the new keys alone: forged from the old root's view.
    let selfish = Signed::sign(&root_body(2, &[&new1], 1, &[]), &[&new1]);
    assert_eq!(root.verify_successor(selfish, NOW), Err(TrustError::Forged));
    // Not a higher version: stale.
    assert!(matches!(
        root2.verify_successor(v2, NOW),
        Err(TrustError::Stale { .. })
    ));
    // Publisher key 1 was revoked by omission.
    let m = Manifest::decode(Signed::sign(&body("vision.defects", 1, 4), &[&key(1)])).unwrap();
    root.authorise_manifest(&m, NOW).unwrap();
    assert_eq!(root2.authorise_manifest(&m, NOW), Err(TrustError::Forged));
}

#[test]
fn node_certificates() {
    let fleet = key(30);
    let mut rb = root_body(1, &[&key(20)], 1, &[]);
    rb.fleet_key = Some(pk(&fleet));
    let root = TrustRoot::bootstrap(Signed::sign(&rb, &[&key(20)]), NOW).unwrap();
    let node = NodeId(pk(&key(40)).0);
    let cert = |signer: &SigningKey, node: NodeId, exp: u64| {
        Signed::sign(
            &NodeCertBody {
                node,
                issued: NOW,
                expires: NOW.plus(Duration::from_secs(exp)),
                label: "site-a".into(),
            },
            &[signer],
        )
    };
    root.check_certificate(&node, Some(&cert(&fleet, node, 100)), NOW)
        .unwrap();
    assert!(root.check_certificate(&node, None, NOW).is_err());
    assert!(
        root.check_certificate(&node, Some(&cert(&key(31), node, 100)), NOW)
            .is_err()
    );
    assert!(
        root.check_certificate(&NodeId([1; 32]), Some(&cert(&fleet, node, 100)), NOW)
            .is_err()
    );
    assert!(
        root.check_certificate(
            &node,
            Some(&cert(&fleet, node, 100)),
            NOW.plus(Duration::from_secs(200))
        )
        .is_err()
    );
}

#[test]
fn channel_names_and_manifest_rules() {
    for ok in ["vision.defects", "a", "llm-chat_2", "0day"] {
        Channel::new(ok).unwrap();
    }
    for bad in [
        "",
        "Vision",
        "a/b",
        ".hidden",
        "-x",
        "sp ace",
        &"x".repeat(65),
    ] {
        assert!(Channel::new(bad).is_err(), "{bad:?}");
    }
    let k = key(1);
    let mut b = body("vision.defects", 1, 4);
    b.artifact.variants[0].files[0]
        .spec
        .chaining_values
        .swap(0, 1);
    assert!(
        Manifest::decode(Signed::sign(&b, &[&k])).is_err(),
        "chaining values must combine to the content id"
    );
    let mut b = body("vision.defects", 1, 4);
    b.artifact.variants[0].files[0].name = "../etc/passwd".into();
    assert!(Manifest::decode(Signed::sign(&b, &[&k])).is_err());
    let mut b = body("vision.defects", 0, 4);
    assert!(
        Manifest::decode(Signed::sign(&b, &[&k])).is_err(),
        "version 0"
    );
    b.version = 1;
    b.rollout.stages[1].share_ppm = 10;
    assert!(
        Manifest::decode(Signed::sign(&b, &[&k])).is_err(),
        "shares must increase"
    );
    let _ = ContentId([0; 32]);
}

/// The envelope's wire form is a length-prefixed body, then a length-prefixed list of
/// (key, signature): what it was when both were `Vec`s, so nodes of either build agree.
/// Clones share the bytes, and adding a signature to a clone leaves the original alone.
#[test]
fn envelope_bytes_are_two_sequences_and_clones_share_them() {
    let (a, b) = (key(1), key(2));
    let s = Signed::sign(&body("models", 1, 3), &[&a]);
    let bytes = s.to_bytes();
    let body_len = s.body_bytes().len();
    let mut want = Vec::new();
    let mut n = body_len;
    while n >= 0x80 {
        want.push((n as u8) | 0x80);
        n >>= 7;
    }
    want.push(n as u8);
    want.extend_from_slice(s.body_bytes());
    want.push(1);
    want.extend_from_slice(&pk(&a).0);
    want.push(64);
    want.extend_from_slice(&s.signatures()[0].sig.0);
    assert_eq!(bytes, want);

    let mut c = s.clone();
    assert!(core::ptr::eq(c.body_bytes(), s.body_bytes()));
    c.add_signature(&b);
    assert_eq!((s.signatures().len(), c.signatures().len()), (1, 2));
    let (back, _) = Signed::<ManifestBody>::from_bytes(&c.to_bytes()).expect("decodes");
    assert_eq!(back, c);
}
