"""Which graph builder exports which ``config.model_type``: the one registry of architectures.

A builder takes the PyTorch model and returns a :class:`BuiltGraph`: the ONNX graph, the I/O
description the runtime reads from llmtool.json, and manifest metadata. Transformer decoders
go through :mod:`llmtool.export.architectures` + :mod:`llmtool.export.decoder`; another family
registers its own builder here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llmtool.errors import UsageError
from llmtool.export.decoder import GraphIO
from llmtool.export.graph import GraphBuilder


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


Builder = Callable[[Any, str, int], BuiltGraph]


def build_transformer(model: Any, dtype: str, opset: int) -> BuiltGraph:
    """GPT-2 and Llama-family models through the neutral decoder description."""
    from llmtool.export.architectures import extract
    from llmtool.export.decoder import build_decoder_graph

    w = extract(model)
    graph, io = build_decoder_graph(w, dtype, opset)
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


BUILDERS: dict[str, Builder] = {
    "llama": build_transformer,
    "mistral": build_transformer,
    "qwen2": build_transformer,
    "gpt2": build_transformer,
}


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


def build_graph(model: Any, dtype: str, opset: int) -> BuiltGraph:
    """Build the ONNX graph for a loaded PyTorch model."""
    check_supported(model.config)
    return BUILDERS[model.config.model_type](model, dtype, opset)
