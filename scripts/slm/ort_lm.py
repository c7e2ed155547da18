#!/usr/bin/env python3
"""Run a Pollen language-model artifact (see /work/slm-contract.md) with onnxruntime.

    python3 scripts/slm/ort_lm.py DIR generate TEXT [--chat] [--max-tokens N] [--threads N]
    python3 scripts/slm/ort_lm.py DIR golden   [--threads N]
    python3 scripts/slm/ort_lm.py DIR check    [--text TEXT] [--tol X]

DIR holds model.onnx, tokenizer.json, generation.json (and golden_prompts.json).
`generate` decodes greedily with the KV cache (one prefill call, then one token per
step, presents fed back as pasts); with --chat, TEXT is a user message rendered
through the chat template. `golden` scores golden_prompts.json the way the node does
(teacher forcing through the cache path) and exits 1 below min_agreement. `check`
compares the graph's logits with a plain numpy forward pass (no cache, float64) built
from the model's own initializers (float models made by llama_onnx.build_llama), and
checks that greedy decoding with the cache equals decoding without it.

As a module: OrtLM (session + tokenizer + generation config), render_chat,
reference_logits (the numpy model).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llama_onnx import read_llama  # noqa: E402


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool = True,
                bos_token: str | None = None, eos_token: str | None = None) -> str:
    """Render a Hugging Face chat template the way transformers does (sandboxed Jinja,
    trim_blocks and lstrip_blocks)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg):
        raise ValueError(msg)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            bos_token=bos_token or "", eos_token=eos_token or "")


def save_tokenizer(tok: Tokenizer, path) -> None:
    """Save as compact JSON with BPE merges written "a b" (the form every tokenizers version
    reads; 0.20+ would write pairs, which older readers refuse). Byte-level tokens never
    hold a space, so the split is unambiguous."""
    data = json.loads(tok.to_str())
    merges = data.get("model", {}).get("merges")
    if merges and isinstance(merges[0], list):
        if any(" " in a or " " in b for a, b in merges):
            raise ValueError("a merge part contains a space")
        data["model"]["merges"] = [f"{a} {b}" for a, b in merges]
    Path(path).write_text(json.dumps(data, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")
    if Tokenizer.from_file(str(path)).to_str() != tok.to_str():
        raise ValueError("tokenizer.json does not read back as written")


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


class OrtLM:
    """A contract artifact loaded in onnxruntime."""

    def __init__(self, directory, threads: int = 1, model_file: str = "model.onnx"):
        self.dir = Path(directory)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.session = ort.InferenceSession(str(self.dir / model_file), so, providers=["CPUExecutionProvider"])
        self.tokenizer = Tokenizer.from_file(str(self.dir / "tokenizer.json"))
        self.gen = json.loads((self.dir / "generation.json").read_text())
        pasts = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self.layers = len(pasts) // 2
        _, self.kv_heads, _, self.head_dim = pasts[0].shape
        self.output_names = ["logits"] + [f"present.{i}.{k}" for i in range(self.layers) for k in ("key", "value")]
        self.eos_ids = [self.token_id(t) for t in self.gen["eos_tokens"]]

    def token_id(self, token: str) -> int:
        i = self.tokenizer.token_to_id(token)
        if i is None:
            raise ValueError(f"{token!r} is not a token of the vocabulary")
        return i

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if self.gen.get("add_bos_token") and self.gen.get("bos_token"):
            ids = [self.token_id(self.gen["bos_token"])] + ids
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def chat_prompt(self, messages: list[dict]) -> str:
        return render_chat(self.gen["chat_template"], messages, True, self.gen.get("bos_token"),
                           self.gen["eos_tokens"][0])

    def empty_past(self) -> list[np.ndarray]:
        return [np.zeros((1, self.kv_heads, 0, self.head_dim), np.float32) for _ in range(2 * self.layers)]

    def forward(self, ids: list[int], past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """One call: ids are the new tokens after len(past) cached ones. Returns logits [S, V]
        and the presents."""
        p = past[0].shape[2]
        feed = {"input_ids": np.array([ids], np.int64),
                "position_ids": np.arange(p, p + len(ids), dtype=np.int64)[None, :]}
        for i in range(self.layers):
            feed[f"past_key_values.{i}.key"] = past[2 * i]
            feed[f"past_key_values.{i}.value"] = past[2 * i + 1]
        out = self.session.run(self.output_names, feed)
        return out[0][0], out[1:]

    def greedy(self, prompt_ids: list[int], max_new: int, stop_at_eos: bool = True,
               use_cache: bool = True) -> tuple[list[int], bool]:
        """Greedy tokens after the prompt, and whether generation stopped at an EOS token
        (which is included in the list)."""
        out: list[int] = []
        if use_cache:
            logits, past = self.forward(prompt_ids, self.empty_past())
        else:
            logits, _ = self.forward(prompt_ids, self.empty_past())
        while len(out) < max_new:
            tok = int(np.argmax(logits[-1]))
            out.append(tok)
            if stop_at_eos and tok in self.eos_ids:
                return out, True
            if len(out) == max_new:
                break
            if use_cache:
                logits, past = self.forward([tok], past)
            else:
                logits, _ = self.forward(prompt_ids + out, self.empty_past())
        return out, False

    def teacher_forced(self, prompt_ids: list[int], continuation: list[int]) -> tuple[list[bool], list[float]]:
        """Like the node's golden check: prefill the prompt, then feed each expected token one
        step at a time. Returns, per expected token, whether it was the argmax and its log-prob."""
        logits, past = self.forward(prompt_ids, self.empty_past())
        hits, logps = [], []
        for k, tok in enumerate(continuation):
            row = logits[-1]
            hits.append(int(np.argmax(row)) == tok)
            logps.append(float(log_softmax(row)[tok]))
            if k + 1 < len(continuation):
                logits, past = self.forward([tok], past)
        return hits, logps

    def top1_margins(self, prompt_ids: list[int], continuation: list[int]) -> list[float]:
        """Along a teacher-forced path: top-1 minus top-2 logit at each step (how far a
        runtime's logits may stray before another token wins)."""
        logits, past = self.forward(prompt_ids, self.empty_past())
        out = []
        for k, tok in enumerate(continuation):
            top2 = np.sort(logits[-1])[-2:]
            out.append(float(top2[1] - top2[0]))
            if k + 1 < len(continuation):
                logits, past = self.forward([tok], past)
        return out

    def golden(self, golden: dict) -> dict:
        hits, logps = [], []
        for p in golden["prompts"]:
            h, lp = self.teacher_forced(self.encode(p["prompt"]), p["continuation"])
            hits += h
            logps += lp
        return {"agreement": sum(hits) / len(hits), "tokens": len(hits), "mean_logp": float(np.mean(logps))}


# ---------------------------------------------------------------- numpy reference

def _rms_norm(x, w, eps):
    return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps) * w


def reference_logits(config: dict, weights: dict[str, np.ndarray], ids: list[int],
                     taps: dict | None = None) -> np.ndarray:
    """Logits [S, V] of the whole sequence, no cache, in float64, written from the Llama
    definition (HF layouts and names, rotate_half rotary). With `taps`, records for each
    down_proj the largest max|input| / rms(input) seen (activation outliers)."""
    W = {k: np.asarray(v, np.float64) for k, v in weights.items()}
    nh, kvh, D = config["heads"], config["kv_heads"], config["head_dim"]
    eps = config["rms_eps"]
    S = len(ids)
    inv_freq = 1.0 / (config["rope_theta"] ** (np.arange(0, D, 2) / D))
    ang = np.arange(S)[:, None] * inv_freq[None, :]
    cos = np.concatenate([np.cos(ang)] * 2, axis=1)
    sin = np.concatenate([np.sin(ang)] * 2, axis=1)

    def rope(x):  # [n, S, D]
        rot = np.concatenate([-x[..., D // 2:], x[..., : D // 2]], axis=-1)
        return x * cos + rot * sin

    causal = np.tril(np.ones((S, S), bool))
    x = W["model.embed_tokens.weight"][ids]
    for i in range(config["layers"]):
        p = f"model.layers.{i}."
        h = _rms_norm(x, W[p + "input_layernorm.weight"], eps)
        q = (h @ W[p + "self_attn.q_proj.weight"].T).reshape(S, nh, D).transpose(1, 0, 2)
        k = (h @ W[p + "self_attn.k_proj.weight"].T).reshape(S, kvh, D).transpose(1, 0, 2)
        v = (h @ W[p + "self_attn.v_proj.weight"].T).reshape(S, kvh, D).transpose(1, 0, 2)
        q, k = rope(q), rope(k)
        k = np.repeat(k, nh // kvh, axis=0)  # HF repeat_kv: head j uses KV head j // group
        v = np.repeat(v, nh // kvh, axis=0)
        s = q @ k.transpose(0, 2, 1) / np.sqrt(D)
        s = np.where(causal, s, -np.inf)
        a = np.exp(s - s.max(axis=-1, keepdims=True))
        a /= a.sum(axis=-1, keepdims=True)
        att = (a @ v).transpose(1, 0, 2).reshape(S, nh * D)
        x = x + att @ W[p + "self_attn.o_proj.weight"].T
        h = _rms_norm(x, W[p + "post_attention_layernorm.weight"], eps)
        gate = h @ W[p + "mlp.gate_proj.weight"].T
        up = h @ W[p + "mlp.up_proj.weight"].T
        act = gate / (1 + np.exp(-gate)) * up
        if taps is not None:
            ratio = float(np.abs(act).max() / np.sqrt((act * act).mean()))
            taps[p + "mlp.down_proj"] = max(ratio, taps.get(p + "mlp.down_proj", 0.0))
        x = x + act @ W[p + "mlp.down_proj.weight"].T
    x = _rms_norm(x, W["model.norm.weight"], eps)
    return x @ W.get("lm_head.weight", W["model.embed_tokens.weight"]).T


def check_against_reference(lm: OrtLM, config: dict, weights: dict, ids: list[int]) -> dict:
    """Graph logits (one prefill call, and prefill of all but the last 3 tokens followed by
    3 single steps) vs the numpy reference."""
    ref = reference_logits(config, weights, ids)
    full, _ = lm.forward(ids, lm.empty_past())
    split = max(1, len(ids) - 3)
    first, past = lm.forward(ids[:split], lm.empty_past())
    rows = [first]
    for t in ids[split:]:
        step, past = lm.forward([t], past)
        rows.append(step)
    cached = np.concatenate(rows, axis=0)
    return {"tokens": len(ids), "max_abs_logit": float(np.abs(ref).max()),
            "max_diff_prefill": float(np.abs(full - ref).max()),
            "max_diff_cached": float(np.abs(cached - ref).max()),
            "argmax_equal": bool((full.argmax(-1) == ref.argmax(-1)).all())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dir")
    ap.add_argument("command", choices=["generate", "golden", "check"])
    ap.add_argument("text", nargs="?")
    ap.add_argument("--chat", action="store_true")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tol", type=float, default=1e-3)
    a = ap.parse_args()
    lm = OrtLM(a.dir, threads=a.threads)
    if a.command == "generate":
        if a.text is None:
            ap.error("generate needs TEXT")
        prompt = lm.chat_prompt([{"role": "user", "content": a.text}]) if a.chat else a.text
        ids = lm.encode(prompt)
        t0 = time.perf_counter()
        out, eos = lm.greedy(ids, a.max_tokens)
        dt = time.perf_counter() - t0
        print(lm.decode(out))
        print(json.dumps({"prompt_tokens": len(ids), "new_tokens": len(out), "stopped_at_eos": eos,
                          "seconds": round(dt, 3), "ids": out}), file=sys.stderr)
        return 0
    if a.command == "golden":
        golden = json.loads((lm.dir / "golden_prompts.json").read_text())
        r = lm.golden(golden)
        r["min_agreement"] = golden["min_agreement"]
        print(json.dumps(r))
        return 0 if r["agreement"] >= golden["min_agreement"] else 1
    config, weights = read_llama(lm.dir / "model.onnx")
    text = a.text or lm.chat_prompt([{"role": "user", "content": "What is the capital of France?"}])
    ids = lm.encode(text)
    r = check_against_reference(lm, config, weights, ids)
    cached, _ = lm.greedy(ids, 8, stop_at_eos=False)
    plain, _ = lm.greedy(ids, 8, stop_at_eos=False, use_cache=False)
    r["greedy_cache_equals_no_cache"] = cached == plain
    r["tol"] = a.tol
    ok = max(r["max_diff_prefill"], r["max_diff_cached"]) <= a.tol and r["greedy_cache_equals_no_cache"]
    print(json.dumps(r))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
