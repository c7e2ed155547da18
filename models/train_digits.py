#!/usr/bin/env python3
"""Train Pollen's bundled demo models and export them to ONNX.

Reproducible: `python3 models/train_digits.py` (from the repository root, or
from anywhere: outputs are written next to this script). Needs the packages in
models/requirements.txt (`pip install -r models/requirements.txt`;
onnxruntime is optional and only used for a cross-check).

Data: scikit-learn's bundled handwritten digits (`load_digits`: 1797 images of
8x8 pixels, 64 features with values 0..16, 10 classes). It ships inside the
scikit-learn package: nothing is downloaded.

Model: a one-hidden-layer MLP (scikit-learn `MLPClassifier`, ReLU, softmax
output) on the input scaled by 1/16. Two versions that differ only in the
hidden layer's width:

    v1: 32 hidden units    -> models/digits-v1.onnx, models/golden-v1.json
    v2: 64 hidden units    -> models/digits-v2.onnx, models/golden-v2.json

The ONNX graph is written by hand with `onnx.helper` (no skl2onnx, no ZipMap,
no sequence/map outputs), using only ops that tract handles well:

    input  float32 [N, 64]
      -> Div(16) -> MatMul(W1) -> Add(b1) -> Relu -> MatMul(W2) -> Add(b2)
      -> Softmax(axis=1)
    probabilities float32 [N, 10]

Opset 13, ir_version 8. The same package versions give byte-identical .onnx
and .json files on every run (fixed seeds, single-threaded BLAS, no
timestamps or paths in the outputs).
"""

import os

# Single-threaded BLAS before numpy is imported: multi-threaded reductions may
# sum in a different order from run to run and change the last bits.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import hashlib  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from sklearn.neural_network import MLPClassifier  # noqa: E402

OUT_DIR = Path(__file__).resolve().parent

SPLIT_SEED = 42  # fixed train/test split
TRAIN_SEED = 0  # fixed weight initialisation and batch shuffling
TEST_SIZE = 0.25
MAX_ITER = 300
N_GOLDEN = 5  # golden vectors: the first 5 test-set images
GOLDEN_TOLERANCE = 1e-4
SKLEARN_TOLERANCE = 1e-5
MAX_ONNX_BYTES = 100 * 1024

VERSIONS = {"v1": 32, "v2": 64}

OPSET = 13
IR_VERSION = 8
INPUT_NAME = "input"
OUTPUT_NAME = "probabilities"
N_FEATURES = 64
N_CLASSES = 10
PIXEL_MAX = 16.0


def load_split():
    digits = load_digits()
    x = digits.data.astype(np.float32)  # raw 0..16 values
    y = digits.target.astype(np.int64)
    assert x.shape[1] == N_FEATURES
    return train_test_split(
        x, y, test_size=TEST_SIZE, random_state=SPLIT_SEED, stratify=y
    )


def train(hidden, x_train, y_train):
    clf = MLPClassifier(
        hidden_layer_sizes=(hidden,),
        activation="relu",
        solver="adam",
        alpha=1e-4,
        batch_size=64,
        learning_rate_init=1e-3,
        max_iter=MAX_ITER,
        random_state=TRAIN_SEED,
    )
    with warnings.catch_warnings():
        # Adam may stop at max_iter before its tolerance is met; that is fine here.
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x_train / PIXEL_MAX, y_train)
    assert list(clf.classes_) == list(range(N_CLASSES))
    assert clf.out_activation_ == "softmax"
    return clf


def weights_of(clf):
    """The exported weights, exactly as they go into the ONNX file (float32)."""
    w1, w2 = (np.ascontiguousarray(w, dtype=np.float32) for w in clf.coefs_)
    b1, b2 = (np.ascontiguousarray(b, dtype=np.float32) for b in clf.intercepts_)
    return w1, b1, w2, b2


def numpy_forward(weights, x_raw):
    """Pure-numpy float32 forward pass, the same ops as the ONNX graph."""
    w1, b1, w2, b2 = weights
    x = np.asarray(x_raw, dtype=np.float32) / np.float32(PIXEL_MAX)
    h = np.maximum(x @ w1 + b1, np.float32(0))
    z = h @ w2 + b2
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def build_onnx(name, weights, hidden):
    w1, b1, w2, b2 = weights
    initializers = [
        numpy_helper.from_array(np.array(PIXEL_MAX, dtype=np.float32), "scale"),
        numpy_helper.from_array(w1, "W1"),
        numpy_helper.from_array(b1, "B1"),
        numpy_helper.from_array(w2, "W2"),
        numpy_helper.from_array(b2, "B2"),
    ]
    nodes = [
        helper.make_node("Div", [INPUT_NAME, "scale"], ["x_scaled"], name="scale_input"),
        helper.make_node("MatMul", ["x_scaled", "W1"], ["h_mm"], name="fc1_matmul"),
        helper.make_node("Add", ["h_mm", "B1"], ["h_pre"], name="fc1_bias"),
        helper.make_node("Relu", ["h_pre"], ["h"], name="fc1_relu"),
        helper.make_node("MatMul", ["h", "W2"], ["logits_mm"], name="fc2_matmul"),
        helper.make_node("Add", ["logits_mm", "B2"], ["logits"], name="fc2_bias"),
        helper.make_node("Softmax", ["logits"], [OUTPUT_NAME], axis=1, name="softmax"),
    ]
    graph = helper.make_graph(
        nodes,
        f"pollen_digits_{name}",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", N_FEATURES])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", N_CLASSES])],
        initializer=initializers,
        doc_string=(
            f"Handwritten digits (sklearn load_digits) MLP, 64-{hidden}-10. "
            "Input: raw 8x8 pixel values 0..16 as float32 [N, 64]. "
            "Output: class probabilities float32 [N, 10] for digits 0..9."
        ),
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="pollen-models-train_digits",
        producer_version=name,
    )
    model.ir_version = IR_VERSION
    model.model_version = int(name.lstrip("v"))
    onnx.checker.check_model(model, full_check=True)
    return model


def check_onnxruntime(path, x, expected):
    """Optional cross-check with onnxruntime; skipped if it is not installed."""
    try:
        import onnxruntime as ort
    except Exception as exc:  # ImportError, or a broken binary wheel
        print(f"  onnxruntime: not available ({exc.__class__.__name__}), skipped")
        return None
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    (got,) = sess.run([OUTPUT_NAME], {INPUT_NAME: x})
    diff = float(np.abs(got - expected).max())
    assert got.shape == expected.shape, got.shape
    assert diff <= SKLEARN_TOLERANCE, f"onnxruntime differs from numpy by {diff}"
    print(f"  onnxruntime {ort.__version__}: max |diff| vs numpy = {diff:.3g}")
    return diff


def write_json(path, obj):
    path.write_text(json.dumps(obj, indent=1) + "\n")


def main():
    x_train, x_test, y_train, y_test = load_split()
    print(
        f"digits: {len(x_train)} train / {len(x_test)} test images "
        f"(split seed {SPLIT_SEED}, stratified)"
    )

    accuracies = {}
    for name, hidden in VERSIONS.items():
        print(f"{name}: MLP 64-{hidden}-10")
        clf = train(hidden, x_train, y_train)
        weights = weights_of(clf)

        probs = numpy_forward(weights, x_test)
        sk_probs = clf.predict_proba(x_test / PIXEL_MAX)
        diff = float(np.abs(probs - sk_probs).max())
        assert diff <= SKLEARN_TOLERANCE, f"numpy forward differs from sklearn by {diff}"
        print(f"  numpy forward vs sklearn predict_proba: max |diff| = {diff:.3g}")

        accuracy = float((probs.argmax(axis=1) == y_test).mean())
        sk_accuracy = float(clf.score(x_test / PIXEL_MAX, y_test))
        assert accuracy == sk_accuracy, (accuracy, sk_accuracy)
        accuracies[name] = accuracy
        print(f"  test accuracy: {accuracy:.4f} ({clf.n_iter_} epochs)")

        onnx_path = OUT_DIR / f"digits-{name}.onnx"
        onnx.save(build_onnx(name, weights, hidden), str(onnx_path))
        size = onnx_path.stat().st_size
        assert size < MAX_ONNX_BYTES, f"{onnx_path.name} is {size} bytes"

        # Re-read the file and recompute from the weights actually stored in it.
        stored = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(onnx_path)).graph.initializer}
        stored_weights = (stored["W1"], stored["B1"], stored["W2"], stored["B2"])
        assert all(np.array_equal(a, b) for a, b in zip(stored_weights, weights))

        golden_x = x_test[:N_GOLDEN]
        expected = numpy_forward(stored_weights, golden_x)
        check_onnxruntime(onnx_path, x_test, numpy_forward(stored_weights, x_test))

        golden = {
            "input_name": INPUT_NAME,
            "output_name": OUTPUT_NAME,
            "inputs": [[float(v) for v in row] for row in golden_x],
            "labels": [int(v) for v in y_test[:N_GOLDEN]],
            "expected": [[float(v) for v in row] for row in expected],
            "expected_class": [int(v) for v in expected.argmax(axis=1)],
            "tolerance": GOLDEN_TOLERANCE,
            "test_accuracy": accuracy,
        }
        write_json(OUT_DIR / f"golden-{name}.json", golden)
        sha = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
        print(f"  wrote {onnx_path.name} ({size} bytes, sha256 {sha})")
        print(f"  golden labels {golden['labels']}, expected_class {golden['expected_class']}")

    assert accuracies["v2"] > accuracies["v1"], accuracies

    sample = {
        "inputs": [
            {
                "name": INPUT_NAME,
                "shape": [1, N_FEATURES],
                "datatype": "FP32",
                "data": [float(v) for v in x_test[0]],
            }
        ]
    }
    write_json(OUT_DIR / "sample-input.json", sample)
    print(f"sample-input.json: test image 0 (label {int(y_test[0])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
