"""Logits processors over each row's token history, with transformers' (and OpenAI's) maths.

Applied in this order, before temperature/top-k/top-p/min-p (transformers' order; presence and
frequency are not in transformers and run right after its repetition penalty, as vLLM does):

1. repetition penalty (transformers ``RepetitionPenaltyLogitsProcessor``): every token seen in
   the prompt or the output has its logit divided by the penalty when positive, multiplied
   when negative;
2. presence / frequency penalty (OpenAI): ``logit[j] -= count[j] * frequency + (count[j] > 0) *
   presence``, ``count`` over the *generated* tokens only (OpenAI's and vLLM's definition);
3. no-repeat n-gram (transformers ``NoRepeatNGramLogitsProcessor``): a token that would repeat
   an n-gram already present in prompt + output gets ``-inf``.

Scores are [vocab] float64 per row; the histories are plain lists of ints.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np


def repetition_penalty(scores: np.ndarray, history: list[int], penalty: float) -> None:
    """Divide positive / multiply negative logits of every token in ``history`` (in place)."""
    if penalty == 1.0 or not history:
        return
    ids = np.unique(np.asarray(history, dtype=np.int64))
    seen = scores[ids]
    scores[ids] = np.where(seen < 0, seen * penalty, seen / penalty)


def presence_frequency_penalty(
    scores: np.ndarray, counts: Counter[int], presence: float, frequency: float
) -> None:
    """OpenAI's penalties from the generated tokens' counts (in place)."""
    if not counts or (presence == 0.0 and frequency == 0.0):
        return
    ids = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))
    n = np.fromiter(counts.values(), dtype=np.float64, count=len(counts))
    scores[ids] -= n * frequency + presence


@dataclass
class NgramIndex:
    """Every (n-1)-token prefix of a growing sequence mapped to the tokens that followed it."""

    n: int
    followers: dict[tuple[int, ...], set[int]] = field(default_factory=dict)
    indexed: int = 0  # tokens of the history whose n-gram ending there is recorded

    def banned(self, history: list[int]) -> list[int]:
        """Tokens that would complete an n-gram already in ``history``."""
        n = self.n
        # Index the n-grams ending at each token added since the last call.
        for end in range(max(self.indexed, n - 1), len(history)):
            prefix = tuple(history[end - n + 1 : end])
            self.followers.setdefault(prefix, set()).add(history[end])
        self.indexed = len(history)
        if len(history) + 1 < n:
            return []
        prefix = tuple(history[len(history) - n + 1 :]) if n > 1 else ()
        return sorted(self.followers.get(prefix, ()))


@dataclass
class RowHistory:
    """One row's tokens (prompt + generated) and what the processors keep about them."""

    tokens: list[int]
    prompt_len: int
    generated: Counter[int] = field(default_factory=Counter)
    ngrams: NgramIndex | None = None

    def append(self, token: int) -> None:
        self.tokens.append(token)
        self.generated[token] += 1


def apply_processors(
    scores: np.ndarray,
    row: RowHistory,
    *,
    repetition: float = 1.0,
    presence: float = 0.0,
    frequency: float = 0.0,
) -> None:
    """Apply every configured processor to one row's [vocab] float64 scores, in place."""
    repetition_penalty(scores, row.tokens, repetition)
    presence_frequency_penalty(scores, row.generated, presence, frequency)
    if row.ngrams is not None:
        banned = row.ngrams.banned(row.tokens)
        if banned:
            scores[banned] = -np.inf
