//! Clients see why: real `pollen run` processes answer readiness, inference, model metadata
//! and Triton's repository index with each version's state (`READY`, `LOADING`,
//! `UNAVAILABLE`) and the reason, through raw HTTP and through Triton's own client.

use pollen_tests::mesh::{Node, Operator};
use pollen_tests::onnxgen;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

/// (status, body as JSON, or as a string if it is not JSON).
fn call(n: &Node, method: &str, path: &str, body: &[u8]) -> (u16, Value) {
    let (status, text) = n.http_with(method, path, body, &[]);
    let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, v)
}

fn digits_row() -> Value {
    let golden: Value = serde_json::from_slice(
        &std::fs::read(pollen_tests::workspace_dir().join("models/golden-v1.json")).unwrap(),
    )
    .unwrap();
    json!({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
        "data": golden["inputs"][0]}]})
}

/// The index entry of `name` version `version`, if listed.
fn entry<'a>(index: &'a Value, name: &str, version: &str) -> Option<&'a Value> {
    index
        .as_array()
        .expect("the index is a JSON array")
        .iter()
        .find(|e| e["name"] == name && e["version"] == version)
}

fn error_text(v: &Value) -> &str {
    v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error field: {v}"))
}

/// `y = op(x)`, `x` and `y` of ONNX element type `elem` and shape `[1, 4]`.
fn one_op(op: &str, elem: u64) -> Vec<u8> {
    let io = |name| onnxgen::Io {
        name,
        elem,
        dims: &[1, 4],
    };
    onnxgen::model(
        &[onnxgen::Node {
            op,
            inputs: &["x"],
            outputs: &["y"],
        }],
        &[],
        &[io("x")],
        &[io("y")],
    )
}

/// ONNX `TensorProto.DataType` of bfloat16, which tract cannot hold.
const BFLOAT16: u64 = 16;

#[test]
fn a_version_that_failed_here_answers_503_with_its_reason_and_the_index_lists_it() {
    let tmp = tempfile::tempdir().unwrap();
    let op = Operator::new(&tmp.path().join("op"), false);
    let a = Node::start(
        &tmp.path().join("a"),
        &["--trust".to_string(), op.trust_file.display().to_string()],
    );
    op.publish_digits(tmp.path(), &a, "digits-v1.onnx", "golden-v1.json", 1, &[]);
    a.wait(Duration::from_secs(60), "v1 served", |s| {
        s.channels.iter().any(|c| c.active_version == Some(1))
    });
    // v2: the v2 graph with v1's golden outputs fails its golden check here.
    op.publish_digits(tmp.path(), &a, "digits-v2.onnx", "golden-v1.json", 2, &[]);
    // A channel whose only version uses an operator tract lacks (found when the graph is
    // analysed), and one whose input has a type tract lacks (found when it is loaded).
    let broken = tmp.path().join("broken.onnx");
    std::fs::write(&broken, one_op("NoSuchOp", onnxgen::FLOAT)).unwrap();
    op.publish(tmp.path(), &a, &broken, "broken", 1, &[]);
    let bf16 = tmp.path().join("bf16.onnx");
    std::fs::write(&bf16, one_op("Identity", BFLOAT16)).unwrap();
    op.publish(tmp.path(), &a, &bf16, "bf16", 1, &[]);
    a.wait(
        Duration::from_secs(60),
        "v2, broken and bf16 refused",
        |s| {
            [
                "digits version 2 failed",
                "broken version 1 failed",
                "bf16 version 1 failed",
            ]
            .iter()
            .all(|w| s.errors.iter().any(|e| e.contains(w)))
        },
    );

    // Readiness: the channel is ready (v1 serves); v2 and broken are 503 with the reason.
    let (status, v) = call(&a, "GET", "/v2/models/digits/ready", b"");
    assert_eq!((status, &v["version"]), (200, &json!("1")), "{v}");
    let (status, v) = call(&a, "GET", "/v2/models/digits/versions/2/ready", b"");
    assert_eq!(status, 503, "{v}");
    let why = error_text(&v).to_string();
    assert!(
        why.contains("version 2")
            && why.contains("(GoldenMismatch)")
            && why.contains("golden check"),
        "{why}"
    );
    let (status, v) = call(&a, "GET", "/v2/models/broken/ready", b"");
    assert_eq!(status, 503, "{v}");
    let broken_why = error_text(&v).to_string();
    assert!(
        broken_why.contains("(UnsupportedOp)") && broken_why.contains("NoSuchOp"),
        "{broken_why}"
    );
    // Unknown models and versions stay 404.
    assert_eq!(call(&a, "GET", "/v2/models/nope/ready", b"").0, 404);
    assert_eq!(
        call(&a, "GET", "/v2/models/digits/versions/9/ready", b"").0,
        404
    );

    // Inference: without a version v1 answers; v2 and broken answer 503 and the reason.
    let row = serde_json::to_vec(&digits_row()).unwrap();
    let (status, v) = call(&a, "POST", "/v2/models/digits/infer", &row);
    assert_eq!((status, &v["model_version"]), (200, &json!("1")), "{v}");
    let (status, v) = call(&a, "POST", "/v2/models/digits/versions/2/infer", &row);
    assert_eq!((status, error_text(&v)), (503, why.as_str()));
    let x = json!({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
        "data": [0, 0, 0, 0]}]});
    let (status, v) = call(
        &a,
        "POST",
        "/v2/models/broken/infer",
        x.to_string().as_bytes(),
    );
    assert_eq!((status, error_text(&v)), (503, broken_why.as_str()));

    // Metadata lists each version with its state.
    let (status, meta) = call(&a, "GET", "/v2/models/digits", b"");
    assert_eq!(status, 200, "{meta}");
    assert_eq!(meta["versions"], json!(["1"]), "{meta}");
    let states = meta["states"].as_array().expect("states");
    assert_eq!(states.len(), 2, "{meta}");
    assert_eq!(states[0]["version"], "1");
    assert_eq!(states[0]["state"], "READY");
    assert_eq!(states[1]["version"], "2");
    assert_eq!(states[1]["state"], "UNAVAILABLE");
    let reason = states[1]["reason"].as_str().unwrap();
    assert!(why.ends_with(reason), "{why} / {reason}");
    let (status, v) = call(&a, "GET", "/v2/models/digits/versions/2", b"");
    assert_eq!((status, error_text(&v)), (503, why.as_str()));
    assert_eq!(v["states"], meta["states"]);
    let (status, v) = call(&a, "GET", "/v2/models/broken", b"");
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["states"][0]["state"], "UNAVAILABLE");

    // Triton's repository index: every version, or the ready ones.
    for body in [&b""[..], b"{}"] {
        let (status, index) = call(&a, "POST", "/v2/repository/index", body);
        assert_eq!(status, 200, "{index}");
        assert_eq!(index.as_array().unwrap().len(), 4, "{index}");
        assert_eq!(entry(&index, "digits", "1").unwrap()["state"], "READY");
        assert_eq!(entry(&index, "digits", "1").unwrap()["reason"], "");
        let v2 = entry(&index, "digits", "2").unwrap();
        assert_eq!(
            (&v2["state"], &v2["reason"]),
            (&json!("UNAVAILABLE"), &json!(reason))
        );
        let b1 = entry(&index, "broken", "1").unwrap();
        assert_eq!(b1["state"], "UNAVAILABLE");
        assert!(broken_why.ends_with(b1["reason"].as_str().unwrap()));
        let t1 = entry(&index, "bf16", "1").unwrap();
        assert_eq!(t1["state"], "UNAVAILABLE");
        let r = t1["reason"].as_str().unwrap();
        assert!(
            r.contains("(UnsupportedOp)") && r.to_lowercase().contains("bfloat16"),
            "{r}"
        );
    }
    let (status, index) = call(&a, "POST", "/v2/repository/index", br#"{"ready": true}"#);
    assert_eq!(status, 200);
    assert_eq!(
        index,
        json!([{"name": "digits", "version": "1", "state": "READY", "reason": ""}])
    );
    let (status, v) = call(&a, "POST", "/v2/repository/index", br#"{"ready": 1}"#);
    assert_eq!(status, 400, "{v}");

    // One failure, one class: the status (this node's release and its own health report
    // in the sample) says UnsupportedOp as the index does, wherever tract found it.
    let s = a.wait(Duration::from_secs(30), "the reports in the sample", |s| {
        s.channels
            .iter()
            .filter(|c| c.channel == "broken" || c.channel == "bf16")
            .all(|c| c.releases.iter().any(|r| !r.failures.is_empty()))
    });
    for name in ["broken", "bf16"] {
        let c = s.channels.iter().find(|c| c.channel == name).unwrap();
        let r = &c.releases[0];
        assert_eq!(r.state, "UNAVAILABLE", "{name}");
        assert_eq!(r.error_class.as_deref(), Some("UnsupportedOp"), "{name}");
        assert_eq!(r.failures[0].class, "UnsupportedOp", "{name}");
        assert_eq!(r.reason, index_reason(&a, name), "{name}");
    }
    let d = s.channels.iter().find(|c| c.channel == "digits").unwrap();
    let d2 = d.releases.iter().find(|r| r.version == 2).unwrap();
    assert_eq!(d2.error_class.as_deref(), Some("GoldenMismatch"));
    assert_eq!(d2.reason, reason);

    eprintln!("v2: {why}\nbroken: {broken_why}");
    // Triton's client, unchanged.
    let script = pollen_tests::workspace_dir().join("tests/python/model_states_check.py");
    let out = std::process::Command::new("python3")
        .arg(&script)
        .arg(&a.http)
        .output()
        .expect("run python3 (with tritonclient[http] and numpy)");
    assert!(
        out.status.success(),
        "tritonclient check failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let t: Value = serde_json::from_slice(&out.stdout).expect("the script prints JSON");
    assert_eq!(
        t["ready"],
        json!({"digits": true, "digits/1": true, "digits/2": false, "broken": false})
    );
    let (_, index) = call(&a, "POST", "/v2/repository/index", b"");
    assert_eq!(
        t["index"], index,
        "get_model_repository_index parses the index"
    );
    assert_eq!(t["metadata"]["states"], meta["states"]);
    assert_eq!(
        t["infer_digits_2"],
        json!({"status": "503", "message": why})
    );
    assert_eq!(
        t["infer_broken"],
        json!({"status": "503", "message": broken_why})
    );
}

/// The index reason of version 1 of `name`.
fn index_reason(n: &Node, name: &str) -> String {
    let (_, index) = call(n, "POST", "/v2/repository/index", b"");
    entry(&index, name, "1").unwrap()["reason"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn a_version_on_its_way_is_loading_with_its_download_progress() {
    let tmp = tempfile::tempdir().unwrap();
    let op = Operator::new(&tmp.path().join("op"), false);
    let trust = vec!["--trust".to_string(), op.trust_file.display().to_string()];
    // a uploads at 64 KiB/s: b takes about 10 s to fetch the model's 640 kB.
    let mut args = trust.clone();
    args.extend(["--upload-limit".to_string(), "65536".to_string()]);
    let a = Node::start(&tmp.path().join("a"), &args);
    let mut args = trust.clone();
    args.extend(["--bootstrap".to_string(), a.addr()]);
    let b = Node::start(&tmp.path().join("b"), &args);
    b.wait(Duration::from_secs(20), "connected", |s| {
        !s.peers.is_empty()
    });
    let model = tmp.path().join("table.onnx");
    std::fs::write(&model, onnxgen::gather(40_000)).unwrap();
    op.publish(
        tmp.path(),
        &a,
        &model,
        "table",
        1,
        &["--chunk-size", "16KiB"],
    );

    let (mut index_loading, mut ready_loading) = (None, None);
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        assert!(
            Instant::now() < deadline,
            "table v1 never served on b (index saw {index_loading:?}, ready saw \
             {ready_loading:?}):\n{}",
            b.log()
        );
        let (status, v) = call(&b, "GET", "/v2/models/table/ready", b"");
        if status == 200 {
            break;
        }
        if status == 503 && error_text(&v).contains("fetching") {
            ready_loading = Some(error_text(&v).to_string());
        }
        let (_, index) = call(&b, "POST", "/v2/repository/index", b"{}");
        if let Some(e) = entry(&index, "table", "1")
            && e["state"] == "LOADING"
            && e["reason"].as_str().unwrap().starts_with("fetching: ")
        {
            index_loading = Some(e["reason"].as_str().unwrap().to_string());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let ready_loading = ready_loading.expect("ready answered 503 while fetching");
    assert!(
        ready_loading
            .starts_with("model 'table' is loading on this node; version 1 is LOADING: fetching: "),
        "{ready_loading}"
    );
    let index_loading = index_loading.expect("the index said LOADING while fetching");
    eprintln!("while fetching: ready {ready_loading:?}; index {index_loading:?}");
    assert!(index_loading.ends_with(" of 40 chunks"), "{index_loading}");
    let (_, index) = call(&b, "POST", "/v2/repository/index", b"");
    assert_eq!(
        index,
        json!([{"name": "table", "version": "1", "state": "READY", "reason": ""}])
    );
}
