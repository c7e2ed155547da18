//! End-to-end golden checks in the ONNX test-data layout: `pollen publish --golden DIR`
//! with `test_data_set_0/{input_K.pb, output_K.pb}` larger than a control frame, spread
//! by a 2-node mesh as the release's golden file, checked at activation on every node.

use pollen_tests::mesh::{Operator, test_bytes};
use pollen_tests::onnxgen::{self, FLOAT, INT64, Io, Node as OnnxNode};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// `y = Identity(x)` with `x` FP32 `[1, 3, 256, 400]` (1.2 MB) and `m = Identity(n)`
/// with `n` INT64 `[4]`.
fn model() -> Vec<u8> {
    let x_dims = [1, 3, 256, 400];
    onnxgen::model(
        &[
            OnnxNode {
                op: "Identity",
                inputs: &["x"],
                outputs: &["y"],
            },
            OnnxNode {
                op: "Identity",
                inputs: &["n"],
                outputs: &["m"],
            },
        ],
        &[],
        &[
            Io {
                name: "x",
                elem: FLOAT,
                dims: &x_dims,
            },
            Io {
                name: "n",
                elem: INT64,
                dims: &[4],
            },
        ],
        &[
            Io {
                name: "y",
                elem: FLOAT,
                dims: &x_dims,
            },
            Io {
                name: "m",
                elem: INT64,
                dims: &[4],
            },
        ],
    )
}

const ELEMENTS: usize = 3 * 256 * 400;

/// The element of `y` the bad release gets wrong.
const WRONG: usize = 123_457;

/// `dir/test_data_set_0/`: `x` in [0, 1) and `n` as inputs (`n` and `m` unnamed, so
/// they are matched by position); expected `y` is `x` shifted by `y_shift` (element
/// [`WRONG`] by `wrong` more), `m` is `n`.
fn golden_dir(dir: &Path, y_shift: f32, wrong: f32) -> PathBuf {
    let set = dir.join("test_data_set_0");
    std::fs::create_dir_all(&set).unwrap();
    let x: Vec<f32> = test_bytes(ELEMENTS * 4, 7)
        .chunks(4)
        .map(|c| f32::from(u16::from_le_bytes([c[0], c[1]])) / 65536.0)
        .collect();
    let y: Vec<u8> = x
        .iter()
        .enumerate()
        .flat_map(|(k, v)| (v + y_shift + if k == WRONG { wrong } else { 0.0 }).to_le_bytes())
        .collect();
    let x: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
    let n: Vec<u8> = [3i64, -1, 1 << 40, 0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let dims = [1, 3, 256, 400];
    for (file, pb) in [
        (
            "input_0.pb",
            onnxgen::tensor_proto(Some("x"), FLOAT, &dims, &x),
        ),
        ("input_1.pb", onnxgen::tensor_proto(None, INT64, &[4], &n)),
        (
            "output_0.pb",
            onnxgen::tensor_proto(Some("y"), FLOAT, &dims, &y),
        ),
        ("output_1.pb", onnxgen::tensor_proto(None, INT64, &[4], &n)),
    ] {
        std::fs::write(set.join(file), pb).unwrap();
    }
    dir.to_path_buf()
}

#[test]
fn large_golden_data_travels_as_a_file_and_guards_activation_on_every_node() {
    let tmp = tempfile::tempdir().unwrap();
    let op = Operator::new(&tmp.path().join("op"), false);
    let (a, b) = op.connected_pair(tmp.path());

    let file = tmp.path().join("model.onnx");
    std::fs::write(&file, model()).unwrap();
    // v1: expected outputs within the default tolerances (atol 1e-4 + rtol 1e-3 * |want|).
    let good = golden_dir(&tmp.path().join("good"), 5e-5, 0.0);
    let bytes: u64 = std::fs::read_dir(good.join("test_data_set_0"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(
        bytes > 1 << 20,
        "golden data of {bytes} bytes exceeds a control frame"
    );
    let golden = good.display().to_string();
    op.publish(tmp.path(), &a, &file, "big", 1, &["--golden", &golden]);
    for n in [&a, &b] {
        let s = n.wait(Duration::from_secs(60), "serving v1", |s| {
            s.channels
                .iter()
                .any(|c| c.channel == "big" && c.active_version == Some(1))
        });
        let release = &s.channels[0].releases[0];
        assert_eq!(
            release.files.len(),
            2,
            "the model and its golden file: {:?}",
            release.files
        );
        assert!(
            n.log().contains("big version 1 passed its checks"),
            "{}",
            n.log()
        );
        let (code, body) = n.http("GET", "/v2/models/big/versions/1/ready", b"");
        assert_eq!(code, 200, "{body}");
    }

    // v2: the same model with one element of `y` expected 0.5 off: refused everywhere.
    let bad = golden_dir(&tmp.path().join("bad"), 5e-5, 0.5);
    let golden = bad.display().to_string();
    op.publish(tmp.path(), &a, &file, "big", 2, &["--golden", &golden]);
    for n in [&a, &b] {
        let s = n.wait(Duration::from_secs(60), "v2 refused", |s| {
            s.errors
                .iter()
                .any(|e| e.contains("big version 2 failed to activate"))
        });
        let e = s
            .errors
            .iter()
            .find(|e| e.contains("big version 2 failed to activate"))
            .unwrap();
        assert!(
            e.contains("(GoldenMismatch)")
                && e.contains("output 'y'")
                && e.contains(&format!("element {WRONG} (at [0, 1, 52, 257])"))
                && e.contains("bound"),
            "{e}"
        );
        let (code, body) = n.http("GET", "/v2/models/big/versions/1/ready", b"");
        assert_eq!(code, 200, "v1 still serves: {body}");
        assert_eq!(
            s.channels[0].active_version,
            Some(1),
            "v2 never serves on {}",
            n.url()
        );
    }
}
