//! Writes seed corpora for the fuzz targets into `corpus/<target>/` (gitignored):
//! well-formed frames, envelopes and chunk inputs that the fuzzer then mutates.
//!
//! `cargo run --example gen_seeds` from `fuzz/` (plain stable build, no sanitizer).

use pollen_protocol::SigningKey;
use pollen_protocol::chunking::ChunkSize;
use pollen_protocol::harness::{Operator, manifest_body, random_file_spec};
use pollen_protocol::ids::{ContentId, ManifestId, NodeId};
use pollen_protocol::manifest::Channel;
use pollen_protocol::rollout::{
    ErrorClass, Gate, HealthReport, HealthReportBody, HealthStatus, InstructionBody, RolloutAction,
    RolloutPlan,
};
use pollen_protocol::signing::Signed;
use pollen_protocol::time::UnixTime;
use pollen_protocol::trust::NodeCertBody;
use pollen_protocol::wire::{
    Bitfield, ChannelDigest, ChunkHeader, Digest, Message, ObjectId, RejectReason,
    encode_chunk_frame, length_prefixed,
};
use std::fs;
use std::path::Path;
use std::time::Duration;

fn write(dir: &str, name: &str, bytes: &[u8]) {
    let d = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(dir);
    fs::create_dir_all(&d).expect("create corpus dir");
    fs::write(d.join(name), bytes).expect("write seed");
}

fn main() {
    let op = Operator::new(7, 1, None);
    let fleet = SigningKey::from_bytes(&[9; 32]);
    let node = SigningKey::from_bytes(&[3; 32]);
    let node_id = NodeId(node.verifying_key().to_bytes());
    let channel = Channel::new("vision.prod").expect("channel");

    let plan = RolloutPlan::percent(
        &[1.0, 10.0, 100.0],
        Duration::from_secs(600),
        Some(Gate {
            min_healthy: 3,
            max_failure_ppm: 50_000,
        }),
    );
    let small = manifest_body(
        "vision.prod",
        1,
        random_file_spec(100, 16 * 1024, 1),
        RolloutPlan::immediate(),
        UnixTime::from_secs(2_000),
    );
    let multi = manifest_body(
        "vision.prod",
        2,
        random_file_spec(40_000, 16 * 1024, 2),
        plan,
        UnixTime::from_secs(3_000),
    );
    let m1 = Signed::sign(&small, &op.signers(1));
    let m2 = Signed::sign(&multi, &op.signers(2));
    let cert = Signed::sign(
        &NodeCertBody {
            node: node_id,
            issued: UnixTime::from_secs(1),
            expires: UnixTime::from_secs(99),
            label: "site-a".into(),
        },
        &[&fleet],
    );
    let report_body = |status| HealthReportBody {
        node: node_id,
        channel: channel.clone(),
        version: 2,
        manifest: ManifestId(m2.body_hash()),
        status,
        requests: 1000,
        errors: 3,
        latency_p50_us: 1200,
        latency_p99_us: 9000,
        timestamp: UnixTime::from_secs(3_100),
        lm: None,
    };
    let r_ok = Signed::sign(&report_body(HealthStatus::Ok), &[&node]);
    let r_fail = Signed::sign(
        &report_body(HealthStatus::Failed {
            class: ErrorClass::GoldenMismatch,
            detail: "output 0 off by 0.5".into(),
        }),
        &[&node],
    );
    let instr = Signed::sign(
        &InstructionBody {
            channel: channel.clone(),
            version: 2,
            action: RolloutAction::Halt,
            issued: UnixTime::from_secs(3_200),
        },
        &op.signers(2),
    );

    // signed_decode: envelopes of every kind.
    write("signed_decode", "manifest_small", &m1.to_bytes());
    write("signed_decode", "manifest_multi", &m2.to_bytes());
    write("signed_decode", "trust_root", &op.trust.to_bytes());
    write("signed_decode", "node_cert", &cert.to_bytes());
    write("signed_decode", "report_ok", &r_ok.to_bytes());
    write("signed_decode", "report_failed", &r_fail.to_bytes());
    write("signed_decode", "instruction", &instr.to_bytes());
    // The seeds must be accepted, or they seed nothing useful.
    pollen_protocol::manifest::Manifest::from_bytes(&m1.to_bytes()).expect("manifest seed decodes");
    pollen_protocol::manifest::Manifest::from_bytes(&m2.to_bytes()).expect("manifest seed decodes");
    pollen_protocol::trust::SignedTrustRoot::from_bytes(&op.trust.to_bytes())
        .expect("trust seed decodes");
    pollen_protocol::trust::SignedNodeCert::from_bytes(&cert.to_bytes())
        .expect("cert seed decodes");
    Signed::<HealthReportBody>::from_bytes(&r_fail.to_bytes()).expect("report seed decodes");
    pollen_protocol::rollout::SignedInstruction::from_bytes(&instr.to_bytes())
        .expect("instruction seed decodes");

    // wire_decode: one frame body per message kind, plus a length-prefixed stream.
    let file = ContentId([5; 32]);
    let mut bits = Bitfield::new(13);
    bits.set(0);
    bits.set(12);
    let msgs = vec![
        Message::Manifest(m2.clone()),
        Message::TrustRoot(op.trust.clone()),
        Message::Reports(vec![
            HealthReport {
                signed: r_ok,
                cert: Some(cert.clone()),
            },
            HealthReport {
                signed: r_fail,
                cert: None,
            },
        ]),
        Message::Instruction(instr.clone()),
        Message::IHave(vec![
            ObjectId::Manifest(ManifestId(m1.body_hash())),
            ObjectId::TrustRoot(1),
            ObjectId::Instruction(instr.body_hash()),
        ]),
        Message::Want(vec![ObjectId::TrustRoot(2)]),
        Message::Digest(Digest {
            trust_version: 1,
            channels: vec![ChannelDigest {
                channel: channel.clone(),
                highest: 2,
                manifests: vec![(2, ManifestId(m2.body_hash()))],
            }],
            reports: vec![(ManifestId(m2.body_hash()), [8; 32])],
            instructions: vec![instr.body_hash()],
            reply: true,
        }),
        Message::Have { file, chunks: bits },
        Message::HaveChunk { file, index: 3 },
        Message::Request {
            id: 300,
            file,
            index: 1,
        },
        Message::Cancel { id: 300 },
        Message::Reject {
            id: 301,
            reason: RejectReason::Busy,
        },
        Message::Certificate(cert),
    ];
    let mut stream = Vec::new();
    for (i, m) in msgs.iter().enumerate() {
        let enc = m.encode();
        assert!(
            pollen_protocol::wire::decode_frame(&enc).is_ok(),
            "seed {i} decodes"
        );
        write("wire_decode", &format!("msg_{i:02}"), &enc);
        if enc.len() < 2000 {
            stream.extend(length_prefixed(&enc));
        }
    }
    let chunk = encode_chunk_frame(
        &ChunkHeader {
            id: 7,
            file,
            index: 2,
        },
        b"chunk bytes",
    );
    write("wire_decode", "chunk_frame", &chunk);
    stream.extend(length_prefixed(&chunk));
    write("wire_decode", "stream", &stream);

    // chunk_verify: header fields then data (see the target's layout).
    let header = |sel: u8, size: u64, ncv: u8, id: [u8; 32], cvs: &[[u8; 32]], index: u32| {
        let mut v = vec![sel];
        v.extend(size.to_le_bytes());
        v.push(ncv);
        v.extend(id);
        for cv in cvs {
            v.extend(cv);
        }
        v.extend(index.to_le_bytes());
        v
    };
    let data: Vec<u8> = (0..300u32).map(|i| (i * 7 + 1) as u8).collect();
    // A consistent one-chunk spec whose chunk verifies.
    let mut one = header(
        0,
        data.len() as u64,
        0,
        *blake3::hash(&data).as_bytes(),
        &[],
        0,
    );
    one.extend(&data);
    write("chunk_verify", "one_chunk_ok", &one);
    // A multi-chunk spec (chaining values of a real file), small data.
    let big: Vec<u8> = data.iter().cycle().take(40_000).copied().collect();
    let spec =
        pollen_protocol::chunking::spec_for_bytes(&big, ChunkSize::new(16 * 1024).expect("size"));
    let mut multi = header(0, 40_000, 3, spec.content_id.0, &spec.chaining_values, 2);
    multi.extend(&big[32 * 1024..]);
    write("chunk_verify", "multi_chunk_last", &multi);
    let mut grow = header(2, 200_000, 4, [1; 32], &[[2; 32]; 4], 1);
    grow.extend(&data[..50]);
    write("chunk_verify", "stretched", &grow);
    println!("seeds written to {}/corpus", env!("CARGO_MANIFEST_DIR"));
}
