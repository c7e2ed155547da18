"""Ask a pollen node about its models' states with Triton's own HTTP client, unchanged.

Usage: python3 model_states_check.py HOST:PORT

Prints one JSON object with what tritonclient made of the node's answers: model
readiness (is_model_ready, with and without a version), the repository index
(get_model_repository_index), model metadata, and the status and message of the
exception an inference on a version that is not served raises. The Rust test that runs
it checks the values.
"""

import json
import sys

import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException


def infer_error(client, model, version, name, shape):
    x = np.zeros(shape, dtype=np.float32)
    i = httpclient.InferInput(name, list(x.shape), "FP32")
    i.set_data_from_numpy(x, binary_data=True)
    try:
        client.infer(model, inputs=[i], model_version=version)
    except InferenceServerException as e:
        return {"status": e.status(), "message": e.message()}
    return None


def main() -> int:
    client = httpclient.InferenceServerClient(url=sys.argv[1])
    out = {
        "ready": {
            "digits": client.is_model_ready("digits"),
            "digits/1": client.is_model_ready("digits", "1"),
            "digits/2": client.is_model_ready("digits", "2"),
            "broken": client.is_model_ready("broken"),
        },
        "index": client.get_model_repository_index(),
        "metadata": client.get_model_metadata("digits"),
        "infer_digits_2": infer_error(client, "digits", "2", "input", (1, 64)),
        "infer_broken": infer_error(client, "broken", "", "x", (1, 4)),
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
