//! Models as they ship, through a real `pollen` process and KServe v2: an `If` on a scalar
//! input served once `pollen publish --const` fixes it (and refused with the flag to use
//! before), symbolic dimensions declared with `--input` and served at several sizes, and
//! a model tract can run only at concrete shapes prepared per request shape (counted in
//! `/metrics`).

use pollen_tests::mesh::{Node, Operator};
use pollen_tests::onnxgen;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(30)))
        .http_status_as_error(false)
        .build()
        .into()
}

fn get(url: &str) -> (u16, Value) {
    let mut r = agent().get(url).call().expect("request");
    let status = r.status().as_u16();
    (status, r.body_mut().read_json().unwrap_or(Value::Null))
}

fn post(url: &str, body: &Value) -> (u16, Value) {
    let mut r = agent().post(url).send_json(body).expect("request");
    let status = r.status().as_u16();
    let text = r.body_mut().read_to_string().unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn wait_ready(n: &Node, model: &str, version: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let url = format!("{}/v2/models/{model}/versions/{version}/ready", n.url());
    while get(&url).0 != 200 {
        assert!(
            Instant::now() < deadline,
            "{model} v{version} never served:\n{}",
            n.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn x(rows: usize) -> Value {
    json!({"name": "x", "shape": [rows, 4], "datatype": "FP32", "data": vec![1.0; rows * 4]})
}

fn sr(v: i64) -> Value {
    json!({"name": "sr", "shape": [1], "datatype": "INT64", "data": [v]})
}

#[test]
fn an_if_on_a_scalar_input_serves_once_it_is_declared_constant() {
    let tmp = tempfile::tempdir().unwrap();
    let op = Operator::new(&tmp.path().join("op"), false);
    let trust = vec!["--trust".to_string(), op.trust_file.display().to_string()];
    let n = Node::start(&tmp.path().join("n"), &trust);
    let model = tmp.path().join("vad.onnx");
    std::fs::write(&model, onnxgen::if_on_sample_rate()).unwrap();

    // As shipped: tract cannot type an If whose branches differ; the refusal says what
    // would make it work.
    op.publish(tmp.path(), &n, &model, "vad", 1, &[]);
    let s = n.wait(Duration::from_secs(60), "v1 refused", |s| {
        s.errors
            .iter()
            .any(|e| e.contains("vad version 1 failed to activate"))
    });
    let e = s
        .errors
        .iter()
        .find(|e| e.contains("vad version 1"))
        .unwrap();
    assert!(e.contains("--const sr=VALUE"), "{e}");

    // A name that is not a graph input is refused by publish itself.
    let out = pollen_tests::Pollen::in_dir(tmp.path())
        .run([
            "publish".to_string(),
            model.display().to_string(),
            "--channel".into(),
            "vad".into(),
            "--version".into(),
            "2".into(),
            "--key".into(),
            op.dir.join("publisher.key").display().to_string(),
            "--node".into(),
            n.url(),
            "--const".into(),
            "rate=16000".into(),
        ])
        .failure();
    assert!(
        out.contains("no graph input 'rate'") && out.contains("'sr'"),
        "{out}"
    );

    // Declared: sr fixed (its type, INT64, read from the model), the batch named.
    op.publish(
        tmp.path(),
        &n,
        &model,
        "vad",
        2,
        &["--const", "sr=16000", "--input", "x=f32[B,4]"],
    );
    wait_ready(&n, "vad", 2);
    let (status, meta) = get(&format!("{}/v2/models/vad", n.url()));
    assert_eq!(status, 200);
    assert_eq!(
        meta["inputs"],
        json!([{"name": "x", "datatype": "FP32", "shape": [-1, 4]}])
    );
    assert_eq!(meta["parameters"]["constants"][0]["name"], "sr");
    assert_eq!(meta["parameters"]["constants"][0]["data"], json!([16000]));

    let infer = format!("{}/v2/models/vad/infer", n.url());
    for rows in [1, 3] {
        let (status, out) = post(&infer, &json!({"inputs": [x(rows)]}));
        assert_eq!(status, 200, "{out}");
        assert_eq!(
            out["outputs"][0]["shape"],
            json!([rows, 4]),
            "the then branch"
        );
        assert_eq!(out["outputs"][0]["data"], json!(vec![2.0; rows * 4]));
    }
    let (status, out) = post(&infer, &json!({"inputs": [x(1), sr(16000)]}));
    assert_eq!(status, 200, "the same value is accepted: {out}");
    let (status, out) = post(&infer, &json!({"inputs": [x(1), sr(8000)]}));
    assert_eq!(status, 400, "{out}");
    let msg = out["error"].as_str().unwrap_or_default();
    assert!(msg.contains("'sr' is fixed at [16000]"), "{msg}");
}

#[test]
fn a_model_tract_cannot_optimise_symbolically_is_prepared_per_shape() {
    let tmp = tempfile::tempdir().unwrap();
    let op = Operator::new(&tmp.path().join("op"), false);
    let trust = vec!["--trust".to_string(), op.trust_file.display().to_string()];
    let n = Node::start(&tmp.path().join("n"), &trust);
    let model = tmp.path().join("unet.onnx");
    std::fs::write(&model, onnxgen::unet_step()).unwrap();
    op.publish(tmp.path(), &n, &model, "unet", 1, &[]);
    wait_ready(&n, "unet", 1);
    let infer = format!("{}/v2/models/unet/infer", n.url());
    let image = |h: usize, w: usize| json!({"inputs": [{"name": "x", "shape": [1, 1, h, w], "datatype": "FP32", "data": vec![1.0; h * w]}]});
    for (h, w) in [(4, 4), (8, 6), (4, 4)] {
        let (status, out) = post(&infer, &image(h, w));
        assert_eq!(status, 200, "{out}");
        assert_eq!(out["outputs"][0]["shape"], json!([1, 2, h, w]));
    }
    let (status, out) = post(&infer, &image(5, 5));
    assert_eq!(status, 400, "an odd size does not fit the U-Net: {out}");
    let metric = |name: &str| {
        let text = n.metrics();
        text.lines()
            .find(|l| l.starts_with(name) && l.contains("model=\"unet\""))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
    };
    assert_eq!(metric("pollen_model_specialisations_total"), Some(3.0));
    assert_eq!(metric("pollen_model_specialisations_cached"), Some(2.0));
}
