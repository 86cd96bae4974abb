"""What a graph builder hands the export pipeline, and the runtime reads back from llmtool.json.

A builder returns a :class:`BuiltGraph`: the ONNX graph, its :class:`GraphIO` (input and output
names, the cache entries of the manifest) and the manifest's metadata. :class:`GraphOptions`
and :class:`WeightFormat` select the variant; :data:`FLOAT_TYPES` maps the export dtype to numpy
and ONNX element types; :data:`MS_DOMAIN` is the op domain of ONNX Runtime's contrib ops.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from onnx import TensorProto

from llmtool import defaults

if TYPE_CHECKING:
    from llmtool.export.graph import GraphBuilder

# ONNX Runtime's contrib ops (GroupQueryAttention, Skip*LayerNormalization, MatMulNBits, ...).
MS_DOMAIN = "com.microsoft"

# Export dtype -> (numpy type, ONNX element type) of weights, activations and the KV cache.
FLOAT_TYPES = {"fp32": (np.float32, TensorProto.FLOAT), "fp16": (np.float16, TensorProto.FLOAT16)}


@dataclass
class GraphIO:
    """What the runtime needs to drive a graph: its I/O names and the cache layout."""

    inputs: list[str]
    outputs: list[str]
    cache: list[dict[str, Any]]
    layout: str = "standard"  # "standard": left padding, growing cache; "fused": see fused.py


@dataclass
class BuiltGraph:
    """An ONNX graph ready to save, with what the manifest records about it.

    Attributes:
        graph: The graph and its weights.
        io: Input/output names and the cache layout.
        meta: Manifest fields: ``architecture``, ``model_type``, ``num_layers``, ``vocab_size``,
            ``max_positions`` (None when unbounded) and family-specific sizes.
    """

    graph: GraphBuilder
    io: GraphIO
    meta: dict[str, Any]


@dataclass(frozen=True)
class WeightFormat:
    """How linear-layer weights are stored in the graph.

    Attributes:
        quantize: None (the export dtype), ``int8`` or ``int4`` blocks (``MatMulNBits``), see
            :mod:`llmtool.export.quantize`.
        block_size: Quantization block length along the input dimension.
        symmetric: int4 without zero points (faster, less exact).
        head_matmul: The LM head as its own [E, V] MatMul instead of a Gemm on the embedding,
            so it can be quantized (set for every quantized export).
    """

    quantize: str | None = None
    block_size: int = defaults.QUANT_BLOCK_SIZE
    symmetric: bool = False
    head_matmul: bool = False


@dataclass(frozen=True)
class GraphOptions:
    """Variants of a graph.

    Attributes:
        fused: ONNX Runtime's contrib-op layout (see :mod:`llmtool.export.fused`).
        weights: How linear weights are stored (float, or int4 blocks with an untied head).
    """

    fused: bool = False
    weights: WeightFormat = field(default_factory=WeightFormat)


def cache_entries(
    num_layers: int, kv_heads: int, head_dim: int, dtype: str
) -> list[dict[str, Any]]:
    """The manifest's description of a KV cache: one entry per fed-back tensor.

    Args:
        num_layers: Decoder layers (two entries each: key and value).
        kv_heads: Key/value heads.
        head_dim: Size of one head.
        dtype: The export dtype (``fp32`` or ``fp16``), which the cache is stored in.
    """
    return [
        {
            "input": f"past_key_values.{i}.{kind}",
            "output": f"present.{i}.{kind}",
            "shape": ["batch", kv_heads, "past_sequence", head_dim],
            "dtype": "float16" if dtype == "fp16" else "float32",
            "sequence_axis": 2,
        }
        for i in range(num_layers)
        for kind in ("key", "value")
    ]


def state_cache_entries(
    num_layers: int, hidden_size: int, state_names: tuple[str, ...]
) -> list[dict[str, Any]]:
    """The manifest's description of a recurrent state: one fixed-size float32 entry per tensor.

    Args:
        num_layers: Recurrent layers.
        hidden_size: Width of each state tensor.
        state_names: ``("h",)`` for an RNN, ``("h", "c")`` for an LSTM.
    """
    return [
        {
            "input": f"past_state.{i}.{name}",
            "output": f"present_state.{i}.{name}",
            "shape": ["batch", hidden_size],
            "dtype": "float32",
            "sequence_axis": None,
        }
        for i in range(num_layers)
        for name in state_names
    ]
