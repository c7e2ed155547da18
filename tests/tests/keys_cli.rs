//! `pollen keys …` end to end: the real binary, real files, checked with the node's code.

use pollen_protocol::manifest::Manifest;
use pollen_protocol::trust::{NodeCertBody, TrustRoot, TrustRootBody};
use pollen_protocol::{NodeId, PublicKey, UnixTime};
use pollen_tests::Pollen;
use std::fs;
use std::path::Path;

fn now() -> UnixTime {
    pollen_keys::time::unix_now().unwrap()
}

fn read_root(path: &Path) -> TrustRoot {
    let (signed, _) = pollen_keys::files::read_signed::<TrustRootBody>(path, "trust root").unwrap();
    TrustRoot::bootstrap(signed, now()).unwrap()
}

/// `generate` prints the public key, alone on a line.
fn generate(p: &Pollen, name: &str) -> String {
    let out = p.run(["keys", "generate", name]).success();
    let hex = out.trim().to_string();
    assert_eq!(hex.len(), 64, "{out:?}");
    assert!(hex.parse::<PublicKey>().is_ok(), "{out:?}");
    hex
}

#[test]
fn keys_trust_certify_and_manifest_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let p = Pollen::in_dir(dir.path());

    let root_pub = generate(&p, "root.key");
    let publisher_pub = generate(&p, "publisher.key");
    let fleet_pub = generate(&p, "fleet.key");
    let node_pub = generate(&p, "node.key");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(dir.path().join("root.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    assert_eq!(
        p.run(["keys", "public", "root.key"]).success().trim(),
        root_pub
    );

    // Overwriting a key file fails, clearly, and leaves it alone.
    let before = fs::read(dir.path().join("root.key")).unwrap();
    let err = p.run(["keys", "generate", "root.key"]).failure();
    assert!(
        err.contains("key file root.key already exists; refusing to overwrite"),
        "{err}"
    );
    assert_eq!(fs::read(dir.path().join("root.key")).unwrap(), before);
    let err = p.run(["keys", "public", "publisher.key.missing"]).failure();
    assert!(err.contains("cannot read key file"), "{err}");

    // A trust root with a publisher (by key file) and a fleet key (by hex).
    let out = p
        .run([
            "keys",
            "trust",
            "create",
            "--root",
            "root.key",
            "--publisher",
            "publisher.key=vision.*,audio",
            "--fleet-key",
            &fleet_pub,
            "--sign",
            "root.key",
            "--out",
            "root.trust",
        ])
        .success();
    assert!(
        out.contains("wrote trust root version 1 to root.trust"),
        "{out}"
    );
    let root = read_root(&dir.path().join("root.trust"));
    assert_eq!(root.body.root_keys[0].to_hex(), root_pub);
    assert_eq!(root.body.publishers[0].key.to_hex(), publisher_pub);
    assert_eq!(
        root.body.fleet_key.map(|k| k.to_hex()),
        Some(fleet_pub.clone())
    );

    let show = p.run(["keys", "trust", "show", "root.trust"]).success();
    for want in [
        "trust root version 1",
        root_pub.as_str(),
        publisher_pub.as_str(),
        "vision.*, audio",
        fleet_pub.as_str(),
        "self-signed to threshold: yes (1 of 1 required)",
    ] {
        assert!(show.contains(want), "missing {want:?} in:\n{show}");
    }

    // Certify the node; a node holding the root accepts the certificate.
    let out = p
        .run([
            "keys",
            "certify",
            "--fleet",
            "fleet.key",
            "--node",
            &node_pub,
            "--label",
            "site-a",
            "--trust",
            "root.trust",
            "--out",
            "node.cert",
        ])
        .success();
    assert!(out.contains("wrote certificate for node"), "{out}");
    let (cert, _) =
        pollen_keys::files::read_signed::<NodeCertBody>(&dir.path().join("node.cert"), "cert")
            .unwrap();
    let node = NodeId(node_pub.parse::<PublicKey>().unwrap().0);
    root.check_certificate(&node, Some(&cert), now()).unwrap();
    let show = p
        .run(["keys", "cert", "show", "node.cert", "--trust", "root.trust"])
        .success();
    assert!(
        show.contains("site-a") && show.contains("accepted under trust root version 1: yes"),
        "{show}"
    );

    // A manifest for a small file, then an offline extra signature.
    let model = b"not really onnx, but bytes all the same";
    fs::write(dir.path().join("model.onnx"), model).unwrap();
    let out = p
        .run([
            "keys",
            "manifest",
            "create",
            "model.onnx",
            "--channel",
            "vision.defects",
            "--version",
            "3",
            "--key",
            "publisher.key",
            "--stages",
            "5%,25%,100%",
            "--stage-interval",
            "60s",
            "--trust",
            "root.trust",
            "--out",
            "model.manifest",
        ])
        .success();
    assert!(out.contains("vision.defects version 3"), "{out}");
    let out = p
        .run([
            "keys",
            "manifest",
            "sign",
            "model.manifest",
            "--key",
            "root.key",
        ])
        .success();
    assert!(out.contains("2 signature(s)"), "{out}");

    let m = Manifest::from_bytes(&fs::read(dir.path().join("model.manifest")).unwrap()).unwrap();
    root.authorise_manifest(&m, now()).unwrap();
    let file = &m.body.artifact.variants[0].files[0];
    assert_eq!(file.name, "model.onnx");
    assert_eq!(file.spec.content_id.0, *blake3::hash(model).as_bytes());
    assert_eq!(m.signed.signatures().len(), 2);

    let show = p
        .run([
            "keys",
            "manifest",
            "show",
            "model.manifest",
            "--trust",
            "root.trust",
        ])
        .success();
    for want in [
        format!("manifest {}", m.id),
        "channel:  vision.defects".into(),
        "version:  3".into(),
        format!(
            "model.onnx  {} bytes  content id {}",
            model.len(),
            file.spec.content_id
        ),
        "1. 5% of nodes, at creation".into(),
        "2. 25% of nodes, 1m after the previous stage".into(),
        format!("{publisher_pub}  valid, authorised for this channel"),
        "accepted under trust root version 1: yes".into(),
    ] {
        assert!(show.contains(&want), "missing {want:?} in:\n{show}");
    }

    // A channel the publisher may not sign is refused before anything is written.
    let err = p
        .run([
            "keys",
            "manifest",
            "create",
            "model.onnx",
            "--channel",
            "text.chat",
            "--version",
            "1",
            "--key",
            "publisher.key",
            "--trust",
            "root.trust",
            "--out",
            "bad.manifest",
        ])
        .failure();
    assert!(
        err.contains("not allowed to sign channel text.chat"),
        "{err}"
    );
    assert!(!dir.path().join("bad.manifest").exists());

    // The wrong kind of file is named as such.
    let err = p.run(["keys", "trust", "show", "model.manifest"]).failure();
    assert!(
        err.contains("model.manifest is not a pollen trust root"),
        "{err}"
    );
    let err = p.run(["keys", "public", "root.trust"]).failure();
    assert!(err.contains("root.trust is not a pollen key file"), "{err}");
}

#[test]
fn trust_rotation_with_two_of_three_signed_offline() {
    let dir = tempfile::tempdir().unwrap();
    let p = Pollen::in_dir(dir.path());
    for k in ["r1.key", "r2.key", "r3.key", "r4.key", "pub.key"] {
        generate(&p, k);
    }
    let base = [
        "keys",
        "trust",
        "create",
        "--root",
        "r1.key",
        "r2.key",
        "r3.key",
        "--root-threshold",
        "2",
        "--publisher",
        "pub.key=*",
        "--sign",
        "r1.key",
    ];

    // One signature of two: refused unless --partial, then completed by `trust sign`.
    let err = p.run(base.iter().chain(&["--out", "v1.trust"])).failure();
    assert!(err.contains("signed by 1 of the 2 root keys"), "{err}");
    assert!(!dir.path().join("v1.trust").exists());
    let run = p.run(base.iter().chain(&["--partial", "--out", "v1.trust"]));
    assert!(
        run.stderr
            .contains("nodes refuse this trust root until 1 more"),
        "{run}"
    );
    run.success();
    let show = p.run(["keys", "trust", "show", "v1.trust"]).success();
    assert!(
        show.contains("self-signed to threshold: NO (1 of 2 required)"),
        "{show}"
    );
    let out = p
        .run(["keys", "trust", "sign", "v1.trust", "--key", "r2.key"])
        .success();
    assert!(out.contains("2 of 2 required (complete)"), "{out}");
    let v1 = read_root(&dir.path().join("v1.trust"));

    // Rotate r1 out and r4 in, keeping the publishers; r1 and r4 sign, r3 co-signs later.
    let out = p
        .run([
            "keys",
            "trust",
            "rotate",
            "--current",
            "v1.trust",
            "--root",
            "r2.key",
            "r3.key",
            "r4.key",
            "--sign",
            "r1.key",
            "r4.key",
            "--partial",
            "--out",
            "v2.trust",
        ])
        .success();
    assert!(out.contains("wrote trust root version 2"), "{out}");
    let err = p
        .run(["keys", "trust", "sign", "v2.trust", "--key", "r1.key"])
        .failure();
    assert!(
        err.contains("is not a root key of this trust root"),
        "{err}"
    );
    let out = p
        .run([
            "keys",
            "trust",
            "sign",
            "v2.trust",
            "--key",
            "r3.key",
            "--current",
            "v1.trust",
        ])
        .success();
    assert!(out.contains("(complete)"), "{out}");
    let (v2, body) = pollen_keys::files::read_signed::<TrustRootBody>(
        &dir.path().join("v2.trust"),
        "trust root",
    )
    .unwrap();
    let next = v1.verify_successor(v2, now()).unwrap();
    assert_eq!(next.body.version, 2);
    assert_eq!(body.publishers, v1.body.publishers);
    let show = p
        .run(["keys", "trust", "show", "v2.trust", "--current", "v1.trust"])
        .success();
    assert!(
        show.contains("valid rotation of version 1: yes (2 of 2 required)"),
        "{show}"
    );

    // One of the two signatures version 2 needs is not enough; a key it does not know is refused.
    let err = p
        .run([
            "keys",
            "trust",
            "rotate",
            "--current",
            "v2.trust",
            "--root",
            "r4.key",
            "--root-threshold",
            "1",
            "--sign",
            "r4.key",
            "--out",
            "v3.trust",
        ])
        .failure();
    assert!(
        err.contains("signed by 1 of the 2 root keys of version 2"),
        "{err}"
    );
    let err = p
        .run([
            "keys",
            "trust",
            "rotate",
            "--current",
            "v2.trust",
            "--sign",
            "r1.key",
            "--out",
            "v3.trust",
        ])
        .failure();
    assert!(err.contains("is a root key of neither"), "{err}");
    assert!(!dir.path().join("v3.trust").exists());
}

#[test]
fn usage_errors_exit_with_2_and_help_works() {
    let dir = tempfile::tempdir().unwrap();
    let p = Pollen::in_dir(dir.path());
    let help = p.run(["--help"]).success();
    assert!(help.contains("keys"), "{help}");
    let run = p.run(["keys", "manifest", "create", "--channel", "x"]);
    assert_eq!(run.code, Some(2), "{run}");
}
