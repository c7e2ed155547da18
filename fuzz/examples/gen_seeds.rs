//! Writes seed corpora for the fuzz targets into `corpus/<target>/`: well-formed frames,
//! envelopes and chunk inputs, KServe requests, ONNX tensors, golden files and models,
//! generation configs and OpenAI request bodies that the fuzzer then mutates.
//!
//! `cargo run --example gen_seeds --no-default-features` from `fuzz/` (plain stable build,
//! no sanitizer; without the default `node` feature it does not build pollen-node).

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
    Bitfield, ChannelDigest, ChunkHeader, Digest, Hello, Message, ObjectId, RejectReason,
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
        Message::Certificate(cert.clone()),
        Message::Hello(Hello {
            site: Some("site-a".into()),
            cert: Some(cert),
        }),
        Message::Hello(Hello {
            site: None,
            cert: None,
        }),
        Message::Prune,
        Message::Fetching {
            file,
            index: 2,
            millis: 30_000,
        },
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
    node_seeds();
    println!("seeds written to {}/corpus", env!("CARGO_MANIFEST_DIR"));
}

// --- Protobuf writing for the ONNX seeds (field numbers from onnx.proto). ---

fn varint(mut n: u64, out: &mut Vec<u8>) {
    loop {
        let b = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

/// A length-delimited field.
fn pb_bytes(field: u64, b: &[u8], out: &mut Vec<u8>) {
    varint((field << 3) | 2, out);
    varint(b.len() as u64, out);
    out.extend_from_slice(b);
}

/// A varint field.
fn pb_int(field: u64, n: u64, out: &mut Vec<u8>) {
    varint(field << 3, out);
    varint(n, out);
}

/// A packed repeated varint field.
fn pb_packed(field: u64, ns: &[u64], out: &mut Vec<u8>) {
    let mut p = Vec::new();
    for &n in ns {
        varint(n, &mut p);
    }
    pb_bytes(field, &p, out);
}

/// `TensorProto` with raw data.
fn tensor_raw(name: &str, elem: u64, dims: &[u64], raw: &[u8]) -> Vec<u8> {
    let mut t = Vec::new();
    for &d in dims {
        pb_int(1, d, &mut t);
    }
    pb_int(2, elem, &mut t);
    if !name.is_empty() {
        pb_bytes(8, name.as_bytes(), &mut t);
    }
    pb_bytes(9, raw, &mut t);
    t
}

/// `ValueInfoProto` of a tensor: dims as values, or parameters for negative entries.
fn value_info(name: &str, elem: u64, dims: &[i64]) -> Vec<u8> {
    let mut shape = Vec::new();
    for &d in dims {
        let mut dim = Vec::new();
        if d >= 0 {
            pb_int(1, d as u64, &mut dim);
        } else {
            pb_bytes(2, b"batch", &mut dim);
        }
        pb_bytes(1, &dim, &mut shape);
    }
    let mut tt = Vec::new();
    pb_int(1, elem, &mut tt);
    pb_bytes(2, &shape, &mut tt);
    let mut ty = Vec::new();
    pb_bytes(1, &tt, &mut ty);
    let mut vi = Vec::new();
    pb_bytes(1, name.as_bytes(), &mut vi);
    pb_bytes(2, &ty, &mut vi);
    vi
}

/// An `AttributeProto`: `kind` 3 int, 5 tensor, 6 graph, 8 ints, 9 strings.
fn attr(name: &str, kind: u64, body: &[u8]) -> Vec<u8> {
    let mut a = Vec::new();
    pb_bytes(1, name.as_bytes(), &mut a);
    match kind {
        3 => a.extend_from_slice(body),
        _ => pb_bytes(kind, body, &mut a),
    }
    a
}

fn node(op: &str, inputs: &[&str], outputs: &[&str], attrs: &[Vec<u8>]) -> Vec<u8> {
    let mut n = Vec::new();
    for i in inputs {
        pb_bytes(1, i.as_bytes(), &mut n);
    }
    for o in outputs {
        pb_bytes(2, o.as_bytes(), &mut n);
    }
    pb_bytes(
        3,
        format!("{op}_{}", outputs.first().unwrap_or(&"")).as_bytes(),
        &mut n,
    );
    pb_bytes(4, op.as_bytes(), &mut n);
    for a in attrs {
        pb_bytes(5, a, &mut n);
    }
    n
}

/// `GraphProto` from nodes, initializers, inputs and outputs (already encoded).
fn graph(nodes: &[Vec<u8>], inits: &[Vec<u8>], inputs: &[Vec<u8>], outputs: &[Vec<u8>]) -> Vec<u8> {
    let mut g = Vec::new();
    for n in nodes {
        pb_bytes(1, n, &mut g);
    }
    pb_bytes(2, b"g", &mut g);
    for t in inits {
        pb_bytes(5, t, &mut g);
    }
    for i in inputs {
        pb_bytes(11, i, &mut g);
    }
    for o in outputs {
        pb_bytes(12, o, &mut g);
    }
    g
}

/// `ModelProto`: IR version 8, opset 17, the graph.
fn model(graph: &[u8]) -> Vec<u8> {
    let mut m = Vec::new();
    pb_int(1, 8, &mut m);
    let mut opset = Vec::new();
    pb_int(2, 17, &mut opset);
    pb_bytes(8, &opset, &mut m);
    pb_bytes(7, graph, &mut m);
    m
}

fn le<T: Copy, const N: usize>(xs: &[T], f: fn(T) -> [u8; N]) -> Vec<u8> {
    xs.iter().flat_map(|&x| f(x)).collect()
}

/// Seeds of the targets on pollen-node's and pollen-keys' decoders.
fn node_seeds() {
    use pollen_protocol::manifest::{DType, GoldenCheck, TensorData, encode_golden_file};

    // kserve_request: mode byte (odd: u32 LE header length follows), then the body.
    let json_req = br#"{"id":"req-1","parameters":{"binary_data_output":false},"inputs":[
{"name":"x","shape":[2,3],"datatype":"FP32","data":[[0.5,-1.25,3e-3],[1,2,3.5]]},
{"name":"n","shape":[3],"datatype":"INT64","data":[-9223372036854775808,0,42]},
{"name":"b","shape":[2],"datatype":"BOOL","data":[true,false]},
{"name":"s","shape":[2],"datatype":"BYTES","data":["hello","\u00e9t\u00e9"]},
{"name":"h","shape":[1,2],"datatype":"FP16","data":[65504,-0.000061035]},
{"name":"u","shape":[],"datatype":"UINT8","data":255},
{"name":"d","shape":[2],"datatype":"FP64","data":[1e300,-2.5]},
{"name":"i","shape":[2,1],"datatype":"INT8","data":[[-128],[127]]}],
"outputs":[{"name":"y","parameters":{"binary_data":true}},{"name":"z"}]}"#;
    let mut seed = vec![0u8];
    seed.extend_from_slice(json_req);
    write("kserve_request", "json_types", &seed);
    let i16s = le(&[1i16, -2, 300], i16::to_le_bytes);
    let mut bytes_el = Vec::new();
    for e in [&b"abc"[..], &[0xff, 0x00]] {
        bytes_el.extend((e.len() as u32).to_le_bytes());
        bytes_el.extend_from_slice(e);
    }
    let f32s = le(&[1.5f32, f32::NAN, -0.0, 7.0], f32::to_le_bytes);
    let header = format!(
        r#"{{"inputs":[{{"name":"a","shape":[2],"datatype":"UINT16","data":[1,65535]}},
{{"name":"b","shape":[3],"datatype":"INT16","parameters":{{"binary_data_size":{}}}}},
{{"name":"c","shape":[2],"datatype":"BYTES","parameters":{{"binary_data_size":{}}}}},
{{"name":"d","shape":[2,2],"datatype":"BOOL","parameters":{{"binary_data_size":4}}}},
{{"name":"f","shape":[4],"datatype":"FP32","parameters":{{"binary_data_size":16}}}}],
"parameters":{{"binary_data_output":true}}}}"#,
        i16s.len(),
        bytes_el.len()
    );
    let mut seed = vec![1u8];
    seed.extend((header.len() as u32).to_le_bytes());
    seed.extend_from_slice(header.as_bytes());
    seed.extend(&i16s);
    seed.extend(&bytes_el);
    seed.extend([0u8, 1, 2, 255]);
    seed.extend(&f32s);
    write("kserve_request", "binary_mixed", &seed);
    write("kserve_request", "index_ready", b"\x00{\"ready\": true}");
    write("kserve_request", "header_len", b"\x00 1024 ");

    // golden_decode: TensorProtos of several types and encodings, and a golden file.
    let f32_raw = tensor_raw(
        "x",
        1,
        &[2, 2],
        &le(&[1.0f32, -2.0, 0.5, 3.25], f32::to_le_bytes),
    );
    write("golden_decode", "pb_f32_raw", &f32_raw);
    let mut f32_typed = Vec::new();
    pb_int(1, 3, &mut f32_typed);
    pb_int(2, 1, &mut f32_typed);
    pb_bytes(
        4,
        &le(&[0.25f32, 1e-8, -7.0], f32::to_le_bytes),
        &mut f32_typed,
    );
    pb_bytes(8, b"probs", &mut f32_typed);
    write("golden_decode", "pb_f32_float_data", &f32_typed);
    let mut i64_typed = Vec::new();
    pb_packed(1, &[2, 1], &mut i64_typed);
    pb_int(2, 7, &mut i64_typed);
    pb_packed(7, &[(-5i64) as u64, 1 << 40], &mut i64_typed);
    write("golden_decode", "pb_i64_int64_data", &i64_typed);
    let mut bools = Vec::new();
    pb_int(1, 3, &mut bools);
    pb_int(2, 9, &mut bools);
    pb_packed(5, &[1, 0, 1], &mut bools);
    write("golden_decode", "pb_bool_int32_data", &bools);
    let mut strings = Vec::new();
    pb_int(1, 2, &mut strings);
    pb_int(2, 8, &mut strings);
    pb_bytes(6, b"hello", &mut strings);
    pb_bytes(6, b"world", &mut strings);
    write("golden_decode", "pb_string", &strings);
    let mut u32s = Vec::new();
    pb_int(1, 2, &mut u32s);
    pb_int(2, 12, &mut u32s);
    pb_packed(11, &[7, u64::from(u32::MAX)], &mut u32s);
    write("golden_decode", "pb_u32_uint64_data", &u32s);
    let mut f16s = Vec::new();
    pb_int(1, 2, &mut f16s);
    pb_int(2, 10, &mut f16s);
    pb_packed(5, &[0x3c00, 0xc000], &mut f16s);
    write("golden_decode", "pb_f16_int32_data", &f16s);
    let mut doubles = Vec::new();
    pb_int(1, 1, &mut doubles);
    pb_int(2, 11, &mut doubles);
    pb_bytes(10, &2.5f64.to_le_bytes(), &mut doubles);
    write("golden_decode", "pb_f64_double_data", &doubles);
    let td = |name: &str, dtype: DType, shape: &[u64], data: Vec<u8>| TensorData {
        name: name.into(),
        dtype,
        shape: shape.to_vec(),
        data,
    };
    let golden = encode_golden_file(&[
        GoldenCheck {
            inputs: vec![
                td(
                    "x",
                    DType::F32,
                    &[1, 2],
                    le(&[0.5f32, 1.5], f32::to_le_bytes),
                ),
                td("n", DType::I64, &[1], le(&[3i64], i64::to_le_bytes)),
            ],
            expected: vec![td(
                "y",
                DType::F32,
                &[1, 2],
                le(&[1.0f32, 2.0], f32::to_le_bytes),
            )],
            tolerance: 1e-4,
        },
        GoldenCheck {
            inputs: vec![td("b", DType::Bool, &[2], vec![1, 0])],
            expected: vec![td("c", DType::U8, &[2, 1], vec![7, 9])],
            tolerance: 0.0,
        },
    ]);
    pollen_protocol::manifest::decode_golden_file(&golden).expect("golden seed decodes");
    write("golden_decode", "golden_file", &golden);

    // onnx_graph: a real model, and small graphs with what `prepare` rewrites.
    let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/digits-v1.onnx");
    if let Ok(m) = fs::read(&models) {
        write("onnx_graph", "digits_v1", &m);
    }
    let identity = model(&graph(
        &[node("Identity", &["x"], &["y"], &[])],
        &[],
        &[value_info("x", 1, &[-1, 3])],
        &[value_info("y", 1, &[-1, 3])],
    ));
    write("onnx_graph", "identity", &identity);
    // `If` on a constant input (`sr == 16000`), with subgraph branches.
    let branch = |v: f32| {
        let t = tensor_raw("", 1, &[], &v.to_le_bytes());
        graph(
            &[node("Constant", &[], &["c"], &[attr("value", 5, &t)])],
            &[],
            &[],
            &[value_info("c", 1, &[])],
        )
    };
    let mut one = Vec::new();
    pb_int(3, 16000, &mut one);
    let if_model = model(&graph(
        &[
            node("Constant", &[], &["k"], &[attr("value_int", 3, &one)]),
            node("Equal", &["sr", "k"], &["cond"], &[]),
            node(
                "If",
                &["cond"],
                &["branch_out"],
                &[
                    attr("then_branch", 6, &branch(1.0)),
                    attr("else_branch", 6, &branch(2.0)),
                ],
            ),
            node("Add", &["x", "branch_out"], &["y"], &[]),
        ],
        &[],
        &[value_info("x", 1, &[1]), value_info("sr", 7, &[1])],
        &[value_info("y", 1, &[1])],
    ));
    write("onnx_graph", "if_on_const", &if_model);
    // A ZipMap at an output (scikit-learn's export), int64 and string labels.
    let mut labels = Vec::new();
    pb_packed(8, &[3, 5, 9], &mut labels);
    let mut names = Vec::new();
    pb_bytes(9, b"cat", &mut names);
    let zipmap = model(&graph(
        &[
            node("Softmax", &["x"], &["p"], &[]),
            node(
                "ZipMap",
                &["p"],
                &["probs"],
                &[{
                    let mut a = Vec::new();
                    pb_bytes(1, b"classlabels_int64s", &mut a);
                    a.extend(&labels);
                    a
                }],
            ),
            node(
                "ZipMap",
                &["p"],
                &["named"],
                &[{
                    let mut a = Vec::new();
                    pb_bytes(1, b"classlabels_strings", &mut a);
                    a.extend(&names);
                    a
                }],
            ),
        ],
        &[],
        &[value_info("x", 1, &[-1, 3])],
        &[value_info("probs", 0, &[]), value_info("named", 0, &[])],
    ));
    write("onnx_graph", "zipmap", &zipmap);
    // DequantizeLinear of initializers, per tensor and per axis.
    let mut axis = Vec::new();
    pb_int(3, 0, &mut axis);
    let dq = model(&graph(
        &[
            node("DequantizeLinear", &["wq", "ws", "wz"], &["w"], &[]),
            node(
                "DequantizeLinear",
                &["vq", "vs"],
                &["v"],
                &[attr("axis", 3, &axis)],
            ),
            node("MatMul", &["x", "w"], &["xw"], &[]),
            node("Add", &["xw", "v"], &["y"], &[]),
        ],
        &[
            tensor_raw("wq", 3, &[2, 2], &[1, 255, 127, 128]),
            tensor_raw("ws", 1, &[], &0.5f32.to_le_bytes()),
            tensor_raw("wz", 3, &[], &[1]),
            tensor_raw("vq", 2, &[2, 1], &[10, 200]),
            tensor_raw("vs", 1, &[2], &le(&[0.1f32, 0.2], f32::to_le_bytes)),
        ],
        &[value_info("x", 1, &[1, 2])],
        &[value_info("y", 1, &[-1, 2])],
    ));
    write("onnx_graph", "dequantize", &dq);

    // lm_config: generation.json and golden_prompts.json.
    write(
        "lm_config",
        "generation",
        br#"{"format": 1, "context_length": 8192, "bos_token": "<|endoftext|>", "add_bos_token": false,
"eos_tokens": ["<|im_end|>", "<|endoftext|>"],
"chat_template": "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system
You are helpful.<|im_end|>
' }}{% endif %}{{'<|im_start|>' + message['role'] + '
' + message['content'] | trim + '<|im_end|>' + '
'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant
' }}{% endif %}",
"defaults": {"temperature": 0.7, "top_p": 0.95, "max_tokens": 128}}"#,
    );
    write(
        "lm_config",
        "generation_minimal",
        br#"{"format": 1, "context_length": 2048, "eos_tokens": ["</s>"]}"#,
    );
    write(
        "lm_config",
        "golden_prompts",
        br#"{"min_agreement": 0.9, "prompts": [{"prompt": "The capital of France is", "continuation": [6342, 30, 378]},
{"prompt": "1, 2, 3,", "continuation": [216, 34]}]}"#,
    );

    // openai_request: byte 0 even is a chat request, odd a completion.
    let chat = br#"{"model": "smollm", "messages": [{"role": "system", "content": "Be brief."},
{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": " there"}]},
{"role": "assistant", "content": null}, {"role": "user", "content": "2+2?"}],
"max_tokens": 32, "temperature": 0.5, "top_p": 0.9, "seed": -3, "stop": ["

", "END"],
"stream": true, "stream_options": {"include_usage": true}, "n": 1, "user": "ignored"}"#;
    let mut seed = vec![0u8];
    seed.extend_from_slice(chat);
    write("openai_request", "chat", &seed);
    let mut seed = vec![0u8];
    seed.extend_from_slice(br#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 1, "stop": "."}"#);
    write("openai_request", "chat_minimal", &seed);
    let mut seed = vec![1u8];
    seed.extend_from_slice(br#"{"model": "m", "prompt": "Once upon a time", "max_tokens": 16, "ignore_eos": true, "stream": false}"#);
    write("openai_request", "completion_text", &seed);
    let mut seed = vec![1u8];
    seed.extend_from_slice(br#"{"model": "m", "prompt": [1, 2, 49151], "temperature": 0}"#);
    write("openai_request", "completion_tokens", &seed);
    let mut seed = vec![1u8];
    seed.extend_from_slice(br#"{"model": "m", "prompt": ["just one"], "top_p": 1.0}"#);
    write("openai_request", "completion_list", &seed);
}
