#!/usr/bin/env python3
"""Trace a golden mismatch to the first ONNX node where tract and onnxruntime part.

    trace_mismatch.py --pollen BIN MODEL_DIR [MODEL_DIR ...] [--atol A --rtol R]
                      [--min-fraction F] [--out report.json]

MODEL_DIR holds `model.onnx` and `test_data_set_0/` (the corpus layout). For each model:

1. The final outputs under onnxruntime with all graph optimisations (how the corpus's
   golden data is made) and with none (each node computed on its own, as the ONNX
   operator definitions say), and how far apart the two are.
2. Whether the node's activation path (`pollen check-cases`: the node's own model
   preparation, tract, golden checks) matches each of them.
3. A bisection over the graph's node outputs, in the file's (topological) order: each
   probe is the same model with one intermediate tensor as its only output, checked by
   `pollen check-cases` against unoptimised onnxruntime's value of that tensor. The
   first probe that fails names the node, its operator and the difference.

A bisection finds *a* node whose output differs while its inputs agree (the probes
before it pass), which is the operator to report upstream. Nothing here changes the
corpus; probes are written to a temporary directory.
"""

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper, shape_inference


def load_inputs(d):
    feeds = {}
    for f in sorted(glob.glob(os.path.join(d, "test_data_set_0", "input_*.pb"))):
        t = onnx.TensorProto()
        with open(f, "rb") as fh:
            t.ParseFromString(fh.read())
        feeds[t.name] = numpy_helper.to_array(t)
    return feeds


def ort_run(model_bytes, feeds, optimise, outputs=None):
    so = ort.SessionOptions()
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimise
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    s = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
    names = outputs or [o.name for o in s.get_outputs()]
    return dict(zip(names, s.run(names, feeds)))


def write_case(root, name, model, feeds, expected, atol, rtol):
    d = os.path.join(root, name)
    ds = os.path.join(d, "test_data_set_0")
    os.makedirs(ds, exist_ok=True)
    onnx.save(model, os.path.join(d, "model.onnx"))
    for k, (n, v) in enumerate(feeds.items()):
        with open(os.path.join(ds, f"input_{k}.pb"), "wb") as fh:
            fh.write(numpy_helper.from_array(np.asarray(v), n).SerializeToString())
    for k, (n, v) in enumerate(expected.items()):
        with open(os.path.join(ds, f"output_{k}.pb"), "wb") as fh:
            fh.write(numpy_helper.from_array(np.asarray(v), n).SerializeToString())
    return {"name": name, "atol": atol, "rtol": rtol}


def check(pollen, root, cases):
    """Run `pollen check-cases` over `cases` (written under root); name -> outcome."""
    with open(os.path.join(root, "cases.json"), "w") as fh:
        json.dump({"cases": cases}, fh)
    out = os.path.join(root, "out.jsonl")
    subprocess.run([pollen, "check-cases", root, "--out", out], capture_output=True,
                   text=True, timeout=600)
    res = {}
    with open(out) as fh:
        for line in fh:
            line = line.strip()
            if line.startswith("{") and '"name"' in line:
                o = json.loads(line)
                res[o["name"]] = o
    return res


def spread(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return f"shapes {a.shape} vs {b.shape}"
    return f"max abs diff {np.max(np.abs(a - b)) if a.size else 0:.3g}"


def probe_model(model, tensor, elem_type):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.output[:]
    m.graph.output.append(onnx.helper.make_tensor_value_info(tensor, elem_type, None))
    return m


def trace(pollen, d, atol, rtol, min_fraction):
    name = os.path.basename(os.path.normpath(d))
    model = onnx.load(os.path.join(d, "model.onnx"))
    feeds = load_inputs(d)
    raw = model.SerializeToString()
    opt = ort_run(raw, feeds, True)
    plain = ort_run(raw, feeds, False)
    report = {"model": name, "nodes": len(model.graph.node), "outputs": {}}
    for k in opt:
        report["outputs"][k] = {
            "ort_optimised": np.asarray(opt[k]).ravel()[:4].tolist(),
            "ort_unoptimised": np.asarray(plain[k]).ravel()[:4].tolist(),
            "ort_optimised_vs_unoptimised": spread(opt[k], plain[k]),
        }
    print(f"== {name}: {len(model.graph.node)} nodes", flush=True)
    for k, v in report["outputs"].items():
        print(f"   output {k}: optimised {v['ort_optimised']} unoptimised "
              f"{v['ort_unoptimised']} ({v['ort_optimised_vs_unoptimised']})", flush=True)

    with tempfile.TemporaryDirectory() as root:
        cases = [write_case(root, "vs-optimised", model, feeds, opt, atol, rtol),
                 write_case(root, "vs-unoptimised", model, feeds, plain, atol, rtol)]
        res = check(pollen, root, cases)
        for c in ("vs-optimised", "vs-unoptimised"):
            o = res.get(c, {})
            report[c] = o.get("outcome"), o.get("class"), o.get("reason")
            print(f"   tract {c}: {o.get('outcome')} {o.get('class') or ''} "
                  f"{o.get('reason') or ''}", flush=True)
        if res.get("vs-unoptimised", {}).get("outcome") == "served":
            report["first_divergence"] = None
            return report

    # Intermediate tensors with a known element type, in node order.
    inferred = shape_inference.infer_shapes(model)
    types = {vi.name: vi.type.tensor_type.elem_type
             for vi in list(inferred.graph.value_info) + list(inferred.graph.output)
             if vi.type.HasField("tensor_type")}
    # Float tensors only: quantised (integer) ones differ by a unit of rounding between
    # any two runtimes, which would stop the bisection at the first QuantizeLinear.
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16}
    probes = []
    for i, node in enumerate(model.graph.node):
        for o in node.output:
            if o and types.get(o) in floats:
                probes.append((i, node, o))
    values = ort_run(_with_outputs(model, [(p[2], types[p[2]]) for p in probes]), feeds,
                     False, [p[2] for p in probes])

    def fails(j):
        i, node, t = probes[j]
        with tempfile.TemporaryDirectory() as root:
            case = write_case(root, "probe", probe_model(model, t, types[t]), feeds,
                              {t: values[t]}, atol, rtol)
            o = check(pollen, root, [case]).get("probe", {})
        # A probe diverges when more than `min_fraction` of its elements are out of
        # bounds: a few elements a unit of rounding apart are noise, not a wrong operator.
        served = o.get("outcome") == "served"
        m = re.search(r"(\d+) of (\d+) elements out of bounds", o.get("reason") or "")
        if m and int(m.group(1)) <= min_fraction * int(m.group(2)):
            served = True
        print(f"   probe {j}/{len(probes)} node {i} {node.op_type} '{t}': "
              f"{o.get('outcome')} {o.get('reason') or ''}"[:400], flush=True)
        return (not served), o

    lo, hi = 0, len(probes) - 1
    last, good = None, None
    bad, o = fails(hi)
    if not bad:
        report["first_divergence"] = "every intermediate agrees; the final outputs differ"
        return report
    last = (hi, o)
    while lo < hi:
        mid = (lo + hi) // 2
        bad, o = fails(mid)
        if bad:
            hi, last = mid, (mid, o)
        else:
            lo, good = mid + 1, mid
    j, o = last if last[0] == hi else (hi, fails(hi)[1])
    i, node, t = probes[j]
    report["first_divergence"] = {
        "node_index": i, "op_type": node.op_type, "node_name": node.name, "tensor": t,
        "inputs": list(node.input),
        "attributes": {a.name: str(onnx.helper.get_attribute_value(a))[:80]
                       for a in node.attribute},
        "outcome": o.get("outcome"), "class": o.get("class"), "reason": o.get("reason"),
    }
    print(f"   first divergence: node {i} {node.op_type} '{node.name}' -> '{t}': "
          f"{o.get('reason')}", flush=True)
    if good is not None and good == j - 1:
        gi, gnode, gt = probes[good]
        report["last_agreeing"] = {"node_index": gi, "op_type": gnode.op_type, "tensor": gt}
        between = [n.op_type for n in model.graph.node[gi + 1:i + 1]]
        print(f"   last agreeing: node {gi} {gnode.op_type} -> '{gt}'; tract parts in the "
              f"nodes after it: {', '.join(between)}", flush=True)
    return report


def _with_outputs(model, outs):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for t, ty in outs:
        if t not in have:
            m.graph.output.append(onnx.helper.make_tensor_value_info(t, ty, None))
    return m.SerializeToString()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pollen", required=True)
    ap.add_argument("--atol", type=float, default=1e-4)
    ap.add_argument("--rtol", type=float, default=1e-3)
    ap.add_argument("--min-fraction", type=float, default=0.01,
                    help="a probe with at most this fraction of elements out of bounds agrees")
    ap.add_argument("--out", help="write the reports as JSON here")
    ap.add_argument("dirs", nargs="+")
    a = ap.parse_args()
    reports = [trace(a.pollen, d, a.atol, a.rtol, a.min_fraction) for d in a.dirs]
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(reports, fh, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
