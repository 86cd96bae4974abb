"""The ONNX graph of a decoder-only LM with a KV cache, in Optimum's I/O naming.

One graph serves prefill and decode:

  inputs   input_ids [batch, sequence] int64
           attention_mask [batch, total_sequence] int64 (1 = real token, left padding allowed)
           position_ids [batch, sequence] int64
           past_key_values.{i}.key / .value [batch, kv_heads, past_sequence, head_dim]
  outputs  logits [batch, sequence, vocab] float32
           present.{i}.key / .value [batch, kv_heads, total_sequence, head_dim]

where total_sequence = past_sequence + sequence. Weights and the cache are in the export dtype;
norms and softmax run in float32 and logits are always float32.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from onnx import TensorProto

from llmtool.export.blocks import alibi_bias, moe_mlp, rotate_interleaved
from llmtool.export.contract import FLOAT_TYPES, BuiltGraph, GraphIO, WeightFormat, cache_entries
from llmtool.export.graph import GraphBuilder
from llmtool.export.weights import DecoderWeights, LayerWeights

MASK_VALUE = float(np.finfo(np.float32).min)


class DecoderGraph:
    """The standard graph of one :class:`DecoderWeights`; :meth:`build` assembles it.

    Subclasses (the fused graph) override the layer, norm, activation and extra-output hooks.
    """

    layout = "standard"

    def __init__(self, w: DecoderWeights, dtype: str, opset: int, fmt: WeightFormat | None = None):
        self.w = w
        self.fmt = fmt or WeightFormat()
        self.dtype = dtype
        self.np_float, self.onnx_float = FLOAT_TYPES[dtype]
        self.g = GraphBuilder(opset, name=f"llmtool_{w.model_type}")

    # helpers ------------------------------------------------------------------------------
    def weight(self, name: str, array: np.ndarray) -> str:
        # copy=False: fp32 weights are stored as the extractor made them, not copied once more.
        return self.g.weight(name, array.astype(self.np_float, copy=False))

    def optional_weight(self, name: str, array: np.ndarray | None) -> str | None:
        return None if array is None else self.weight(name, array)

    def to_float32(self, x: str) -> str:
        return x if self.dtype == "fp32" else self.g.op("Cast", [x], to=TensorProto.FLOAT)

    def to_model_float(self, x: str) -> str:
        return x if self.dtype == "fp32" else self.g.op("Cast", [x], to=self.onnx_float)

    def linear(
        self, x: str, name: str, w: np.ndarray, b: np.ndarray | None = None, head: bool = False
    ) -> str:
        """x @ w (+ b) for w [in, out], stored as :attr:`fmt` says (int4 heads get 8 bits)."""
        if self.fmt.quantize:
            from llmtool.export.quantize import int4_matmul, int8_matmul

            if self.fmt.quantize == "int8" or head:
                y = int8_matmul(self.g, x, name, w, self.fmt.block_size)
            else:
                y = int4_matmul(self.g, x, name, w, self.fmt.block_size, self.fmt.symmetric)
        else:
            y = self.g.op("MatMul", [x, self.weight(f"{name}.weight", w)])
        bias = self.optional_weight(f"{name}.bias", b)
        return self.g.op("Add", [y, bias]) if bias else y

    def norm(
        self, x: str, name: str, weight: np.ndarray, bias: np.ndarray | None, rms: bool = False
    ) -> str:
        """The model's norm over the last axis (``rms`` forces RMSNorm, as qk-norms are)."""
        g = self.g
        w = self.norm_gain(name, weight)
        eps = self.w.norm_eps
        if self.w.norm == "layer" and not rms:
            b = self.optional_weight(f"{name}.bias", bias)
            return g.op(
                "LayerNormalization",
                [x, w, *([b] if b else [])],
                axis=-1,
                epsilon=eps,
                stash_type=1,
            )
        # RMSNorm in float32, as transformers computes it: x / sqrt(mean(x^2) + eps) * w.
        xf = self.to_float32(x)
        var = g.reduce_mean_last(g.op("Pow", [xf, g.const(2.0, np.float32)]))
        denom = g.op("Sqrt", [g.op("Add", [var, g.const(eps, np.float32)])])
        y = self.to_model_float(g.op("Div", [xf, denom]))
        return g.op("Mul", [y, w])

    def norm_gain(self, name: str, weight: np.ndarray) -> str:
        """A norm's gain as stored: ``offset + w`` for (1 + w) RMSNorms (Gemma), in float32 maths."""
        offset = self.w.norm_weight_offset
        return self.weight(f"{name}.weight", weight + np.float32(offset) if offset else weight)

    def activation(self, h: str, inter: int) -> str:
        """The MLP activation of ``h`` [..., I] (gated: [..., 2*I], gate then up)."""
        g, kind = self.g, self.w.activation
        if kind.endswith("_glu"):  # act(gate) * up
            gate, up = g.split_last(h, [inter, inter])
            return g.op("Mul", [self.plain_activation(gate, kind.removesuffix("_glu")), up])
        return self.plain_activation(h, kind)

    def plain_activation(self, h: str, kind: str) -> str:
        g, f = self.g, self.np_float
        if kind == "silu":
            return g.op("Mul", [h, g.op("Sigmoid", [h])])
        if kind == "relu":
            return g.op("Relu", [h])
        if kind == "gelu":  # 0.5 x (1 + erf(x / sqrt 2))
            inner = g.op("Erf", [g.op("Div", [h, g.const(math.sqrt(2.0), f)])])
        else:  # gelu_tanh: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
            cube = g.op("Mul", [g.op("Pow", [h, g.const(3.0, f)]), g.const(0.044715, f)])
            inner = g.op(
                "Tanh",
                [g.op("Mul", [g.op("Add", [h, cube]), g.const(math.sqrt(2.0 / math.pi), f)])],
            )
        return g.op(
            "Mul", [g.op("Mul", [h, g.const(0.5, f)]), g.op("Add", [inner, g.const(1.0, f)])]
        )

    # graph -----------------------------------------------------------------------------------
    def build(self) -> tuple[GraphBuilder, GraphIO]:
        g, w = self.g, self.w
        g.add_input("input_ids", TensorProto.INT64, ["batch", "sequence"])
        g.add_input("attention_mask", TensorProto.INT64, ["batch", "total_sequence"])
        g.add_input("position_ids", TensorProto.INT64, ["batch", "sequence"])
        cache = self.cache_entries()
        for entry in cache:
            g.add_input(entry["input"], self.onnx_float, entry["shape"])
        ids, positions = self.token_inputs()
        with g.scope("embed"):
            embed = self.weight("embed_tokens.weight", w.embed)
            h = g.op("Gather", [embed, ids], axis=0)  # [B, S, E]
            if w.embed_scale != 1.0:
                h = g.op("Mul", [h, g.const(w.embed_scale, self.np_float)])
            if w.positions is not None:
                pos = self.weight("embed_positions.weight", w.positions)
                h = g.op("Add", [h, g.op("Gather", [pos, positions], axis=0)])
            if w.embed_norm_w is not None:  # BLOOM's word_embeddings_layernorm
                h = self.norm(h, "embed_norm", w.embed_norm_w, w.embed_norm_b)
        h = self.decoder_layers(h)  # final norm applied
        with g.scope("head"):
            logits = self.lm_head(h, embed)
        extra = self.extra_outputs(logits)
        g.add_output(
            self.output_logits(logits),
            "logits",
            TensorProto.FLOAT,
            ["batch", "sequence", w.vocab_size],
        )
        io = GraphIO(
            inputs=["input_ids", "attention_mask", "position_ids", *[c["input"] for c in cache]],
            outputs=["logits", *extra, *[c["output"] for c in cache]],
            cache=cache,
            layout=self.layout,
        )
        order = {name: i for i, name in enumerate(io.outputs)}
        g.outputs.sort(key=lambda value: order[value.name])
        return g, io

    def cache_entries(self) -> list[dict[str, Any]]:
        return cache_entries(self.w.num_layers, self.w.num_kv_heads, self.w.head_dim, self.dtype)

    def token_inputs(self) -> tuple[str, str]:
        """The token ids and positions the layers read (the fused graph reorders padded rows)."""
        return "input_ids", "position_ids"

    def output_logits(self, logits: str) -> str:
        """The ``logits`` output, in the input's token order (see :meth:`token_inputs`)."""
        return logits

    def extra_outputs(self, logits: str) -> list[str]:
        """Outputs besides logits and the cache (none in the standard layout)."""
        return []

    def decoder_layers(self, h: str) -> str:
        g, w = self.g, self.w
        with g.scope("mask"):
            # One additive mask per distinct window (None = full causal), shared by its layers.
            windows = {lw.sliding_window for lw in w.layers}
            masks = {win: self.attention_bias(win) for win in sorted(windows, key=lambda x: x or 0)}
            if w.alibi_slopes is not None:  # [B, H, S, T]: ALiBi is per head
                alibi = alibi_bias(self, w.alibi_slopes)
                masks = {win: g.op("Add", [m, alibi]) for win, m in masks.items()}
        rope = local = None
        if w.rope_cos is not None and w.rope_sin is not None:
            with g.scope("rope"):
                rope = self.gathered_rope("rope", w.rope_cos, w.rope_sin)
                if w.rope_local_cos is not None and w.rope_local_sin is not None:
                    local = self.gathered_rope("rope_local", w.rope_local_cos, w.rope_local_sin)
        for i, layer in enumerate(w.layers):
            with g.scope(f"layers.{i}"):
                layer_rope = local if layer.rope_local and local is not None else rope
                h = self.layer(i, layer, h, masks[layer.sliding_window], layer_rope)
        with g.scope("head"):
            return self.norm(h, "final_norm", w.final_norm_w, w.final_norm_b)

    def gathered_rope(self, name: str, cos: np.ndarray, sin: np.ndarray) -> tuple[str, str]:
        """cos and sin at each position, [B, 1, S, R]: broadcast over heads."""
        g = self.g
        tables = (self.weight(f"{name}.cos", cos), self.weight(f"{name}.sin", sin))
        gathered = [
            g.op("Unsqueeze", [g.op("Gather", [t, "position_ids"], axis=0), g.const([1])])
            for t in tables
        ]
        return gathered[0], gathered[1]

    def lm_head(self, h: str, embed: str) -> str:
        """[B, S, E] normalized hidden states to float32 logits [B, S, V]."""
        g, w = self.g, self.w
        if self.fmt.head_matmul:
            table_t = np.ascontiguousarray((w.lm_head if w.lm_head is not None else w.embed).T)
            logits = self.linear(h, "lm_head", table_t, w.lm_head_b, head=True)  # [B, S, V]
        else:
            head_b = self.optional_weight("lm_head.bias", w.lm_head_b)
            table = self.weight("lm_head.weight", w.lm_head) if w.lm_head is not None else embed
            # Gemm with transB reads the [V, E] table in place, so a tied head costs no copy.
            flat = g.op("Reshape", [h, g.const([-1, w.hidden_size])])
            logits = g.op("Gemm", [flat, table, *([head_b] if head_b else [])], transB=1)
            shape = g.op("Concat", [g.op("Shape", ["input_ids"]), g.const([w.vocab_size])], axis=0)
            logits = g.op("Reshape", [logits, shape])
        logits = self.to_float32(logits)
        if w.logits_scale != 1.0:  # Granite divides by logits_scaling
            logits = g.op("Mul", [logits, g.const(w.logits_scale, np.float32)])
        return self.softcap(logits, w.logits_softcap)

    def attention_bias(self, window: int | None = None) -> str:
        """Additive float32 mask [B, 1, S, T]: 0 where a query may attend, a huge negative elsewhere."""
        g = self.g
        seq = g.op("Gather", [g.op("Shape", ["input_ids"]), g.const(1)], axis=0)  # scalar S
        total = g.op("Gather", [g.op("Shape", ["attention_mask"]), g.const(1)], axis=0)  # scalar T
        past = g.op("Sub", [total, seq])
        one = g.const(1)
        q_pos = g.op("Unsqueeze", [g.op("Range", [past, total, one]), g.const([1])])  # [S, 1]
        k_pos = g.op("Unsqueeze", [g.op("Range", [g.const(0), total, one]), g.const([0])])  # [1, T]
        allowed = g.op("LessOrEqual", [k_pos, q_pos])  # causal [S, T]
        if window:
            lowest = g.op("Sub", [q_pos, g.const(window)])
            allowed = g.op("And", [allowed, g.op("Greater", [k_pos, lowest])])
        allowed = g.op("Unsqueeze", [allowed, g.const([0, 1])])  # [1, 1, S, T]
        pad = g.op("Cast", ["attention_mask"], to=TensorProto.BOOL)
        pad = g.op("Unsqueeze", [pad, g.const([1, 2])])  # [B, 1, 1, T]
        allowed = g.op("And", [allowed, pad])
        return g.op("Where", [allowed, g.const(0.0, np.float32), g.const(MASK_VALUE, np.float32)])

    def layer(
        self, i: int, lw: LayerWeights, h: str, bias: str, rope: tuple[str, str] | None
    ) -> str:
        g, w = self.g, self.w
        heads, kv_heads, d = w.num_heads, w.num_kv_heads, w.head_dim
        x = self.pre_norm(h, f"layers.{i}.norm1", lw.norm1_w, lw.norm1_b)
        qkv = self.linear(x, f"layers.{i}.attn.qkv", lw.qkv_w, lw.qkv_b)
        q, k, v = g.split_last(qkv, [heads * d, kv_heads * d, kv_heads * d])
        full_qk_norm = lw.q_norm_w is not None and lw.k_norm_w is not None
        if full_qk_norm and not lw.qk_norm_per_head:  # over [H*D] (OLMo 2)
            q = self.norm(q, f"layers.{i}.attn.q_norm", lw.q_norm_w, None, rms=True)  # type: ignore[arg-type]
            k = self.norm(k, f"layers.{i}.attn.k_norm", lw.k_norm_w, None, rms=True)  # type: ignore[arg-type]
        # [B, S, n*D] -> [B, n, S, D]
        q = g.op("Transpose", [g.op("Reshape", [q, g.const([0, 0, heads, d])])], perm=[0, 2, 1, 3])
        k = g.op(
            "Transpose", [g.op("Reshape", [k, g.const([0, 0, kv_heads, d])])], perm=[0, 2, 1, 3]
        )
        v = g.op(
            "Transpose", [g.op("Reshape", [v, g.const([0, 0, kv_heads, d])])], perm=[0, 2, 1, 3]
        )
        if full_qk_norm and lw.qk_norm_per_head:  # over each head [D] (Qwen3, Gemma 3)
            q = self.norm(q, f"layers.{i}.attn.q_norm", lw.q_norm_w, None, rms=True)  # type: ignore[arg-type]
            k = self.norm(k, f"layers.{i}.attn.k_norm", lw.k_norm_w, None, rms=True)  # type: ignore[arg-type]
        if rope is not None and lw.use_rope:
            q, k = self.rotate(q, rope), self.rotate(k, rope)
        # [B, KVH, T, D], written straight into the graph outputs.
        k = g.op("Concat", [f"past_key_values.{i}.key", k], axis=2, names=[f"present.{i}.key"])
        v = g.op("Concat", [f"past_key_values.{i}.value", v], axis=2, names=[f"present.{i}.value"])
        g.add_output(
            k, f"present.{i}.key", self.onnx_float, ["batch", kv_heads, "total_sequence", d]
        )
        g.add_output(
            v, f"present.{i}.value", self.onnx_float, ["batch", kv_heads, "total_sequence", d]
        )
        ctx = self.attend(q, k, v, bias, lw.attn_scale)
        o = self.linear(ctx, f"layers.{i}.attn.o", lw.o_w, lw.o_b)
        o = self.pre_norm(o, f"layers.{i}.post_attn_norm", lw.post_attn_norm_w, None)
        if lw.parallel:  # both branches read h: h + attn(norm1(h)) + mlp(norm2(h) or norm1(h))
            x2 = (
                x
                if lw.norm2_w is None
                else self.norm(h, f"layers.{i}.norm2", lw.norm2_w, lw.norm2_b)
            )
            mlp = self.mlp(i, lw, x2)
            return g.op("Add", [g.op("Add", [h, self.scaled(o)]), self.scaled(mlp)])
        h = g.op("Add", [h, self.scaled(o)])
        x = self.pre_norm(h, f"layers.{i}.norm2", lw.norm2_w, lw.norm2_b)
        mlp = self.pre_norm(
            self.mlp(i, lw, x), f"layers.{i}.post_mlp_norm", lw.post_mlp_norm_w, None
        )
        return g.op("Add", [h, self.scaled(mlp)])

    def mlp(self, i: int, lw: LayerWeights, x: str) -> str:
        """The feed-forward branch: a (gated) MLP, or routed experts (MoE)."""
        if lw.moe is not None:
            return moe_mlp(self, f"layers.{i}.moe", lw.moe, x)
        a = self.activation(
            self.linear(x, f"layers.{i}.mlp.up", lw.up_w, lw.up_b), lw.down_w.shape[0]
        )
        return self.linear(a, f"layers.{i}.mlp.down", lw.down_w, lw.down_b)

    def pre_norm(
        self, x: str, name: str, weight: np.ndarray | None, bias: np.ndarray | None
    ) -> str:
        """The norm at one placement, or ``x`` itself where the family has none there."""
        return x if weight is None else self.norm(x, name, weight, bias)

    def softcap(self, x: str, cap: float | None) -> str:
        """cap * tanh(x / cap) in float32 (Gemma 2's attention and logit soft-capping)."""
        if not cap:
            return x
        g = self.g
        c = g.const(cap, np.float32)
        return g.op("Mul", [g.op("Tanh", [g.op("Div", [x, c])]), c])

    def scaled(self, branch: str) -> str:
        """A residual branch times the residual multiplier (Granite), before it is added."""
        if self.w.residual_scale == 1.0:
            return branch
        return self.g.op("Mul", [branch, self.g.const(self.w.residual_scale, self.np_float)])

    def rotate(self, x: str, rope: tuple[str, str]) -> str:
        """x * cos + rotate_half(x) * sin, with rotate_half([x1, x2]) = [-x2, x1].

        With partial rotary only the leading ``rotary_dim`` of each head turn; the rest passes.
        """
        g = self.g
        d = self.w.head_dim
        r = self.w.rotary_dim or d
        passed = None
        if r < d:
            x, passed = g.split_last(x, [r, d - r])
        if self.w.rotary_interleaved:
            rotated = rotate_interleaved(self, x)
        else:
            x1, x2 = g.split_last(x, [r // 2, r // 2])
            rotated = g.op("Concat", [g.op("Neg", [x2]), x1], axis=-1)
        y = g.op("Add", [g.op("Mul", [x, rope[0]]), g.op("Mul", [rotated, rope[1]])])
        return y if passed is None else g.op("Concat", [y, passed], axis=-1)

    def attend(self, q: str, k: str, v: str, bias: str, scale: float) -> str:
        """Scaled dot-product attention; returns [B, S, H*D].

        Grouped-query attention folds the query heads that share a KV head into one axis
        ([B, KVH, rep, S, D] against [B, KVH, 1, T, D]) so the cache is never repeated.
        """
        g, w = self.g, self.w
        heads, kv_heads, d = w.num_heads, w.num_kv_heads, w.head_dim
        rep = heads // kv_heads
        q = g.op("Mul", [q, g.const(scale, self.np_float)])
        k_t = g.op("Transpose", [k], perm=[0, 1, 3, 2])  # [B, KVH, D, T]
        if rep > 1:
            q = g.op("Reshape", [q, g.const([0, kv_heads, rep, -1, d])])
            k_t = g.op("Unsqueeze", [k_t, g.const([2])])
            v = g.op("Unsqueeze", [v, g.const([2])])
            bias = g.op("Unsqueeze", [bias, g.const([1])])
        scores = self.softcap(self.to_float32(g.op("MatMul", [q, k_t])), w.attn_softcap)
        probs = self.to_model_float(g.op("Softmax", [g.op("Add", [scores, bias])], axis=-1))
        ctx = g.op("MatMul", [probs, v])
        if rep > 1:
            ctx = g.op("Reshape", [ctx, g.const([0, heads, -1, d])])
        ctx = g.op("Transpose", [ctx], perm=[0, 2, 1, 3])  # [B, S, H, D]
        return g.op("Reshape", [ctx, g.const([0, 0, heads * d])])


def build_decoder_graph(
    weights: DecoderWeights, dtype: str, opset: int, fmt: WeightFormat | None = None
) -> tuple[GraphBuilder, GraphIO]:
    """Build the KV-cache decoder graph for ``weights``.

    Args:
        weights: The model in neutral form (see :mod:`llmtool.export.weights`).
        dtype: ``fp32`` or ``fp16`` for weights, activations and cache.
        opset: ONNX default-domain opset (17 or newer).
        fmt: How linear weights are stored (float by default; int4 blocks when quantizing).
    """
    return DecoderGraph(weights, dtype, opset, fmt).build()


def build_decoder(
    weights: DecoderWeights, dtype: str, opset: int, fmt: WeightFormat | None = None
) -> BuiltGraph:
    """The standard graph with its manifest metadata: the registry's builder for decoders."""
    return BuiltGraph(*build_decoder_graph(weights, dtype, opset, fmt), weights.manifest_meta())
