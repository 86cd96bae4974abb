"""``llmtool train``: a small causal LM trained on the user's text, ready for ``llmtool export``.

:func:`train_model` (:mod:`llmtool.train.loop`) takes a :class:`TrainOptions`
(:mod:`llmtool.train.options`), reads the corpus (:mod:`llmtool.train.data`), trains or loads a
tokenizer (:mod:`llmtool.train.tokenizer`), builds a Transformer (transformers' Llama or GPT-2)
or a recurrent baseline (:mod:`llmtool.models.recurrent`) from a named preset
(:mod:`llmtool.train.presets`), and runs the training loop with resumable checkpoints
(:mod:`llmtool.train.checkpoint`); :mod:`llmtool.train.metrics` writes what it reports.

The names below are imported on first use: ``import llmtool.train`` and :class:`TrainOptions`
come without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llmtool.train.loop import train_model
    from llmtool.train.metrics import TrainProgress, TrainResult
    from llmtool.train.options import TrainOptions
    from llmtool.train.presets import ARCHS, PRESETS

__all__ = ["ARCHS", "PRESETS", "TrainOptions", "TrainProgress", "TrainResult", "train_model"]
_MODULES = {
    "TrainOptions": "options",
    "TrainProgress": "metrics",
    "TrainResult": "metrics",
    "train_model": "loop",
    "ARCHS": "presets",
    "PRESETS": "presets",
}


def __getattr__(name: str) -> Any:
    if name not in _MODULES:
        raise AttributeError(f"module 'llmtool.train' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"llmtool.train.{_MODULES[name]}"), name)
