"""Sliding-window perplexity, as in the transformers perplexity guide.

The text is tokenized once. Windows of ``max_length`` tokens start every ``stride`` tokens;
in each window only the tokens not scored by an earlier window are scored, the rest serve as
context. Token *t* is scored from the logits at position *t - 1*, so the first token of the text
is never scored. Unlike the guide's loop (which weights each window's mean loss by
``trg_len - 1``), NLL here is summed exactly per scored token.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from llmtool.errors import UsageError

# logits_fn(input_ids [1, L] int64) -> logits [1, L, V] float32
LogitsFn = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Window:
    """One forward pass: tokens [begin, end) are fed, targets [score_from, end) are scored."""

    begin: int
    end: int
    score_from: int

    @property
    def scored(self) -> int:
        return self.end - self.score_from


def plan_windows(n_tokens: int, max_length: int, stride: int) -> list[Window]:
    """The windows of the guide's loop over ``n_tokens`` tokens.

    Raises:
        UsageError: Fewer than two tokens, or a stride outside [1, max_length].
    """
    if n_tokens < 2:
        raise UsageError(
            "The text has fewer than 2 tokens, so nothing can be scored", "use a longer text."
        )
    if max_length < 2:
        raise UsageError(f"--max-length must be at least 2, got {max_length}")
    if not 1 <= stride <= max_length:
        raise UsageError(
            f"--stride must be between 1 and --max-length ({max_length}), got {stride}"
        )
    windows = []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_length, n_tokens)
        windows.append(Window(begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n_tokens:
            break
    return windows


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[target] per row: logits [N, V], targets [N] -> [N] float64."""
    logits = logits.astype(np.float32, copy=False)
    peak = logits.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(logits - peak).sum(axis=-1, dtype=np.float64)) + peak[:, 0]
    return lse - logits[np.arange(len(targets)), targets]


@dataclass
class NllTotals:
    """Summed negative log-likelihood (nats) over ``tokens`` scored tokens."""

    nll_sum: float
    tokens: int
    windows: int

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll)


def scored_windows(
    logits_fn: LogitsFn,
    token_ids: np.ndarray,
    max_length: int,
    stride: int,
    on_window: Callable[[int, int], None] | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield, window by window, the logits that score new tokens and those tokens.

    Yields:
        logits [n, V] float32 (position t - 1 for each target t) and targets [n] int64.
    """
    windows = plan_windows(len(token_ids), max_length, stride)
    for i, w in enumerate(windows):
        logits = logits_fn(token_ids[w.begin : w.end][None, :])[0]
        # Target t is predicted at position t - 1 (window-relative indices).
        first, last = w.score_from - w.begin, w.end - w.begin
        yield logits[first - 1 : last - 1], token_ids[w.score_from : w.end]
        if on_window is not None:
            on_window(i + 1, len(windows))


def sliding_window_nll(
    logits_fn: LogitsFn,
    token_ids: np.ndarray,
    max_length: int,
    stride: int,
    on_window: Callable[[int, int], None] | None = None,
) -> NllTotals:
    """Score ``token_ids`` ([N] int64) window by window with ``logits_fn``.

    Args:
        logits_fn: Maps [1, L] ids to [1, L, V] logits (any backend).
        token_ids: The whole tokenized text.
        max_length: Window length.
        stride: Step between window starts.
        on_window: Progress callback ``(done, total)``.
    """
    total = 0.0
    count = 0
    windows = 0
    for logits, targets in scored_windows(logits_fn, token_ids, max_length, stride, on_window):
        total += float(token_nll(logits, targets).sum())
        count += len(targets)
        windows += 1
    return NllTotals(total, count, windows)
