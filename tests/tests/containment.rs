//! Containment: what a signed model does at activation cannot take a node down (security
//! review C1, M4, L6). Real `pollen run` processes; the models are written by
//! `pollen_tests::onnxgen`.

use pollen_tests::mesh::{Node, Operator};
use pollen_tests::onnxgen;
use std::path::Path;
use std::time::{Duration, Instant};

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(20)))
        .http_status_as_error(false)
        .build()
        .into()
}

/// The version `n` answers inference with, on a golden row of the digits model.
fn served_version(n: &Node) -> Option<String> {
    let golden: serde_json::Value = serde_json::from_slice(
        &std::fs::read(pollen_tests::workspace_dir().join("models/golden-v1.json")).unwrap(),
    )
    .unwrap();
    let body = serde_json::json!({"inputs": [{"name": "input", "shape": [1, 64],
        "datatype": "FP32", "data": golden["inputs"][0]}]});
    let mut r = agent()
        .post(format!("{}/v2/models/digits/infer", n.url()))
        .send_json(&body)
        .ok()?;
    if r.status() != 200 {
        return None;
    }
    let v: serde_json::Value = r.body_mut().read_json().ok()?;
    v["model_version"].as_str().map(String::from)
}

fn wait_served(n: &Node, version: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while served_version(n).as_deref() != Some(version) {
        assert!(
            Instant::now() < deadline,
            "{} never served v{version}:\n{}",
            n.url(),
            n.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `pollen publish FILE` on channel digits (no golden checks) through `node`.
fn publish(tmp: &Path, op: &Operator, node: &Node, file: &Path, version: u64) {
    op.publish(tmp, node, file, "digits", version, &[]);
}

fn wait_refused(n: &Node, version: u64, why: &str) {
    let what = format!("digits version {version} failed to activate");
    n.wait(Duration::from_secs(60), &what, |s| {
        s.errors
            .iter()
            .any(|e| e.contains(&what) && e.contains(why))
    });
}

#[test]
fn models_too_big_for_the_device_fail_their_activation_and_nodes_keep_serving() {
    let tmp = tempfile::tempdir().unwrap();
    let op = Operator::new(&tmp.path().join("op"), false);
    let (a, mut b) = op.connected_pair(tmp.path());
    op.publish_digits(tmp.path(), &a, "digits-v1.onnx", "golden-v1.json", 1, &[]);
    wait_served(&a, "1");
    wait_served(&b, "1");

    // 97 bytes that declare a [1e5, 1e5, 1e5] FP32 input: 4e15 bytes to warm up. Before
    // the fix both nodes aborted ("memory allocation of 4000000000000000 bytes failed")
    // and crash-looped on restart.
    let huge = tmp.path().join("huge.onnx");
    std::fs::write(&huge, onnxgen::identity(&[100_000, 100_000, 100_000])).unwrap();
    publish(tmp.path(), &op, &a, &huge, 2);
    // A product of dimensions that overflows 64 bits (a debug build panicked on it, and
    // the panic was swallowed: the status said v2 while v1 served, and a restart served
    // nothing).
    let overflow = tmp.path().join("overflow.onnx");
    std::fs::write(&overflow, onnxgen::identity(&[1 << 32, 1 << 32, 1 << 32])).unwrap();
    for n in [&a, &b] {
        wait_refused(n, 2, "memory budget");
        assert_eq!(served_version(n).as_deref(), Some("1"));
    }
    publish(tmp.path(), &op, &a, &overflow, 3);
    for n in [&a, &b] {
        wait_refused(n, 3, "memory budget");
        assert_eq!(served_version(n).as_deref(), Some("1"));
    }
    let a_status = a.status();
    let c = &a_status.channels[0];
    assert_eq!(c.active_version, Some(1), "the status says what is served");

    // A restart neither crashes nor tries the failed releases again: it serves v1 past
    // the catch-up hold (10 s), where the old code died a second time.
    b.restart();
    wait_served(&b, "1");
    std::thread::sleep(Duration::from_secs(12));
    assert!(b.running(), "b died after the restart:\n{}", b.log());
    assert_eq!(served_version(&b).as_deref(), Some("1"));
    let log = b.log();
    for v in [2, 3] {
        let tries = log.matches(&format!("digits: version {v} (")).count();
        assert_eq!(tries, 1, "v{v} activated once, never again:\n{log}");
    }
}

/// A node that stops in the middle of an activation (its durable marker left behind)
/// tries the release once more on restart: a power cut or a `kill -9` is no verdict on a
/// model. Stopped in the middle of the same release's activation a second time, it
/// counts the release failed and serves the previous one, across restarts too: a model
/// that kills the node while loading crashes it twice at most.
#[test]
fn a_node_that_died_twice_while_activating_a_release_serves_the_previous_one() {
    let tmp = tempfile::tempdir().unwrap();
    let op = Operator::new(&tmp.path().join("op"), false);
    let trust = vec!["--trust".to_string(), op.trust_file.display().to_string()];
    let mut a = Node::start(&tmp.path().join("a"), &trust);
    op.publish_digits(tmp.path(), &a, "digits-v1.onnx", "golden-v1.json", 1, &[]);
    wait_served(&a, "1");
    op.publish_digits(tmp.path(), &a, "digits-v2.onnx", "golden-v2.json", 2, &[]);
    wait_served(&a, "2");
    let v2 = a.status().channels[0]
        .releases
        .iter()
        .find(|r| r.version == 2)
        .expect("v2")
        .manifest
        .clone();
    let markers = a.dir.join("activating");
    // What a crash in the middle of v2's activation leaves: its durable marker.
    let crash = |a: &mut Node| {
        a.kill();
        std::fs::create_dir_all(&markers).unwrap();
        std::fs::write(markers.join(&v2), b"").unwrap();
        a.restart();
    };
    // Once: v2 is tried again and serves.
    crash(&mut a);
    wait_served(&a, "2");
    assert!(
        a.log().contains("trying it once more"),
        "the first interruption is logged:\n{}",
        a.log()
    );
    assert!(
        !markers.join(&v2).exists(),
        "the marker is consumed once seen"
    );
    // Twice: v2 counts as failed here, v1 serves.
    crash(&mut a);
    wait_served(&a, "1");
    a.wait(Duration::from_secs(10), "the crash reported", |s| {
        s.errors
            .iter()
            .any(|e| e.contains("for the second time: it counts as failed here"))
    });
    std::thread::sleep(Duration::from_secs(12));
    assert_eq!(served_version(&a).as_deref(), Some("1"), "{}", a.log());
    // The failure survives a further restart.
    a.restart();
    wait_served(&a, "1");
    std::thread::sleep(Duration::from_secs(12));
    assert_eq!(served_version(&a).as_deref(), Some("1"), "{}", a.log());
}

/// POST an index vector to the gather model; (status, body).
fn gather(n: &Node, idx: &[i64]) -> (u16, serde_json::Value) {
    let body = serde_json::json!({"inputs": [{"name": "idx", "shape": [idx.len()],
        "datatype": "INT64", "data": idx}]});
    let mut r = agent()
        .post(format!("{}/v2/models/gather/infer", n.url()))
        .send_json(&body)
        .expect("request");
    let status = r.status().as_u16();
    (status, r.body_mut().read_json().unwrap_or_default())
}

#[test]
fn a_client_that_makes_the_model_fail_gets_400_and_cannot_fail_the_rollout() {
    let tmp = tempfile::tempdir().unwrap();
    let op = Operator::new(&tmp.path().join("op"), false);
    let mut args = vec![
        "--trust".to_string(),
        op.trust_file.display().to_string(),
        "--health-interval".into(),
        "1s".into(),
    ];
    let a = Node::start(&tmp.path().join("a"), &args);
    args.extend(["--bootstrap".to_string(), a.addr()]);
    let b = Node::start(&tmp.path().join("b"), &args);
    b.wait(Duration::from_secs(20), "connected", |s| {
        !s.peers.is_empty()
    });
    // y = Gather(W[10, 4], idx): an index past 9 makes tract panic (security review H1).
    let model = tmp.path().join("gather.onnx");
    std::fs::write(&model, onnxgen::gather(10)).unwrap();
    op.publish(
        tmp.path(),
        &a,
        &model,
        "gather",
        1,
        &[
            "--stages",
            "99%,100%",
            "--gate-min-healthy",
            "1",
            "--gate-max-failure",
            "10%",
            "--stage-interval",
            "1h",
        ],
    );
    let ready = |n: &Node| {
        agent()
            .get(format!("{}/v2/models/gather/versions/1/ready", n.url()))
            .call()
            .is_ok_and(|r| r.status() == 200)
    };
    for n in [&a, &b] {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !ready(n) {
            assert!(
                Instant::now() < deadline,
                "gather never served:\n{}",
                n.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let (status, out) = gather(&a, &[3]);
    assert_eq!(status, 200, "{out}");
    assert_eq!(
        out["outputs"][0]["data"],
        serde_json::json!([12.0, 13.0, 14.0, 15.0])
    );

    // Before: four 500s, a CrashLoop report, the gate failed and both nodes rolled back.
    for _ in 0..4 {
        let (status, out) = gather(&a, &[10]);
        assert_eq!(
            status, 400,
            "an index out of range is the client's error: {out}"
        );
        assert!(out["error"].is_string(), "{out}");
    }
    // Several health windows go by (1 s each).
    std::thread::sleep(Duration::from_secs(4));
    for n in [&a, &b] {
        let s = n.status();
        let c = s
            .channels
            .iter()
            .find(|c| c.channel == "gather")
            .expect("gather");
        assert_eq!(c.active_version, Some(1), "{}", n.log());
        let r = c.releases.iter().find(|r| r.version == 1).expect("v1");
        assert!(!r.rolled_back, "rolled back on {}:\n{}", n.url(), n.log());
        assert_eq!(
            r.failed,
            0,
            "failed reports on {}: {:?}",
            n.url(),
            r.failures
        );
        assert!(ready(n));
    }
    let (status, _) = gather(&a, &[9]);
    assert_eq!(status, 200, "the node still serves after the bad requests");
}
