#!/usr/bin/env python3
"""Write the ONNX backend node tests out as model.onnx + test_data_set_N/ directories.

    python3 scripts/corpus/export_node_tests.py OUTDIR [--op OP_TYPE] [--check-ort]

The `onnx` wheel no longer ships the generated onnx/backend/test/data/node files,
but it ships the definitions: onnx.backend.test.case.node.collect_testcases()
builds every operator test case (a one-node model, its inputs and the expected
outputs, and the case's rtol/atol) in memory. This script writes each case as

    OUTDIR/<case name>/model.onnx
    OUTDIR/<case name>/test_data_set_N/input_K.pb   (TensorProto, or SequenceProto /
    OUTDIR/<case name>/test_data_set_N/output_K.pb   OptionalProto / MapProto for the
                                                     few cases whose graph says so)

exactly as onnx's own `backend-test-tools generate-data` does, plus OUTDIR/cases.json
listing each case: name, operator types (including those inside subgraphs and
model-local functions), domains, opset, rtol/atol, number of data sets, the
declared input/output types, and whether every input and output is a plain tensor
of a fixed-size element type (what a tensor-only server can be handed at all).

With --check-ort every written case is read back from disk, run in onnxruntime
(CPU, one thread) and its answer compared with the written expected outputs within
the case's rtol/atol, as ONNX's
backend test runner does: a reference for what "refused" and "wrong" look like in
a mature runtime (cases.json gets an "ort" field per case and counts).
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np

import onnx
from onnx import TensorProto, numpy_helper

# Element types without a fixed size in bytes per element.
VARIABLE_SIZE = {TensorProto.STRING, TensorProto.UNDEFINED}


def type_name(tp: onnx.TypeProto) -> str:
    kind = tp.WhichOneof("value")
    if kind == "tensor_type":
        return f"tensor({TensorProto.DataType.Name(tp.tensor_type.elem_type).lower()})"
    if kind == "sequence_type":
        return f"seq({type_name(tp.sequence_type.elem_type)})"
    if kind == "map_type":
        key = TensorProto.DataType.Name(tp.map_type.key_type).lower()
        return f"map({key},{type_name(tp.map_type.value_type)})"
    if kind == "optional_type":
        return f"optional({type_name(tp.optional_type.elem_type)})"
    if kind == "sparse_tensor_type":
        return f"sparse_tensor({TensorProto.DataType.Name(tp.sparse_tensor_type.elem_type).lower()})"
    return kind or "unknown"


def shape_of(tp: onnx.TypeProto):
    if tp.WhichOneof("value") != "tensor_type" or not tp.tensor_type.HasField("shape"):
        return None
    out = []
    for d in tp.tensor_type.shape.dim:
        out.append(int(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?"))
    return out


def op_types(m: onnx.ModelProto) -> tuple[list[str], list[str]]:
    """Operator types of the graph, its subgraphs and the model's local functions
    (domain-qualified when not the default domain), and the top-level ones."""
    seen: set[str] = set()

    def q(n):
        return f"{n.domain}:{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type

    def walk(nodes):
        for n in nodes:
            seen.add(q(n))
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g.node)
                for g in a.graphs:
                    walk(g.node)

    walk(m.graph.node)
    for f in m.functions:
        walk(f.node)
    top = sorted({q(n) for n in m.graph.node})
    return top, sorted(seen)


def serialise(value, vi: onnx.ValueInfoProto) -> bytes:
    t = vi.type
    if t.HasField("map_type"):
        return numpy_helper.from_dict(value, vi.name).SerializeToString()
    if t.HasField("sequence_type"):
        return numpy_helper.from_list(value, vi.name).SerializeToString()
    if t.HasField("optional_type"):
        return numpy_helper.from_optional(value, vi.name).SerializeToString()
    if isinstance(value, TensorProto):
        return value.SerializeToString()
    return numpy_helper.from_array(value, vi.name).SerializeToString()


def plain_fixed_tensor(tp: onnx.TypeProto) -> bool:
    return tp.WhichOneof("value") == "tensor_type" and tp.tensor_type.elem_type not in VARIABLE_SIZE


def as_comparable(v):
    if isinstance(v, TensorProto):
        v = numpy_helper.to_array(v)
    if isinstance(v, np.generic):  # a few cases give scalars as numpy scalars
        v = np.asarray(v)
    return v


def exotic(v) -> str | None:
    """The ml_dtypes element type of an input (bfloat16, float8, int4, ...) that
    onnxruntime's Python API cannot take as a numpy array, if any."""
    if isinstance(v, list):
        return next((x for x in map(exotic, v) if x), None)
    if isinstance(v, np.ndarray) and v.dtype.type.__module__.startswith("ml_dtypes"):
        return v.dtype.name
    return None


def close(got, want, rtol: float, atol: float) -> bool:
    """The backend test runner's comparison: allclose for numbers, equality for the
    rest, element by element through sequences and optionals."""
    want = as_comparable(want)
    if want is None or got is None:
        return want is None and got is None
    if isinstance(want, list):
        return isinstance(got, list) and len(got) == len(want) and all(
            close(g, w, rtol, atol) for g, w in zip(got, want))
    want = np.asarray(want)
    got = np.asarray(got)
    if (want.dtype.type.__module__.startswith("ml_dtypes") and got.dtype.kind == "u"
            and got.dtype.itemsize == want.dtype.itemsize):
        got = got.view(want.dtype)  # onnxruntime hands float8 outputs back as raw bytes
    if got.shape != want.shape:
        return False
    if want.dtype.kind in "OSU" or got.dtype.kind in "OSU":
        return bool(np.all(got.astype(object) == want.astype(object)))
    try:
        g, w = got.astype(np.float64), want.astype(np.float64)
    except (TypeError, ValueError):
        return bool(np.array_equal(got, want))
    return bool(np.allclose(g, w, rtol=rtol, atol=atol, equal_nan=True))


def read_back(path: Path, vi: onnx.ValueInfoProto):
    """A value from a written .pb file, parsed by the graph's declared type."""
    data = path.read_bytes()
    t = vi.type
    if t.HasField("map_type"):
        p = onnx.MapProto()
        p.ParseFromString(data)
        return numpy_helper.to_dict(p)
    if t.HasField("sequence_type"):
        p = onnx.SequenceProto()
        p.ParseFromString(data)
        return numpy_helper.to_list(p)
    if t.HasField("optional_type"):
        p = onnx.OptionalProto()
        p.ParseFromString(data)
        return numpy_helper.to_optional(p)
    p = TensorProto()
    p.ParseFromString(data)
    assert p.name == vi.name, (path, p.name, vi.name)
    return numpy_helper.to_array(p)


def check_ort(case_dir: Path, rtol: float, atol: float) -> str:
    """Run the written case (model.onnx and test_data_set_*/, read back from disk)
    in onnxruntime and compare with its written expected outputs."""
    import onnxruntime as ort

    model = onnx.load(case_dir / "model.onnx")

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 4
    try:
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001
        return "load error: " + str(e).splitlines()[0][:200]
    g = model.graph
    for ds in sorted(case_dir.glob("test_data_set_*")):
        inputs = [read_back(ds / f"input_{j}.pb", vi) for j, vi in enumerate(g.input)
                  if (ds / f"input_{j}.pb").exists()]
        outputs = [read_back(ds / f"output_{j}.pb", vi) for j, vi in enumerate(g.output)]
        feeds = {vi.name: as_comparable(v) for vi, v in zip(g.input, inputs)}
        odd = next((x for x in map(exotic, feeds.values()) if x), None)
        if odd:
            return f"not checked: onnxruntime's Python API takes no {odd} arrays"
        try:
            got = sess.run(None, feeds)
        except Exception as e:  # noqa: BLE001
            msg = str(e).splitlines()[0][:200]
            if "No corresponding Numpy type" in msg:
                return "not checked: onnxruntime's Python API returns no numpy array: " + msg
            return "run error: " + msg
        for g_, w in zip(got, outputs):
            try:
                ok = close(g_, w, rtol, atol)
            except Exception:  # noqa: BLE001
                ok = False
            if not ok:
                return "mismatch"
    return "pass"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outdir", type=Path)
    ap.add_argument("--op", help="only the cases of this operator type")
    ap.add_argument("--check-ort", action="store_true",
                    help="also run every case in onnxruntime and compare (adds about a minute)")
    args = ap.parse_args()

    import onnx.backend.test.case.node as node_cases

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # overflow warnings from the Cast cases' generators
        cases = node_cases.collect_testcases(args.op)
    t_collect = time.perf_counter() - t0

    out = args.outdir
    out.mkdir(parents=True, exist_ok=True)
    t1 = time.perf_counter()
    entries, total_bytes, total_files = [], 0, 0
    for case in sorted(cases, key=lambda c: c.name):
        assert case.model is not None and case.data_sets is not None, case.name
        d = out / case.name
        if d.exists():
            shutil.rmtree(d)
        d.mkdir()
        m = case.model
        data = m.SerializeToString()
        (d / "model.onnx").write_bytes(data)
        size, files = len(data), 1
        for i, (inputs, outputs) in enumerate(case.data_sets):
            ds = d / f"test_data_set_{i}"
            ds.mkdir()
            for j, v in enumerate(inputs):
                b = serialise(v, m.graph.input[j])
                (ds / f"input_{j}.pb").write_bytes(b)
                size, files = size + len(b), files + 1
            for j, v in enumerate(outputs):
                b = serialise(v, m.graph.output[j])
                (ds / f"output_{j}.pb").write_bytes(b)
                size, files = size + len(b), files + 1
        total_bytes += size
        total_files += files
        top, all_ops = op_types(m)
        io = list(m.graph.input) + list(m.graph.output)
        entries.append({
            "name": case.name,
            "op_types": top,
            "all_op_types": all_ops,
            "domains": sorted({o.domain or "ai.onnx" for o in m.opset_import}),
            "opset_import": {(o.domain or "ai.onnx"): o.version for o in m.opset_import},
            "rtol": case.rtol,
            "atol": case.atol,
            "data_sets": len(case.data_sets),
            "inputs": [{"name": v.name, "type": type_name(v.type), "shape": shape_of(v.type)}
                       for v in m.graph.input],
            "outputs": [{"name": v.name, "type": type_name(v.type), "shape": shape_of(v.type)}
                        for v in m.graph.output],
            "all_io_fixed_size_tensors": all(plain_fixed_tensor(v.type) for v in io),
            "has_local_functions": len(m.functions) > 0,
            "expanded": "_expanded" in case.name,
            "bytes": size,
        })
    t_write = time.perf_counter() - t1
    t_ort = None
    if args.check_ort:
        t2 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for e in entries:
                e["ort"] = check_ort(out / e["name"], e["rtol"], e["atol"])
        t_ort = time.perf_counter() - t2

    by_op = collections.Counter(e["op_types"][0] if len(e["op_types"]) == 1 else "(several)" for e in entries)
    elem_types = collections.Counter(
        io["type"] for e in entries for io in e["inputs"] + e["outputs"])
    summary = {
        "onnx_version": onnx.__version__,
        "python": sys.version.split()[0],
        "cases": len(entries),
        "data_sets": sum(e["data_sets"] for e in entries),
        "files": total_files,
        "bytes": total_bytes,
        "collect_seconds": round(t_collect, 2),
        "write_seconds": round(t_write, 2),
        "distinct_op_types": len({op for e in entries for op in e["all_op_types"]}),
        "expanded_cases": sum(e["expanded"] for e in entries),
        "cases_with_non_tensor_or_variable_size_io": sum(not e["all_io_fixed_size_tensors"] for e in entries),
        "cases_per_top_level_op": dict(sorted(by_op.items())),
        "io_types": dict(sorted(elem_types.items())),
    }
    if t_ort is not None:
        import onnxruntime as ort

        outcome = collections.Counter(e["ort"].split(":")[0].replace(" ", "_") for e in entries)
        summary["onnxruntime_check"] = {
            "onnxruntime_version": ort.__version__,
            "seconds": round(t_ort, 1),
            **dict(sorted(outcome.items())),
        }
    (out / "cases.json").write_text(json.dumps({"summary": summary, "cases": entries}, indent=1) + "\n")
    print(f"{summary['cases']} cases ({summary['expanded_cases']} '_expanded'), {summary['data_sets']} data sets, "
          f"{summary['distinct_op_types']} operator types; {summary['files']} files, "
          f"{total_bytes / 1e6:.1f} MB; collect {t_collect:.1f} s, write {t_write:.1f} s; "
          f"{summary['cases_with_non_tensor_or_variable_size_io']} cases have a sequence/optional/map or "
          f"string input or output; {out / 'cases.json'}")
    if t_ort is not None:
        print("onnxruntime " + ", ".join(f"{k}: {v}" for k, v in summary["onnxruntime_check"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
