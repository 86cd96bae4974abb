"""``llmtool eval``: perplexity under a named protocol, fidelity, throughput, reports and the gate.

Entry points: :func:`llmtool.evaluate.run.run_eval` (everything the command does, in order) and
:func:`evaluate_perplexity` (the library call for one model and one corpus).

Modules: ``data`` (documents), ``protocols`` (the one walk: which tokens each pass feeds and
scores), ``metrics`` (pure numpy: NLL, intervals, fidelity figures), ``reference`` (the model
compared with, and the quantization gate), ``perplexity``, ``throughput``, ``record`` and
``schema`` (the ``--json`` record), ``gate`` (against a baseline), ``render`` (tables, Markdown,
plot), ``run``.

Names are imported on first use so that importing the package stays cheap for the CLI.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llmtool.evaluate.perplexity import PerplexityResult, evaluate_perplexity

__all__ = ["PerplexityResult", "evaluate_perplexity"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'llmtool.evaluate' has no attribute {name!r}")
    return getattr(importlib.import_module("llmtool.evaluate.perplexity"), name)
