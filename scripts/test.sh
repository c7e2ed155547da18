#!/usr/bin/env bash
# The tests, on a fresh machine: installs what they need, builds the pollen binary the
# end-to-end tests run, then runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
# The NAT test builds network namespaces with a masquerading router (iproute2, iptables).
if ! command -v iptables >/dev/null || ! command -v ip >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq >/dev/null 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 iptables >/dev/null 2>&1 \
      || echo "warning: could not install iproute2/iptables; the namespace tests will say why they skip"
  fi
fi
# The serving test drives a node with Triton's own HTTP client.
if ! python3 -c "import tritonclient.http, numpy" 2>/dev/null; then
  python3 -m pip install -q --disable-pip-version-check 'tritonclient[http]'
fi
# The ONNX node-test cases (tests/tests/onnx_node_tests.rs) and the real-model corpus
# (scripts/corpus/) need the pinned onnx, onnxruntime and model packages. --no-deps: the
# file pins everything the scripts use; the model packages' own dependencies (torch,
# opencv, ...) are not needed to read their ONNX files.
if ! python3 -c "import onnx, onnxruntime, skl2onnx" 2>/dev/null; then
  python3 -m pip install -q --disable-pip-version-check --no-deps -r scripts/corpus/requirements.txt
fi
# The language-model tests (tests/tests/lm.rs) make a tiny model with the tokenizers
# package and drive the node with the stock `openai` client (scripts/slm/).
if ! python3 -c "import tokenizers, jinja2, openai" 2>/dev/null; then
  python3 -m pip install -q --disable-pip-version-check --no-deps -r scripts/slm/requirements.txt
fi
# One compile: building the tests also builds `pollen` (node/tests/ uses it) with the
# tests' feature set, which a separate `cargo build` of the binary would not share.
cargo test --workspace --all-features --no-run
POLLEN_BIN="${CARGO_TARGET_DIR:-$PWD/target}/debug/pollen" cargo test --workspace --all-features "$@"
