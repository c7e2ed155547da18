#!/usr/bin/env python3
"""Build the ONNX graph of a Llama-family causal LM with KV-cache inputs and outputs.

    from llama_onnx import build_llama
    build_llama(config, weights, "model.onnx")

This is a library (no command line). The graph follows /work/slm-contract.md: opset 17,
standard ONNX ops only, batch fixed at 1, symbolic dims `sequence` (S, new tokens) and
`past_sequence` (P, cached tokens).

    inputs : input_ids int64 [1, S], position_ids int64 [1, S],
             past_key_values.{i}.key / .value float32 [1, KVH, P, D]   (i in 0..layers)
    outputs: logits float32 [1, S, V],
             present.{i}.key / .value float32 [1, KVH, P+S, D]          (keys after rotary)

The causal mask is computed in the graph from P and S (query row r, at absolute
position P+r, sees keys 0..=P+r); rotary angles come from position_ids.

config keys (all required unless marked):
    vocab           V, vocabulary size
    hidden          H, model width
    layers          L, number of decoder layers
    heads           number of query heads
    kv_heads        KVH, number of key/value heads (divides heads)
    head_dim        D (heads * D need not equal H)
    intermediate    I, SwiGLU width
    rope_theta      rotary base
    rms_eps         RMSNorm epsilon
    context_length  (informational; stored in the model's metadata)

weights: Hugging Face Llama names and HF layouts (nn.Linear weights are [out, in]):
    model.embed_tokens.weight                         [V, H]
    model.layers.{i}.input_layernorm.weight           [H]
    model.layers.{i}.self_attn.q_proj.weight          [heads*D, H]
    model.layers.{i}.self_attn.k_proj.weight          [KVH*D, H]
    model.layers.{i}.self_attn.v_proj.weight          [KVH*D, H]
    model.layers.{i}.self_attn.o_proj.weight          [H, heads*D]
    model.layers.{i}.post_attention_layernorm.weight  [H]
    model.layers.{i}.mlp.gate_proj.weight             [I, H]
    model.layers.{i}.mlp.up_proj.weight               [I, H]
    model.layers.{i}.mlp.down_proj.weight             [H, I]
    model.norm.weight                                 [H]
    lm_head.weight                                    [V, H]  (optional: tied to the
                                                       embedding when absent)

In the ONNX file every matrix used by a MatMul is stored transposed, [in, out], under
the same name with ".weight" replaced by ".weight_t" (the output projection becomes
`lm_head.weight_t` [H, V], a separate initializer even when tied). The embedding and
the norm weights keep their names and layouts. The config is kept as JSON in the model's
metadata under `pollen.llama_config` so a reader can rebuild the reference model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
CONFIG_KEYS = ("vocab", "hidden", "layers", "heads", "kv_heads", "head_dim",
               "intermediate", "rope_theta", "rms_eps", "context_length")
LINEAR = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
          "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Name -> HF-layout shape of every weight the builder needs (lm_head included)."""
    V, H, D, I = config["vocab"], config["hidden"], config["head_dim"], config["intermediate"]
    nh, kvh = config["heads"], config["kv_heads"]
    shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,),
              "lm_head.weight": (V, H)}
    for i in range(config["layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (H,),
            p + "post_attention_layernorm.weight": (H,),
            p + "self_attn.q_proj.weight": (nh * D, H),
            p + "self_attn.k_proj.weight": (kvh * D, H),
            p + "self_attn.v_proj.weight": (kvh * D, H),
            p + "self_attn.o_proj.weight": (H, nh * D),
            p + "mlp.gate_proj.weight": (I, H),
            p + "mlp.up_proj.weight": (I, H),
            p + "mlp.down_proj.weight": (H, I),
        })
    return shapes


def check_weights(config: dict, weights: dict[str, np.ndarray]) -> None:
    missing = [k for k in CONFIG_KEYS if k not in config]
    if missing:
        raise ValueError(f"config lacks {missing}")
    if config["heads"] % config["kv_heads"]:
        raise ValueError("heads must be a multiple of kv_heads")
    if config["head_dim"] % 2:
        raise ValueError("head_dim must be even for rotary embeddings")
    for name, shape in expected_shapes(config).items():
        if name == "lm_head.weight" and name not in weights:
            continue
        if name not in weights:
            raise ValueError(f"missing weight {name}")
        if tuple(weights[name].shape) != shape:
            raise ValueError(f"{name}: shape {weights[name].shape}, expected {shape}")


class _Graph:
    """Small helper that names nodes and intermediate values in order."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0
        self._consts: dict[tuple, str] = {}

    def op(self, op_type: str, inputs: list[str], name: str | None = None, **attrs) -> str:
        self._n += 1
        out = name or f"{op_type.lower()}_{self._n}"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=f"n{self._n}_{op_type}", **attrs))
        return out

    def init(self, name: str, array: np.ndarray) -> str:
        # Not np.ascontiguousarray: it turns a scalar into shape [1], and the ONNX spec (and
        # tract) want scalars where a scalar is due (Range, Gather indices).
        self.inits.append(numpy_helper.from_array(np.array(array, order="C"), name))
        return name

    def const(self, values, dtype) -> str:
        """A small constant initializer, shared between uses of the same value."""
        arr = np.array(values, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.init(f"const_{len(self._consts)}", arr)
        return self._consts[key]


def build_llama(config: dict, weights: dict[str, np.ndarray], path) -> onnx.ModelProto:
    """Write the contract's model.onnx for `config`/`weights` (see module docstring) to
    `path` and return the ModelProto. Weights are converted to float32."""
    check_weights(config, weights)
    V, H, D, I = config["vocab"], config["hidden"], config["head_dim"], config["intermediate"]
    nh, kvh, L = config["heads"], config["kv_heads"], config["layers"]
    group = nh // kvh
    g = _Graph()
    f32 = lambda a: np.asarray(a, dtype=np.float32)  # noqa: E731

    def weight(name: str) -> str:
        if name.endswith(".weight") and any(s in name for s in LINEAR):
            return g.init(name[: -len(".weight")] + ".weight_t", f32(weights[name]).T)
        return g.init(name, f32(weights[name]))

    def rms_norm(x: str, w_name: str) -> str:
        sq = g.op("Mul", [x, x])
        mean = g.op("ReduceMean", [sq], axes=[-1], keepdims=1)
        denom = g.op("Sqrt", [g.op("Add", [mean, g.const(config["rms_eps"], np.float32)])])
        return g.op("Mul", [g.op("Div", [x, denom]), weight(w_name)])

    # Sizes: S from input_ids, P from the first layer's past key, T = P + S.
    S = g.op("Gather", [g.op("Shape", ["input_ids"]), g.const(1, np.int64)], axis=0)
    P = g.op("Gather", [g.op("Shape", ["past_key_values.0.key"]), g.const(2, np.int64)], axis=0)
    T = g.op("Add", [P, S])

    # Causal mask [group*S, T]: 0 where key position <= query position, else a large negative.
    rows = g.op("Unsqueeze", [g.op("Range", [P, T, g.const(1, np.int64)]), g.const([1], np.int64)])
    cols = g.op("Unsqueeze", [g.op("Range", [g.const(0, np.int64), T, g.const(1, np.int64)]),
                              g.const([0], np.int64)])
    allowed = g.op("LessOrEqual", [cols, rows])
    mask = g.op("Where", [allowed, g.const(0.0, np.float32), g.const(-1e9, np.float32)])
    # Queries of one KV head's group are stacked group-major along the row axis (see below).
    mask = g.op("Concat", [mask] * group, axis=0) if group > 1 else mask

    # Rotary tables [S, D] from position_ids (HF rotate_half convention): angle = pos * inv_freq,
    # duplicated over both halves; the sign of rotate_half is folded into the sine table.
    inv_freq = 1.0 / (config["rope_theta"] ** (np.arange(0, D, 2, dtype=np.int64).astype(np.float32) / D))
    pos = g.op("Cast", [g.op("Reshape", ["position_ids", g.const([-1, 1], np.int64)])], to=TensorProto.FLOAT)
    angles = g.op("Mul", [pos, g.const(f32(inv_freq), np.float32)])  # [S, D/2]
    cos_h, sin_h = g.op("Cos", [angles]), g.op("Sin", [angles])
    cos = g.op("Concat", [cos_h, cos_h], axis=1, name="rope_cos")
    sin = g.op("Concat", [g.op("Neg", [sin_h]), sin_h], axis=1, name="rope_sin_signed")
    half = D // 2

    def rotary(x: str) -> str:  # x [1, n, S, D]
        lo = g.op("Slice", [x, g.const([0], np.int64), g.const([half], np.int64), g.const([3], np.int64)])
        hi = g.op("Slice", [x, g.const([half], np.int64), g.const([D], np.int64), g.const([3], np.int64)])
        swapped = g.op("Concat", [hi, lo], axis=3)
        return g.op("Add", [g.op("Mul", [x, cos]), g.op("Mul", [swapped, sin])])

    def heads_first(x: str, n: int) -> str:  # [1, S, n*D] -> [1, n, S, D]
        x = g.op("Reshape", [x, g.const([1, -1, n, D], np.int64)])
        return g.op("Transpose", [x], perm=[0, 2, 1, 3])

    scale = g.const(1.0 / np.sqrt(D), np.float32)
    x = g.op("Gather", [weight("model.embed_tokens.weight"), "input_ids"], axis=0)  # [1, S, H]
    for i in range(L):
        p = f"model.layers.{i}."
        h = rms_norm(x, p + "input_layernorm.weight")
        q = rotary(heads_first(g.op("MatMul", [h, weight(p + "self_attn.q_proj.weight")]), nh))
        k = rotary(heads_first(g.op("MatMul", [h, weight(p + "self_attn.k_proj.weight")]), kvh))
        v = heads_first(g.op("MatMul", [h, weight(p + "self_attn.v_proj.weight")]), kvh)
        k_all = g.op("Concat", [f"past_key_values.{i}.key", k], axis=2, name=f"present.{i}.key")
        v_all = g.op("Concat", [f"past_key_values.{i}.value", v], axis=2, name=f"present.{i}.value")
        # Grouped-query attention without repeating K/V: the query heads of KV head k
        # (head k*group + j) become rows j*S + s of [1, KVH, group*S, D], so plain 4-D
        # MatMuls serve each whole group (the mask was tiled to match).
        q = g.op("Reshape", [q, g.const([1, kvh, -1, D], np.int64)])
        q = g.op("Mul", [q, scale])
        scores = g.op("MatMul", [q, g.op("Transpose", [k_all], perm=[0, 1, 3, 2])])
        probs = g.op("Softmax", [g.op("Add", [scores, mask])], axis=-1)
        att = g.op("MatMul", [probs, v_all])  # [1, KVH, group*S, D]
        att = g.op("Reshape", [att, g.const([1, nh, -1, D], np.int64)])
        att = g.op("Transpose", [att], perm=[0, 2, 1, 3])
        att = g.op("Reshape", [att, g.const([1, -1, nh * D], np.int64)])
        x = g.op("Add", [x, g.op("MatMul", [att, weight(p + "self_attn.o_proj.weight")])])

        h = rms_norm(x, p + "post_attention_layernorm.weight")
        gate = g.op("MatMul", [h, weight(p + "mlp.gate_proj.weight")])
        up = g.op("MatMul", [h, weight(p + "mlp.up_proj.weight")])
        act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])
        x = g.op("Add", [x, g.op("MatMul", [act, weight(p + "mlp.down_proj.weight")])])

    x = rms_norm(x, "model.norm.weight")
    lm_head = weights.get("lm_head.weight", weights["model.embed_tokens.weight"])
    g.op("MatMul", [x, g.init("lm_head.weight_t", f32(lm_head).T)], name="logits")

    def vi(name, elem, shape):
        return helper.make_tensor_value_info(name, elem, shape)

    inputs = [vi("input_ids", TensorProto.INT64, [1, "sequence"]),
              vi("position_ids", TensorProto.INT64, [1, "sequence"])]
    outputs = [vi("logits", TensorProto.FLOAT, [1, "sequence", V])]
    for i in range(L):
        for kind in ("key", "value"):
            inputs.append(vi(f"past_key_values.{i}.{kind}", TensorProto.FLOAT, [1, kvh, "past_sequence", D]))
            # P+S left unnamed: a dim_param would be a new symbol a runtime cannot relate to P and S.
            outputs.append(vi(f"present.{i}.{kind}", TensorProto.FLOAT, [1, kvh, None, D]))

    graph = helper.make_graph(g.nodes, "llama", inputs, outputs, initializer=g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="pollen-slm", producer_version="1")
    model.ir_version = 8
    meta = {k: config[k] for k in CONFIG_KEYS}
    helper.set_model_props(model, {"pollen.llama_config": json.dumps(meta, sort_keys=True)})
    onnx.checker.check_model(model, full_check=False)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return model


def read_llama(path) -> tuple[dict, dict[str, np.ndarray]]:
    """Config and HF-layout weights back from a float model written by build_llama."""
    model = onnx.load(str(path))
    props = {p.key: p.value for p in model.metadata_props}
    config = json.loads(props["pollen.llama_config"])
    weights = {}
    for t in model.graph.initializer:
        if t.name.startswith("const_"):
            continue
        arr = numpy_helper.to_array(t)
        if t.name.endswith(".weight_t"):
            weights[t.name[: -len("_t")]] = arr.T
        else:
            weights[t.name] = arr
    return config, weights


def weight_only_int8(model: onnx.ModelProto) -> onnx.ModelProto:
    """Store every MatMul weight (an initializer [in, out]) as int8 with one float scale
    per output column (symmetric, zero point 0), restored by DequantizeLinear(axis=1)
    before the MatMul. Activations stay float: a runtime may fold the dequantisation into
    float weights at load (tract does), so the file is about 4x smaller and the answers
    nearly the float model's, where dynamic activation quantisation loses more."""
    inits = {i.name: i for i in model.graph.initializer}
    users: dict[str, int] = {}
    for n in model.graph.node:
        for x in n.input:
            users[x] = users.get(x, 0) + 1
    new_nodes = []
    for n in model.graph.node:
        w = n.input[1] if n.op_type == "MatMul" and len(n.input) == 2 else None
        if w in inits and users.get(w) == 1 and len(inits[w].dims) == 2:
            arr = numpy_helper.to_array(inits[w]).astype(np.float32)
            scale = np.abs(arr).max(axis=0) / 127.0
            scale[scale == 0] = 1.0
            q = np.clip(np.rint(arr / scale), -127, 127).astype(np.int8)
            model.graph.initializer.remove(inits[w])
            model.graph.initializer.extend([
                numpy_helper.from_array(q, w + "_q"),
                numpy_helper.from_array(scale.astype(np.float32), w + "_scale"),
            ])
            new_nodes.append(helper.make_node(
                "DequantizeLinear", [w + "_q", w + "_scale"], [w], name=w + "_dequantize", axis=1))
        new_nodes.append(n)
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    return model

