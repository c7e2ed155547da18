//! Staged rollouts across real `pollen run` processes on loopback: stages opening in order
//! on every node, a canary that fails its gate and rolls back, operator halt / resume /
//! rollback reaching a node that was down when they were issued, a forged halt, and pins.
//!
//! The tests share one lock: each runs up to ten nodes, and two at once on a 2-core
//! machine would measure the scheduler rather than the protocol.

use pollen_node::status::{ReleaseStatus, Status};
use pollen_protocol::NodeId;
use pollen_protocol::manifest::{Channel, DeviceRequirements, Variant};
use pollen_protocol::rollout::{Gate, RolloutPlan, cohort_point};
use pollen_tests::Pollen;
use pollen_tests::mesh::{Node, Operator, now};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static SERIAL: Mutex<()> = Mutex::new(());

const CHANNEL: &str = "digits";

fn models() -> PathBuf {
    pollen_tests::workspace_dir().join("models")
}

fn channel() -> Channel {
    Channel::new(CHANNEL).unwrap()
}

fn node_id(s: &Status) -> NodeId {
    NodeId(pollen_protocol::ids::parse_hex32(&s.node_id).expect("node id"))
}

fn release(s: &Status, version: u64) -> Option<&ReleaseStatus> {
    s.channels
        .iter()
        .find(|c| c.channel == CHANNEL)?
        .releases
        .iter()
        .find(|r| r.version == version)
}

fn active(s: &Status) -> Option<u64> {
    s.channels
        .iter()
        .find(|c| c.channel == CHANNEL)
        .and_then(|c| c.active_version)
}

fn open_stages(s: &Status, version: u64) -> usize {
    release(s, version).map_or(0, |r| r.open_stages)
}

/// Stage of each node in `plan` for `version`.
fn stages(ids: &[NodeId], plan: &RolloutPlan, version: u64) -> Vec<usize> {
    ids.iter()
        .map(|id| {
            plan.stage_of(cohort_point(id, &channel(), version))
                .expect("last stage is 100%")
        })
        .collect()
}

fn statuses(nodes: &[Node]) -> Vec<Status> {
    nodes.iter().map(|n| n.status()).collect()
}

/// Start `n` nodes bootstrapped to the first, with extra args per node.
fn mesh(tmp: &Path, op: &Operator, n: usize, extra: impl Fn(usize) -> Vec<String>) -> Vec<Node> {
    let trust = vec![
        "--trust".to_string(),
        op.trust_file.display().to_string(),
        "--health-interval".to_string(),
        "2s".to_string(),
    ];
    let mut a_args = trust.clone();
    a_args.extend(extra(0));
    let first = Node::start(&tmp.join("n0"), &a_args);
    let mut nodes = vec![first];
    for i in 1..n {
        let mut args = trust.clone();
        args.extend(["--bootstrap".to_string(), nodes[0].addr()]);
        args.extend(extra(i));
        nodes.push(Node::start(&tmp.join(format!("n{i}")), &args));
    }
    for n in &nodes {
        n.wait(Duration::from_secs(30), "connected", |s| {
            !s.peers.is_empty()
        });
    }
    nodes
}

fn wait_all(nodes: &[Node], timeout: Duration, what: &str, pred: impl Fn(usize, &Status) -> bool) {
    for (i, n) in nodes.iter().enumerate() {
        n.wait(timeout, what, |s| pred(i, s));
    }
}

/// Publish v1 (immediate) through the first node, wait until every node serves it, and
/// return the node ids.
fn v1_everywhere(tmp: &Path, op: &Operator, nodes: &[Node]) -> Vec<NodeId> {
    op.publish_digits(tmp, &nodes[0], "digits-v1.onnx", "golden-v1.json", 1, &[]);
    wait_all(nodes, Duration::from_secs(60), "serving v1", |_, s| {
        active(s) == Some(1)
    });
    statuses(nodes).iter().map(node_id).collect()
}

fn log_has(n: &Node, needle: &str) -> bool {
    n.log().contains(needle)
}

/// Ten nodes, a 20% / 50% / 100% plan with 8 s stages and a gate: stages open in order,
/// exactly the nodes of the open stages run the new version at each step, and every node
/// agrees on the open stages and their opening times. Then a version whose weak-device
/// variant fails its golden check: the canary stage fails its gate, the next stage never
/// opens, the canaries that had switched go back, and nobody outside the canary stage
/// ever served it.
#[test]
fn ten_nodes_follow_a_staged_rollout_and_a_failing_canary_rolls_back() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let op = Operator::new(&tmp.path().join("op"), false);
    // Nodes 6..9 are weak devices: the weak variant of the failing release is theirs.
    let weak: BTreeSet<usize> = (6..10).collect();
    let nodes = mesh(tmp.path(), &op, 10, |i| {
        if weak.contains(&i) {
            vec!["--device-class".into(), "weak".into()]
        } else {
            Vec::new()
        }
    });
    let ids = v1_everywhere(tmp.path(), &op, &nodes);

    // ---- phase 1: 20% / 50% / 100%, 8 s apart, gate: 1 healthy, at most 20% failed.
    let interval = Duration::from_secs(8);
    let gate = Gate {
        min_healthy: 1,
        max_failure_ppm: 200_000,
    };
    let plan = RolloutPlan::percent(&[20.0, 50.0, 100.0], interval, Some(gate));
    // A version whose cohort points put at least one node in every stage.
    let v = (2..500u64)
        .find(|&v| {
            let st = stages(&ids, &plan, v);
            (0..3).all(|k| st.contains(&k))
        })
        .expect("a version with every stage populated");
    let stage_of = stages(&ids, &plan, v);
    eprintln!("v{v}: stages of the ten nodes {stage_of:?}");
    assert_bad_input_changes_nothing(&nodes[0]);
    assert!(
        !nodes[0].status().gates_open_to_sybils,
        "no gated release yet: nothing to warn about"
    );

    let published = Instant::now();
    op.publish_digits(
        tmp.path(),
        &nodes[0],
        "digits-v2.onnx",
        "golden-v2.json",
        v,
        &[
            "--stages",
            "20%,50%,100%",
            "--stage-interval",
            "8s",
            "--gate-min-healthy",
            "1",
            "--gate-max-failure",
            "20%",
        ],
    );
    let mut last_open = vec![0usize; nodes.len()];
    let mut step_times = Vec::new();
    for k in 1..=3usize {
        // Every node sees stage k open, then exactly the nodes of stages < k switch while
        // every node still agrees that k stages are open.
        let deadline = published + interval * k as u32 + Duration::from_secs(20);
        let expected: BTreeSet<usize> = (0..nodes.len()).filter(|&i| stage_of[i] < k).collect();
        loop {
            let st = statuses(&nodes);
            for (i, s) in st.iter().enumerate() {
                let open = open_stages(s, v);
                assert!(open >= last_open[i], "node {i}: open stages went back");
                last_open[i] = open;
                if active(s) == Some(v) {
                    assert!(
                        stage_of[i] < open,
                        "node {i} (stage {}) serves v{v} with {open} stages open",
                        stage_of[i] + 1
                    );
                }
            }
            let on_v: BTreeSet<usize> = (0..nodes.len())
                .filter(|&i| active(&st[i]) == Some(v))
                .collect();
            let all_k = st.iter().all(|s| open_stages(s, v) == k);
            if all_k && on_v == expected {
                assert!(
                    st.iter().all(|s| s.gates_open_to_sybils),
                    "a gated release without a fleet key: every status says its gates are \
                     open to Sybil reporters"
                );
                step_times.push(published.elapsed());
                break;
            }
            assert!(
                Instant::now() < deadline,
                "step {k}: on v{v} {on_v:?}, expected {expected:?}, open stages {:?}",
                st.iter().map(|s| open_stages(s, v)).collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let full = published.elapsed();
    let st = statuses(&nodes);
    let opened: Vec<Vec<Option<u64>>> = st
        .iter()
        .map(|s| {
            release(s, v)
                .unwrap()
                .stage_list
                .iter()
                .map(|x| x.opened_at_ms)
                .collect()
        })
        .collect();
    for (i, o) in opened.iter().enumerate() {
        assert_eq!(o, &opened[0], "node {i} agrees on the opening times");
    }
    eprintln!(
        "publish -> stages seen open and switched at {:?}; full rollout {:.1} s (stage interval 8 s)",
        step_times
            .iter()
            .map(|d| format!("{:.1}s", d.as_secs_f64()))
            .collect::<Vec<_>>(),
        full.as_secs_f64()
    );

    // ---- phase 2: the weak variant fails its golden check.
    let w_plan = RolloutPlan::percent(&[20.0, 50.0, 100.0], Duration::from_secs(10), Some(gate));
    let w = (v + 1..v + 1000)
        .find(|&w| {
            let st = stages(&ids, &w_plan, w);
            let canary: Vec<usize> = (0..10).filter(|&i| st[i] == 0).collect();
            canary.iter().any(|i| weak.contains(i))
                && canary.iter().any(|i| !weak.contains(i))
                && canary.len() < 10
        })
        .expect("a version whose canary mixes weak and strong nodes");
    let w_stage = stages(&ids, &w_plan, w);
    let canary: BTreeSet<usize> = (0..10).filter(|&i| w_stage[i] == 0).collect();
    eprintln!("v{w}: canary {canary:?}, weak {weak:?}");
    let strong_file = op.manifest(&[models().join("digits-v2.onnx")], CHANNEL, w, 1 << 20);
    let weak_file = op.manifest(&[models().join("digits-v1.onnx")], CHANNEL, w, 1 << 20);
    let mut body = strong_file.body.clone();
    body.artifact.variants[0].name = "default".into();
    body.artifact.variants.push(Variant {
        name: "weak".into(),
        requires: DeviceRequirements {
            device_classes: vec!["weak".into()],
            min_memory_mib: 0,
            cpu_features: Vec::new(),
        },
        files: weak_file.body.artifact.variants[0].files.clone(),
    });
    body.golden =
        pollen_keys::manifest::golden_from_json(&models().join("golden-v2.json")).unwrap();
    body.rollout = w_plan;
    body.created = now();
    body.expires = now().plus(Duration::from_secs(86400));
    let m = pollen_keys::manifest::sign(&body, &[&op.publisher]).unwrap();
    let published = Instant::now();
    let (code, text) = nodes[0].post_manifest(&m.signed.to_bytes());
    assert_eq!(code, 200, "{text}");
    let mut served_w = BTreeSet::new();
    let mut failure_seen: Option<Duration> = None;
    let all_back;
    loop {
        let st = statuses(&nodes);
        for (i, s) in st.iter().enumerate() {
            if active(s) == Some(w) {
                served_w.insert(i);
            }
            assert!(
                open_stages(s, w) <= 1,
                "node {i}: a later stage of v{w} opened"
            );
            if failure_seen.is_none() && release(s, w).is_some_and(|r| r.rolled_back) {
                failure_seen = Some(published.elapsed());
            }
        }
        let done = st
            .iter()
            .all(|s| active(s) == Some(v) && release(s, w).is_some_and(|r| r.rolled_back));
        if done {
            all_back = published.elapsed();
            break;
        }
        assert!(
            published.elapsed() < Duration::from_secs(60),
            "no rollback everywhere: {:?}",
            st.iter()
                .map(|s| (
                    active(s),
                    release(s, w).map(|r| (r.rolled_back, r.failed, r.healthy))
                ))
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Past the second stage's time: still closed everywhere, everybody on v.
    std::thread::sleep((Duration::from_secs(13)).saturating_sub(published.elapsed()));
    let st = statuses(&nodes);
    for (i, s) in st.iter().enumerate() {
        assert_eq!(active(s), Some(v), "node {i} back on v{v}");
        let r = release(s, w).expect("release kept");
        assert_eq!(r.open_stages, 1, "node {i}: only the canary stage opened");
        assert!(r.rolled_back, "node {i} knows v{w} failed its gate");
        assert_eq!(
            r.failures.first().map(|f| f.class.as_str()),
            Some("GoldenMismatch"),
            "node {i} shows the failure reason"
        );
        assert!(
            r.stage_list[1].why.contains("failed its gate"),
            "node {i}: {:?}",
            r.stage_list[1]
        );
    }
    for (i, n) in nodes.iter().enumerate() {
        let passed = log_has(n, &format!("{CHANNEL} version {w} passed its checks"));
        if !canary.contains(&i) {
            assert!(!passed, "node {i} outside the canary stage served v{w}");
        }
        if canary.contains(&i) && weak.contains(&i) {
            assert!(!passed, "weak canary {i} passed a failing golden check");
            assert!(log_has(
                n,
                &format!("{CHANNEL} version {w} failed to activate (GoldenMismatch)")
            ));
        }
        if passed {
            assert!(
                log_has(n, &format!("{CHANNEL}: rolling back from version {w}")),
                "canary {i} served v{w} and must have rolled back"
            );
        }
    }
    assert!(served_w.is_subset(&canary), "served v{w}: {served_w:?}");
    let text = Pollen::in_dir(tmp.path())
        .run(["status", "--node", &nodes[0].url()])
        .success();
    assert!(
        text.contains("ROLLED BACK") && text.contains("GoldenMismatch"),
        "{text}"
    );
    let rolled: Vec<usize> = (0..10)
        .filter(|&i| log_has(&nodes[i], &format!("rolling back from version {w}")))
        .collect();
    eprintln!(
        "v{w}: gate failure seen {:.1} s after publish, last node back on v{v} at {:.1} s \
         ({:.1} s after the failure); canaries that served and rolled back: {rolled:?}",
        failure_seen.unwrap_or_default().as_secs_f64(),
        all_back.as_secs_f64(),
        (all_back - failure_seen.unwrap_or_default()).as_secs_f64()
    );
}

/// Halt, resume and rollback from the command line reach every node, including one that
/// was down when each was issued; a forged halt is refused and logged; a pin holds a node
/// on its version across a restart until it is lifted.
#[test]
fn halt_resume_rollback_reach_a_node_that_was_away_and_forged_halts_fail() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let op = Operator::new(&tmp.path().join("op"), false);
    let mut nodes = mesh(tmp.path(), &op, 4, |_| Vec::new());
    let pollen = Pollen::in_dir(tmp.path());
    let key = op.dir.join("publisher.key").display().to_string();
    let ids = v1_everywhere(tmp.path(), &op, &nodes);
    let plan = RolloutPlan::percent(&[25.0, 100.0], Duration::from_secs(12), None);
    // Node 3 (the one that will be away) outside the canary stage, some other node in it.
    let v = (2..500u64)
        .find(|&v| {
            let st = stages(&ids, &plan, v);
            st[3] == 1 && st[..3].contains(&0)
        })
        .expect("a suitable version");
    let st = stages(&ids, &plan, v);
    let canary: Vec<usize> = (0..4).filter(|&i| st[i] == 0).collect();

    // A halt signed by a key the trust root does not know is refused and logged.
    let forged = tmp.path().join("forged.key");
    pollen
        .run(["keys", "generate", forged.to_str().unwrap()])
        .success();
    let err = pollen
        .run([
            "rollout",
            "halt",
            CHANNEL,
            "--version",
            "1",
            "--key",
            forged.to_str().unwrap(),
            "--node",
            &nodes[0].url(),
        ])
        .failure();
    assert!(err.contains("refused"), "{err}");
    assert!(
        log_has(&nodes[0], "rejected local instruction"),
        "{}",
        nodes[0].log()
    );

    assert_bad_input_changes_nothing(&nodes[0]);

    let published = Instant::now();
    op.publish_digits(
        tmp.path(),
        &nodes[0],
        "digits-v2.onnx",
        "golden-v2.json",
        v,
        &["--stages", "25%,100%", "--stage-interval", "12s"],
    );
    for &i in &canary {
        nodes[i].wait(Duration::from_secs(30), "canary on v", |s| {
            active(s) == Some(v)
        });
    }
    // Node 3 goes away; the operator halts the rollout through node 1.
    nodes[3].kill();
    pollen
        .run([
            "rollout",
            "halt",
            CHANNEL,
            "--key",
            &key,
            "--node",
            &nodes[1].url(),
        ])
        .success();
    for n in &nodes[..3] {
        n.wait(Duration::from_secs(15), "halt known", |s| {
            release(s, v).is_some_and(|r| r.halted)
        });
    }
    assert!(
        published.elapsed() < Duration::from_secs(12),
        "halted before stage 2's time"
    );
    std::thread::sleep(Duration::from_secs(14).saturating_sub(published.elapsed()));
    for (i, n) in nodes[..3].iter().enumerate() {
        let s = n.status();
        assert_eq!(open_stages(&s, v), 1, "node {i}: halted at one stage");
        assert_eq!(active(&s) == Some(v), canary.contains(&i), "node {i}");
    }
    // Node 3 comes back after stage 2's time: it must learn the halt before it switches.
    nodes[3].restart();
    let back = Instant::now();
    let mut halted_seen = false;
    while back.elapsed() < Duration::from_secs(8) {
        let s = nodes[3].status();
        assert_ne!(active(&s), Some(v), "node 3 switched to a halted release");
        halted_seen |= release(&s, v).is_some_and(|r| r.halted && r.open_stages == 1);
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(halted_seen, "node 3 learned the halt:\n{}", nodes[3].log());
    assert_eq!(active(&nodes[3].status()), Some(1));

    // Resume through node 2: the second stage's time has passed, so everybody switches.
    pollen
        .run([
            "rollout",
            "resume",
            CHANNEL,
            "--key",
            &key,
            "--node",
            &nodes[2].url(),
        ])
        .success();
    wait_all(
        &nodes,
        Duration::from_secs(30),
        "on v after resume",
        |_, s| active(s) == Some(v),
    );

    // Node 2 goes away; the operator rolls back to version 1 through node 0.
    nodes[2].kill();
    let out = pollen
        .run([
            "rollout",
            "rollback",
            CHANNEL,
            "--to",
            "1",
            "--key",
            &key,
            "--node",
            &nodes[0].url(),
        ])
        .success();
    let rb = v + 1;
    assert!(out.contains(&format!("published as version {rb}")), "{out}");
    for i in [0, 1, 3] {
        nodes[i].wait(Duration::from_secs(30), "on the rollback release", |s| {
            active(s) == Some(rb)
        });
    }
    nodes[2].restart();
    nodes[2].wait(Duration::from_secs(30), "on the rollback release", |s| {
        active(s) == Some(rb)
    });
    let s = nodes[2].status();
    let files = |ver: u64| -> Vec<String> {
        release(&s, ver)
            .unwrap()
            .files
            .iter()
            .map(|f| f.content_id.clone())
            .collect()
    };
    assert_eq!(
        files(rb),
        files(1),
        "the rollback release serves version 1's artifact"
    );

    // Pin node 1 to v: it leaves the channel's newest release, and stays across a restart.
    pollen
        .run(["pin", CHANNEL, &v.to_string(), "--node", &nodes[1].url()])
        .success();
    nodes[1].wait(Duration::from_secs(15), "pinned to v", |s| {
        active(s) == Some(v)
    });
    nodes[1].restart();
    let s = nodes[1].wait(Duration::from_secs(15), "pinned after restart", |s| {
        active(s) == Some(v)
    });
    assert_eq!(s.channels[0].pinned, Some(v));
    pollen
        .run(["unpin", CHANNEL, "--node", &nodes[1].url()])
        .success();
    nodes[1].wait(Duration::from_secs(15), "unpinned", |s| {
        active(s) == Some(rb)
    });
}

/// Bad input on the control endpoints (a malformed instruction, bad pin bodies and
/// channels, an unknown manifest): a clear 4xx each, and nothing changes on a node that
/// serves version 1 unpinned.
fn assert_bad_input_changes_nothing(n0: &Node) {
    let (code, body) = n0.http("POST", "/v1/instructions", b"not an envelope");
    assert_eq!(code, 422, "{body}");
    assert!(body.contains("malformed instruction"), "{body}");
    for bad in ["abc", "0", "-3", ""] {
        let (code, body) = n0.http("PUT", &format!("/v1/pins/{CHANNEL}"), bad.as_bytes());
        assert_eq!(code, 400, "pin body {bad:?}: {body}");
        assert!(body.contains("version number"), "{body}");
    }
    let (code, body) = n0.http("PUT", "/v1/pins/Not%20A%20Channel", b"1");
    assert_eq!(code, 400, "{body}");
    let (code, body) = n0.http("GET", &format!("/v1/manifests/{CHANNEL}/99"), b"");
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("keeps no release 99"), "{body}");
    let s = n0.status();
    assert_eq!(s.channels[0].pinned, None, "no pin was set");
    assert_eq!(active(&s), Some(1), "still serving v1");
    assert!(release(&s, 1).is_some_and(|r| r.instruction.is_none()));
}
