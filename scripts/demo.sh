#!/usr/bin/env bash
# A second tour besides `pollen demo`: a real local mesh on loopback.
# Generates an operator key and a trust root, starts four `pollen run` nodes in two sites
# (mDNS off, bootstrap on loopback), publishes a generated 24 MiB model file through one
# node, shows the spread live until every node holds it, prints one node's status, and
# stops the nodes. Then runs a small pollen-sim scenario (40 simulated nodes).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q -p pollen-node --bin pollen -p pollen-sim
pollen=$PWD/target/debug/pollen
sim=$PWD/target/debug/pollen-sim
dir=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT INT TERM

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "operator: keys and a trust root (publisher may sign demo.*)"
$pollen keys generate "$dir/root.key" >/dev/null
$pollen keys generate "$dir/publisher.key" >/dev/null
$pollen keys trust create --root "$dir/root.key" --publisher "$dir/publisher.key=demo.*" \
  --sign "$dir/root.key" --out "$dir/trust.pollen"

start() { # name site [bootstrap]
  local name=$1 site=$2 boot=${3:-}
  local args=(run --data-dir "$dir/$name" --listen /ip4/127.0.0.1/tcp/0 --http 127.0.0.1:0
    --no-mdns --site "$site" --trust "$dir/trust.pollen")
  [ -n "$boot" ] && args+=(--bootstrap "$boot")
  RUST_LOG=warn $pollen "${args[@]}" >"$dir/$name.out" 2>"$dir/$name.log" &
  pids+=($!)
  for _ in $(seq 100); do [ -s "$dir/$name/http.addr" ] && grep -q listening "$dir/$name.out" && break; sleep 0.1; done
}
addr() { grep -m1 listening "$dir/$1.out" | awk '{print $3}'; }
http() { echo "http://$(cat "$dir/$1/http.addr")"; }

say "four nodes: two in site 'north', two in site 'south'"
start n1 north
start n2 north "$(addr n1)"
start s1 south "$(addr n1)"
start s2 south "$(addr s1)"
for n in n1 n2 s1 s2; do echo "$n: $(http $n)  $(addr $n)"; done

say "publish a 24 MiB model through n1"
head -c $((24 * 1024 * 1024)) /dev/urandom >"$dir/model.onnx"
$pollen publish "$dir/model.onnx" --channel demo.model --version 1 --key "$dir/publisher.key" --node "$(http n1)"

say "spread (chunks held per node)"
for _ in $(seq 300); do
  line=""
  done_all=1
  for n in n1 n2 s1 s2; do
    st=$($pollen status --node "$(http $n)" --json 2>/dev/null || echo '{}')
    have=$(printf '%s' "$st" | python3 -c 'import json,sys
try:
    s=json.load(sys.stdin); f=s["channels"][0]["releases"][-1]["files"][0]; print(str(f["have"]) + "/" + str(f["total"]))
except Exception: print("0/?")')
    line="$line  $n $have"
    case $have in */?|0/*) done_all=0;; esac
    [ "${have%/*}" = "${have#*/}" ] || done_all=0
  done
  printf '\r%s' "$line"
  [ $done_all = 1 ] && break
  sleep 0.2
done
echo

say "status of s2 (what it knows of the mesh)"
$pollen status --node "$(http s2)"

say "pollen-sim: 40 simulated nodes on two sites, v1 everywhere, then a staged v2 that fails on weak devices (virtual time, seed 3)"
$sim run scenarios/ci-small.toml --quiet --out "${TMPDIR:-/tmp}/pollen-demo-sim"
