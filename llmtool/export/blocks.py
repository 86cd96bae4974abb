"""Graph blocks some families add to the decoder: routed experts (MoE), ALiBi, interleaved rotary.

Each is a function over a :class:`~llmtool.export.transformer.DecoderGraph` (its builder ``g``,
its weights ``w`` and its ``linear`` / ``activation`` helpers), so the standard and the fused
graph share them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from onnx import TensorProto

from llmtool.export.weights import MoeWeights

# ``graph`` below is a DecoderGraph (llmtool.export.transformer), typed Any because that module
# imports this one.
DecoderGraph = Any


def moe_mlp(graph: DecoderGraph, name: str, moe: MoeWeights, x: str) -> str:
    """Top-k routed experts over ``x`` [B, S, E], as transformers' sparse MoE blocks compute it.

    The router's softmax runs in float32 over all experts; TopK keeps k of them (renormalized
    when ``moe.normalize``); ScatterElements writes those k weights into a dense [B, S, n] tensor
    that is zero elsewhere. Every expert then runs on every token and the outputs are summed with
    those weights: a zero weight removes an expert exactly, so the result equals the sparse
    dispatch without data-dependent shapes (a cost of n / k times the expert FLOPs).
    """
    g = graph.g
    n = len(moe.up_w)
    # The router stays in float weights (routing decisions are precision-sensitive).
    logits = graph.to_float32(g.op("MatMul", [x, graph.weight(f"{name}.router", moe.router_w)]))
    probs = g.op("Softmax", [logits], axis=-1)  # [B, S, n] float32
    top, index = g.op("TopK", [probs, g.const([moe.top_k])], outputs=2, axis=-1)  # [B, S, k]
    if moe.normalize:
        top = g.op("Div", [top, g.op("ReduceSum", [top, g.const([-1])], keepdims=1)])
    zeros = g.op("Mul", [probs, g.const(0.0, np.float32)])
    dense = graph.to_model_float(g.op("ScatterElements", [zeros, index, top], axis=-1))
    out = None
    for e in range(n):
        up = graph.linear(x, f"{name}.experts.{e}.up", moe.up_w[e])
        act = graph.activation(up, moe.down_w[e].shape[0])
        y = graph.linear(act, f"{name}.experts.{e}.down", moe.down_w[e])
        weight = g.op("Slice", [dense, g.const([e]), g.const([e + 1]), g.const([-1])])  # [B, S, 1]
        y = g.op("Mul", [y, weight])
        out = y if out is None else g.op("Add", [out, y])
    assert out is not None
    return out


def alibi_bias(graph: DecoderGraph, slopes: np.ndarray) -> str:
    """ALiBi's additive float32 bias [1, H, 1, T]: slope_h * key position.

    BLOOM adds slope_h * (key's position among the row's real tokens); the two differ by a
    per-row constant, which softmax ignores, so key indices (left padding included) are exact.
    """
    g = graph.g
    total = g.op("Gather", [g.op("Shape", ["attention_mask"]), g.const(1)], axis=0)  # scalar T
    k_pos = g.op("Cast", [g.op("Range", [g.const(0), total, g.const(1)])], to=TensorProto.FLOAT)
    k_pos = g.op("Unsqueeze", [k_pos, g.const([0, 1, 2])])  # [1, 1, 1, T]
    table = g.const(slopes.astype(np.float32).reshape(1, -1, 1, 1), np.float32)  # [1, H, 1, 1]
    return g.op("Mul", [table, k_pos])


def rotate_interleaved(graph: DecoderGraph, x: str) -> str:
    """GPT-J / Cohere's rotate_every_two on [..., R]: pairs (x0, x1) -> (-x1, x0)."""
    g = graph.g
    r = graph.w.rotary_dim or graph.w.head_dim
    pairs = g.op("Reshape", [x, g.const([0, 0, 0, r // 2, 2])])  # [B, n, S, R/2, 2]
    even, odd = g.split_last(pairs, [1, 1])
    rotated = g.op("Concat", [g.op("Neg", [odd]), even], axis=-1)
    return g.op("Reshape", [rotated, g.const([0, 0, 0, r])])
