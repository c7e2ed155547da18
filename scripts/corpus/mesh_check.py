#!/usr/bin/env python3
"""Every model of the real-model corpus through a real 3-node Pollen mesh.

    mesh_check.py --pollen target/debug/pollen --corpus /tmp/corpus-out \
        [--out report.md] [--json report.json] [--only a,b] [--runs 10]

For each model that build_corpus.py wrote (model.onnx + test_data_set_N/), this:

1. publishes it through the first of three `pollen run` nodes on loopback with
   `pollen publish --golden <model>/test_data_set_0` (plus the declared facts in HINTS),
   signed by a publisher key of a fresh trust root;
2. waits until every node serves it (`/v2/models/<channel>/ready` answers 200) or
   refused it (503 with the reason, or the failure in `/v1/status`);
3. sends every data set's inputs through KServe v2 (Triton's own HTTP client, binary
   tensors) to every node and compares the answers with the expected outputs that
   onnxruntime computed (max abs difference over nodes and data sets);
4. times the same input through Pollen (HTTP, one request at a time) and through
   onnxruntime called directly (1 intra-op thread), median of --runs each.

It exits 1 if a model that activated answers beyond its tolerance on any node: served
but wrong is the one outcome that must never happen. Refusals are reported with their
reason, not failures of this script.
"""

import argparse
import json
import re
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

TOKEN = "0" * 64

# Facts the publisher declares for models that need them (pollen publish flags).
HINTS = {
    "silero-vad": ["--const", "sr=16000"],
    "silero-vad-16k-op15": ["--const", "sr=16000"],
    "silero-vad-op18-ifless": ["--const", "sr=16000"],
}

# Tolerances, the same for the golden checks at publish and for the comparison here:
# |got - want| <= atol + rtol * |want| for floats, exact for integers and booleans.
# onnxruntime's own optimised and unoptimised graphs differ by up to 1.6e-5 on the float
# models (corpus.json, ort.max_abs_diff_optimised_vs_unoptimised), so a second runtime
# gets a few times that; quantised models round differently from one runtime to the
# next (onnxruntime against itself: 1/255 on the QDQ model), so they get 1e-2.
ATOL, RTOL = 1e-4, 1e-3
QUANTISED = {"smart-turn-v3.2-int8", "ocr-cls-int8-static", "magika-int8-dynamic"}


def tolerance(name):
    return (1e-2, 1e-2) if name in QUANTISED else (ATOL, RTOL)


def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def http(method, url, body=None, timeout=30):
    req = urllib.request.Request(url, data=body, method=method)
    req.add_header("Authorization", f"Bearer {TOKEN}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")
    except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
        return 0, str(e)


class Node:
    def __init__(self, pollen, root, name, trust, bootstrap=None):
        self.dir = root / name
        self.dir.mkdir(parents=True)
        (self.dir / "api-token").write_text(TOKEN)
        os.chmod(self.dir / "api-token", 0o600)
        args = [pollen, "run", "--data-dir", str(self.dir), "--listen",
                "/ip4/127.0.0.1/tcp/0", "--http", "127.0.0.1:0", "--no-mdns",
                "--trust", str(trust)]
        if bootstrap:
            args += ["--bootstrap", bootstrap]
        self.log = open(self.dir / "node.log", "w")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=self.log,
                                     env={**os.environ, "RUST_LOG": "info"})
        deadline = time.time() + 30
        addr = self.dir / "http.addr"
        while not (addr.exists() and addr.read_text().strip()):
            if self.proc.poll() is not None or time.time() > deadline:
                raise SystemExit(f"{name} did not start; see {self.dir}/node.log")
            time.sleep(0.05)
        self.url = "http://" + addr.read_text().strip()
        while not self.status().get("listen"):
            time.sleep(0.05)

    def status(self):
        code, body = http("GET", self.url + "/v1/status")
        return json.loads(body) if code == 200 else {}

    def rss_kib(self):
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def tensors(dirpath, prefix):
    out = []
    k = 0
    while (dirpath / f"{prefix}_{k}.pb").exists():
        # A ZipMap output's plain probability tensor sits beside it.
        plain = dirpath / f"zipmap_{prefix}_{k}_as_tensor.pb"
        path = plain if plain.exists() else dirpath / f"{prefix}_{k}.pb"
        t = onnx.TensorProto()
        t.ParseFromString(path.read_bytes())
        out.append((t.name, numpy_helper.to_array(t)))
        k += 1
    return out


TRITON_TYPES = {
    np.dtype("float32"): "FP32", np.dtype("float64"): "FP64", np.dtype("float16"): "FP16",
    np.dtype("int64"): "INT64", np.dtype("int32"): "INT32", np.dtype("int16"): "INT16",
    np.dtype("int8"): "INT8", np.dtype("uint8"): "UINT8", np.dtype("uint16"): "UINT16",
    np.dtype("uint32"): "UINT32", np.dtype("uint64"): "UINT64", np.dtype("bool"): "BOOL",
}


def infer(client, channel, inputs, skip):
    import tritonclient.http as th
    reqs = []
    for name, arr in inputs:
        if name in skip:
            continue
        i = th.InferInput(name, list(arr.shape), TRITON_TYPES[arr.dtype])
        i.set_data_from_numpy(arr, binary_data=True)
        reqs.append(i)
    r = client.infer(channel, reqs)
    return {o["name"]: r.as_numpy(o["name"]) for o in r.get_response()["outputs"]}


def max_diff(want, got, atol=ATOL, rtol=RTOL):
    if got is None:
        return float("inf"), False
    got = np.asarray(got)
    if got.shape != want.shape:
        return float("inf"), False
    if want.dtype.kind in "fc":
        w = want.astype(np.float64)
        g = got.astype(np.float64)
        both_nan = np.isnan(w) & np.isnan(g)
        d = np.where(both_nan, 0.0, np.abs(w - g))
        bound = atol + rtol * np.abs(w)
        return float(d.max(initial=0.0)), bool((d <= bound).all())
    same = np.array_equal(want, got.astype(want.dtype))
    return (0.0 if same else float("inf")), same


def wait_outcome(nodes, channel, timeout):
    """Per node: ("READY", seconds) or ("REFUSED", reason) or ("TIMEOUT", last)."""
    start = time.time()
    out = [None] * len(nodes)
    while time.time() - start < timeout and any(o is None for o in out):
        for i, n in enumerate(nodes):
            if out[i] is not None:
                continue
            code, body = http("GET", f"{n.url}/v2/models/{channel}/ready")
            if code == 200:
                out[i] = ("READY", time.time() - start)
                continue
            # A refusal: 503 with the reason (a node that failed to activate), or, from
            # the status, a failed report of this release (every node's own report
            # reaches every node's sample).
            failures = [f for c in n.status().get("channels", []) if c.get("channel") == channel
                        for r in c.get("releases", []) for f in r.get("failures", [])]
            if code == 503 and "error" in body and "loading" not in body.lower():
                out[i] = ("REFUSED", json.loads(body).get("error", body))
            elif failures and time.time() - start > 5:
                out[i] = ("REFUSED", f"{failures[0]['class']}: {failures[0]['detail']}")
        time.sleep(0.2)
    return [o or ("TIMEOUT", "no answer within %d s" % timeout) for o in out]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pollen", required=True)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--out")
    ap.add_argument("--json")
    ap.add_argument("--only")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--timeout", type=int, default=300)
    ap.add_argument("--min-served", type=int, default=0,
                    help="fail when fewer models serve and match (a regression)")
    ap.add_argument("--no-golden", action="store_true",
                    help="publish without golden checks (to compare)")
    a = ap.parse_args()
    import onnxruntime as ort
    import tritonclient.http as th

    corpus = Path(a.corpus)
    meta = {m["name"]: m for m in json.loads((corpus / "corpus.json").read_text())["models"]}
    names = sorted(meta)
    if a.only:
        names = [n for n in names if n in a.only.split(",")]
    pollen = str(Path(a.pollen).resolve())
    root = Path(tempfile.mkdtemp(prefix="pollen-mesh-check-"))
    keys = root / "keys"
    keys.mkdir()
    for k in ("root", "publisher"):
        r = run([pollen, "keys", "generate", str(keys / f"{k}.key")])
        if r.returncode:
            raise SystemExit(r.stderr)
    trust = keys / "trust.pollen"
    r = run([pollen, "keys", "trust", "create", "--root", str(keys / "root.key"),
             "--publisher", f"{keys / 'publisher.key'}=*", "--sign", str(keys / "root.key"),
             "--out", str(trust)])
    if r.returncode:
        raise SystemExit(r.stderr)
    nodes = [Node(pollen, root, "n0", trust)]
    boot = nodes[0].status()["listen"][0]
    nodes += [Node(pollen, root, f"n{i}", trust, boot) for i in (1, 2)]
    rows = []
    wrong = []
    try:
        for name in names:
            m = meta[name]
            d = corpus / name
            sets = sorted(p for p in d.iterdir() if p.name.startswith("test_data_set_"))
            channel = "corpus." + name
            consts = {f.split("=")[0] for f in HINTS.get(name, []) if "=" in f}
            row = {"model": name, "kind": m.get("kind"), "source": m.get("source"),
                   "size_bytes": m.get("size_bytes")}
            rss0 = nodes[0].rss_kib()
            t0 = time.time()
            r = run([pollen, "publish", str(d / "model.onnx"), "--channel", channel,
                     "--version", "1", "--key", str(keys / "publisher.key"),
                     "--node", nodes[0].url, "--token-file", str(nodes[0].dir / "api-token"),
                     ] + ([] if a.no_golden else
                          ["--golden", str(sets[0]), "--golden-atol", str(tolerance(name)[0]),
                           "--golden-rtol", str(tolerance(name)[1])])
                    + HINTS.get(name, []))
            if r.returncode:
                row.update(outcome="REFUSED", reason="publish: " + r.stderr.strip()[-400:])
                rows.append(row)
                print(f"{name}: refused at publish: {row['reason']}", flush=True)
                continue
            outcomes = wait_outcome(nodes, channel, a.timeout)
            row["nodes"] = [o[0] for o in outcomes]
            if all(o[0] == "READY" for o in outcomes):
                row["outcome"] = "SERVED"
                row["ready_s"] = round(outcomes[0][1], 2)
                row["rss_growth_mib"] = round((nodes[0].rss_kib() - rss0) / 1024, 1)
            else:
                row["outcome"] = "REFUSED"
                row["reason"] = next(o[1] for o in outcomes if o[0] != "READY")
                rows.append(row)
                print(f"{name}: refused: {row['reason'][:300]}", flush=True)
                continue
            worst, ok = 0.0, True
            for n in nodes:
                client = th.InferenceServerClient(n.url.removeprefix("http://"),
                                                  network_timeout=120.0)
                for s in sets:
                    inputs = tensors(s, "input")
                    got = infer(client, channel, inputs, consts)
                    for oname, want in tensors(s, "output"):
                        diff, fine = max_diff(want, got.get(oname), *tolerance(name))
                        worst = max(worst, diff)
                        ok &= fine
            row["max_abs_diff"] = worst
            row["within_tolerance"] = ok
            if not ok:
                wrong.append(name)
            # Latency on the first data set, node 0 over HTTP against onnxruntime direct.
            inputs = tensors(sets[0], "input")
            client = th.InferenceServerClient(nodes[0].url.removeprefix("http://"),
                                              network_timeout=120.0)
            so = ort.SessionOptions()
            so.intra_op_num_threads = 1
            so.inter_op_num_threads = 1
            sess = ort.InferenceSession(str(d / "model.onnx"), so,
                                        providers=["CPUExecutionProvider"])
            feed = dict(inputs)
            pt, ot = [], []
            for _ in range(a.runs):
                t = time.perf_counter()
                infer(client, channel, inputs, consts)
                pt.append(time.perf_counter() - t)
                t = time.perf_counter()
                sess.run(None, feed)
                ot.append(time.perf_counter() - t)
            row["pollen_ms"] = round(statistics.median(pt) * 1e3, 3)
            row["ort_ms"] = round(statistics.median(ot) * 1e3, 3)
            row["ratio"] = round(row["pollen_ms"] / max(row["ort_ms"], 1e-6), 2)
            row["publish_to_ready_s"] = round(time.time() - t0, 2)
            rows.append(row)
            print(f"{name}: served, max diff {worst:.3g}, {row['pollen_ms']} ms vs "
                  f"onnxruntime {row['ort_ms']} ms", flush=True)
    finally:
        for n in nodes:
            n.stop()
    served = [r for r in rows if r["outcome"] == "SERVED" and r.get("within_tolerance")]
    lines = [
        "| model | kind | source | outcome | max abs diff | Pollen ms | onnxruntime ms | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    def source(src):
        if not isinstance(src, dict):
            return str(src)
        if "package" in src:
            return src["package"]
        base = src.get("from", {}).get("package")
        return "made here" + (f" from {base}" if base else " (skl2onnx)")

    for r in rows:
        src = source(r["source"])
        if r["outcome"] != "SERVED":
            # The class and detail, without the state's preamble.
            r["reason"] = re.sub(r"^model '.*?' has no version ready on this node; version \d+ "
                                 r"is UNAVAILABLE: failed to activate on this node ", "",
                                 r["reason"])
        if r["outcome"] == "SERVED":
            lines.append(f"| {r['model']} | {r['kind']} | {src} | served | "
                         f"{r['max_abs_diff']:.2g} | {r['pollen_ms']} | {r['ort_ms']} | "
                         f"{r['ratio']} |")
        else:
            reason = r["reason"].replace("|", "/").replace("\n", " ")[:160]
            lines.append(f"| {r['model']} | {r['kind']} | {src} | refused: {reason} | | | | |")
    summary = (f"{len(served)} of {len(rows)} served and matched onnxruntime; "
               f"{len(wrong)} served beyond the tolerance")
    report = "\n".join(lines) + "\n\n" + summary + "\n"
    print(report)
    if a.out:
        Path(a.out).write_text(report)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1, default=str))
    shutil.rmtree(root, ignore_errors=True)
    if wrong:
        print("served wrong: " + ", ".join(wrong), file=sys.stderr)
        sys.exit(1)
    if len(served) < a.min_served:
        print(f"only {len(served)} served, {a.min_served} expected", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
