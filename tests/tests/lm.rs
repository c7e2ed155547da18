//! Language models end to end, on real `pollen run` processes: a tiny causal LM of the
//! SmolLM2 family made by `scripts/slm/make_tiny_lm.py` (float and int8 variants),
//! published with `pollen publish --variant … --requires`, fetched and served by each node
//! in its own variant, and answered on the OpenAI-compatible API: by the stock `openai`
//! Python client (`scripts/slm/openai_check.py`: greedy answers equal to onnxruntime's,
//! streaming, stop strings, seeds, refusals), and by raw HTTP for the bounds (429 past
//! the generation places, a vanished client cancels its generation, a hot swap does not
//! cut a stream short).

use pollen_tests::Pollen;
use pollen_tests::mesh::{Node, Operator};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The tiny LM, made by its script into `dir` (`fp32/` and `int8/`), checked by the script
/// to be the model the committed expected answers were computed on; those answers.
fn tiny_lm(dir: &Path) -> serde_json::Value {
    let out = Command::new("python3")
        .arg(repo().join("scripts/slm/make_tiny_lm.py"))
        .arg(dir)
        // Compare with the committed expected answers instead of rewriting them.
        .arg("--check")
        .output()
        .expect("python3 (with onnx, onnxruntime, tokenizers: scripts/slm/requirements.txt)");
    assert!(
        out.status.success(),
        "make_tiny_lm.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&std::fs::read(repo().join("scripts/slm/tiny_expected.json")).unwrap())
        .unwrap()
}

fn publish(op: &Operator, tmp: &Path, node: &Node, lm: &Path, version: u64, extra: &[&str]) {
    let mut args: Vec<String> = vec![
        "publish".into(),
        "--channel".into(),
        "lm".into(),
        "--version".into(),
        version.to_string(),
        "--key".into(),
        op.dir.join("publisher.key").display().to_string(),
        "--node".into(),
        node.url(),
        "--variant".into(),
        format!("fp32={}", lm.join("fp32").display()),
        "--variant".into(),
        format!("int8={}", lm.join("int8").display()),
        "--requires".into(),
        "int8:class=weak".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    Pollen::in_dir(tmp).run(args).success();
}

fn serving(n: &Node, version: u64) -> pollen_node::status::Status {
    n.wait(Duration::from_secs(90), "serving the LM", |s| {
        s.channels
            .iter()
            .any(|c| c.channel == "lm" && c.active_version == Some(version))
    })
}

/// A raw HTTP/1.1 POST of a JSON body; the stream, for reading the answer as it comes.
fn post(n: &Node, path: &str, body: &serde_json::Value) -> TcpStream {
    let body = body.to_string();
    let mut s = TcpStream::connect(&n.http).expect("connect");
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s
}

/// The status line of an answer.
fn status_of(s: &mut BufReader<TcpStream>) -> u16 {
    let mut line = String::new();
    s.read_line(&mut line).unwrap();
    line.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

fn chat_body(prompt: &str, max_tokens: u64, stream: bool) -> serde_json::Value {
    serde_json::json!({
        "model": "lm",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    })
}

#[test]
fn a_language_model_serves_each_device_its_variant_on_the_openai_api() {
    let tmp = tempfile::tempdir().unwrap();
    let lm = tmp.path().join("tiny");
    let expected = tiny_lm(&lm);
    let op = Operator::new(&tmp.path().join("op"), false);
    let trust = vec!["--trust".to_string(), op.trust_file.display().to_string()];
    let a = Node::start(&tmp.path().join("a"), &trust);
    let mut weak = trust.clone();
    weak.extend([
        "--bootstrap".into(),
        a.addr(),
        "--device-class".into(),
        "weak".into(),
    ]);
    let b = Node::start(&tmp.path().join("b"), &weak);
    b.wait(Duration::from_secs(20), "connected", |s| {
        !s.peers.is_empty()
    });

    publish(&op, tmp.path(), &a, &lm, 1, &[]);
    for (n, variant) in [(&a, "fp32"), (&b, "int8")] {
        let s = serving(n, 1);
        let release = &s.channels[0].releases[0];
        assert_eq!(release.variant, variant, "{}", n.url());
        assert!(
            n.log()
                .contains("a language model; its golden prompts agree"),
            "{}",
            n.log()
        );
    }

    // The weak node fetched only its own variant's model (the publishing node holds every
    // file it was given).
    let fp32 = blake3_hex(&std::fs::read(lm.join("fp32/model.onnx")).unwrap());
    let int8 = blake3_hex(&std::fs::read(lm.join("int8/model.onnx")).unwrap());
    assert!(b.blob(&int8).exists(), "the weak node holds its int8 model");
    assert!(
        !b.blob(&fp32).exists(),
        "the weak node fetched the fp32 model"
    );

    // The stock OpenAI client against the float node: answers equal onnxruntime's.
    let out = Command::new("python3")
        .arg(repo().join("scripts/slm/openai_check.py"))
        .args(["--base-url", &format!("{}/v1", a.url()), "--model", "lm"])
        .arg("--expected")
        .arg(repo().join("scripts/slm/tiny_expected.json"))
        .output()
        .expect("python3 with the openai package (scripts/slm/requirements.txt)");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.contains("all checks passed"),
        "{said}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The int8 node answers too (its own greedy text may differ from the float one's).
    let (code, body) = b.http_with(
        "POST",
        "/v1/chat/completions",
        chat_body("What is the capital of France?", 8, false)
            .to_string()
            .as_bytes(),
        &[("content-type", "application/json")],
    );
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v["usage"]["prompt_tokens"],
        expected["prompts"][0]["prompt_ids"]
            .as_array()
            .unwrap()
            .len()
    );

    // The control API's /v1 mutations still need the token; the OpenAI routes do not.
    let (code, _) = a.http_with("POST", "/v1/instructions", b"{}", &[]);
    assert_eq!(code, 401);

    // v2 states golden continuations the model does not give: every node refuses it with
    // the reason, and v1 goes on serving.
    let bad = tmp.path().join("bad");
    for v in ["fp32", "int8"] {
        let (from, to) = (lm.join(v), bad.join(v));
        std::fs::create_dir_all(&to).unwrap();
        for f in ["model.onnx", "tokenizer.json", "generation.json"] {
            std::fs::copy(from.join(f), to.join(f)).unwrap();
        }
        let mut g: serde_json::Value =
            serde_json::from_slice(&std::fs::read(from.join("golden_prompts.json")).unwrap())
                .unwrap();
        for p in g["prompts"].as_array_mut().unwrap() {
            for t in p["continuation"].as_array_mut().unwrap() {
                *t = serde_json::json!((t.as_u64().unwrap() + 1) % 275);
            }
        }
        std::fs::write(to.join("golden_prompts.json"), g.to_string()).unwrap();
    }
    publish(&op, tmp.path(), &a, &bad, 2, &[]);
    for n in [&a, &b] {
        let s = n.wait(Duration::from_secs(90), "v2 refused", |s| {
            s.errors
                .iter()
                .any(|e| e.contains("lm version 2 failed to activate"))
        });
        let e = s
            .errors
            .iter()
            .find(|e| e.contains("lm version 2 failed to activate"))
            .unwrap();
        assert!(
            e.contains("(GoldenMismatch)") && e.contains("expected tokens of its golden prompts"),
            "{e}"
        );
        assert_eq!(s.channels[0].active_version, Some(1), "v1 still serves");
    }

    let m = a.metrics();
    assert!(
        m.contains("pollen_lm_generations_total{model=\"lm\",version=\"1\",outcome=\"ok\"}")
            && m.contains("pollen_lm_decode_tokens_per_second{model=\"lm\",version=\"1\"}"),
        "{m}"
    );
}

fn blake3_hex(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

/// Generation places: with one place and no queue, a second request is answered 429
/// while a streamed generation holds the place (its client reads nothing, so it waits
/// on the client); the client going away ends the generation and frees the place. A
/// stream started on v1 finishes on v1 while v2 is swapped in.
#[test]
fn generations_are_bounded_cancelled_with_their_client_and_survive_a_hot_swap() {
    let tmp = tempfile::tempdir().unwrap();
    let lm = tmp.path().join("tiny");
    tiny_lm(&lm);
    // A longer context than the model was made with (rotary positions go on), and only
    // `<|endoftext|>` ends a generation (the model is made to say `<|im_end|>` early), so
    // that a generation outlasts what the sockets buffer and waits on its client.
    for v in ["fp32", "int8"] {
        let path = lm.join(v).join("generation.json");
        let mut g: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        g["context_length"] = serde_json::json!(8192);
        g["eos_tokens"] = serde_json::json!(["<|endoftext|>"]);
        std::fs::write(&path, g.to_string()).unwrap();
    }
    let op = Operator::new(&tmp.path().join("op"), false);
    let config = tmp.path().join("node.toml");
    std::fs::write(&config, "max_generations = 1\ngeneration_queue = 0\n").unwrap();
    let args = vec![
        "--trust".to_string(),
        op.trust_file.display().to_string(),
        "--config".into(),
        config.display().to_string(),
    ];
    let a = Node::start(&tmp.path().join("a"), &args);
    publish(&op, tmp.path(), &a, &lm, 1, &[]);
    serving(&a, 1);

    // A long streamed generation whose client does not read.
    let long = chat_body("Tell me a long story.", 8000, true);
    let held = post(&a, "/v1/chat/completions", &long);
    std::thread::sleep(Duration::from_millis(500));
    let mut second = BufReader::new(post(&a, "/v1/chat/completions", &chat_body("Hi", 4, false)));
    assert_eq!(status_of(&mut second), 429, "no place and no queue: 429");
    // The client goes away: its generation ends, and the place is free again.
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut r = BufReader::new(post(&a, "/v1/chat/completions", &chat_body("Hi", 4, false)));
        match status_of(&mut r) {
            200 => break,
            429 if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            other => panic!("after the client left: {other}"),
        }
    }
    let m = a.metrics();
    assert!(
        m.contains(
            "pollen_lm_generations_total{model=\"lm\",version=\"1\",outcome=\"cancelled\"} 1"
        ),
        "{m}"
    );
    // A generation frees its place before its answer ends: requests sent back to back,
    // each on the end of the one before, never find the place taken.
    for i in 0..10 {
        let mut r = BufReader::new(post(
            &a,
            "/v1/chat/completions",
            &chat_body("Hi", 4, i % 2 == 0),
        ));
        assert_eq!(status_of(&mut r), 200, "back-to-back request {i}");
        let mut rest = String::new();
        r.read_to_string(&mut rest).unwrap();
    }

    // Hot swap mid-stream: v2 is published while a v1 stream is under way (its client
    // reads only its first event until v2 serves).
    let ok = "pollen_lm_generations_total{model=\"lm\",version=\"1\",outcome=\"ok\"}";
    let finished_before = a.metric(ok);
    let swap = chat_body("Tell me a long story.", 3000, true);
    let mut stream = BufReader::new(post(&a, "/v1/chat/completions", &swap));
    assert_eq!(status_of(&mut stream), 200);
    let mut first = String::new();
    while !first.starts_with("data: ") {
        first.clear();
        stream.read_line(&mut first).unwrap();
    }
    publish(&op, tmp.path(), &a, &lm, 2, &[]);
    serving(&a, 2);
    assert_eq!(
        a.metric(ok),
        finished_before,
        "the v1 generation was still under way when v2 took over"
    );
    let mut rest = String::new();
    stream.read_to_string(&mut rest).unwrap_or_default();
    assert!(
        rest.contains("\"finish_reason\":\"length\"") && rest.contains("data: [DONE]"),
        "the v1 stream ran to its end: {rest}"
    );
    assert!(rest.contains("pollen-v1-"), "it stayed on v1: {first}");
    let (code, body) = a.http_with(
        "POST",
        "/v1/chat/completions",
        chat_body("Hi", 4, false).to_string().as_bytes(),
        &[],
    );
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("pollen-v2-"), "new requests go to v2: {body}");
}
