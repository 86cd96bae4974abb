"""``llmtool export``: a model spec to a validated ONNX directory.

:func:`export_model` (:mod:`llmtool.export.pipeline`) is the entry point. The other modules build
graphs:

* ``registry``: one entry per ``config.model_type`` (extractor, graph builders, fused?,
  quantizable?), :func:`~llmtool.export.registry.check_supported`, ``build_graph``;
* ``contract``: what a builder returns (``BuiltGraph``, ``GraphIO``, the cache entries of
  llmtool.json), ``GraphOptions``, ``WeightFormat``, dtype and op-domain constants;
* ``weights`` (the neutral ``DecoderWeights``) and ``extractors`` (transformers model → it);
* ``transformer`` (the standard KV-cache graph), ``fused`` (contrib ops), ``recurrent`` (LSTM /
  RNN), on the small ``graph`` builder; ``quantize`` (int8 / int4 blocks); ``validate``.

Names are imported on first use so that building a graph does not import the pipeline.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llmtool.export.pipeline import ExportResult, export_model

__all__ = ["ExportResult", "export_model"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'llmtool.export' has no attribute {name!r}")
    return getattr(importlib.import_module("llmtool.export.pipeline"), name)
