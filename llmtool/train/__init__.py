"""``llmtool train``: a small causal LM trained on the user's text, ready for ``llmtool export``.

:func:`train_model` reads the corpus (:mod:`llmtool.train.data`), trains or loads a tokenizer,
builds a Transformer (transformers' Llama or GPT-2) or a recurrent baseline
(:mod:`llmtool.models.recurrent`) from a named preset (:mod:`llmtool.train.presets`), and runs the
training loop with resumable checkpoints (:mod:`llmtool.train.loop`).

The names below are imported on first use, so that :mod:`llmtool.models.recurrent_config` (what
loading and the runtime need) comes without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llmtool.train.loop import TrainOptions, TrainProgress, TrainResult, train_model
    from llmtool.train.presets import ARCHS, PRESETS

__all__ = ["ARCHS", "PRESETS", "TrainOptions", "TrainProgress", "TrainResult", "train_model"]
_MODULES = {
    "TrainOptions": "loop",
    "TrainProgress": "loop",
    "TrainResult": "loop",
    "train_model": "loop",
    "ARCHS": "presets",
    "PRESETS": "presets",
}


def __getattr__(name: str) -> Any:
    if name not in _MODULES:
        raise AttributeError(f"module 'llmtool.train' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"llmtool.train.{_MODULES[name]}"), name)
