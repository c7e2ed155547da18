#!/usr/bin/env python3
"""Make a tiny random causal LM of the SmolLM2 family as a Pollen LM artifact, twice.

    python3 scripts/slm/make_tiny_lm.py OUTDIR [--expected scripts/slm/tiny_expected.json]

Writes OUTDIR/fp32/ and OUTDIR/int8/, each with model.onnx, tokenizer.json,
generation.json and golden_prompts.json (format: /work/slm-contract.md). Everything is
derived from one numpy seed, so every run writes byte-identical files (the int8 model
given the pinned onnxruntime). The model: 4 layers, hidden 256, 8 heads, 2 KV heads,
head_dim 32, SwiGLU 704, rope_theta 10000, context 512, untied output matrix; random
weights scaled so that logits have a useful spread. The tokenizer is byte-level BPE:
<|endoftext|>, <|im_start|>, <|im_end|> (ids 0-2, as in SmolLM2), the 256 byte tokens
and a few fixed merges, so any UTF-8 text round-trips. generation.json has a plain
ChatML template.

To make EOS testable, the output column of <|im_end|> is set to 1.05 x the column of a
token X chosen here: the model then ends its answer where it would have written X.
X is picked so that exactly one golden prompt stops (after 8 to 16 new tokens, the EOS
included) while the others run to the 32-token limit; tiny_expected.json says which.

int8: onnxruntime.quantization.quantize_dynamic on every MatMul weight (output
projection included), QInt8 per output channel; the graph gets DynamicQuantizeLinear +
MatMulInteger (standard ONNX domain; unused opset imports are removed).

The script checks the float graph against the numpy reference (ort_lm.reference_logits),
greedy-with-cache against greedy-without-cache, and writes --expected (default
scripts/slm/tiny_expected.json: prompts, token ids, greedy ids up to 32 new tokens (EOS
included when it stopped there), their text (EOS left out), sha256 of every file written). --check compares with that file instead of writing it and
exits 1 if anything differs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from llama_onnx import build_llama, expected_shapes  # noqa: E402
from ort_lm import OrtLM, check_against_reference, render_chat, save_tokenizer  # noqa: E402

SEED = 6  # of seeds 1-10, a large top-1 margin along the greedy paths and EOS mid-way
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# A few merges so that words are not all single bytes ("Ġ" is the byte-level space).
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("e", "r"), ("a", "n"), ("o", "n"),
          ("Ġ", "a"), ("r", "e"), ("e", "s"), ("Ġ", "s"), ("o", "u"), ("in", "g"), ("Ġ", "w"),
          ("e", "n"), ("Ġ", "c")]
CHAT_TEMPLATE = ("{% for message in messages %}"
                 "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
                 "{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
CONFIG = {"vocab": len(SPECIALS) + 256 + len(MERGES), "hidden": 256, "layers": 4, "heads": 8,
          "kv_heads": 2, "head_dim": 32, "intermediate": 704, "rope_theta": 10000.0,
          "rms_eps": 1e-5, "context_length": 512}
PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer briefly."},
     {"role": "user", "content": "Write a haiku about bees."}],
    [{"role": "user", "content": "Explain pollination in one sentence."}],
    [{"role": "user", "content": "¿Qué tal? Say hello in three languages — 你好!"}],
]
GOLDEN_TOKENS = 16
EXPECTED_TOKENS = 32
EOS_GAIN = 1.05
FILES = ("model.onnx", "tokenizer.json", "generation.json", "golden_prompts.json")


def byte_alphabet() -> list[str]:
    """GPT-2's printable stand-in for each byte value 0..255 (the byte-level alphabet)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


def make_tokenizer() -> Tokenizer:
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for ch in byte_alphabet():
        vocab[ch] = len(vocab)
    for a, b in MERGES:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=MERGES))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return tok


def make_weights(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random weights. Linear layers ~ N(0, 1/fan_in) so every block adds a residual term of
    the same order as the (unit-variance) embeddings; the output matrix is scaled up so
    that logits spread over a few units; norm weights are 1 + small noise."""
    H = CONFIG["hidden"]
    w = {}
    for name, shape in expected_shapes(CONFIG).items():
        if len(shape) == 1:
            w[name] = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name == "model.embed_tokens.weight":
            w[name] = rng.standard_normal(shape)
        elif name == "lm_head.weight":
            w[name] = 3.0 * rng.standard_normal(shape) / np.sqrt(H)
        else:
            w[name] = rng.standard_normal(shape) / np.sqrt(shape[1])
        # Queries and keys a bit larger, for attention that is not uniform.
        if "q_proj" in name or "k_proj" in name:
            w[name] *= 1.5
    # Shrink the output columns of the special tokens, control and non-ASCII bytes so that
    # greedy text is printable ASCII (readable in tests; the tokenizer still round-trips any
    # UTF-8) and ends only where <|im_end|> is made to win (pick_eos_token).
    printable = {ord("\n")} | set(range(0x20, 0x7F))
    w["lm_head.weight"][: len(SPECIALS)] *= 0.25
    for b in range(256):
        if b not in printable:
            w["lm_head.weight"][len(SPECIALS) + b] *= 0.25
    return {k: v.astype(np.float32) for k, v in w.items()}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def greedy_logits(lm: OrtLM, ids: list[int], n: int) -> np.ndarray:
    """Logit rows [n, V] along the greedy path (no stopping), KV cache step by step."""
    logits, past = lm.forward(ids, lm.empty_past())
    rows = []
    for _ in range(n):
        rows.append(logits[-1])
        logits, past = lm.forward([int(np.argmax(logits[-1]))], past)
    return np.array(rows)


def pick_eos_token(lm: OrtLM, prompt_ids: list[list[int]]) -> tuple[int, int]:
    """Token X and prompt such that, with <|im_end|>'s column = EOS_GAIN x X's, greedy
    decoding stops that prompt after 8..16 tokens and no other within 32 (by a margin of
    0.1 logit). Until EOS wins, the greedy path is the one without the change."""
    paths = [greedy_logits(lm, ids, EXPECTED_TOKENS) for ids in prompt_ids]
    if any((p.argmax(axis=1) < len(SPECIALS)).any() for p in paths):
        raise SystemExit("a special token is greedy before the EOS change; change SEED")
    for target in range(len(paths)):
        for x in range(len(SPECIALS), CONFIG["vocab"]):
            # eos logit minus the best other logit, per step (X itself counts among the others).
            gaps = [EOS_GAIN * p[:, x] - p.max(axis=1) for p in paths]
            fires = np.flatnonzero(gaps[target] > 0.1)
            if not len(fires) or not 7 <= fires[0] < GOLDEN_TOKENS or (np.abs(gaps[target][:fires[0]]) < 0.1).any():
                continue
            if all((g < -0.1).all() for j, g in enumerate(gaps) if j != target):
                return x, target
    raise SystemExit("no token ends exactly one golden prompt; change SEED")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("outdir", type=Path)
    ap.add_argument("--expected", type=Path, default=HERE / "tiny_expected.json")
    ap.add_argument("--check", action="store_true", help="compare with --expected instead of writing it")
    a = ap.parse_args()
    t_start = time.perf_counter()
    fp32, int8 = a.outdir / "fp32", a.outdir / "int8"
    for d in (fp32, int8):
        d.mkdir(parents=True, exist_ok=True)

    tok = make_tokenizer()
    save_tokenizer(tok, fp32 / "tokenizer.json")
    generation = {"format": 1, "context_length": CONFIG["context_length"], "bos_token": None,
                  "add_bos_token": False, "eos_tokens": ["<|im_end|>", "<|endoftext|>"],
                  "chat_template": CHAT_TEMPLATE,
                  "defaults": {"temperature": 0.0, "top_p": 1.0, "max_tokens": 256}}
    write_json(fp32 / "generation.json", generation)
    samples = ["héllo wörld — 你好 🐝\n\t<|im_start|>x", "\x00\x7f\u00ff\ufffd \U0010ffff"]
    for s in samples:
        if tok.decode(tok.encode(s, add_special_tokens=False).ids, skip_special_tokens=False) != s:
            raise SystemExit(f"tokenizer does not round-trip {s!r}")

    rng = np.random.default_rng(SEED)
    weights = make_weights(rng)
    prompts = [render_chat(CHAT_TEMPLATE, m, True) for m in PROMPTS]

    # First build without the EOS shortcut, to see where each prompt goes.
    eos_id = SPECIALS.index("<|im_end|>")
    build_llama(CONFIG, weights, fp32 / "model.onnx")
    lm = OrtLM(fp32)
    prompt_ids = [lm.encode(p) for p in prompts]
    x_tok, eos_prompt = pick_eos_token(lm, prompt_ids)
    weights["lm_head.weight"][eos_id] = EOS_GAIN * weights["lm_head.weight"][x_tok]
    build_llama(CONFIG, weights, fp32 / "model.onnx")
    lm = OrtLM(fp32)

    # Expected (up to 32) and golden (up to 16) continuations, KV cache, step by step.
    expected_prompts, golden_prompts = [], []
    for i, (msgs, text, ids) in enumerate(zip(PROMPTS, prompts, prompt_ids)):
        out, eos = lm.greedy(ids, EXPECTED_TOKENS)
        plain, _ = lm.greedy(ids, EXPECTED_TOKENS, use_cache=False)
        if plain != out:
            raise SystemExit(f"prompt {i}: greedy with the cache differs from greedy without it")
        if eos != (i == eos_prompt):
            raise SystemExit(f"prompt {i}: EOS {'missing' if not eos else 'unexpected'}")
        golden_prompts.append({"prompt": text, "continuation": out[:GOLDEN_TOKENS]})
        expected_prompts.append({"messages": msgs, "prompt": text, "prompt_ids": ids, "greedy_ids": out,
                                 "stopped_at_eos": eos, "text": lm.decode(out[:-1] if eos else out)})
    if not 8 <= len(golden_prompts[eos_prompt]["continuation"]) <= GOLDEN_TOKENS:
        raise SystemExit("EOS prompt's continuation is outside 8..16 tokens")
    golden = {"min_agreement": 0.9, "prompts": golden_prompts}
    write_json(fp32 / "golden_prompts.json", golden)

    # Checks of the float graph.
    ref = check_against_reference(lm, CONFIG, weights, prompt_ids[0] + expected_prompts[0]["greedy_ids"][:8])
    if max(ref["max_diff_prefill"], ref["max_diff_cached"]) > 1e-4 or not ref["argmax_equal"]:
        raise SystemExit(f"graph differs from the numpy reference: {ref}")
    fp_score = lm.golden(golden)
    margins = [m for p in expected_prompts for m in lm.top1_margins(p["prompt_ids"], p["greedy_ids"])]
    if fp_score["agreement"] != 1.0:
        raise SystemExit(f"float model disagrees with its own golden continuations: {fp_score}")

    # int8 variant.
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger().setLevel(logging.ERROR)  # its "consider pre-processing" advice

    tmp = int8 / "model.tmp.onnx"
    quantize_dynamic(fp32 / "model.onnx", tmp, op_types_to_quantize=["MatMul"], per_channel=True,
                     weight_type=QuantType.QInt8)
    q = onnx.load(str(tmp))
    tmp.unlink()
    used = {n.domain for n in q.graph.node}
    del_ops = [o for o in q.opset_import if o.domain not in used and o.domain not in ("", "ai.onnx")]
    for o in del_ops:
        q.opset_import.remove(o)
    if used - {"", "ai.onnx"}:
        raise SystemExit(f"int8 model uses non-standard domains {used}")
    # The quantiser's shape inference names the P+S dim ("unk__N"); keep the float model's I/O.
    f = onnx.load(str(fp32 / "model.onnx"), load_external_data=False)
    for field in ("input", "output"):
        del getattr(q.graph, field)[:]
        getattr(q.graph, field).extend(getattr(f.graph, field))
    del q.graph.value_info[:]
    onnx.save(q, str(int8 / "model.onnx"))
    for f in ("tokenizer.json", "generation.json"):
        (int8 / f).write_bytes((fp32 / f).read_bytes())
    lm8 = OrtLM(int8)
    q_score = lm8.golden(golden)
    # The int8 variant's bound comes from the agreement onnxruntime measured where the
    # expected file was written, less 0.1. A check keeps that bound: onnxruntime's int8
    # kernels differ per CPU (on AVX2 without VNNI its u8 x s8 products go through
    # VPMADDUBSW, whose int16 pair sums saturate, as its quantisation docs warn), so the
    # same model agreed 0.966 on the machine that wrote the file and 0.797 on an AVX2-only
    # EPYC. The node's own golden check (tract) is what the bound is for.
    old = json.loads(a.expected.read_text()) if a.check else None
    if old is not None:
        min8 = float(old["int8_min_agreement"])
    else:
        min8 = max(float(np.floor((q_score["agreement"] - 0.1) * 20) / 20), 0.5)
    write_json(int8 / "golden_prompts.json", {"min_agreement": min8, "prompts": golden_prompts})
    if q_score["agreement"] < min8:
        if not a.check:
            raise SystemExit("int8 agreement below its own bound")
        print(f"note: onnxruntime's int8 agreement here is {q_score['agreement']:.3f}, under the "
              f"bound {min8} (its int8 kernels on this CPU; the node's check is tract's)", file=sys.stderr)

    int8_ops = sorted({n.op_type for n in q.graph.node} - {n.op_type for n in onnx.load(str(fp32 / "model.onnx")).graph.node})
    hashes = {f"{d.name}/{f}": sha256(d / f) for d in (fp32, int8) for f in FILES}
    expected = {
        "config": CONFIG, "seed": SEED,
        "eos_prompt": eos_prompt,
        "eos_note": (f"<|im_end|>'s output column is {EOS_GAIN} x that of token {x_tok} "
                     f"({tok.id_to_token(x_tok)!r}): prompt {eos_prompt} stops at EOS, the others run to the limit"),
        "reference_check": ref,
        "golden_fp32": fp_score, "golden_int8": q_score,
        "int8_min_agreement": min8, "int8_new_ops": int8_ops,
        "min_top1_margin_fp32": min(margins),
        "prompts": expected_prompts, "sha256": hashes,
    }
    if old is not None:  # measured floats aside, which may vary in the last digits between machines
        new = json.loads(json.dumps(expected))
        bad = [k for k in ("config", "seed", "eos_prompt", "eos_note", "prompts", "sha256") if old.get(k) != new[k]]
        if bad:
            print(f"differs from {a.expected}: {bad}", file=sys.stderr)
            return 1
    else:
        write_json(a.expected, expected)

    params = sum(int(np.prod(s)) for s in expected_shapes(CONFIG).values())
    print(f"tiny LM: {params:,} parameters, vocab {CONFIG['vocab']}, EOS prompt {eos_prompt} "
          f"(stops after {len(expected_prompts[eos_prompt]['greedy_ids'])} tokens)")
    print(f"graph vs numpy reference: max |diff| {max(ref['max_diff_prefill'], ref['max_diff_cached']):.2e} "
          f"(logits up to {ref['max_abs_logit']:.1f}); greedy with cache == without: yes; "
          f"min top-1 logit margin on the greedy paths {min(margins):.3f}")
    print(f"{'file':<26}{'bytes':>12}  sha256")
    for k, v in hashes.items():
        d, f = k.split("/")
        print(f"{k:<26}{(a.outdir / d / f).stat().st_size:>12,}  {v[:16]}")
    print(f"golden agreement: fp32 {fp_score['agreement']:.3f}, int8 {q_score['agreement']:.3f} "
          f"(int8 min_agreement {min8}); mean log-likelihood fp32 {fp_score['mean_logp']:.4f}, "
          f"int8 {q_score['mean_logp']:.4f}, diff {q_score['mean_logp'] - fp_score['mean_logp']:+.4f}")
    for p in expected_prompts:
        print(f"  {'EOS' if p['stopped_at_eos'] else 'max'} {len(p['greedy_ids']):>2} tokens: {p['text']!r}")
    print(f"done in {time.perf_counter() - t_start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
