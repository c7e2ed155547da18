//! The HTTP server's bounds (security review H2, H3): slow or idle connections are closed
//! after the header timeout, connections past the cap are closed at once and the node's
//! file descriptors stay bounded, and slow uploads cannot hold more than two blocking
//! threads, so inference keeps answering.

use pollen_tests::mesh::{Node, Operator};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// A valid inference request on a fresh connection: its status, and how long it took.
fn infer(n: &Node) -> (u16, Duration) {
    let golden: serde_json::Value = serde_json::from_slice(
        &std::fs::read(pollen_tests::workspace_dir().join("models/golden-v1.json")).unwrap(),
    )
    .unwrap();
    let body = serde_json::json!({"inputs": [{"name": "input", "shape": [1, 64],
        "datatype": "FP32", "data": golden["inputs"][0]}]});
    let started = Instant::now();
    let status = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(5)))
        .http_status_as_error(false)
        .build()
        .new_agent()
        .post(format!("{}/v2/models/digits/infer", n.url()))
        .send_json(&body)
        .map_or(0, |r| r.status().as_u16());
    (status, started.elapsed())
}

/// Has the node closed this connection (or answered it, then closed it)?
fn closed_by_server(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut b = [0u8; 256];
    match s.read(&mut b) {
        Ok(0) => true,
        Ok(_) => true, // an error answer (408), then the close
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

#[test]
fn slow_and_idle_connections_are_closed_and_slow_uploads_do_not_stop_inference() {
    let tmp = tempfile::tempdir().unwrap();
    let (_op, n) = Operator::with_node_serving_digits(tmp.path());
    let addr = n.http.clone();
    let (status, baseline) = infer(&n);
    assert_eq!(status, 200);

    // Three slow uploads with the token: two hold the upload slots, the third is refused
    // at once; inference answers meanwhile (before: every slow upload held a blocking
    // thread, and 520 of them stopped inference).
    let mut uploads = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(&addr).unwrap();
        write!(
            s,
            "PUT /v1/files/{} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {}\r\n\
             Content-Length: 1000000\r\n\r\nx",
            "ab".repeat(32),
            pollen_tests::TEST_TOKEN
        )
        .unwrap();
        uploads.push(s);
    }
    std::thread::sleep(Duration::from_millis(300));
    let bearer = format!("Bearer {}", pollen_tests::TEST_TOKEN);
    let (status, text) = n.http_with(
        "PUT",
        &format!("/v1/files/{}", "cd".repeat(32)),
        b"x",
        &[("authorization", &bearer)],
    );
    assert_eq!(status, 503, "{text}");
    let (status, t) = infer(&n);
    assert_eq!(status, 200);
    assert!(
        t < Duration::from_secs(2),
        "inference took {t:?} (baseline {baseline:?})"
    );

    // Past the connection cap (512), a new connection is closed at once; the node's fds
    // stay near the cap (before: 5000 idle connections held 5014 fds).
    let before = fds(n.pid());
    let mut idle: Vec<TcpStream> = (0..540)
        .filter_map(|_| TcpStream::connect(&addr).ok())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let held = fds(n.pid());
    assert!(
        held < before + 525,
        "fds {before} -> {held}: the cap is 512"
    );
    // A slowloris: a few header bytes every second on some of them.
    for s in idle.iter_mut().take(20) {
        let _ = s.write_all(b"GET /v1/status HTTP/1.1\r\nX-a: ");
    }
    for _ in 0..4 {
        std::thread::sleep(Duration::from_secs(1));
        for s in idle.iter_mut().take(20) {
            let _ = s.write_all(b"a");
        }
    }
    // After the header timeout (10 s) every one of them has been closed by the node, and
    // a valid request is answered again at once.
    std::thread::sleep(Duration::from_secs(8));
    let open = idle
        .iter_mut()
        .map(closed_by_server)
        .filter(|closed| !closed)
        .count();
    assert_eq!(open, 0, "connections still open after the header timeout");
    drop(idle);
    let (status, t) = infer(&n);
    assert_eq!(status, 200);
    assert!(t < Duration::from_secs(2), "{t:?}");
    drop(uploads);
}

/// Review M2: uploads that no manifest refers to yet are held to `max_unreferenced_bytes`
/// (here 600 KB): past it an upload gets 507 with the reason, whether it declares its
/// length or not, and nothing of it stays on disk; once a manifest refers to the first
/// file, the room is back.
#[test]
fn uploads_past_the_unreferenced_quota_are_refused_until_a_manifest_refers_to_them() {
    use pollen_tests::mesh::test_bytes;
    let tmp = tempfile::tempdir().unwrap();
    let op = Operator::new(&tmp.path().join("op"), false);
    let config = tmp.path().join("node.toml");
    std::fs::write(&config, "max_unreferenced_bytes = 600000\n").unwrap();
    let n = Node::start(
        &tmp.path().join("n"),
        &[
            "--trust".into(),
            op.trust_file.display().to_string(),
            "--config".into(),
            config.display().to_string(),
        ],
    );
    let file = |name: &str, seed: u64| {
        let p = tmp.path().join(name);
        std::fs::write(&p, test_bytes(400_000, seed)).unwrap();
        p
    };
    let (a, b) = (file("a.bin", 1), file("b.bin", 2));
    let ma = op.manifest(std::slice::from_ref(&a), "quota.a", 1, 65_536);
    let mb = op.manifest(std::slice::from_ref(&b), "quota.b", 1, 65_536);
    n.upload(&ma, std::slice::from_ref(&a));
    let cid_b = mb.body.artifact.variants[0].files[0]
        .spec
        .content_id
        .to_hex();
    let bytes_b = std::fs::read(&b).unwrap();
    // Raw connections, so that the client never writes past what the node reads before
    // it answers (a client still writing may get a reset instead of the answer).
    let put = |head: &str, body: &[u8]| {
        let mut s = TcpStream::connect(&n.http).unwrap();
        write!(
            s,
            "PUT /v1/files/{cid_b}?chunk_size=65536 HTTP/1.1\r\nHost: 127.0.0.1\r\n\
             Authorization: Bearer {}\r\nConnection: close\r\n{head}\r\n",
            pollen_tests::TEST_TOKEN
        )
        .unwrap();
        s.write_all(body).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
        String::from_utf8_lossy(&answer).into_owned()
    };
    // A declared length over the room left (600,000 - 400,000): refused before any byte
    // of the body is read.
    let answer = put(&format!("Content-Length: {}\r\n", bytes_b.len()), b"");
    assert!(answer.starts_with("HTTP/1.1 507"), "{answer}");
    assert!(answer.contains("upload quota"), "{answer}");
    // No length (chunked): refused once the body passes the room; one byte past it is
    // sent.
    let mut chunk = format!("{:x}\r\n", 200_001).into_bytes();
    chunk.extend_from_slice(&bytes_b[..200_001]);
    let answer = put("Transfer-Encoding: chunked\r\n", &chunk);
    assert!(answer.starts_with("HTTP/1.1 507"), "{answer}");
    assert!(
        !n.blob(&cid_b).exists(),
        "nothing of the refused upload is kept"
    );
    // A manifest now refers to the first file: it no longer counts.
    let (status, text) = n.post_manifest(&ma.signed.to_bytes());
    assert_eq!(status, 200, "{text}");
    n.upload(&mb, std::slice::from_ref(&b));
    assert!(n.blob(&cid_b).exists());
}
