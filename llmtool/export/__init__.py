"""``llmtool export``: a model spec to a validated ONNX directory.

:func:`export_model` (:mod:`llmtool.export.pipeline`) is the entry point. The other modules build
graphs: the registry of architectures, the neutral decoder description and its extractors, the
standard, fused and recurrent graph builders, quantization, and validation against PyTorch.

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
