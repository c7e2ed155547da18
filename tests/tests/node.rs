//! End-to-end: real `pollen run` processes on loopback (mDNS off).
//!
//! Each test builds its own mesh in a temp dir; every wait is bounded.

use pollen_tests::Pollen;
use pollen_tests::mesh::{Node, Operator, test_bytes};
use std::path::PathBuf;
use std::time::Duration;

const MIB: usize = 1024 * 1024;

fn args(op: &Operator, extra: &[&str]) -> Vec<String> {
    let mut v = vec!["--trust".to_string(), op.trust_file.display().to_string()];
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// `pollen publish FILE` as version 1 of `channel` through the node at `url`, signed with
/// the operator's publisher key.
fn publish_v1(
    dir: &std::path::Path,
    op: &Operator,
    file: &std::path::Path,
    channel: &str,
    url: &str,
) {
    Pollen::in_dir(dir)
        .run([
            "publish",
            file.to_str().unwrap(),
            "--channel",
            channel,
            "--version",
            "1",
            "--key",
            op.dir.join("publisher.key").to_str().unwrap(),
            "--node",
            url,
        ])
        .success();
}

fn write_file(dir: &std::path::Path, name: &str, len: usize, seed: u64) -> (PathBuf, Vec<u8>) {
    let data = test_bytes(len, seed);
    let p = dir.join(name);
    std::fs::write(&p, &data).expect("write test file");
    (p, data)
}

#[test]
fn five_nodes_share_a_40_mib_file_mostly_peer_to_peer() {
    let tmp = tempfile::tempdir().unwrap();
    let op = Operator::new(&tmp.path().join("op"), false);
    let publisher = Node::start(&tmp.path().join("n0"), &args(&op, &["--site", "lab"]));
    let boot = publisher.addr();
    let mut nodes = vec![];
    for i in 1..5 {
        nodes.push(Node::start(
            &tmp.path().join(format!("n{i}")),
            &args(&op, &["--site", "lab", "--bootstrap", &boot]),
        ));
    }
    // Let the mesh form (Kademlia) before publishing.
    for n in &nodes {
        n.wait(Duration::from_secs(30), "3 peers", |s| s.peers.len() >= 3);
    }
    let (file, data) = write_file(tmp.path(), "model.onnx", 40 * MIB, 1);
    publish_v1(tmp.path(), &op, &file, "vision.defects", &publisher.url());
    let cid = blake3::hash(&data).to_hex().to_string();
    let pub_id = publisher.status().node_id;
    for n in &nodes {
        let s = n.wait(Duration::from_secs(120), "the whole file", |s| {
            Node::has_release(s, "vision.defects", 1)
        });
        // These files are random bytes, not models: distribution completes, serving (tested
        // in serving.rs) refuses them.
        let got = n.wait_blob(&cid, Duration::from_secs(10));
        assert!(got == data, "byte-identical copy");
        let total: u64 = s.peers.iter().map(|p| p.chunks_from).sum();
        let from_publisher = s
            .peers
            .iter()
            .find(|p| p.node_id == pub_id)
            .map_or(0, |p| p.chunks_from);
        let others = total - from_publisher;
        eprintln!(
            "{}: {total} chunks, {from_publisher} from the publisher, {others} from peers",
            s.node_id
        );
        assert!(
            others * 4 >= 40,
            "at least 25% of 40 chunks from non-publishers, got {others}"
        );
    }
}

#[test]
fn killed_mid_download_resumes_to_an_identical_file() {
    let tmp = tempfile::tempdir().unwrap();
    let op = Operator::new(&tmp.path().join("op"), false);
    // 4 MiB/s upload: a 24 MiB file takes ~6 s, so kills land mid-download.
    let publisher = Node::start(
        &tmp.path().join("pub"),
        &args(&op, &["--upload-limit", "4194304"]),
    );
    let (file, data) = write_file(tmp.path(), "model.onnx", 24 * MIB, 2);
    let m = op.manifest(std::slice::from_ref(&file), "vision.defects", 1, MIB as u64);
    let (code, body) = publisher.publish(&m, &[file]);
    assert_eq!(code, 200, "{body}");
    let cid = blake3::hash(&data).to_hex().to_string();
    let boot = publisher.addr();
    let mut node = Node::start(&tmp.path().join("dl"), &args(&op, &["--bootstrap", &boot]));
    let mut x: u64 = 0x1234_5678;
    let mut progress = vec![];
    for round in 0..20 {
        // A pseudo-random instant in [50, 450) ms after start.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        std::thread::sleep(Duration::from_millis(50 + x % 400));
        let have = node
            .status()
            .channels
            .first()
            .and_then(|c| c.releases.first())
            .map_or(0, |r| r.files[0].have);
        progress.push(have);
        node.kill();
        // Whatever is on disk is never corrupt: a blob exists only complete and exact.
        if let Ok(b) = std::fs::read(node.blob(&cid)) {
            assert!(b == data, "round {round}: blob differs from the original");
            break;
        }
        node.restart();
    }
    node.restart();
    node.wait(Duration::from_secs(120), "complete after restarts", |s| {
        Node::has_release(s, "vision.defects", 1)
    });
    let got = node.wait_blob(&cid, Duration::from_secs(10));
    assert!(got == data, "byte-identical after {} kills", progress.len());
    eprintln!("chunks held at each kill: {progress:?}");
}

#[test]
fn corrupt_peer_is_refused_and_honest_download_completes() {
    let tmp = tempfile::tempdir().unwrap();
    let op = Operator::new(&tmp.path().join("op"), false);
    let publisher = Node::start(&tmp.path().join("pub"), &args(&op, &[]));
    let boot = publisher.addr();
    let liar = Node::start(
        &tmp.path().join("liar"),
        &args(&op, &["--bootstrap", &boot, "--test-corrupt-chunks"]),
    );
    let (file, data) = write_file(tmp.path(), "model.onnx", 8 * MIB, 3);
    let m = op.manifest(std::slice::from_ref(&file), "vision.defects", 1, 256 * 1024);
    assert_eq!(publisher.publish(&m, &[file]).0, 200);
    liar.wait(Duration::from_secs(60), "liar holds the file", |s| {
        Node::has_release(s, "vision.defects", 1)
    });
    // The newcomer knows only the liar at first.
    let newcomer = Node::start(
        &tmp.path().join("new"),
        &args(&op, &["--bootstrap", &liar.addr()]),
    );
    newcomer.wait(Duration::from_secs(60), "complete", |s| {
        Node::has_release(s, "vision.defects", 1)
    });
    let cid = blake3::hash(&data).to_hex().to_string();
    assert!(
        newcomer.wait_blob(&cid, Duration::from_secs(10)) == data,
        "no corrupt byte stored"
    );
    let failed = newcomer.metric("pollen_chunks_failed_total");
    assert!(failed >= 1.0, "the liar's chunks were caught ({failed})");
    eprintln!("newcomer refused {failed} corrupt chunks");
}

#[test]
fn restarted_node_rejects_a_replayed_older_version() {
    let tmp = tempfile::tempdir().unwrap();
    let op = Operator::new(&tmp.path().join("op"), false);
    let mut node = Node::start(&tmp.path().join("a"), &args(&op, &[]));
    let mut manifests = vec![];
    for v in [1u64, 2, 4] {
        let (file, _) = write_file(
            tmp.path(),
            &format!("m{v}.onnx"),
            100_000 + v as usize,
            10 + v,
        );
        let m = op.manifest(std::slice::from_ref(&file), "vision.defects", v, 64 * 1024);
        let (code, body) = node.publish(&m, &[file]);
        assert_eq!(code, 200, "v{v}: {body}");
        manifests.push(m);
    }
    node.kill();
    node.restart();
    let s = node.wait(Duration::from_secs(20), "restored", |s| {
        s.channels.first().is_some_and(|c| c.highest == 4)
    });
    assert_eq!(s.channels[0].highest, 4);
    // v2 it accepted before, and a v3 it never saw: both are below the highest (4).
    let (file, _) = write_file(tmp.path(), "m3.onnx", 99_999, 99);
    let v3 = op.manifest(std::slice::from_ref(&file), "vision.defects", 3, 64 * 1024);
    for (name, m) in [("v2", &manifests[1]), ("v3", &v3)] {
        let (code, body) = node.post_manifest(&m.signed.to_bytes());
        assert_eq!(code, 422, "replayed {name} refused: {body}");
        assert!(body.contains("not above the highest"), "{body}");
    }
    assert!(node.metrics().contains("reason=\"stale\""));
    // The files of every release kept across the restart are still in the store.
    for m in &manifests {
        let cid = m.body.artifact.variants[0].files[0]
            .spec
            .content_id
            .to_hex();
        assert!(
            node.blob(&cid).is_file(),
            "blob of v{} kept",
            m.body.version
        );
    }
    assert_eq!(node.status().channels[0].highest, 4);
}

#[test]
fn late_joiner_finds_peers_through_kademlia() {
    let tmp = tempfile::tempdir().unwrap();
    let op = Operator::new(&tmp.path().join("op"), false);
    // 4 MiB/s uploads (a WAN-like uplink): one source alone would need 12 s.
    let slow = ["--upload-limit", "4194304"];
    let publisher = Node::start(&tmp.path().join("pub"), &args(&op, &slow));
    let boot = publisher.addr();
    let (file, _) = write_file(tmp.path(), "model.onnx", 48 * MIB, 4);
    let m = op.manifest(std::slice::from_ref(&file), "vision.defects", 1, MIB as u64);
    assert_eq!(publisher.publish(&m, &[file]).0, 200);
    let mut early = vec![];
    for i in 0..3 {
        early.push(Node::start(
            &tmp.path().join(format!("e{i}")),
            &args(&op, &["--bootstrap", &boot, slow[0], slow[1]]),
        ));
    }
    for n in &early {
        n.wait(Duration::from_secs(60), "complete", |s| {
            Node::has_release(s, "vision.defects", 1)
        });
    }
    // The late joiner knows only one early node, not the publisher.
    let late = Node::start(
        &tmp.path().join("late"),
        &args(&op, &["--bootstrap", &early[0].addr()]),
    );
    let s = late.wait(Duration::from_secs(60), "complete", |s| {
        Node::has_release(s, "vision.defects", 1)
    });
    let bootstrap_id = early[0].status().node_id;
    let sources: Vec<_> = s.peers.iter().filter(|p| p.chunks_from > 0).collect();
    let found = sources.iter().filter(|p| p.node_id != bootstrap_id).count();
    eprintln!(
        "late joiner: {} peers, chunks per source {:?}",
        s.peers.len(),
        sources.iter().map(|p| p.chunks_from).collect::<Vec<_>>()
    );
    assert!(
        s.peers.len() >= 3,
        "found peers beyond its bootstrap: {}",
        s.peers.len()
    );
    assert!(
        found >= 2,
        "fetched from {found} peers it found through Kademlia"
    );
}

#[test]
fn uncertified_node_connects_and_receives_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let op = Operator::new(&tmp.path().join("op"), true);
    // Certificates need the node ids: start each node once to create its identity.
    let mut a = Node::start(&tmp.path().join("a"), &args(&op, &[]));
    let mut b = Node::start(&tmp.path().join("b"), &args(&op, &[]));
    let ca = op.certify(&a.status().node_id, "a");
    let cb = op.certify(&b.status().node_id, "b");
    a.args
        .extend(["--cert".to_string(), ca.display().to_string()]);
    a.restart();
    b.args.extend([
        "--cert".to_string(),
        cb.display().to_string(),
        "--bootstrap".into(),
        a.addr(),
    ]);
    b.restart();
    let stranger = Node::start(
        &tmp.path().join("c"),
        &args(&op, &["--bootstrap", &a.addr()]),
    );
    let (file, _) = write_file(tmp.path(), "model.onnx", 2 * MIB, 5);
    let m = op.manifest(std::slice::from_ref(&file), "private.model", 1, MIB as u64);
    assert_eq!(a.publish(&m, &[file]).0, 200);
    b.wait(Duration::from_secs(60), "certified node completes", |s| {
        Node::has_release(s, "private.model", 1)
    });
    std::thread::sleep(Duration::from_secs(3));
    let s = stranger.status();
    assert!(
        s.channels.is_empty(),
        "stranger learned no manifest: {:?}",
        s.channels
    );
    assert!(s.peers.is_empty(), "stranger has no protocol peer");
    assert!(
        std::fs::read_dir(stranger.dir.join("blobs"))
            .map(|d| d.count())
            .unwrap_or(0)
            == 0
    );
}

#[test]
fn publish_explains_what_is_wrong() {
    let tmp = tempfile::tempdir().unwrap();
    let op = Operator::new(&tmp.path().join("op"), false);
    let node = Node::start(&tmp.path().join("a"), &args(&op, &[]));
    let (file, _) = write_file(tmp.path(), "model.onnx", 50_000, 6);
    let stranger = tmp.path().join("stranger.key");
    pollen_keys::generate_key_file(&stranger).unwrap();
    let publisher = op.dir.join("publisher.key");
    let pollen = Pollen::in_dir(tmp.path());
    let publish = |key: &std::path::Path, channel: &str, version: &str, url: &str| {
        pollen.run([
            "publish",
            file.to_str().unwrap(),
            "--channel",
            channel,
            "--version",
            version,
            "--key",
            key.to_str().unwrap(),
            "--node",
            url,
        ])
    };
    let e = publish(&stranger, "vision.defects", "1", &node.url()).failure();
    assert!(e.contains("unknown key"), "{e}");
    publish(&publisher, "vision.defects", "2", &node.url()).success();
    let e = publish(&publisher, "vision.defects", "2", &node.url()).failure();
    assert!(e.contains("not above the current version 2"), "{e}");
    let e = publish(&publisher, "vision.defects", "3", "http://127.0.0.1:9").failure();
    assert!(e.contains("cannot reach the node"), "{e}");
    let e = pollen
        .run(["keys", "generate", stranger.to_str().unwrap()])
        .failure();
    assert!(e.contains("refusing to overwrite"), "{e}");
}

#[test]
fn channel_not_allowed_for_the_key_is_explained() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pollen = Pollen::in_dir(dir);
    pollen.run(["keys", "generate", "root.key"]).success();
    pollen.run(["keys", "generate", "pub.key"]).success();
    pollen
        .run([
            "keys",
            "trust",
            "create",
            "--root",
            "root.key",
            "--publisher",
            "pub.key=audio.*",
            "--sign",
            "root.key",
            "--out",
            "trust.pollen",
        ])
        .success();
    let node = Node::start(
        &dir.join("a"),
        &[
            "--trust".to_string(),
            dir.join("trust.pollen").display().to_string(),
        ],
    );
    let (file, _) = write_file(dir, "model.onnx", 20_000, 7);
    let e = pollen
        .run([
            "publish",
            file.to_str().unwrap(),
            "--channel",
            "vision.defects",
            "--version",
            "1",
            "--key",
            "pub.key",
            "--node",
            &node.url(),
        ])
        .failure();
    assert!(e.contains("channel not allowed for that key"), "{e}");
}

#[test]
fn offline_past_the_trust_roots_expiry_keeps_serving_after_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let op = Operator::with_validity(&tmp.path().join("op"), false, Duration::from_secs(4));
    let mut node = Node::start(&tmp.path().join("a"), &args(&op, &[]));
    // The bundled model, so "serving" means answering inference requests.
    let file = pollen_tests::workspace_dir().join("models/digits-v1.onnx");
    let data = std::fs::read(&file).unwrap();
    let m = op.manifest(std::slice::from_ref(&file), "digits", 1, 16 * 1024);
    assert_eq!(node.publish(&m, std::slice::from_ref(&file)).0, 200);
    let serving = |s: &pollen_node::status::Status| {
        s.channels.first().and_then(|c| c.active_version) == Some(1)
    };
    node.wait(Duration::from_secs(20), "serving", serving);
    std::thread::sleep(Duration::from_secs(5));
    node.kill();
    // Restarted after the trust root (and --trust file) expired: what it had stays.
    node.restart();
    let s = node.wait(Duration::from_secs(20), "restored", serving);
    assert_eq!(s.trust_version, 1, "the expired root is still known");
    let cid = blake3::hash(&data).to_hex().to_string();
    assert!(
        std::fs::read(node.blob(&cid)).unwrap() == data,
        "the model file is kept"
    );
    let body = format!(
        "{{\"inputs\":[{{\"name\":\"input\",\"shape\":[1,64],\"datatype\":\"FP32\",\"data\":[{}]}}]}}",
        vec!["0"; 64].join(",")
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let r = ureq::post(&format!("{}/v2/models/digits/infer", node.url())).send(body.as_bytes());
        if let Ok(mut r) = r
            && r.status() == 200
        {
            let text = r.body_mut().read_to_string().unwrap();
            assert!(text.contains("\"model_version\":\"1\""), "{text}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the restarted node answers inference"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A seed with one upload slot and no queue answers the requests it cannot serve at once
/// `Busy`: the downloaders free them, ask each other meanwhile, and come back; every copy
/// completes byte-identical.
#[test]
fn busy_answers_send_requests_elsewhere_and_every_download_completes() {
    let tmp = tempfile::tempdir().unwrap();
    let op = Operator::new(&tmp.path().join("op"), false);
    let config = tmp.path().join("seed.toml");
    std::fs::write(&config, "max_concurrent_uploads = 1\nqueued_uploads = 0\n").unwrap();
    let publisher = Node::start(
        &tmp.path().join("n0"),
        &args(&op, &["--config", config.to_str().unwrap()]),
    );
    let boot = publisher.addr();
    let nodes: Vec<Node> = (1..4)
        .map(|i| {
            Node::start(
                &tmp.path().join(format!("n{i}")),
                &args(&op, &["--bootstrap", &boot]),
            )
        })
        .collect();
    for n in &nodes {
        n.wait(Duration::from_secs(30), "2 peers", |s| s.peers.len() >= 2);
    }
    let (file, data) = write_file(tmp.path(), "model.onnx", 16 * MIB, 7);
    publish_v1(tmp.path(), &op, &file, "vision.busy", &publisher.url());
    let cid = blake3::hash(&data).to_hex().to_string();
    for n in &nodes {
        n.wait(Duration::from_secs(120), "the whole file", |s| {
            Node::has_release(s, "vision.busy", 1)
        });
        assert!(
            n.wait_blob(&cid, Duration::from_secs(10)) == data,
            "byte-identical"
        );
    }
    let busy = publisher.metric("pollen_chunk_requests_busy_total");
    eprintln!("the seed answered {busy} requests Busy");
    assert!(
        busy > 0.0,
        "three downloaders against one slot: some answered Busy"
    );
}
