#!/usr/bin/env bash
# The main job until `pollen demo` exists: an operator's whole key flow with the real
# `pollen` binary (keys, trust root, node certificate, a signed staged manifest for a
# generated model file), then the protocol core distributing an artifact across a
# 50-node mesh on the deterministic harness (`pollen-sim harness`).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q -p pollen-node --bin pollen -p pollen-sim
pollen=target/debug/pollen
sim=target/debug/pollen-sim
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "operator keys"
$pollen keys generate "$dir/root.key"
$pollen keys generate "$dir/publisher.key"
$pollen keys generate "$dir/fleet.key"
$pollen keys generate "$dir/node.key"

say "trust root: one root key, one publisher for vision.*, a fleet key"
$pollen keys trust create --root "$dir/root.key" --publisher "$dir/publisher.key=vision.*" \
  --fleet-key "$dir/fleet.key" --sign "$dir/root.key" --out "$dir/trust.pollen"
$pollen keys trust show "$dir/trust.pollen"

say "node certificate"
$pollen keys certify --fleet "$dir/fleet.key" --node "$dir/node.key" --label site-a \
  --trust "$dir/trust.pollen" --out "$dir/node.cert"

say "signed manifest for a 5 MiB model file, staged 5% / 25% / 100%"
head -c $((5 * 1024 * 1024 + 123)) /dev/urandom > "$dir/model.onnx"
$pollen keys manifest create "$dir/model.onnx" --channel vision.defects --version 1 \
  --key "$dir/publisher.key" --stages 5%,25%,100% --stage-interval 10m \
  --trust "$dir/trust.pollen" --out "$dir/v1.manifest"
$pollen keys manifest show "$dir/v1.manifest" --trust "$dir/trust.pollen"
if command -v b3sum >/dev/null; then b3sum "$dir/model.onnx"; fi

say "protocol core: 50 nodes fetch a 64-chunk artifact (virtual time, seed 1)"
$sim harness --nodes 50 --seed 1
