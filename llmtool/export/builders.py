"""Which graph builder exports which ``config.model_type``: the one registry of architectures.

A builder takes the PyTorch model and returns a :class:`BuiltGraph`: the ONNX graph, the I/O
description the runtime reads from llmtool.json, and manifest metadata. Transformer decoders
go through :mod:`llmtool.export.architectures` + :mod:`llmtool.export.transformer`; another family
registers its own builder here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llmtool.errors import UsageError
from llmtool.export.graph import GraphBuilder
from llmtool.export.transformer import GraphIO, WeightFormat


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
class GraphOptions:
    """Variants of a graph.

    Attributes:
        fused: ONNX Runtime's contrib-op layout (see :mod:`llmtool.export.fused`).
        weights: How linear weights are stored (float, or int4 blocks with an untied head).
    """

    fused: bool = False
    weights: WeightFormat = field(default_factory=WeightFormat)


Builder = Callable[[Any, str, int, GraphOptions], BuiltGraph]


def build_transformer(model: Any, dtype: str, opset: int, options: GraphOptions) -> BuiltGraph:
    """GPT-2 and Llama-family models through the neutral decoder description."""
    from llmtool.export.architectures import extract
    from llmtool.export.fused import build_fused_graph
    from llmtool.export.transformer import build_decoder_graph

    w = extract(model)
    build = build_fused_graph if options.fused else build_decoder_graph
    graph, io = build(w, dtype, opset, options.weights)
    meta = {
        "architecture": w.arch,
        "model_type": w.model_type,
        "num_layers": w.num_layers,
        "num_heads": w.num_heads,
        "num_kv_heads": w.num_kv_heads,
        "head_dim": w.head_dim,
        "hidden_size": w.hidden_size,
        "vocab_size": w.vocab_size,
        "max_positions": w.max_positions,
    }
    return BuiltGraph(graph, io, meta)


def build_recurrent(model: Any, dtype: str, opset: int, options: GraphOptions) -> BuiltGraph:
    """LSTM and Elman RNN models from ``llmtool train``: the recurrent state is the cache."""
    from llmtool.export.recurrent import build_recurrent_graph

    return build_recurrent_graph(model, dtype, opset)


BUILDERS: dict[str, Builder] = {
    "llama": build_transformer,
    "mistral": build_transformer,
    "qwen2": build_transformer,
    "gpt2": build_transformer,
    # llmtool.models.recurrent_config.LSTM_TYPE / RNN_TYPE.
    "llmtool_lstm": build_recurrent,
    "llmtool_rnn": build_recurrent,
}
# Model types with a fused graph (``export --fused``).
FUSED_TYPES = frozenset({"llama", "mistral", "qwen2", "gpt2"})


def supported_model_types() -> list[str]:
    """The ``config.model_type`` values export accepts."""
    return sorted(BUILDERS)


def check_supported(config: Any) -> None:
    """Raise a :class:`UsageError` naming the supported architectures if ``config`` is not one."""
    model_type = getattr(config, "model_type", None)
    if model_type not in BUILDERS:
        raise UsageError(
            f"Architecture '{model_type}' is not supported",
            f"llmtool exports {', '.join(supported_model_types())}.",
        )


def build_graph(
    model: Any, dtype: str, opset: int, options: GraphOptions | None = None
) -> BuiltGraph:
    """Build the ONNX graph for a loaded PyTorch model."""
    options = options or GraphOptions()
    check_supported(model.config)
    model_type = model.config.model_type
    if options.fused and model_type not in FUSED_TYPES:
        raise UsageError(
            f"--fused is not available for '{model_type}'",
            f"it supports {', '.join(sorted(FUSED_TYPES))}; export without --fused.",
        )
    return BUILDERS[model_type](model, dtype, opset, options)
