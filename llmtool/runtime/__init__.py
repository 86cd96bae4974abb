"""ONNX Runtime half of llmtool: an export directory to a session that generation and eval drive.

* :mod:`llmtool.runtime.session`: provider choice and ONNX Runtime session settings.
* :mod:`llmtool.runtime.decoders`: the cache, prompt padding and prefill-then-step decoders.
* :mod:`llmtool.runtime.model`: :class:`OnnxCausalLM`, the export loaded with its forward pass.

Names are imported on first use so that importing the package stays cheap for the CLI.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llmtool.runtime.model import OnnxCausalLM
    from llmtool.runtime.session import SessionOptions, create_session, cuda_available

# Public name -> the module that defines it.
_HOMES = {
    "OnnxCausalLM": "llmtool.runtime.model",
    "SessionOptions": "llmtool.runtime.session",
    "create_session": "llmtool.runtime.session",
    "cuda_available": "llmtool.runtime.session",
}
__all__ = ["OnnxCausalLM", "SessionOptions", "create_session", "cuda_available"]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'llmtool.runtime' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
