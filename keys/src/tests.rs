//! Scenarios across modules, each checked with the node's own verification code.

use crate::files::{read_signed, write_signed};
use crate::manifest::{NewManifest, build_body, parse_stages};
use crate::time::days;
use crate::trust::{Completion, parse_publisher};
use crate::{cert, generate_key, manifest, public_key, trust};
use ed25519_dalek::SigningKey;
use pollen_protocol::chunking::ChunkSize;
use pollen_protocol::manifest::{Channel, Manifest};
use pollen_protocol::rollout::RolloutPlan;
use pollen_protocol::trust::{
    ChannelPattern, NodeCertBody, Publisher, TrustError, TrustRoot, TrustRootBody,
};
use pollen_protocol::{NodeId, UnixTime};
use std::path::Path;
use std::time::Duration;

const NOW: UnixTime = UnixTime(1_750_000_000_000);

fn key() -> SigningKey {
    generate_key().unwrap()
}

fn body(
    version: u64,
    roots: &[&SigningKey],
    threshold: u8,
    publishers: &[&SigningKey],
) -> TrustRootBody {
    TrustRootBody {
        version,
        created: NOW,
        expires: NOW.plus(days(365)),
        root_keys: roots.iter().map(|k| public_key(k)).collect(),
        root_threshold: threshold,
        publishers: publishers
            .iter()
            .map(|k| Publisher {
                key: public_key(k),
                name: "ops".into(),
                channels: vec![ChannelPattern("vision.*".into())],
            })
            .collect(),
        publish_threshold: 1,
        fleet_key: None,
    }
}

#[test]
fn create_is_accepted_by_bootstrap_and_roundtrips_through_a_file() {
    let root = key();
    let publisher = key();
    let b = body(1, &[&root], 1, &[&publisher]);
    let (signed, c) = trust::create(&b, &[&root], NOW).unwrap();
    assert_eq!(c, Completion::Complete { have: 1, need: 1 });
    TrustRoot::bootstrap(signed.clone(), NOW).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("root.bin");
    write_signed(&path, &signed).unwrap();
    let (back, back_body) = read_signed::<TrustRootBody>(&path, "trust root").unwrap();
    assert_eq!(back, signed);
    assert_eq!(back_body, b);
    let text = trust::describe(&back, &back_body, NOW, None);
    assert!(
        text.contains("self-signed to threshold: yes (1 of 1 required)"),
        "{text}"
    );
    assert!(text.contains("vision.*"), "{text}");

    // A signer that is not a root key is refused before anything is written.
    let err = trust::create(&b, &[&publisher], NOW)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("is not one of the trust root's root keys"),
        "{err}"
    );
    // A body that breaks a rule is refused with the rule.
    let mut bad = b.clone();
    bad.root_threshold = 2;
    let err = trust::create(&bad, &[&root], NOW).unwrap_err().to_string();
    assert!(err.contains("root threshold"), "{err}");
}

#[test]
fn other_kinds_of_file_are_not_trust_roots() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("junk");
    std::fs::write(&path, b"not an envelope").unwrap();
    let err = read_signed::<TrustRootBody>(&path, "trust root")
        .unwrap_err()
        .to_string();
    assert!(err.contains("is not a pollen trust root"), "{err}");
}

#[test]
fn rotation_is_accepted_by_verify_successor() {
    let (r1, r2, r3) = (key(), key(), key());
    let publisher = key();
    let (s1, _) = trust::create(&body(1, &[&r1, &r2], 1, &[&publisher]), &[&r1], NOW).unwrap();
    let current = trust::verify_self_signed(s1).unwrap();

    // Rotate r1 out and r3 in, signed by r2 (a current root key) and r3 (a new one).
    let b2 = body(2, &[&r2, &r3], 1, &[&publisher]);
    let (s2, c) = trust::rotate(&current, &b2, &[&r2, &r3], NOW).unwrap();
    assert!(c.is_complete());
    let next = current.verify_successor(s2.clone(), NOW).unwrap();
    assert_eq!(next.body, b2);
    // Signed by a new key too, it also works as a first root.
    TrustRoot::bootstrap(s2.clone(), NOW).unwrap();
    let text = trust::describe(&s2, &b2, NOW, Some(&current));
    assert!(text.contains("valid rotation of version 1: yes"), "{text}");
}

#[test]
fn rotation_signed_by_a_wrong_key_is_refused() {
    let (r1, r2, stranger) = (key(), key(), key());
    let (s1, _) = trust::create(&body(1, &[&r1], 1, &[]), &[&r1], NOW).unwrap();
    let current = trust::verify_self_signed(s1).unwrap();
    let b2 = body(2, &[&r2], 1, &[]);

    // A key in neither root.
    let err = trust::rotate(&current, &b2, &[&stranger], NOW)
        .unwrap_err()
        .to_string();
    assert!(err.contains("is a root key of neither"), "{err}");
    // A key of the new root only: nodes would take it for a forgery.
    let err = trust::rotate(&current, &b2, &[&r2], NOW)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no valid signature from a root key of the current trust root"),
        "{err}"
    );
    // What such a file would meet on a node.
    let forged = pollen_protocol::signing::Signed::sign(&b2, &[&r2]);
    assert_eq!(
        current.verify_successor(forged, NOW),
        Err(TrustError::Forged)
    );
    // Not a higher version.
    let err = trust::rotate(&current, &body(1, &[&r1], 1, &[]), &[&r1], NOW)
        .unwrap_err()
        .to_string();
    assert!(err.contains("must be above the current version 1"), "{err}");
}

#[test]
fn threshold_two_signed_one_key_at_a_time() {
    let (r1, r2, r3) = (key(), key(), key());
    let b = body(1, &[&r1, &r2, &r3], 2, &[]);
    let (mut signed, c) = trust::create(&b, &[&r1], NOW).unwrap();
    assert_eq!(c, Completion::Partial { have: 1, need: 2 });
    assert_eq!(
        TrustRoot::bootstrap(signed.clone(), NOW),
        Err(TrustError::UnderThreshold { have: 1, need: 2 })
    );
    assert!(trust::verify_self_signed(signed.clone()).is_err());
    // Signing again with the same key does not count twice.
    let c = trust::add_signature(&mut signed, &r1, None, NOW).unwrap();
    assert_eq!(c, Completion::Partial { have: 1, need: 2 });
    // A key that is no root key is refused and leaves the envelope alone.
    let before = signed.clone();
    assert!(trust::add_signature(&mut signed, &key(), None, NOW).is_err());
    assert_eq!(signed, before);
    // The second holder signs offline.
    let c = trust::add_signature(&mut signed, &r3, None, NOW).unwrap();
    assert_eq!(c, Completion::Complete { have: 2, need: 2 });
    let root = TrustRoot::bootstrap(signed.clone(), NOW).unwrap();

    // A rotation needs two of the current keys as well, gathered the same way.
    let b2 = body(2, &[&r2, &r3], 2, &[]);
    let (mut s2, c) = trust::rotate(&root, &b2, &[&r2], NOW).unwrap();
    assert_eq!(c, Completion::Partial { have: 1, need: 2 });
    assert!(root.verify_successor(s2.clone(), NOW).is_err());
    // Without the current root, r1 is not a key of the new body.
    assert!(trust::add_signature(&mut s2, &r1, None, NOW).is_err());
    let c = trust::add_signature(&mut s2, &r1, Some(&root), NOW).unwrap();
    assert_eq!(c, Completion::Complete { have: 2, need: 2 });
    root.verify_successor(s2, NOW).unwrap();
}

fn write_pattern(path: &Path, len: usize, seed: u8) -> Vec<u8> {
    let mut data = vec![0u8; len];
    blake3::Hasher::new()
        .update(&[seed])
        .finalize_xof()
        .fill(&mut data);
    std::fs::write(path, &data).unwrap();
    data
}

#[test]
fn manifest_for_files_of_0_1_and_3_mib_plus_5_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let sizes = [0usize, 1, 3 * 1024 * 1024 + 5];
    let names = ["empty.bin", "one.bin", "model.onnx"];
    let mut datas = Vec::new();
    let mut paths = Vec::new();
    for (i, (size, name)) in sizes.iter().zip(names).enumerate() {
        let p = dir.path().join(name);
        datas.push(write_pattern(&p, *size, i as u8));
        paths.push(p);
    }
    let (root_key, publisher) = (key(), key());
    let (signed_root, _) =
        trust::create(&body(1, &[&root_key], 1, &[&publisher]), &[&root_key], NOW).unwrap();
    let root = TrustRoot::bootstrap(signed_root, NOW).unwrap();

    let new = NewManifest {
        channel: Channel::new("vision.defects").unwrap(),
        version: 7,
        files: paths.clone(),
        chunk_size: ChunkSize::DEFAULT,
        rollout: parse_stages("5%,25%,100%", Duration::from_secs(60), None).unwrap(),
        created: NOW,
        expires: NOW.plus(days(30)),
        replaces: None,
    };
    let body = build_body(&new).unwrap();
    let m = manifest::sign(&body, &[&publisher]).unwrap();
    manifest::check_against(&m, &root, NOW).unwrap();

    let files = &m.body.artifact.variants[0].files;
    assert_eq!(m.body.artifact.variants[0].name, "default");
    for ((f, data), name) in files.iter().zip(&datas).zip(names) {
        assert_eq!(f.name, name);
        assert_eq!(f.spec.size, data.len() as u64);
        assert_eq!(
            f.spec.content_id.0,
            *blake3::hash(data).as_bytes(),
            "{name}"
        );
        f.spec.check().unwrap();
        for i in 0..f.spec.chunk_count() {
            let off = f.spec.chunk_offset(i) as usize;
            let len = f.spec.chunk_len(i).unwrap() as usize;
            f.spec.verify_chunk(i, &data[off..off + len]).unwrap();
        }
    }
    assert_eq!(files[2].spec.chaining_values.len(), 4);

    // Through a file and back, as a node receives it.
    let out = dir.path().join("m.manifest");
    write_signed(&out, &m.signed).unwrap();
    let back = Manifest::from_bytes(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(back, m);
    let text = manifest::describe(&back, NOW, Some(&root));
    assert!(
        text.contains("accepted under trust root version 1: yes"),
        "{text}"
    );
    assert!(text.contains("5% of nodes"), "{text}");

    // A key the root does not know, or a channel out of its scope, is refused.
    let stranger = manifest::sign(&body, &[&key()]).unwrap();
    assert!(manifest::check_against(&stranger, &root, NOW).is_err());
    let mut other = new.clone();
    other.channel = Channel::new("audio").unwrap();
    let out_of_scope = manifest::sign(&build_body(&other).unwrap(), &[&publisher]).unwrap();
    let err = manifest::check_against(&out_of_scope, &root, NOW)
        .unwrap_err()
        .to_string();
    assert!(err.contains("not allowed to sign channel audio"), "{err}");

    // Two files of one name are refused.
    let mut dup = new.clone();
    dup.files = vec![paths[1].clone(), paths[1].clone()];
    let err = build_body(&dup).unwrap_err().to_string();
    assert!(err.contains("duplicate file"), "{err}");
}

#[test]
fn manifest_threshold_two_with_offline_signature() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("model.onnx");
    write_pattern(&file, 1000, 9);
    let (root_key, p1, p2) = (key(), key(), key());
    let mut b = body(1, &[&root_key], 1, &[&p1, &p2]);
    b.publish_threshold = 2;
    let (signed_root, _) = trust::create(&b, &[&root_key], NOW).unwrap();
    let root = TrustRoot::bootstrap(signed_root, NOW).unwrap();

    let new = NewManifest {
        channel: Channel::new("vision.ocr").unwrap(),
        version: 1,
        files: vec![file],
        chunk_size: ChunkSize::DEFAULT,
        rollout: RolloutPlan::immediate(),
        created: NOW,
        expires: NOW.plus(days(1)),
        replaces: None,
    };
    let mbody = build_body(&new).unwrap();
    // Both keys at once.
    let both = manifest::sign(&mbody, &[&p1, &p2]).unwrap();
    manifest::check_against(&both, &root, NOW).unwrap();
    // One now, one later.
    let m = manifest::sign(&mbody, &[&p1]).unwrap();
    let err = manifest::check_against(&m, &root, NOW)
        .unwrap_err()
        .to_string();
    assert!(err.contains("1 of 2 required signatures"), "{err}");
    let mut signed = m.signed.clone();
    manifest::add_signature(&mut signed, &p2).unwrap();
    let m2 = Manifest::decode(signed).unwrap();
    assert_eq!(m2.id, m.id, "co-signing does not change the manifest id");
    assert!(manifest::signed_by(&m2, &p2));
    manifest::check_against(&m2, &root, NOW).unwrap();
}

#[test]
fn node_certificate_checks_against_the_fleet_key() {
    let (root_key, fleet, node_key, other_fleet) = (key(), key(), key(), key());
    let mut b = body(1, &[&root_key], 1, &[]);
    b.fleet_key = Some(public_key(&fleet));
    let (signed_root, _) = trust::create(&b, &[&root_key], NOW).unwrap();
    let root = TrustRoot::bootstrap(signed_root, NOW).unwrap();
    let node = NodeId(public_key(&node_key).0);

    let c = cert::certify(&fleet, node, "site-a", NOW, NOW.plus(days(365))).unwrap();
    root.check_certificate(&node, Some(&c), NOW).unwrap();
    cert::check_against(&c, &root, NOW).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.cert");
    write_signed(&path, &c).unwrap();
    let (back, back_body) = read_signed::<NodeCertBody>(&path, "node certificate").unwrap();
    assert_eq!(back, c);
    assert!(cert::describe(&back, &back_body, NOW).contains("site-a"));

    // Another node cannot use it; another key's certificate does not count; expiry counts.
    let other = NodeId(public_key(&key()).0);
    assert!(root.check_certificate(&other, Some(&c), NOW).is_err());
    let foreign = cert::certify(&other_fleet, node, "", NOW, NOW.plus(days(1))).unwrap();
    assert!(root.check_certificate(&node, Some(&foreign), NOW).is_err());
    assert!(cert::check_against(&foreign, &root, NOW).is_err());
    assert!(
        root.check_certificate(&node, Some(&c), NOW.plus(days(366)))
            .is_err()
    );
    // Rules of the body are enforced before signing.
    assert!(cert::certify(&fleet, node, &"x".repeat(200), NOW, NOW.plus(days(1))).is_err());
    assert!(cert::certify(&fleet, node, "", NOW, NOW).is_err());
}

#[test]
fn publisher_arguments() {
    let dir = tempfile::tempdir().unwrap();
    let k = key();
    let hex = public_key(&k).to_hex();
    let p = parse_publisher(&format!("{hex}=vision.*,audio")).unwrap();
    assert_eq!(p.key, public_key(&k));
    assert_eq!(p.name, "");
    assert_eq!(
        p.channels,
        [
            ChannelPattern("vision.*".into()),
            ChannelPattern("audio".into())
        ]
    );
    let path = dir.path().join("alice.key");
    crate::write_key_file(&path, &k).unwrap();
    let p = parse_publisher(&format!("{}=*", path.display())).unwrap();
    assert_eq!((p.key, p.name.as_str()), (public_key(&k), "alice"));
    assert!(parse_publisher(&hex).is_err());
    assert!(parse_publisher(&format!("{hex}=")).is_err());
    assert!(parse_publisher("nothex=*").is_err());
    // Bad patterns are caught by the body rules.
    let mut b = body(1, &[&k], 1, &[]);
    b.publishers
        .push(parse_publisher(&format!("{hex}=Vision/x")).unwrap());
    let err = trust::create(&b, &[&k], NOW).unwrap_err().to_string();
    assert!(err.contains("channel pattern"), "{err}");
}
