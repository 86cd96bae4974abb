"""Structured output: a token mask per step from a JSON schema or a regex, by llguidance.

llguidance compiles the grammar against the export's tokenizer (its Hugging Face tokenizers
adapter) and, per row and step, fills a [ceil(vocab / 32)] int32 bitmask of the tokens that keep
the text inside the grammar; masked logits become ``-inf`` before any sampling. Once the grammar
is complete only EOS is allowed, so each row ends on EOS with text that parses.

llguidance is an optional dependency (``pip install 'llmtool[structured]'``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from llmtool.errors import UsageError


def _llguidance() -> Any:
    try:
        import llguidance
        import llguidance.numpy  # the bitmask helpers
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise UsageError(
            "Structured output needs llguidance", "pip install 'llmtool[structured]'."
        ) from exc
    return llguidance


def compile_grammar(json_schema: str | dict[str, Any] | None, regex: str | None) -> str:
    """The llguidance grammar for a JSON schema (text or dict) or a regex, checked.

    Raises:
        UsageError: Both or neither given, the schema is not JSON, or the engine cannot
            compile the schema / regex.
    """
    if (json_schema is None) == (regex is None):
        raise UsageError("Give exactly one of --json-schema and --regex")
    llg = _llguidance()
    if json_schema is not None:
        what = "JSON schema"
        try:
            schema = json.loads(json_schema) if isinstance(json_schema, str) else json_schema
            # Compact JSON (no free whitespace): small models otherwise wander in blanks.
            grammar = llg.LLMatcher.grammar_from_json_schema(
                schema, defaults={"whitespace_flexible": False}
            )
        except (ValueError, TypeError) as exc:
            raise UsageError(f"The JSON schema is not valid JSON: {exc}", "fix the file.") from exc
    else:
        what = "regex"
        grammar = llg.LLMatcher.grammar_from_regex(regex)
    is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        message = " ".join(messages[0].split())
        raise UsageError(f"The {what} cannot be compiled: {message}", f"fix the {what}.")
    return grammar


class Constraint:
    """One grammar matcher per row; :meth:`mask` applies its allowed tokens to logits."""

    def __init__(
        self, grammar: str, tokenizer: Any, batch: int, eos_ids: Sequence[int] = ()
    ) -> None:
        llg = _llguidance()
        import llguidance.hf

        eos = [int(t) for t in eos_ids] or None
        self._tok = llguidance.hf.from_tokenizer(tokenizer, eos_token=eos)
        self._numpy = llg.numpy
        self.matchers = [llg.LLMatcher(self._tok, grammar, log_level=0) for _ in range(batch)]
        self._bitmask = llg.numpy.allocate_token_bitmask(batch, self._tok.vocab_size)

    def active(self, row: int) -> bool:
        """Whether the row's grammar still takes tokens (not stopped, no error)."""
        m = self.matchers[row]
        return not (m.is_stopped() or m.is_error())

    def mask(self, scores: np.ndarray, row: int) -> None:
        """Set disallowed tokens of one row's [vocab] scores to -inf, in place.

        A complete (stopped) grammar allows only EOS; a row whose matcher failed (it cannot,
        unless a token outside the mask was forced) is left unconstrained.
        """
        if self.matchers[row].is_error():
            return
        self._numpy.fill_next_token_bitmask(self.matchers[row], self._bitmask, row)
        view = scores.reshape(1, -1)
        self._numpy.apply_token_bitmask_inplace(view, self._bitmask[row : row + 1])

    def consume(self, row: int, token: int) -> None:
        """Advance the row's grammar by the chosen token."""
        if self.active(row):
            self.matchers[row].consume_token(int(token))
