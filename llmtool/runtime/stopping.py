"""What ends a generated row besides ``max_new_tokens``, and the incremental text it is read from.

* :class:`StopConditions`: stop strings, a time limit, EOS on or off (the library's options),
* :class:`RowStops`: which rows of a batch have finished and why (``eos``, ``stop``, ``length``,
  ``time``), shared by the token-step and streaming layers of :mod:`llmtool.generate`,
* :class:`Detokenizer`: a row's text as it grows, with stop strings found (even across token
  boundaries) and never streamed.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from llmtool.errors import UsageError


@dataclass
class StopConditions:
    """What ends a row besides ``max_new_tokens``.

    Attributes:
        stop: Stop strings: a row ends when its text contains one, and its text is cut just before
            it (the string may span several tokens).
        max_time: Seconds after which every row still running ends (``finish_reason`` ``time``).
        eos: End at the model's EOS ids (and, in chat, the template's end-of-turn token).
    """

    stop: Sequence[str] = ()
    max_time: float | None = None
    eos: bool = True

    def validate(self) -> None:
        """Raise :class:`UsageError` on an empty stop string or a non-positive time."""
        if any(not s for s in self.stop):
            raise UsageError("A --stop string is empty", "give every --stop some text.")
        if self.max_time is not None and self.max_time <= 0:
            raise UsageError(f"--max-time must be positive, got {self.max_time}")


class RowStops:
    """Which rows have finished and why; shared by the token-step and streaming layers."""

    def __init__(self, batch: int, eos: np.ndarray, conditions: StopConditions) -> None:
        self.finished = np.zeros(batch, dtype=bool)
        self.reasons = ["length"] * batch
        self.eos = eos
        self.stop = tuple(conditions.stop)
        self.deadline = (
            time.perf_counter() + conditions.max_time if conditions.max_time is not None else None
        )

    def finish(self, rows: int | np.ndarray, reason: str) -> None:
        """End ``rows`` (a row index or a [batch] bool mask) for ``reason`` unless already ended."""
        picked = np.flatnonzero(rows) if isinstance(rows, np.ndarray) else [rows]
        for row in picked:
            if not self.finished[row]:
                self.finished[row], self.reasons[row] = True, reason

    def after_step(self, tokens: np.ndarray) -> None:
        """Mark rows that took EOS, then every row when time is up."""
        self.finish(np.isin(tokens, self.eos), "eos")
        if self.deadline is not None and time.perf_counter() >= self.deadline:
            self.finish(np.ones_like(self.finished), "time")


def decode_new_tokens(tokenizer: Any, token_ids: Sequence[int], stop_ids: Any) -> str:
    """The text of generated tokens: a final stop token is dropped, nothing else is.

    Special tokens inside the text stay (``<|im_start|>assistant``, an EOS that ``--ignore-eos``
    went past): stripping them would leave their neighbours (bare role words) looking like
    ordinary text.
    """
    ids = list(token_ids)
    if ids and ids[-1] in set(int(t) for t in stop_ids):
        ids = ids[:-1]
    return str(tokenizer.decode(ids, skip_special_tokens=False))


class Detokenizer:
    """Incremental detokenization: emits only complete new text (no half UTF-8 characters).

    With stop strings it also finds the first one in the text (:attr:`cut` is the text before
    it) and holds back a tail that could still grow into one, so a stop string never streams.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = (), eos: Any = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.eos = eos
        self.emitted = ""
        self.cut: str | None = None

    def push(self, token_ids: list[int]) -> str:
        """The text ``token_ids`` add to what was emitted ("" while a character is incomplete)."""
        text = decode_new_tokens(self.tokenizer, token_ids, self.eos)
        if self.stop:
            hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
            if hits:
                self.cut = text[: min(hits)]
                return self.flush(self.cut)
            text = text[: len(text) - self._held_back(text)]
        if text.endswith("\ufffd") or not text.startswith(self.emitted):
            return ""
        delta, self.emitted = text[len(self.emitted) :], text
        return delta

    def _held_back(self, text: str) -> int:
        """Length of the longest tail of ``text`` that begins some stop string."""
        return max(
            (
                k
                for s in self.stop
                for k in range(min(len(s) - 1, len(text)), 0, -1)
                if text.endswith(s[:k])
            ),
            default=0,
        )

    def flush(self, text: str) -> str:
        """The rest of the final text (held-back partial characters included)."""
        delta = text[len(self.emitted) :] if text.startswith(self.emitted) else ""
        self.emitted = text
        return delta
