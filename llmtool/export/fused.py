"""The fused decoder graph: ONNX Runtime contrib ops for fast decoding (CUDA fp16, and CPU).

Same input and output names as the standard graph (:mod:`llmtool.export.transformer`), plus two
outputs that keep sampling on the device:

  last_logits [batch, vocab] float32   logits at each row's last real token
  next_token  [batch] int64            argmax of last_logits (greedy)

The next-token subgraph (``extra_outputs``) picks each row's last real position on the device::

    attention_mask ─ReduceSum─► length [B] ─(-1)─► length_last ────────────┐
    input_ids ─Shape─ConstantOfShape─ReduceSum─► S [B] ─(-1)─► chunk_last ─┴─Less, Where─► last [B]
    logits [B, S, V] ─GatherElements(last, axis 1)─► last_logits [B, V] ─ArgMax─► next_token [B]

(``length_last < chunk_last`` only in a right-padded prefill; a decode step has S = 1, so
position 0.)

Differences in contract, recorded in llmtool.json as ``"layout": "fused"``:

* ``GroupQueryAttention`` needs **right-padded** rows: it derives each row's length
  (``seqlens_k = sum(mask) - 1``) and the rotary positions from the mask, so llama-family graphs
  take no ``position_ids`` (GPT-2 keeps them for its learned positions). Left-padded rows (as
  Optimum and transformers batch) are accepted too: ``token_inputs`` rotates each row by its
  leading pad count, read from the chunk's own mask columns, so the real tokens come first, and
  ``output_logits`` rotates ``logits`` back (``next_token`` reads the rotated ones)::

      mask[:, -S:] ─Cast─ArgMax─► lead [B, 1]
      input_ids ─GatherElements((j + lead) mod S)─► packed ids ─► layers ─► packed logits
      packed logits [B*S, V] ─Gather(b*S + (j - lead) mod S)─► logits [B, S, V]

  A right-padded row, and every decode step (S = 1), is rotated by 0.
* The cache may be a preallocated buffer [batch, kv_heads, max_length, head_dim] bound as both
  ``past_key_values.*`` and ``present.*``: GroupQueryAttention then writes the new keys and values
  in place, so decode steps have fixed shapes, allocate nothing and can be captured as a CUDA
  graph. Fed back like the standard cache (present grows by one), it works too.

Each layer is: [Skip]SimplifiedLayerNormalization (residual add fused), one MatMul for q, k and
v, GroupQueryAttention (rotary fused), MatMul, SkipSimplifiedLayerNormalization, one MatMul for
gate and up, SiLU·up (ORT fuses SiLU), MatMul. GPT-2 uses the LayerNorm counterparts and FastGelu.
GroupQueryAttention runs on CUDA in fp16 only; fp32 fused graphs are for the CPU.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from llmtool.errors import UsageError
from llmtool.export.contract import MS_DOMAIN, BuiltGraph, GraphIO, WeightFormat
from llmtool.export.graph import GraphBuilder
from llmtool.export.transformer import DecoderGraph
from llmtool.export.weights import DecoderWeights, LayerWeights


class _FusedDecoderGraph(DecoderGraph):
    layout = "fused"

    def __init__(
        self, w: DecoderWeights, dtype: str, opset: int, fmt: WeightFormat | None = None
    ) -> None:
        super().__init__(w, dtype, opset, fmt)
        rotary = w.rotary_dim or w.head_dim
        if rotary % 16 and w.rope_cos is not None:
            raise UsageError(
                f"--fused needs a rotary dimension divisible by 16 (GroupQueryAttention's rotary "
                f"kernel); this model rotates {rotary} of {w.head_dim} head dims",
                "export without --fused.",
            )

    def build(self) -> tuple[GraphBuilder, GraphIO]:
        g, io = super().build()
        if self.w.positions is None:
            # Llama-family graphs read positions from the mask; drop the unused input.
            g.inputs = [i for i in g.inputs if i.name != "position_ids"]
            io.inputs.remove("position_ids")
        return g, io

    def token_inputs(self) -> tuple[str, str]:
        """Left-padded rows rotated into the right-padded order GroupQueryAttention needs."""
        g = self.g
        with g.scope("left_padding"):
            shape = g.op("Shape", ["input_ids"])
            ones = g.op("ConstantOfShape", [shape], value=_int64_tensor(1))  # [B, S]
            column = g.op("Sub", [g.op("CumSum", [ones, g.const(1)]), g.const(1)])  # [B, S] j
            row = g.op("Sub", [g.op("CumSum", [ones, g.const(0)]), g.const(1)])  # [B, S] b
            seq = g.op("ReduceSum", [ones, g.const([1])], keepdims=1)  # [B, 1], every entry S
            # The chunk's own mask columns (the last S); its first 1 is the row's left padding.
            start = g.op("Neg", [g.op("Slice", [shape, g.const([1]), g.const([2])])])  # [1] -S
            chunk = g.op("Slice", ["attention_mask", start, g.const([_INT64_MAX]), g.const([1])])
            chunk = g.op("Cast", [chunk], to=TensorProto.FLOAT)
            lead = g.op("ArgMax", [chunk], axis=1, keepdims=1)  # [B, 1] leading pad columns
            # packed[b, j] = ids[b, (j + lead_b) mod S]: real tokens first, pads after them.
            source = g.op("Mod", [g.op("Add", [column, lead]), seq])
            ids = g.op("GatherElements", ["input_ids", source], axis=1)
            positions = "position_ids"
            if self.w.positions is not None:
                positions = g.op("GatherElements", ["position_ids", source], axis=1)
            # logits[b, j] = packed_logits[b, (j - lead_b) mod S], as rows of [B*S, V].
            back = g.op("Mod", [g.op("Add", [g.op("Sub", [column, lead]), seq]), seq])
            self.unpack_index = g.op("Add", [g.op("Mul", [row, seq]), back])  # [B, S]
        return ids, positions

    def output_logits(self, logits: str) -> str:
        g = self.g
        with g.scope("left_padding"):
            rows = g.op("Reshape", [logits, g.const([-1, self.w.vocab_size])])  # [B*S, V]
            return g.op("Gather", [rows, self.unpack_index], axis=0)  # [B, S, V]

    def extra_outputs(self, logits: str) -> list[str]:
        # ``logits`` are in packed (right-padded) order, where the last real token is at
        # length - 1 in a prefill.
        g, w = self.g, self.w
        with g.scope("next_token"):
            # Row lengths computed on the device: a shape-derived scalar (on the host in ORT)
            # feeding device math would need a copy and forbid CUDA graph capture.
            ones = g.op("ConstantOfShape", [g.op("Shape", ["input_ids"])], value=_int64_tensor(1))
            seq = g.op("ReduceSum", [ones, g.const([1])], keepdims=0)  # [B], every entry S
            # Last real token: length - 1 in a right-padded prompt, position 0 in a decode step.
            length_last = g.op("Sub", [self.mask_sum, g.const(1)])
            chunk_last = g.op("Sub", [seq, g.const(1)])
            use_length = g.op("Less", [length_last, chunk_last])
            last = g.op("Where", [use_length, length_last, chunk_last])
            index = g.op(
                "Expand",
                [g.op("Unsqueeze", [last, g.const([1, 2])]), g.const([1, 1, w.vocab_size])],
            )
            last_logits = g.op("GatherElements", [logits, index], axis=1)  # [B, 1, V]
            last_logits = g.op("Squeeze", [last_logits, g.const([1])], names=["last_logits"])
            g.op("ArgMax", [last_logits], axis=-1, keepdims=0, names=["next_token"])
        g.add_output("last_logits", "last_logits", TensorProto.FLOAT, ["batch", w.vocab_size])
        g.add_output("next_token", "next_token", TensorProto.INT64, ["batch"])
        return ["last_logits", "next_token"]

    def norm_op(
        self, x: str, skip: str | None, name: str, weight: np.ndarray, bias: np.ndarray | None
    ) -> tuple[str, str]:
        """Normalize ``x + skip``; returns (normalized, x + skip)."""
        g = self.g
        w = self.norm_gain(name, weight)
        eps = self.w.norm_eps
        rms = self.w.norm == "rms"
        if skip is None:
            if rms:
                y = g.op("SimplifiedLayerNormalization", [x, w], axis=-1, epsilon=eps, stash_type=1)
            else:
                b = self.weight(f"{name}.bias", bias if bias is not None else np.zeros_like(weight))
                y = g.op("LayerNormalization", [x, w, b], axis=-1, epsilon=eps, stash_type=1)
            return y, x
        base = g.fresh_name("SkipNorm")
        names = [f"{base}/out", "", "", f"{base}/sum"]
        if rms:
            y, _, _, total = g.op(
                "SkipSimplifiedLayerNormalization",
                [x, skip, w],
                domain=MS_DOMAIN,
                names=names,
                epsilon=eps,
            )
        else:
            b = self.weight(f"{name}.bias", bias if bias is not None else np.zeros_like(weight))
            y, _, _, total = g.op(
                "SkipLayerNormalization",
                [x, skip, w, b],
                domain=MS_DOMAIN,
                names=names,
                epsilon=eps,
            )
        return y, total

    def decoder_layers(self, h: str) -> str:
        g, w = self.g, self.w
        with g.scope("lengths"):
            self.mask_sum = g.op("ReduceSum", ["attention_mask", g.const([1])], keepdims=0)  # [B]
            self.seqlens_k = g.op(
                "Cast", [g.op("Sub", [self.mask_sum, g.const(1)])], to=TensorProto.INT32
            )
            total = g.op("Gather", [g.op("Shape", ["attention_mask"]), g.const(1)], axis=0)
            self.total_length = g.op(
                "Cast", [total], to=TensorProto.INT32
            )  # scalar, read on the host
        self.rope_caches: list[str] = ["", ""]
        if w.rope_cos is not None and w.rope_sin is not None:
            self.rope_caches = self.rope_cache("rope", w.rope_cos, w.rope_sin)
        self.local_caches = self.rope_caches
        if w.rope_local_cos is not None and w.rope_local_sin is not None:
            self.local_caches = self.rope_cache("rope_local", w.rope_local_cos, w.rope_local_sin)
        residual, pending = h, None
        for i, layer in enumerate(w.layers):
            with g.scope(f"layers.{i}"):
                residual, pending = self.fused_layer(i, layer, residual, pending)
        with g.scope("head"):
            y, _ = self.norm_op(residual, pending, "final_norm", w.final_norm_w, w.final_norm_b)
        return y

    def rope_cache(self, name: str, cos: np.ndarray, sin: np.ndarray) -> list[str]:
        """GroupQueryAttention's [P, R/2] cos / sin caches: one entry per frequency.

        transformers' tables repeat each frequency, in both halves (rotate_half) or in adjacent
        columns (interleaved pairs, GPT-J / Cohere).
        """
        half = cos.shape[1] // 2
        pick = slice(0, None, 2) if self.w.rotary_interleaved else slice(0, half)
        return [
            self.weight(f"{name}.cos_cache", np.ascontiguousarray(cos[:, pick])),
            self.weight(f"{name}.sin_cache", np.ascontiguousarray(sin[:, pick])),
        ]

    def fused_layer(
        self, i: int, lw: LayerWeights, residual: str, pending: str | None
    ) -> tuple[str, str]:
        g, w = self.g, self.w
        x, residual = self.placed_norm(
            residual, pending, f"layers.{i}.norm1", lw.norm1_w, lw.norm1_b
        )
        qkv = self.linear(x, f"layers.{i}.attn.qkv", lw.qkv_w, lw.qkv_b)
        qkv_inputs = [qkv, "", ""]  # packed q, k, v
        if lw.q_norm_w is not None and lw.k_norm_w is not None:
            qkv_inputs = self.qk_normed(i, lw, qkv)
        rotary = w.rope_cos is not None and lw.use_rope
        window = lw.sliding_window or 0
        attn = g.op(
            "GroupQueryAttention",
            [
                *qkv_inputs,
                f"past_key_values.{i}.key",
                f"past_key_values.{i}.value",
                self.seqlens_k,
                self.total_length,
                *((self.local_caches if lw.rope_local else self.rope_caches) if rotary else []),
            ],
            domain=MS_DOMAIN,
            names=[g.fresh_name("gqa") + "/out", f"present.{i}.key", f"present.{i}.value"],
            num_heads=w.num_heads,
            kv_num_heads=w.num_kv_heads,
            scale=float(lw.attn_scale),
            do_rotary=int(rotary),
            rotary_interleaved=int(w.rotary_interleaved),
            local_window_size=window if window else -1,
            softcap=float(w.attn_softcap or 0.0),
        )[0]
        present_shape: list[int | str] = ["batch", w.num_kv_heads, "total_sequence", w.head_dim]
        g.add_output(f"present.{i}.key", f"present.{i}.key", self.onnx_float, present_shape)
        g.add_output(f"present.{i}.value", f"present.{i}.value", self.onnx_float, present_shape)
        o = self.linear(attn, f"layers.{i}.attn.o", lw.o_w, lw.o_b)
        o = self.pre_norm(o, f"layers.{i}.post_attn_norm", lw.post_attn_norm_w, None)
        if lw.parallel:  # the next norm's skip input is attn + mlp, both read from this residual
            x2 = (
                x
                if lw.norm2_w is None
                else self.pre_norm(residual, f"layers.{i}.norm2", lw.norm2_w, lw.norm2_b)
            )
            return residual, self.g.op("Add", [self.scaled(o), self.scaled(self.mlp(i, lw, x2))])
        x, residual = self.placed_norm(
            residual, self.scaled(o), f"layers.{i}.norm2", lw.norm2_w, lw.norm2_b
        )
        mlp = self.pre_norm(
            self.mlp(i, lw, x), f"layers.{i}.post_mlp_norm", lw.post_mlp_norm_w, None
        )
        return residual, self.scaled(mlp)

    def placed_norm(
        self, x: str, skip: str | None, name: str, weight: np.ndarray | None, b: np.ndarray | None
    ) -> tuple[str, str]:
        """:meth:`norm_op`, or the bare residual sum where the family has no norm there."""
        if weight is not None:
            return self.norm_op(x, skip, name, weight, b)
        total = x if skip is None else self.g.op("Add", [x, skip])
        return total, total

    def pre_norm(
        self, x: str, name: str, weight: np.ndarray | None, bias: np.ndarray | None
    ) -> str:
        return x if weight is None else self.norm_op(x, None, name, weight, bias)[0]

    def qk_normed(self, i: int, lw: LayerWeights, qkv: str) -> list[str]:
        """Separate q, k, v [B, S, n*D] with q and k RMS-normalized (qk-norm).

        Per head (Qwen3, Gemma 3) or over the whole projection (OLMo 2).
        """
        g, w = self.g, self.w
        d = w.head_dim
        q, k, v = g.split_last(qkv, [w.num_heads * d, w.num_kv_heads * d, w.num_kv_heads * d])
        out = []
        for name, x, weight in (("q_norm", q, lw.q_norm_w), ("k_norm", k, lw.k_norm_w)):
            assert weight is not None
            heads = g.op("Reshape", [x, g.const([0, 0, -1, d])]) if lw.qk_norm_per_head else x
            normed = g.op(
                "SimplifiedLayerNormalization",
                [heads, self.norm_gain(f"layers.{i}.attn.{name}", weight)],
                axis=-1,
                epsilon=w.norm_eps,
                stash_type=1,
            )
            out.append(g.op("Reshape", [normed, g.const([0, 0, -1])]))
        return [*out, v]

    def activation(self, h: str, inter: int) -> str:
        if self.w.activation == "gelu_tanh":
            return self.g.op("FastGelu", [h], domain=MS_DOMAIN)
        return super().activation(h, inter)


_INT64_MAX = int(np.iinfo(np.int64).max)


def _int64_tensor(value: int) -> TensorProto:
    return helper.make_tensor("value", TensorProto.INT64, [1], [value])


def build_fused_graph(
    weights: DecoderWeights, dtype: str, opset: int, fmt: WeightFormat | None = None
) -> tuple[GraphBuilder, GraphIO]:
    """Build the fused (contrib-op) decoder graph for ``weights``; see the module docstring."""
    return _FusedDecoderGraph(weights, dtype, opset, fmt).build()


def build_fused(
    weights: DecoderWeights, dtype: str, opset: int, fmt: WeightFormat | None = None
) -> BuiltGraph:
    """The fused graph with its manifest metadata: the registry's fused builder for decoders."""
    return BuiltGraph(*build_fused_graph(weights, dtype, opset, fmt), weights.manifest_meta())
