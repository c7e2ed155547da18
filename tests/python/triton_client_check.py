"""Drive a pollen node with Triton's own HTTP client (tritonclient[http]), unchanged.

Usage: python3 triton_client_check.py HOST:PORT MODEL GOLDEN_JSON

Checks server and model readiness and metadata, then runs every golden input in JSON
mode and in the binary tensor data mode (Triton's default), and compares the predicted
classes and probabilities with the golden file. Exits non-zero with a message on any
mismatch.
"""

import json
import sys

import numpy as np
import tritonclient.http as httpclient


def main() -> int:
    url, model, golden_path = sys.argv[1], sys.argv[2], sys.argv[3]
    with open(golden_path) as f:
        golden = json.load(f)
    client = httpclient.InferenceServerClient(url=url)
    assert client.is_server_live(), "server not live"
    assert client.is_server_ready(), "server not ready"
    assert client.is_model_ready(model), "model not ready"
    meta = client.get_model_metadata(model)
    assert meta["platform"] == "onnx_onnxv1", meta
    inp = meta["inputs"][0]
    out = meta["outputs"][0]
    assert inp["datatype"] == "FP32", meta
    for binary in (False, True):
        for row, want, cls in zip(golden["inputs"], golden["expected"], golden["expected_class"]):
            x = np.asarray([row], dtype=np.float32)
            i = httpclient.InferInput(inp["name"], list(x.shape), "FP32")
            i.set_data_from_numpy(x, binary_data=binary)
            o = httpclient.InferRequestedOutput(out["name"], binary_data=binary)
            result = client.infer(model, inputs=[i], outputs=[o])
            y = result.as_numpy(out["name"])
            assert y is not None and y.shape == (1, 10), (binary, y)
            got = int(np.argmax(y[0]))
            assert got == cls, f"binary={binary}: class {got}, expected {cls}"
            err = float(np.max(np.abs(y[0] - np.asarray(want, dtype=np.float32))))
            assert err <= golden["tolerance"], f"binary={binary}: max error {err}"
        print(f"{'binary' if binary else 'json'} mode: {len(golden['inputs'])} golden inputs ok")
    # A request with an error comes back as an exception carrying the server's message.
    bad = httpclient.InferInput("nope", [1, 64], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 64), dtype=np.float32), binary_data=True)
    try:
        client.infer(model, inputs=[bad])
    except Exception as e:  # tritonclient raises InferenceServerException
        assert "nope" in str(e), e
        print("error mode: ok:", str(e)[:80])
    else:
        raise AssertionError("a request with an unknown input succeeded")
    return 0


if __name__ == "__main__":
    sys.exit(main())
