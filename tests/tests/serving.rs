//! End-to-end serving: real `pollen run` processes serving the bundled digits model over
//! KServe v2, version swaps under load, a version whose golden check fails, bad requests.

use pollen_tests::mesh::{Node, Operator};
use std::path::PathBuf;
use std::time::{Duration, Instant};

fn models() -> PathBuf {
    pollen_tests::workspace_dir().join("models")
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(20)))
        .http_status_as_error(false)
        .build()
        .into()
}

fn golden() -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(models().join("golden-v1.json")).unwrap()).unwrap()
}

/// POST a JSON body; returns (status, body JSON).
fn post(url: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
    let mut r = agent().post(url).send_json(body).expect("request");
    let status = r.status().as_u16();
    let text = r.body_mut().read_to_string().unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
    )
}

fn infer_body(row: &serde_json::Value) -> serde_json::Value {
    serde_json::json!({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": row}]})
}

fn argmax(v: &serde_json::Value) -> usize {
    let d = v["outputs"][0]["data"].as_array().expect("output data");
    d.iter()
        .enumerate()
        .max_by(|a, b| a.1.as_f64().unwrap().total_cmp(&b.1.as_f64().unwrap()))
        .map(|(i, _)| i)
        .unwrap()
}

fn serving(n: &Node, version: u64) -> bool {
    let r = agent()
        .get(format!(
            "{}/v2/models/digits/versions/{version}/ready",
            n.url()
        ))
        .call()
        .expect("ready");
    r.status() == 200
        && agent()
            .get(format!("{}/v2/models/digits", n.url()))
            .call()
            .is_ok_and(|mut r| {
                r.body_mut()
                    .read_json::<serde_json::Value>()
                    .is_ok_and(|v| v["versions"][0] == serde_json::json!(version.to_string()))
            })
}

fn wait_serving(n: &Node, version: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !serving(n, version) {
        assert!(
            Instant::now() < deadline,
            "v{version} never served on {}:\n{}",
            n.url(),
            n.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn serves_swaps_under_load_and_refuses_a_failing_version() {
    let tmp = tempfile::tempdir().unwrap();
    let op = Operator::new(&tmp.path().join("op"), false);
    let (a, b) = op.connected_pair(tmp.path());

    op.publish_digits(tmp.path(), &a, "digits-v1.onnx", "golden-v1.json", 1, &[]);
    for n in [&a, &b] {
        wait_serving(n, 1);
        let g = golden();
        for (row, class) in g["inputs"]
            .as_array()
            .unwrap()
            .iter()
            .zip(g["expected_class"].as_array().unwrap())
        {
            let (status, out) = post(
                &format!("{}/v2/models/digits/infer", n.url()),
                &infer_body(row),
            );
            assert_eq!(status, 200, "{out}");
            assert_eq!(out["model_version"], "1");
            assert_eq!(
                argmax(&out) as u64,
                class.as_u64().unwrap(),
                "golden class on {}",
                n.url()
            );
        }
    }

    // v2 while a bounded loop of requests runs against b: every request succeeds.
    let url = format!("{}/v2/models/digits/infer", b.url());
    let row = golden()["inputs"][2].clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let (url, row, stop) = (url.clone(), row.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut seen = Vec::new();
                let start = Instant::now();
                while !stop.load(std::sync::atomic::Ordering::Relaxed)
                    && start.elapsed() < Duration::from_secs(60)
                {
                    let (status, out) = post(&url, &infer_body(&row));
                    assert_eq!(status, 200, "request during the swap: {out}");
                    seen.push(out["model_version"].as_str().unwrap().to_string());
                }
                seen
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    op.publish_digits(tmp.path(), &a, "digits-v2.onnx", "golden-v2.json", 2, &[]);
    wait_serving(&b, 2);
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut versions = Vec::new();
    for w in workers {
        versions.extend(w.join().expect("worker"));
    }
    assert!(
        versions.len() > 10,
        "the loop ran ({} requests)",
        versions.len()
    );
    assert_eq!(versions.first().map(String::as_str), Some("1"));
    assert_eq!(versions.last().map(String::as_str), Some("2"));

    // v3: the v2 graph with v1's golden outputs: the check fails, v2 keeps serving.
    op.publish_digits(tmp.path(), &a, "digits-v2.onnx", "golden-v1.json", 3, &[]);
    for n in [&a, &b] {
        n.wait(Duration::from_secs(30), "v3 refused", |s| {
            s.errors
                .iter()
                .any(|e| e.contains("version 3 failed to activate"))
        });
    }
    for n in [&a, &b] {
        let (status, out) = post(
            &format!("{}/v2/models/digits/infer", n.url()),
            &infer_body(&row),
        );
        assert_eq!(status, 200);
        assert_eq!(out["model_version"], "2", "v3 never serves on {}", n.url());
        // v3 is known here but not served: 503 with the reason.
        let mut r = agent()
            .get(format!("{}/v2/models/digits/versions/3", n.url()))
            .call()
            .unwrap();
        let body = r.body_mut().read_to_string().unwrap_or_default();
        assert_eq!(r.status(), 503, "{body}");
        assert!(body.contains("GoldenMismatch"), "{body}");
    }
    let metrics = b.metrics();
    assert!(
        metrics.contains("pollen_inference_requests_total{model=\"digits\",version=\"2\"}"),
        "{metrics}"
    );
}

#[test]
fn bad_requests_get_clear_4xx_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let op = Operator::new(&tmp.path().join("op"), false);
    let a = Node::start(
        &tmp.path().join("a"),
        &["--trust".to_string(), op.trust_file.display().to_string()],
    );
    op.publish_digits(tmp.path(), &a, "digits-v1.onnx", "golden-v1.json", 1, &[]);
    wait_serving(&a, 1);
    let url = format!("{}/v2/models/digits/infer", a.url());
    let ones: Vec<f32> = vec![1.0; 64];
    let cases = [
        (
            "unknown model",
            format!("{}/v2/models/nope/infer", a.url()),
            infer_body(&serde_json::json!(ones)),
            404,
        ),
        (
            "wrong input name",
            url.clone(),
            serde_json::json!({"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32", "data": ones}]}),
            400,
        ),
        (
            "wrong dtype",
            url.clone(),
            serde_json::json!({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "INT32", "data": vec![1; 64]}]}),
            400,
        ),
        (
            "wrong shape",
            url.clone(),
            serde_json::json!({"inputs": [{"name": "input", "shape": [1, 32], "datatype": "FP32", "data": vec![1.0; 32]}]}),
            400,
        ),
        (
            "data length not matching the shape",
            url.clone(),
            serde_json::json!({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": vec![1.0; 63]}]}),
            400,
        ),
        (
            "unknown version",
            format!("{}/v2/models/digits/versions/9/infer", a.url()),
            infer_body(&serde_json::json!(ones)),
            404,
        ),
    ];
    for (what, url, body, want) in cases {
        let (status, out) = post(&url, &body);
        assert_eq!(status, want, "{what}: {out}");
        assert!(
            out["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{what}: error message in {out}"
        );
    }
    // Malformed JSON.
    let mut r = agent().post(&url).send("{not json").unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.body_mut().read_to_string().unwrap().contains("\"error\""));
    // Body too large (one byte over the limit): refused 413 from its Content-Length, before
    // a byte of it is read, so the client sends only the head and reads the answer (a
    // client still writing could meet the connection closed after the 413, which HTTP
    // allows). JSON bodies have a limit of their own, from the model's sizes (json_bounds.rs);
    // this is the limit of the binary tensor data extension.
    let over = pollen_node::http::v2::MAX_INFER_BODY + 1;
    let mut conn = std::net::TcpStream::connect(&a.http).unwrap();
    let head = format!(
        "POST /v2/models/digits/infer HTTP/1.1\r\nHost: 127.0.0.1\r\n\
         Connection: close\r\nContent-Type: application/octet-stream\r\n\
         Inference-Header-Content-Length: 100\r\nContent-Length: {over}\r\n\r\n"
    );
    std::io::Write::write_all(&mut conn, head.as_bytes()).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut answer = Vec::new();
    let _ = std::io::Read::read_to_end(&mut conn, &mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("\"error\""), "{answer}");
    // Server metadata and health.
    for path in [
        "/v2",
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/models/digits",
        "/v2/models/digits/ready",
    ] {
        let r = agent().get(format!("{}{path}", a.url())).call().unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
}

/// Triton's own Python HTTP client, unchanged, in JSON and binary modes (`.ci/run`
/// installs `tritonclient[http]`; without it this test fails and says how to install it).
#[test]
fn tritonclient_works_unchanged() {
    let probe = std::process::Command::new("python3")
        .args(["-c", "import tritonclient.http, numpy"])
        .output();
    let installed = probe.as_ref().is_ok_and(|o| o.status.success());
    assert!(
        installed,
        "python3 with tritonclient[http] is needed: pip install 'tritonclient[http]' ({:?})",
        probe.map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
    );
    let tmp = tempfile::tempdir().unwrap();
    let op = Operator::new(&tmp.path().join("op"), false);
    let a = Node::start(
        &tmp.path().join("a"),
        &["--trust".to_string(), op.trust_file.display().to_string()],
    );
    op.publish_digits(tmp.path(), &a, "digits-v1.onnx", "golden-v1.json", 1, &[]);
    wait_serving(&a, 1);
    let script = pollen_tests::workspace_dir().join("tests/python/triton_client_check.py");
    let out = std::process::Command::new("python3")
        .arg(&script)
        .arg(&a.http)
        .arg("digits")
        .arg(models().join("golden-v1.json"))
        .output()
        .expect("run python3");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "tritonclient check failed:\n{text}");
    assert!(text.contains("binary mode: 5 golden inputs ok"), "{text}");
    eprintln!("{text}");
}

/// `pollen demo`, the README's main command, end to end (it exits after its tour here).
#[test]
fn demo_runs_its_whole_tour() {
    let out = std::process::Command::new(pollen_tests::pollen_bin())
        .arg("demo")
        .env("POLLEN_DEMO_EXIT", "1")
        .output()
        .expect("run pollen demo");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "pollen demo failed:\n{text}");
    assert!(text.contains("answered with model_version \"1\""), "{text}");
    assert!(text.contains("answered with model_version \"2\""), "{text}");
    assert!(
        text.contains("stopped 5 nodes; removed"),
        "cleans up:\n{text}"
    );
}
