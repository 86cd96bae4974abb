"""ONNX Runtime half of llmtool: an export directory to a session that generation and eval drive.

* :mod:`llmtool.runtime.model`: :class:`OnnxCausalLM`, provider choice and the forward pass.
* :mod:`llmtool.runtime.decoders`: prefill-then-step decoders over the model's cache.

Names are imported on first use so that importing the package stays cheap for the CLI.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llmtool.runtime.model import OnnxCausalLM, SessionOptions, create_session, cuda_available

__all__ = ["OnnxCausalLM", "SessionOptions", "create_session", "cuda_available"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'llmtool.runtime' has no attribute {name!r}")
    return getattr(importlib.import_module("llmtool.runtime.model"), name)
