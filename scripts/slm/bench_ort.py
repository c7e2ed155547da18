#!/usr/bin/env python3
"""onnxruntime baseline for serving a Pollen LM artifact: one JSON line on stdout.

    python3 scripts/slm/bench_ort.py DIR [--threads N] [--runs R] [--prompt-tokens 64] [--new-tokens 128]

DIR holds model.onnx and tokenizer.json (generation.json as the contract has it). The
prompt is a fixed English text tokenised and cut to --prompt-tokens ids (repeated if
shorter), fed raw (no chat template). Each run: one prefill call on the prompt; the time
to first token (ttft_ms) is that call plus the argmax. Then greedy decoding with the KV
cache, one token per call, until --new-tokens new tokens exist (the first came from the
prefill, so new_tokens - 1 single-token calls); EOS does not stop it, so every run does
the same work. decode_tok_s = (new_tokens - 1) / time of those calls. One untimed warm-up
run first; the figures are medians over --runs runs (each run's values are listed too).
load_s is the session creation time; peak_rss_mb is this process's VmHWM at the end
(Python, numpy and onnxruntime included; not ru_maxrss, which Linux carries over from
the parent across fork and exec, so a parent holding a model inflated it). onnxruntime: CPU provider, --threads intra-op
threads, 1 inter-op thread, sequential execution, default graph optimisations.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ort_lm import OrtLM  # noqa: E402

TEXT = ("Pollination is the transfer of pollen from the anther of a flower to the stigma, which "
        "allows fertilisation and the production of seeds. Bees, butterflies, moths, beetles, "
        "birds and bats carry pollen between flowers while they feed on nectar, and the wind "
        "carries the light pollen of grasses and many trees over long distances. Farmers rent "
        "hives of honey bees to pollinate almonds, apples and blueberries every spring.")


def one_run(lm: OrtLM, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    logits, past = lm.forward(prompt, lm.empty_past())
    tok = int(np.argmax(logits[-1]))
    ttft = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _ in range(new_tokens - 1):
        logits, past = lm.forward([tok], past)
        tok = int(np.argmax(logits[-1]))
    return ttft, (new_tokens - 1) / (time.perf_counter() - t1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    a = ap.parse_args()
    t0 = time.perf_counter()
    lm = OrtLM(a.dir, threads=a.threads)
    load_s = time.perf_counter() - t0
    ids = lm.tokenizer.encode(TEXT, add_special_tokens=False).ids
    prompt = (ids * (a.prompt_tokens // len(ids) + 1))[: a.prompt_tokens]
    one_run(lm, prompt, min(a.new_tokens, 8))
    ttfts, speeds = [], []
    for _ in range(a.runs):
        ttft, speed = one_run(lm, prompt, a.new_tokens)
        ttfts.append(ttft * 1000)
        speeds.append(speed)
    print(json.dumps({
        "model": str(a.dir / "model.onnx"), "runtime": f"onnxruntime {ort.__version__}", "threads": a.threads,
        "prompt_tokens": len(prompt), "new_tokens": a.new_tokens, "runs": a.runs,
        "load_s": round(load_s, 3), "ttft_ms": round(statistics.median(ttfts), 2),
        "decode_tok_s": round(statistics.median(speeds), 2),
        "ttft_ms_runs": [round(x, 2) for x in ttfts], "decode_tok_s_runs": [round(x, 2) for x in speeds],
        "peak_rss_mb": peak_rss_mb(),
    }))
    return 0


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM), MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


if __name__ == "__main__":
    sys.exit(main())
