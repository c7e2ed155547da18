//! The local API's guard (security review H4, M3, M5): mutations need the node's token,
//! foreign Host names and browser origins are refused, reads and inference stay open on
//! loopback, and the CLI says clearly when it has no token.

use pollen_tests::mesh::Operator;
use std::os::unix::fs::PermissionsExt;

#[test]
fn mutations_need_the_token_and_foreign_hosts_and_origins_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (_op, n) = Operator::with_node_serving_digits(tmp.path());
    let token = n.dir.join("api-token");
    let mode = std::fs::metadata(&token).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the token file is the owner's only");

    let bearer = format!("Bearer {}", pollen_tests::TEST_TOKEN);
    let wrong = "Bearer 00".to_string();
    // No token, a wrong one: 401 on every kind of mutation, and nothing changes.
    for headers in [vec![], vec![("authorization", wrong.as_str())]] {
        for (method, path, body) in [
            ("PUT", "/v1/pins/digits", &b"1"[..]),
            ("DELETE", "/v1/pins/digits", b""),
            ("POST", "/v1/manifests", b"x"),
            ("POST", "/v1/instructions", b"x"),
            ("PUT", "/v1/files/00?chunk_size=16384", b"x"),
        ] {
            let (status, text) = n.http_with(method, path, body, &headers);
            assert_eq!(status, 401, "{method} {path} {headers:?}: {text}");
            assert!(text.contains("api-token"), "{text}");
        }
    }
    assert_eq!(n.status().channels[0].pinned, None, "no pin was set");
    // The right token passes the guard (then the route's own checks apply).
    let (status, text) = n.http_with(
        "PUT",
        "/v1/pins/digits",
        b"1",
        &[("authorization", &bearer)],
    );
    assert_eq!(status, 200, "{text}");
    let (status, _) = n.http_with(
        "DELETE",
        "/v1/pins/digits",
        b"",
        &[("authorization", &bearer)],
    );
    assert_eq!(status, 200);

    // Reads and inference are open on loopback, without a token.
    let (status, _) = n.http_with("GET", "/v1/status", b"", &[]);
    assert_eq!(status, 200);
    let (status, _) = n.http_with("GET", "/v2/models/digits", b"", &[]);
    assert_eq!(status, 200);

    // DNS rebinding: a foreign Host is refused, token or not.
    for (method, path) in [("GET", "/v1/status"), ("PUT", "/v1/pins/digits")] {
        let (status, text) = n.http_with(
            method,
            path,
            b"1",
            &[
                ("host", "attacker.example:7411"),
                ("authorization", &bearer),
            ],
        );
        assert_eq!(status, 421, "{method} {path}: {text}");
    }
    let (status, _) = n.http_with("GET", "/v1/status", b"", &[("host", "localhost:7411")]);
    assert_eq!(status, 200, "loopback names pass");
    // A web page's cross-origin request (a "simple" text/plain POST) is refused.
    let (status, text) = n.http_with(
        "POST",
        "/v2/models/digits/infer",
        b"{}",
        &[
            ("origin", "http://evil.example"),
            ("content-type", "text/plain"),
        ],
    );
    assert_eq!(status, 403, "{text}");
    assert_eq!(n.status().channels[0].pinned, None);

    // The CLI without any token says what is missing.
    let out = std::process::Command::new(pollen_tests::pollen_bin())
        .args(["pin", "digits", "1", "--node", &n.url()])
        .env_remove("POLLEN_API_TOKEN")
        .env("HOME", tmp.path()) // no default data dir with a token
        .env_remove("XDG_DATA_HOME")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("API token"), "{err}");
    // With --data-dir it finds the node's token.
    let out = std::process::Command::new(pollen_tests::pollen_bin())
        .args(["pin", "digits", "1", "--node", &n.url(), "--data-dir"])
        .arg(&n.dir)
        .env_remove("POLLEN_API_TOKEN")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(n.status().channels[0].pinned, Some(1));
}

/// Review L4: re-posting a manifest the node already holds (here from gossip) is
/// answered as accepted, but does not record it as published by this node, which would
/// pin the release and keep its files for good.
#[test]
fn reposting_a_held_manifest_pins_nothing() {
    use pollen_tests::mesh::{Node, test_bytes};
    use std::time::Duration;
    let tmp = tempfile::tempdir().unwrap();
    let op = Operator::new(&tmp.path().join("op"), false);
    let trust = op.trust_file.display().to_string();
    let a = Node::start(&tmp.path().join("a"), &["--trust".into(), trust.clone()]);
    let file = tmp.path().join("m.bin");
    std::fs::write(&file, test_bytes(100_000, 3)).unwrap();
    let m = op.manifest(std::slice::from_ref(&file), "repost.me", 1, 65_536);
    let (status, text) = a.publish(&m, std::slice::from_ref(&file));
    assert_eq!(status, 200, "{text}");
    let b = Node::start(
        &tmp.path().join("b"),
        &["--trust".into(), trust, "--bootstrap".into(), a.addr()],
    );
    b.wait(Duration::from_secs(60), "release from gossip", |s| {
        Node::has_release(s, "repost.me", 1)
    });
    let (status, text) = b.post_manifest(&m.signed.to_bytes());
    assert_eq!(status, 200, "{text}");
    let published = |n: &Node| -> Vec<String> {
        let state = std::fs::read_to_string(n.dir.join("state.json")).unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(&state).unwrap_or_default();
        serde_json::from_value(v["published"].clone()).unwrap_or_default()
    };
    assert_eq!(published(&a).len(), 1, "the publisher records it");
    assert!(published(&b).is_empty(), "re-posted: {:?}", published(&b));
}
