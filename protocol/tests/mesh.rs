//! Mesh behaviour on the deterministic harness: many state machines, virtual time, seeded
//! links. Each test asserts outcomes, and prints the seed on failure via the harness.

use core::time::Duration;
use pollen_protocol::chunking::FileSpec;
use pollen_protocol::harness::{
    Harness, HealthPlan, LinkModel, Operator, manifest_body, random_file_spec,
};
use pollen_protocol::io::{Command, Event, ObjectKind};
use pollen_protocol::manifest::{Channel, SignedManifest};
use pollen_protocol::rollout::{ErrorClass, Gate, HealthStatus, RolloutPlan};
use pollen_protocol::signing::Signed;
use pollen_protocol::wire::Message;
use pollen_protocol::{Config, Instant, SigningKey, UnixTime};

const T0: UnixTime = UnixTime::from_secs(1_700_000_000);

fn harness(n: usize, seed: u64) -> (Harness, Operator) {
    let op = Operator::new(seed, 1, None);
    let mut h = Harness::new(n, Config::default(), LinkModel::default(), seed, T0);
    h.install_trust(&op.trust);
    h.connect_random(6);
    (h, op)
}

fn sign(
    op: &Operator,
    channel: &str,
    version: u64,
    spec: &FileSpec,
    plan: RolloutPlan,
    created: UnixTime,
) -> SignedManifest {
    Signed::sign(
        &manifest_body(channel, version, spec.clone(), plan, created),
        &op.signers(1),
    )
}

fn vision() -> Channel {
    Channel::new("vision.defects").unwrap()
}

#[test]
fn fifty_nodes_fetch_a_64_chunk_artifact() {
    for seed in [7, 8, 9] {
        fifty_nodes(seed);
    }
}

fn fifty_nodes(seed: u64) {
    let (mut h, op) = harness(50, seed);
    let spec = random_file_spec(64 * 16 * 1024, 16 * 1024, 1);
    let m = sign(
        &op,
        "vision.defects",
        1,
        &spec,
        RolloutPlan::immediate(),
        T0,
    );
    h.publish(0, &m, &[&spec]).unwrap();
    h.run_for(Duration::from_secs(120));
    for i in 0..50 {
        assert_eq!(
            h.nodes[i].mesh.highest(&vision()),
            1,
            "node {i} accepted the manifest"
        );
        assert!(
            h.has_file(i, &spec),
            "node {i} holds every chunk: {}",
            h.nodes[i].mesh.debug_file(&spec.content_id)
        );
        assert_eq!(
            h.nodes[i].active.get(&vision()).map(|a| a.0),
            Some(1),
            "node {i} active"
        );
        let mesh = &h.nodes[i].mesh;
        let id = mesh.release(&vision(), 1).map(|r| r.id());
        assert_eq!(id, Some(pollen_protocol::ManifestId(m.body_hash())));
        assert_eq!(mesh.actives().next(), Some((&vision(), 1, id.unwrap())));
        assert!(mesh.live_files().contains(&spec.content_id));
        assert_eq!(mesh.releases().count(), 1);
    }
    let s = &h.stats;
    assert_eq!(s.double_stores, 0, "no node stores a chunk twice");
    let dup = s.duplicate_transfers as f64 / s.chunk_transfers as f64;
    let publisher = s.uploaded[0] as f64 / spec.size as f64;
    eprintln!(
        "seed {seed}: transfers {} duplicates {} ({:.2}%) publisher uploaded {:.2}x the artifact, {} messages",
        s.chunk_transfers,
        s.duplicate_transfers,
        dup * 100.0,
        publisher,
        s.messages
    );
    assert!(dup <= 0.02, "duplicates {dup}");
    assert!(publisher <= 3.0, "publisher uploaded {publisher}x");
}

#[test]
fn bad_manifests_are_rejected_everywhere() {
    let seed = 11;
    let op = Operator::new(seed, 2, None);
    let n = 12;
    let mut h = Harness::new(n, Config::default(), LinkModel::default(), seed, T0);
    h.install_trust(&op.trust);
    h.connect_random(4);
    let spec = random_file_spec(100_000, 16 * 1024, 2);
    let plan = RolloutPlan::immediate;
    let both = op.signers(2);
    // A good v2 first, so that a v1 is a replay.
    let good = Signed::sign(
        &manifest_body("vision.defects", 2, spec.clone(), plan(), T0),
        &both,
    );
    h.publish(0, &good, &[&spec]).unwrap();
    h.run_for(Duration::from_secs(30));
    for i in 0..n {
        assert_eq!(h.nodes[i].mesh.highest(&vision()), 2);
    }
    let stranger = SigningKey::from_bytes(&[42; 32]);
    let forged = Signed::sign(
        &manifest_body("vision.defects", 3, spec.clone(), plan(), T0),
        &[&stranger],
    );
    let scoped = Signed::sign(
        &manifest_body("vision.defects", 4, spec.clone(), plan(), T0),
        &[&op.publishers[2]],
    );
    let mut expired_body = manifest_body(
        "vision.defects",
        5,
        spec.clone(),
        plan(),
        T0.minus(Duration::from_secs(100)),
    );
    expired_body.expires = T0.minus(Duration::from_secs(10));
    let expired = Signed::sign(&expired_body, &both);
    let replayed = Signed::sign(
        &manifest_body("vision.defects", 1, spec.clone(), plan(), T0),
        &both,
    );
    let under = Signed::sign(
        &manifest_body("vision.defects", 6, spec.clone(), plan(), T0),
        &op.signers(1),
    );
    let cases = [
        ("forged", forged),
        ("out_of_scope", scoped),
        ("expired", expired),
        ("stale", replayed),
        ("under_threshold", under),
    ];
    for (label, m) in &cases {
        // Through the local API of node 0, and pushed by node 1 to every node.
        assert!(
            h.command(0, Command::Publish(m.clone())).is_err(),
            "{label} refused locally"
        );
        // Node 1 turns attacker: connected to everyone, it pushes the manifest to all.
        for to in 0..n {
            if to != 1 {
                h.connect(1, to);
                h.inject(1, to, Message::Manifest(m.clone()));
            }
        }
        h.run_for(Duration::from_secs(5));
        for i in 0..n {
            if i == 1 {
                continue;
            }
            let seen = h.nodes[i].events.iter().any(|(_, e)| matches!(e, Event::Rejected { kind: ObjectKind::Manifest, label: l, .. } if l == label));
            assert!(seen, "node {i} rejected {label}");
        }
    }
    h.run_for(Duration::from_secs(60));
    for i in 0..n {
        assert_eq!(h.nodes[i].mesh.highest(&vision()), 2, "node {i}");
        assert!(
            h.nodes[i].served.iter().all(|(_, v)| *v == 2),
            "node {i} served only v2"
        );
    }
}

#[test]
fn corrupt_peers_are_penalised_and_honest_nodes_complete() {
    let (mut h, op) = harness(20, 23);
    for bad in [3, 9, 14] {
        h.nodes[bad].corrupt = true;
    }
    let spec = random_file_spec(32 * 16 * 1024, 16 * 1024, 5);
    let m = sign(
        &op,
        "vision.defects",
        1,
        &spec,
        RolloutPlan::immediate(),
        T0,
    );
    h.publish(0, &m, &[&spec]).unwrap();
    h.run_for(Duration::from_secs(300));
    assert!(h.stats.corrupt_arrivals > 0, "corrupt peers did serve");
    for i in 0..20 {
        if [3, 9, 14].contains(&i) {
            continue;
        }
        assert!(h.has_file(i, &spec), "honest node {i} completed");
    }
    let penalised = h
        .nodes
        .iter()
        .flat_map(|n| n.events.iter())
        .filter(
            |(_, e)| matches!(e, Event::PeerPenalised { reason, .. } if reason.contains("corrupt")),
        )
        .count();
    assert!(penalised > 0);
}

#[test]
fn partitioned_node_catches_up_to_the_latest_version() {
    let (mut h, op) = harness(16, 31);
    let specs: Vec<FileSpec> = (0..3)
        .map(|v| random_file_spec(50_000 + v * 1000, 16 * 1024, 40 + v as u64))
        .collect();
    let m1 = sign(
        &op,
        "vision.defects",
        1,
        &specs[0],
        RolloutPlan::immediate(),
        T0,
    );
    h.publish(0, &m1, &[&specs[0]]).unwrap();
    h.run_for(Duration::from_secs(20));
    h.partition(5);
    for v in 2..=3u64 {
        let spec = &specs[v as usize - 1];
        let m = sign(
            &op,
            "vision.defects",
            v,
            spec,
            RolloutPlan::immediate(),
            h.wall(),
        );
        h.publish(0, &m, &[spec]).unwrap();
        h.run_for(Duration::from_secs(20));
    }
    assert_eq!(h.nodes[5].mesh.highest(&vision()), 1, "cut off");
    // Hours offline.
    h.run_for(Duration::from_secs(3 * 3600));
    h.heal(5);
    h.run_for(Duration::from_secs(60));
    assert_eq!(h.nodes[5].mesh.highest(&vision()), 3);
    assert_eq!(h.nodes[5].active.get(&vision()).map(|a| a.0), Some(3));
    assert!(h.has_file(5, &specs[2]));
}

fn staged_plan() -> RolloutPlan {
    RolloutPlan::percent(
        &[20.0, 50.0, 100.0],
        Duration::from_secs(30),
        Some(Gate {
            min_healthy: 1,
            max_failure_ppm: 200_000,
        }),
    )
}

/// Publish v1 everywhere, then v2 with a 3-stage plan; returns (harness, operator, v2 spec).
fn staged(
    seed: u64,
    policy: impl FnMut(usize, &Channel, u64) -> HealthPlan + 'static,
) -> (Harness, Operator, SignedManifest) {
    let (mut h, op) = harness(30, seed);
    h.set_policy(policy);
    let s1 = random_file_spec(40_000, 16 * 1024, 61);
    let s2 = random_file_spec(41_000, 16 * 1024, 62);
    let m1 = sign(&op, "vision.defects", 1, &s1, RolloutPlan::immediate(), T0);
    h.publish(0, &m1, &[&s1]).unwrap();
    h.run_for(Duration::from_secs(20));
    let m2 = sign(&op, "vision.defects", 2, &s2, staged_plan(), h.wall());
    h.publish(0, &m2, &[&s2]).unwrap();
    (h, op, m2)
}

#[test]
fn staged_rollout_opens_stages_in_order() {
    let (mut h, _op, m2) = staged(41, |_, _, _| HealthPlan::ok());
    let m2 = pollen_protocol::manifest::Manifest::decode(m2).unwrap();
    let stage_of: Vec<Option<usize>> = h.nodes.iter().map(|n| m2.stage_of(&n.id())).collect();
    assert!(
        stage_of.contains(&Some(0)),
        "seed gives a non-empty canary stage"
    );
    for (open, t) in [(1usize, 15u64), (2, 45), (3, 75)] {
        h.run_until(Instant::from_micros(0) + Duration::from_secs(20 + t));
        for (i, n) in h.nodes.iter().enumerate() {
            let on_v2 = n.active.get(&vision()).map(|a| a.0) == Some(2);
            let admitted = stage_of[i].is_some_and(|s| s < open);
            assert_eq!(
                on_v2, admitted,
                "node {i} with {open} stages open (stage {:?})",
                stage_of[i]
            );
            let d = n.mesh.release(&vision(), 2).unwrap().decision.unwrap();
            assert_eq!(d.open_stages(), open, "node {i} agrees on open stages");
        }
    }
}

#[test]
fn failing_canary_rolls_back_and_later_stages_never_open() {
    let (mut h, _op, m2) = staged(43, |_, _, v| {
        if v == 2 {
            HealthPlan {
                at_activation: HealthStatus::Ok,
                later: Some((
                    Duration::from_secs(5),
                    HealthStatus::Failed {
                        class: ErrorClass::RuntimeErrors,
                        detail: "error rate 40%".into(),
                    },
                )),
            }
        } else {
            HealthPlan::ok()
        }
    });
    let m2 = pollen_protocol::manifest::Manifest::decode(m2).unwrap();
    h.run_for(Duration::from_secs(200));
    let mut canaries = 0;
    for (i, n) in h.nodes.iter().enumerate() {
        let stage = m2.stage_of(&n.id());
        let served_v2 = n.served.contains(&(vision(), 2));
        assert_eq!(
            served_v2,
            stage == Some(0),
            "node {i}: only canaries ever served v2"
        );
        if served_v2 {
            canaries += 1;
            assert!(
                n.events.iter().any(|(_, e)| matches!(
                    e,
                    Event::RollBack {
                        from: 2,
                        from_manifest,
                        to: Some((1, _)),
                        ..
                    } if *from_manifest == m2.id
                )),
                "canary {i} rolled back: {:#?}",
                n.events
                    .iter()
                    .filter(|(_, e)| !matches!(
                        e,
                        Event::FileProgress { .. }
                            | Event::CommandDone { .. }
                            | Event::PeerPenalised { .. }
                    ))
                    .collect::<Vec<_>>()
            );
        }
        assert_eq!(
            n.active.get(&vision()).map(|a| a.0),
            Some(1),
            "node {i} back on v1"
        );
        assert!(
            !n.events.iter().any(|(_, e)| matches!(
                e,
                Event::StageOpened {
                    version: 2,
                    stage: 1..,
                    ..
                }
            )),
            "node {i}: no later stage opened"
        );
        assert!(
            n.events
                .iter()
                .any(|(_, e)| matches!(e, Event::RolloutFailed { version: 2, .. })),
            "node {i} saw the failure"
        );
    }
    assert!(canaries > 0);
}

fn small_run(seed: u64) -> [u8; 32] {
    let (mut h, op) = harness(12, seed);
    let spec = random_file_spec(10 * 16 * 1024, 16 * 1024, 3);
    let m = sign(
        &op,
        "vision.defects",
        1,
        &spec,
        RolloutPlan::immediate(),
        T0,
    );
    h.publish(0, &m, &[&spec]).unwrap();
    h.run_for(Duration::from_secs(30));
    h.trace_hash()
}

#[test]
fn same_seed_same_outputs_different_seed_different() {
    assert_eq!(small_run(5), small_run(5));
    assert_ne!(small_run(5), small_run(6));
}

#[test]
fn equivocation_converges_on_the_lowest_body_hash() {
    let (mut h, op) = harness(20, 51);
    let a = random_file_spec(30_000, 16 * 1024, 71);
    let b = random_file_spec(30_001, 16 * 1024, 72);
    let ma = sign(&op, "vision.defects", 1, &a, RolloutPlan::immediate(), T0);
    let mb = sign(&op, "vision.defects", 1, &b, RolloutPlan::immediate(), T0);
    h.publish(0, &ma, &[&a]).unwrap();
    h.publish(10, &mb, &[&b]).unwrap();
    h.run_for(Duration::from_secs(60));
    let kept = pollen_protocol::ManifestId(ma.body_hash())
        .min(pollen_protocol::ManifestId(mb.body_hash()));
    for (i, n) in h.nodes.iter().enumerate() {
        assert!(
            n.events.iter().any(
                |(_, e)| matches!(e, Event::Equivocation { kept: k, version: 1, .. } if *k == kept)
            ),
            "node {i} raised the alert"
        );
        assert_eq!(
            n.active.get(&vision()).map(|a| a.1),
            Some(kept),
            "node {i} serves the kept manifest"
        );
    }
}

#[test]
fn halt_stops_later_stages_and_forged_halt_is_refused() {
    use pollen_protocol::rollout::{InstructionBody, RolloutAction};
    let (mut h, op, m2) = staged(45, |_, _, _| HealthPlan::ok());
    // Canary stage opens; halt before the second stage.
    h.run_for(Duration::from_secs(10));
    let halt = |k: &SigningKey, issued| {
        Signed::sign(
            &InstructionBody {
                channel: vision(),
                version: 2,
                action: RolloutAction::Halt,
                issued,
            },
            &[k],
        )
    };
    let forged = halt(&SigningKey::from_bytes(&[77; 32]), h.wall());
    assert!(
        h.command(3, Command::Instruct(forged)).is_err(),
        "forged halt refused"
    );
    let wall = h.wall();
    let real = halt(&op.publishers[0], wall);
    h.command(3, Command::Instruct(real)).unwrap();
    h.run_for(Duration::from_secs(150));
    let m2 = pollen_protocol::manifest::Manifest::decode(m2).unwrap();
    for (i, n) in h.nodes.iter().enumerate() {
        assert!(
            n.events
                .iter()
                .any(|(_, e)| matches!(e, Event::InstructionAccepted { version: 2, .. })),
            "node {i} got the halt"
        );
        let on_v2 = n.active.get(&vision()).map(|a| a.0) == Some(2);
        assert_eq!(
            on_v2,
            m2.stage_of(&n.id()) == Some(0),
            "node {i}: only the canary stage runs v2"
        );
    }
}

#[test]
fn rotated_trust_root_spreads_and_authorises_new_publishers() {
    use pollen_protocol::trust::{ChannelPattern, Publisher, TrustRootBody};
    let (mut h, op) = harness(15, 61);
    let new_publisher = SigningKey::from_bytes(&[99; 32]);
    let old = op.trust.decode_body().unwrap();
    let body = TrustRootBody {
        version: 2,
        publishers: vec![Publisher {
            key: pollen_protocol::PublicKey::from(&new_publisher),
            name: "new".into(),
            channels: vec![ChannelPattern("*".into())],
        }],
        ..old
    };
    let v2 = Signed::sign(&body, &[&op.root]);
    h.command(4, Command::SetTrustRoot(v2)).unwrap();
    h.run_for(Duration::from_secs(30));
    let spec = random_file_spec(20_000, 16 * 1024, 81);
    let m = Signed::sign(
        &manifest_body(
            "vision.defects",
            1,
            spec.clone(),
            RolloutPlan::immediate(),
            T0,
        ),
        &[&new_publisher],
    );
    h.publish(0, &m, &[&spec]).unwrap();
    let old_signed = sign(
        &op,
        "vision.defects",
        2,
        &spec,
        RolloutPlan::immediate(),
        T0,
    );
    assert!(
        h.command(0, Command::Publish(old_signed)).is_err(),
        "revoked publisher refused"
    );
    h.run_for(Duration::from_secs(30));
    for (i, n) in h.nodes.iter().enumerate() {
        assert_eq!(n.mesh.trust_root().unwrap().body.version, 2, "node {i}");
        assert_eq!(n.mesh.highest(&vision()), 1, "node {i}");
    }
}

#[test]
fn uncertified_node_is_refused_and_receives_nothing() {
    use pollen_protocol::trust::NodeCertBody;
    let seed = 71;
    let fleet = SigningKey::from_bytes(&[5; 32]);
    let op = Operator::new(seed, 1, Some(pollen_protocol::PublicKey::from(&fleet)));
    let n = 8;
    let mut h = Harness::new(n, Config::default(), LinkModel::default(), seed, T0);
    for i in 0..n - 1 {
        let body = NodeCertBody {
            node: h.nodes[i].id(),
            issued: T0,
            expires: T0.plus(Duration::from_secs(86400)),
            label: format!("node-{i}"),
        };
        h.nodes[i].cert = Some(Signed::sign(&body, &[&fleet]));
    }
    h.install_trust(&op.trust);
    h.connect_random(3);
    for i in 0..n - 1 {
        h.connect(n - 1, i);
    }
    let spec = random_file_spec(50_000, 16 * 1024, 91);
    h.publish(
        0,
        &sign(
            &op,
            "vision.defects",
            1,
            &spec,
            RolloutPlan::immediate(),
            T0,
        ),
        &[&spec],
    )
    .unwrap();
    h.run_for(Duration::from_secs(60));
    for i in 0..n - 1 {
        assert!(h.has_file(i, &spec), "certified node {i} completed");
    }
    let stranger = &h.nodes[n - 1];
    assert_eq!(
        stranger.mesh.highest(&vision()),
        0,
        "stranger got no manifest"
    );
    assert!(!h.has_file(n - 1, &spec), "stranger got no chunk");
    assert!(h.stats.messages > 0);
    // A health report of an uncertified node, relayed by a certified peer, is ignored;
    // the certified nodes' own reports fill the sample.
    use pollen_protocol::rollout::{HealthReport, HealthReportBody};
    let mid = pollen_protocol::ManifestId(
        sign(
            &op,
            "vision.defects",
            1,
            &spec,
            RolloutPlan::immediate(),
            T0,
        )
        .body_hash(),
    );
    let outsider = SigningKey::from_bytes(&[42; 32]);
    let body = HealthReportBody {
        node: pollen_protocol::NodeId::from(&outsider),
        channel: vision(),
        version: 1,
        manifest: mid,
        status: HealthStatus::Failed {
            class: ErrorClass::LoadError,
            detail: "not a fleet member".into(),
        },
        requests: 0,
        errors: 0,
        latency_p50_us: 0,
        latency_p99_us: 0,
        timestamp: h.wall(),
        lm: None,
    };
    let report = HealthReport {
        signed: Signed::sign(&body, &[&outsider]),
        cert: None,
    };
    let from = h.nodes[1].id();
    h.input(
        0,
        pollen_protocol::io::Input::Received {
            from,
            msg: Message::Reports(vec![report]),
        },
    );
    h.run_for(Duration::from_secs(10));
    for i in 0..n - 1 {
        let s = h.nodes[i].mesh.sample(&mid).expect("sample");
        assert_eq!(
            s.counts().failed,
            0,
            "node {i} ignored the uncertified report"
        );
        assert_eq!(
            s.len(),
            n - 1,
            "node {i}: a report from every certified node"
        );
    }
}

#[test]
fn endgame_duplicates_a_request_stuck_on_a_slow_peer() {
    let (mut h, op) = harness(3, 81);
    // Node 1 holds the file too but uploads at 1 KiB/s: a 16 KiB chunk takes 16 s.
    h.nodes[1].upload_bytes_per_sec = Some(1024);
    h.partition(2);
    let spec = random_file_spec(8 * 16 * 1024, 16 * 1024, 11);
    let m = sign(
        &op,
        "vision.defects",
        1,
        &spec,
        RolloutPlan::immediate(),
        T0,
    );
    h.publish(0, &m, &[&spec]).unwrap();
    h.run_for(Duration::from_secs(1));
    let all = pollen_protocol::wire::Bitfield::full(8);
    h.command(
        1,
        Command::LocalChunks {
            file: spec.content_id,
            chunks: all,
        },
    )
    .unwrap();
    h.heal(2);
    let start = h.now();
    while !h.has_file(2, &spec) && h.now() - start < Duration::from_secs(60) {
        h.run_for(Duration::from_millis(100));
    }
    let took = h.now() - start;
    // Without the endgame, the chunks queued at the slow peer would take 16 s each.
    assert!(
        took < Duration::from_secs(5),
        "node 2 completed in {took:?}: {}",
        h.nodes[2].mesh.debug_file(&spec.content_id)
    );
    assert!(
        h.stats.uploaded[1] > 0 || took < Duration::from_secs(1),
        "the slow peer was asked"
    );
}

/// Clocks off by up to ±150 s: every node reaches the same decision (stage opening times
/// derive from signed timestamps, not from when a node heard something), none refuses a
/// peer's report as too far ahead, nobody rolls back, and each node opens a stage when its
/// own clock says so: no earlier than the harness time minus its offset.
#[test]
fn clock_skew_of_minutes_keeps_one_decision() {
    let seed = 47;
    let op = Operator::new(seed, 1, None);
    let mut h = Harness::new(30, Config::default(), LinkModel::default(), seed, T0);
    for i in 0..30 {
        // Deterministic offsets spread over [-150 s, +150 s].
        h.nodes[i].clock_offset_ms = (i as i64 * 10_343 % 300_001) - 150_000;
    }
    h.install_trust(&op.trust);
    h.connect_random(6);
    let s1 = random_file_spec(40_000, 16 * 1024, 61);
    let s2 = random_file_spec(41_000, 16 * 1024, 62);
    let m1 = sign(&op, "vision.defects", 1, &s1, RolloutPlan::immediate(), T0);
    h.publish(0, &m1, &[&s1]).unwrap();
    h.run_for(Duration::from_secs(20));
    let plan = RolloutPlan::percent(
        &[20.0, 50.0, 100.0],
        Duration::from_secs(60),
        Some(Gate {
            min_healthy: 2,
            max_failure_ppm: 200_000,
        }),
    );
    let m2 = sign(&op, "vision.defects", 2, &s2, plan, h.wall());
    h.publish(0, &m2, &[&s2]).unwrap();
    h.run_for(Duration::from_secs(600));
    let m2 = pollen_protocol::manifest::Manifest::decode(m2).unwrap();
    let decisions: Vec<_> = h
        .nodes
        .iter()
        .map(|n| {
            n.mesh.status()[0]
                .releases
                .iter()
                .find(|r| r.version == 2)
                .and_then(|r| r.decision.clone())
                .expect("decision on v2")
        })
        .collect();
    assert_eq!(decisions[0].open_stages(), 3, "{:?}", decisions[0]);
    for (i, n) in h.nodes.iter().enumerate() {
        assert_eq!(
            decisions[i].opened, decisions[0].opened,
            "node {i} opened times"
        );
        assert_eq!(
            n.active.get(&vision()).map(|a| a.0),
            Some(2),
            "node {i} on v2"
        );
        for (t, e) in &n.events {
            assert!(
                !matches!(e, Event::RollBack { .. } | Event::RolloutFailed { .. }),
                "node {i}: {e:?}"
            );
            assert!(
                !matches!(
                    e,
                    Event::Rejected {
                        label: "future",
                        ..
                    }
                ),
                "node {i} refused a report of a skewed peer: {e:?}"
            );
            if let Event::StageOpened { stage, at, .. } = e {
                // Harness wall time when this node saw the stage open, on its own clock.
                let local = T0.as_millis() as i64
                    + (*t - Instant::ZERO).as_millis() as i64
                    + n.clock_offset_ms;
                assert!(
                    local >= at.as_millis() as i64,
                    "node {i} opened stage {stage} before its clock reached it"
                );
            }
        }
        // Nodes switched when their own stage was open on their own clock.
        let stage = m2.stage_of(&n.id()).expect("100% plan");
        let activated = n.events.iter().find_map(|(t, e)| match e {
            Event::Activate { version: 2, .. } => Some(*t),
            _ => None,
        });
        let t = activated.expect("activated v2");
        let local =
            T0.as_millis() as i64 + (t - Instant::ZERO).as_millis() as i64 + n.clock_offset_ms;
        assert!(
            local >= decisions[0].opened[stage].as_millis() as i64,
            "node {i} in stage {stage} switched early"
        );
    }
}

/// 2,000 reports from 2,000 nodes, injected into different nodes of a 20-node mesh in
/// different orders: every node ends with the same sample of exactly K reports, equal to
/// the sample built from all 2,000 at once, and decides alike.
#[test]
fn two_thousand_reports_give_every_node_the_same_sample_and_decision() {
    use pollen_protocol::NodeId;
    use pollen_protocol::rollout::{HealthReport, HealthReportBody, ReportSample, evaluate};
    const K: usize = 64;
    let seed = 49;
    let op = Operator::new(seed, 1, None);
    let cfg = Config {
        report_sample_size: K,
        ..Config::default()
    };
    let mut h = Harness::new(20, cfg, LinkModel::default(), seed, T0);
    h.install_trust(&op.trust);
    h.connect_random(4);
    let s1 = random_file_spec(20_000, 16 * 1024, 63);
    let plan = RolloutPlan::percent(
        &[5.0, 30.0, 100.0],
        Duration::from_secs(60),
        Some(Gate {
            min_healthy: 20,
            max_failure_ppm: 150_000,
        }),
    );
    let m1 = sign(&op, "vision.defects", 1, &s1, plan.clone(), T0);
    let mid = pollen_protocol::ManifestId(m1.body_hash());
    h.publish(0, &m1, &[&s1]).unwrap();
    h.run_for(Duration::from_secs(10));
    let mut reports = Vec::new();
    for i in 0..2000u32 {
        let mut sk = [0u8; 32];
        sk[..4].copy_from_slice(&i.to_le_bytes());
        sk[4] = 0xA5;
        let key = SigningKey::from_bytes(&sk);
        let status = if i % 9 == 0 {
            HealthStatus::Failed {
                class: ErrorClass::GoldenMismatch,
                detail: "golden check 0: off by 0.3".into(),
            }
        } else {
            HealthStatus::Ok
        };
        let body = HealthReportBody {
            node: NodeId::from(&key),
            channel: vision(),
            version: 1,
            manifest: mid,
            status,
            requests: u64::from(i % 50),
            errors: 0,
            latency_p50_us: 300,
            latency_p99_us: 900,
            timestamp: T0.plus(Duration::from_millis(1_000 + u64::from(i) * 7 % 5_000)),
            lm: None,
        };
        reports.push((
            HealthReport {
                signed: Signed::sign(&body, &[&key]),
                cert: None,
            },
            body,
        ));
    }
    let mut reference = ReportSample::new(mid, K);
    for (r, b) in reports.iter().cloned() {
        reference.insert(r, b);
    }
    // Each report enters at one node, through one of its peers, in batches of 40.
    let mut batches: Vec<(usize, Vec<HealthReport>)> = Vec::new();
    for (j, chunk) in reports.chunks(40).enumerate() {
        let node = (j * 7) % 20;
        batches.push((node, chunk.iter().map(|(r, _)| r.clone()).collect()));
    }
    for (node, list) in batches {
        let from = h.nodes[h.neighbours(node)[0]].id();
        h.input(
            node,
            pollen_protocol::io::Input::Received {
                from,
                msg: Message::Reports(list),
            },
        );
        h.run_for(Duration::from_millis(300));
    }
    h.run_for(Duration::from_secs(120));
    let at = [
        T0,
        T0.plus(Duration::from_secs(61)),
        T0.plus(Duration::from_secs(200)),
    ];
    for (i, n) in h.nodes.iter().enumerate() {
        let s = n.mesh.sample(&mid).expect("sample");
        assert_eq!(s.len(), K, "node {i} keeps K");
        assert_eq!(
            s.digest(),
            reference.digest(),
            "node {i} holds the reference sample"
        );
        for now in at {
            assert_eq!(
                evaluate(&plan, T0, Some(s), None, now, |_| Some(0), Duration::ZERO),
                evaluate(
                    &plan,
                    T0,
                    Some(&reference),
                    None,
                    now,
                    |_| Some(0),
                    Duration::ZERO
                ),
                "node {i} decides like the reference at {now:?}"
            );
        }
    }
    let d = evaluate(
        &plan,
        T0,
        Some(&reference),
        None,
        at[2],
        |_| Some(0),
        Duration::ZERO,
    );
    let c = reference.counts();
    eprintln!(
        "sample of {K} of 2000: {} healthy, {} failed; decision at +200 s: {:?}",
        c.healthy, c.failed, d
    );
}

/// A node pinned to v1 stays on it while v2 rolls out to everybody else, keeps v1 even
/// after the channel moves on, and follows the rollout again once unpinned.
#[test]
fn pinned_node_stays_on_its_version_until_unpinned() {
    let (mut h, op) = harness(10, 51);
    let s1 = random_file_spec(40_000, 16 * 1024, 64);
    let s2 = random_file_spec(41_000, 16 * 1024, 65);
    let m1 = sign(&op, "vision.defects", 1, &s1, RolloutPlan::immediate(), T0);
    h.publish(0, &m1, &[&s1]).unwrap();
    h.run_for(Duration::from_secs(20));
    h.command(
        4,
        Command::PinVersion {
            channel: vision(),
            version: Some(1),
        },
    )
    .unwrap();
    let m2 = sign(
        &op,
        "vision.defects",
        2,
        &s2,
        RolloutPlan::immediate(),
        h.wall(),
    );
    h.publish(0, &m2, &[&s2]).unwrap();
    h.run_for(Duration::from_secs(30));
    for (i, n) in h.nodes.iter().enumerate() {
        let want = if i == 4 { 1 } else { 2 };
        assert_eq!(n.active.get(&vision()).map(|a| a.0), Some(want), "node {i}");
    }
    assert_eq!(h.nodes[4].mesh.status()[0].pinned, Some(1));
    h.command(
        4,
        Command::PinVersion {
            channel: vision(),
            version: None,
        },
    )
    .unwrap();
    h.run_for(Duration::from_secs(30));
    assert_eq!(h.nodes[4].active.get(&vision()).map(|a| a.0), Some(2));
}

/// A node down while a halt is issued, restarted after the next stage's time: it restores
/// a release it would now be admitted to, but learns the halt from its first peer before
/// it switches, so it never serves the halted version.
#[test]
fn node_restarted_after_a_halt_learns_it_before_switching() {
    use pollen_protocol::rollout::{InstructionBody, RolloutAction};
    // No gate: on restart the node is admitted by time alone, before it hears anybody.
    let (mut h, op) = harness(30, 53);
    let s1 = random_file_spec(40_000, 16 * 1024, 61);
    let s2 = random_file_spec(41_000, 16 * 1024, 62);
    let m1 = sign(&op, "vision.defects", 1, &s1, RolloutPlan::immediate(), T0);
    h.publish(0, &m1, &[&s1]).unwrap();
    h.run_for(Duration::from_secs(20));
    let plan = RolloutPlan::percent(&[20.0, 50.0, 100.0], Duration::from_secs(30), None);
    let m2 = sign(&op, "vision.defects", 2, &s2, plan, h.wall());
    h.publish(0, &m2, &[&s2]).unwrap();
    let m2d = pollen_protocol::manifest::Manifest::decode(m2).unwrap();
    let k = (0..h.nodes.len())
        .find(|&i| m2d.stage_of(&h.nodes[i].id()) == Some(1))
        .expect("a node in the second stage");
    h.run_for(Duration::from_secs(10));
    assert!(
        h.has_file(k, &m2d.body.artifact.variants[0].files[0].spec),
        "prefetched"
    );
    h.stop(k);
    let halt = Signed::sign(
        &InstructionBody {
            channel: vision(),
            version: 2,
            action: RolloutAction::Halt,
            issued: h.wall(),
        },
        &[&op.publishers[0]],
    );
    let issuer = (k + 1) % h.nodes.len();
    h.command(issuer, Command::Instruct(halt)).unwrap();
    h.run_for(Duration::from_secs(60));
    assert!(
        h.nodes[k].mesh.signed_instruction(&m2d.id).is_none(),
        "the halt did not reach the partitioned node"
    );
    let before = h.nodes[k].events.len();
    h.restart(k);
    h.heal(k);
    h.run_for(Duration::from_secs(30));
    let after: Vec<&Event> = h.nodes[k].events[before..].iter().map(|(_, e)| e).collect();
    assert!(
        !after
            .iter()
            .any(|e| matches!(e, Event::Activate { version: 2, .. })),
        "node {k} switched to the halted release: {after:?}"
    );
    assert!(
        after
            .iter()
            .any(|e| matches!(e, Event::InstructionAccepted { version: 2, .. })),
        "node {k} learned the halt"
    );
    assert_eq!(h.nodes[k].active.get(&vision()).map(|a| a.0), Some(1));
}

/// Pins of channels a node does not follow take no channel slot, and a valid manifest a
/// node has no room for is refused without penalising the honest peer that relayed it
/// (security review H4: a pin flood made nodes ban every peer that knew a new channel).
#[test]
fn pins_take_no_channel_slots_and_a_full_table_penalises_nobody() {
    let op = Operator::new(61, 1, None);
    let config = Config {
        max_channels: 2,
        ..Config::default()
    };
    let mut h = Harness::new(6, config, LinkModel::default(), 61, T0);
    h.install_trust(&op.trust);
    h.connect_random(4);
    let pin = |h: &mut Harness, name: &str, version| {
        h.command(
            3,
            Command::PinVersion {
                channel: Channel::new(name).unwrap(),
                version,
            },
        )
    };
    pin(&mut h, "junk-0", Some(1)).unwrap();
    pin(&mut h, "junk-1", Some(1)).unwrap();
    assert!(
        pin(&mut h, "junk-2", Some(1)).is_err(),
        "pending pins are bounded"
    );
    pin(&mut h, "junk-1", None).unwrap();
    pin(&mut h, "junk-2", Some(1)).unwrap();
    assert!(h.nodes[3].mesh.status().is_empty(), "no channel slot taken");
    let mut version = 0;
    for name in ["a", "b", "c"] {
        version += 1;
        let spec = random_file_spec(50_000 + version, 16 * 1024, 4);
        let m = sign(&op, name, 1, &spec, RolloutPlan::immediate(), h.wall());
        let r = h.publish(0, &m, &[&spec]);
        if name == "c" {
            let e = r.unwrap_err();
            assert!(e.contains("no room"), "{e}");
            // As if a peer with room relayed it to every node.
            for to in 1..6 {
                h.inject(0, to, Message::Manifest(m.clone()));
            }
        } else {
            r.unwrap();
        }
        h.run_for(Duration::from_secs(20));
    }
    for (i, n) in h.nodes.iter().enumerate() {
        let channels: Vec<String> = n
            .mesh
            .status()
            .iter()
            .map(|c| c.channel.to_string())
            .collect();
        assert_eq!(channels, ["a", "b"], "node {i}");
        assert!(
            !n.events
                .iter()
                .any(|(_, e)| matches!(e, Event::PeerPenalised { .. })),
            "node {i} penalised a peer"
        );
    }
}

/// A leaked key signs more bodies for one version than the evidence bound holds: nodes
/// that heard them in different orders still all end on the lowest body hash (security
/// review M7: past 64 entries later equivocations were ignored and nodes kept whichever
/// body they had seen first).
#[test]
fn equivocation_converges_past_the_evidence_bound() {
    let (mut h, op) = harness(4, 53);
    let specs: Vec<_> = (0..80)
        .map(|k: u64| random_file_spec(31_000 + k as usize, 16 * 1024, 100 + k))
        .collect();
    let mut ms: Vec<_> = specs
        .iter()
        .map(|s| sign(&op, "vision.defects", 1, s, RolloutPlan::immediate(), T0))
        .collect();
    // Highest body hash first: node 0 hears the lowest one last, past the bound.
    ms.sort_by_key(|m| core::cmp::Reverse(m.body_hash()));
    let lowest = ms
        .iter()
        .map(|m| pollen_protocol::ManifestId(m.body_hash()))
        .min()
        .unwrap();
    // Node 0 hears them from the highest hash down, node 3 from the lowest up.
    for (k, m) in ms.iter().enumerate() {
        h.inject(1, 0, Message::Manifest(m.clone()));
        h.inject(2, 3, Message::Manifest(ms[ms.len() - 1 - k].clone()));
    }
    h.run_for(Duration::from_secs(30));
    for (i, n) in h.nodes.iter().enumerate() {
        let v1 = n
            .mesh
            .release(&vision(), 1)
            .map(|r| r.id())
            .expect("version 1 known");
        assert_eq!(v1, lowest, "node {i} keeps the lowest body hash");
    }
}

/// Review M7: two roots of one version, both signed by the root keys, reach different
/// nodes. Every node that sees both raises the alert once, keeps the root it has, and a
/// forged root of that version (not signed by the root keys) raises nothing.
#[test]
fn trust_root_equivocation_is_detected_and_the_next_version_heals_it() {
    use pollen_protocol::trust::TrustRootBody;
    let (mut h, op) = harness(10, 62);
    let old = op.trust.decode_body().unwrap();
    let root = |version: u64, name: &str, key: &SigningKey| {
        let mut body = TrustRootBody {
            version,
            ..old.clone()
        };
        body.publishers[0].name = name.into();
        Signed::sign(&body, &[key])
    };
    // A root of the version in force (1) that the root keys did not sign: no evidence.
    let forged = root(old.version, "forged", &SigningKey::from_bytes(&[77; 32]));
    h.inject(0, 1, Message::TrustRoot(forged));
    h.run_for(Duration::from_secs(1));
    assert_eq!(
        h.nodes[1].mesh.trust_equivocation(),
        None,
        "a forged root is no evidence"
    );
    let a = root(2, "a", &op.root);
    let b = root(2, "b", &op.root);
    h.command(0, Command::SetTrustRoot(a.clone())).unwrap();
    h.command(9, Command::SetTrustRoot(b.clone())).unwrap();
    h.run_for(Duration::from_secs(60));
    let alerts = |n: &pollen_protocol::harness::HarnessNode| {
        n.events
            .iter()
            .filter(|(_, e)| matches!(e, Event::TrustRootEquivocation { version: 2, .. }))
            .count()
    };
    let mut alerted = 0;
    for (i, n) in h.nodes.iter().enumerate() {
        assert_eq!(n.mesh.trust_root().unwrap().body.version, 2, "node {i}");
        assert!(alerts(n) <= 1, "node {i}: once per version");
        alerted += alerts(n);
        assert_eq!(n.mesh.trust_equivocation(), (alerts(n) == 1).then_some(2));
    }
    assert!(alerted >= 2, "both sides of the split saw the other root");
    let before: Vec<usize> = h.nodes.iter().map(alerts).collect();
    let mut body = old.clone();
    // Heal: version 3 signed by the root keys reaches every node whichever v2 it holds.
    body.version = 3;
    let v3 = Signed::sign(&body, &[&op.root]);
    h.command(4, Command::SetTrustRoot(v3)).unwrap();
    h.run_for(Duration::from_secs(30));
    for (i, n) in h.nodes.iter().enumerate() {
        assert_eq!(
            n.mesh.trust_root().unwrap().body.version,
            3,
            "node {i} healed"
        );
        assert_eq!(alerts(n), before[i], "node {i}: no new alert");
    }
}

/// Review M8: a health report carrying more than one signature is refused before any
/// signature is verified (one frame could otherwise cost ~10k verifications), and counts
/// nowhere; the honest reports still fill the sample.
#[test]
fn a_report_with_more_than_one_signature_is_refused_unverified() {
    use pollen_protocol::rollout::{HealthReport, HealthReportBody};
    let (mut h, op) = harness(4, 63);
    let spec = random_file_spec(20_000, 16 * 1024, 91);
    let m = sign(
        &op,
        "vision.defects",
        1,
        &spec,
        RolloutPlan::immediate(),
        T0,
    );
    h.publish(0, &m, &[&spec]).unwrap();
    h.run_for(Duration::from_secs(20));
    let mid = pollen_protocol::ManifestId(m.body_hash());
    let key = SigningKey::from_bytes(&[43; 32]);
    let body = HealthReportBody {
        node: pollen_protocol::NodeId::from(&key),
        channel: vision(),
        version: 1,
        manifest: mid,
        status: HealthStatus::Failed {
            class: ErrorClass::LoadError,
            detail: "many signatures".into(),
        },
        requests: 0,
        errors: 0,
        latency_p50_us: 0,
        latency_p99_us: 0,
        timestamp: h.wall(),
        lm: None,
    };
    let padded = HealthReport {
        signed: Signed::sign(&body, &[&key, &SigningKey::from_bytes(&[44; 32]), &key]),
        cert: None,
    };
    let from = h.nodes[1].id();
    let before = h.nodes[0].events.len();
    h.input(
        0,
        pollen_protocol::io::Input::Received {
            from,
            msg: Message::Reports(vec![padded]),
        },
    );
    h.run_for(Duration::from_secs(1));
    assert!(
        h.nodes[0].events[before..].iter().any(|(_, e)| matches!(
            e,
            Event::Rejected { kind: ObjectKind::Report, label: "malformed", reason, .. }
                if reason.contains("carries one signature, not")
        )),
        "refused as malformed"
    );
    let s = h.nodes[0].mesh.sample(&mid).expect("sample");
    assert_eq!(s.counts().failed, 0, "it counts nowhere");
}

/// A release of two variants: nodes fetch only the variant their device chooses, and the
/// publisher, which runs the default variant, keeps and seeds the other one it was given,
/// so a device of the other class finds a source.
#[test]
fn nodes_fetch_only_their_variant_and_the_publisher_seeds_the_others() {
    use pollen_protocol::manifest::{DeviceProfile, DeviceRequirements, FileEntry, Variant};
    use rand_chacha::ChaCha8Rng;
    use rand_core::SeedableRng;
    let op = Operator::new(11, 1, None);
    let mut h = Harness::new(4, Config::default(), LinkModel::default(), 11, T0);
    // Node 3 is a weak device.
    let weak = Config {
        device: DeviceProfile {
            device_class: Some("weak".into()),
            ..DeviceProfile::default()
        },
        ..Config::default()
    };
    let id = h.nodes[3].id();
    h.nodes[3].mesh = pollen_protocol::Mesh::new(
        id,
        weak,
        ChaCha8Rng::seed_from_u64(3),
        pollen_protocol::Now::new(Instant::ZERO, T0),
    );
    h.install_trust(&op.trust);
    h.connect_random(6);
    let fp32 = random_file_spec(8 * 16 * 1024, 16 * 1024, 1);
    let int8 = random_file_spec(2 * 16 * 1024, 16 * 1024, 2);
    let mut body = manifest_body(
        "vision.defects",
        1,
        fp32.clone(),
        RolloutPlan::immediate(),
        T0,
    );
    body.artifact.variants.push(Variant {
        name: "int8".into(),
        requires: DeviceRequirements {
            device_classes: vec!["weak".into()],
            ..DeviceRequirements::default()
        },
        files: vec![FileEntry {
            name: "model.onnx".into(),
            spec: int8.clone(),
        }],
    });
    let m = Signed::sign(&body, &op.signers(1));
    h.publish(0, &m, &[&fp32, &int8]).unwrap();
    h.run_for(Duration::from_secs(120));
    for i in 1..3 {
        assert!(h.has_file(i, &fp32), "node {i} holds its fp32 variant");
        assert!(
            !h.has_file(i, &int8),
            "node {i} never fetched the int8 variant"
        );
        assert_eq!(h.nodes[i].active.get(&vision()).map(|a| a.0), Some(1));
    }
    assert!(
        h.has_file(3, &int8),
        "the weak node got its int8 variant from the publisher: {}",
        h.nodes[3].mesh.debug_file(&int8.content_id)
    );
    assert!(!h.has_file(3, &fp32), "the weak node never fetched fp32");
    assert_eq!(h.nodes[3].active.get(&vision()).map(|a| a.0), Some(1));
    let live = h.nodes[0].mesh.live_files();
    assert!(
        live.contains(&fp32.content_id) && live.contains(&int8.content_id),
        "the publisher keeps both variants"
    );
}

/// A publisher pins what it publishes, right after the publish (as the node does). With
/// every older release pinned, trimming the channel to `retained_versions` once removed
/// the release just published: the fifth publish on a node vanished from its publisher
/// (found by the soak: the publisher never served it, and a rollback to it failed). The
/// newest release is never trimmed.
#[test]
fn a_publisher_keeps_every_release_it_publishes_past_the_retained_count() {
    let (mut h, op) = harness(4, 61);
    let keep = Config::default().retained_versions as u64;
    for v in 1..=keep + 3 {
        let spec = random_file_spec(40_000 + v as usize * 1000, 16 * 1024, 60 + v);
        let m = sign(
            &op,
            "vision.defects",
            v,
            &spec,
            RolloutPlan::immediate(),
            h.wall(),
        );
        h.publish(0, &m, &[&spec]).unwrap();
        h.command(
            0,
            Command::Pin(pollen_protocol::ids::ManifestId(m.body_hash())),
        )
        .unwrap();
        assert!(
            h.nodes[0].mesh.release(&vision(), v).is_some(),
            "v{v}: the publisher dropped the release it just published"
        );
        h.run_for(Duration::from_secs(20));
        for i in 0..4 {
            assert_eq!(
                h.nodes[i].active.get(&vision()).map(|a| a.0),
                Some(v),
                "node {i} after v{v}"
            );
        }
    }
    // Everything it published is still there to roll back to.
    for v in 1..=keep + 3 {
        assert!(h.nodes[0].mesh.release(&vision(), v).is_some(), "v{v} kept");
    }
}
