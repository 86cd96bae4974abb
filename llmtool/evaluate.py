"""``llmtool eval``: perplexity of an ONNX export on a text file."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmtool import defaults
from llmtool.errors import UsageError
from llmtool.perplexity import sliding_window_nll
from llmtool.runtime import OnnxCausalLM, SessionOptions


@dataclass
class PerplexityResult:
    """Sliding-window perplexity of one model on one text.

    Attributes:
        perplexity: exp(mean NLL) over scored tokens.
        nll: Mean negative log-likelihood per scored token, in nats.
        bits_per_byte: Total NLL in bits over the text's UTF-8 bytes.
        tokens: Tokens scored.
        max_length: Window length.
        stride: Step between windows.
        provider: Execution provider used.
        bytes: UTF-8 bytes of the text.
        windows: Forward passes run.
        seconds: Wall-clock time of the scoring.
    """

    perplexity: float
    nll: float
    bits_per_byte: float
    tokens: int
    max_length: int
    stride: int
    provider: str
    bytes: int
    windows: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_text(path: str | Path) -> str:
    """Read a UTF-8 text file, with clear errors for a missing, empty or non-UTF-8 file."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"Data file {path} does not exist", "pass a UTF-8 text file with --data.")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(
            f"{path} is not valid UTF-8 (bad byte at offset {e.start})",
            "convert the file to UTF-8.",
        ) from e
    if not text.strip():
        raise UsageError(f"Data file {path} is empty", "pass a file with text in it.")
    return text


def default_max_length(model: OnnxCausalLM) -> int:
    """min(model context, 1024)."""
    context = model.max_positions or defaults.MAX_EVAL_LENGTH
    return min(context, defaults.MAX_EVAL_LENGTH)


def evaluate_perplexity(
    model: OnnxCausalLM | str | Path,
    data: str | Path,
    *,
    max_length: int | None = None,
    stride: int | None = None,
    provider: str = defaults.PROVIDER,
    session_options: SessionOptions | None = None,
    on_window: Callable[[int, int], None] | None = None,
) -> PerplexityResult:
    """Sliding-window perplexity of an export on a text file.

    Args:
        model: An :class:`OnnxCausalLM` or an export directory.
        data: A UTF-8 text file.
        max_length: Window length; default min(model context, 1024).
        stride: Step between windows; default ``max_length // 2``.
        provider: ``auto``, ``cuda`` or ``cpu``.
        session_options: ONNX Runtime settings.
        on_window: Progress callback ``(done, total)``.
    """
    text = read_text(data)
    if not isinstance(model, OnnxCausalLM):
        model = OnnxCausalLM(model, provider, options=session_options)
    max_length = max_length or default_max_length(model)
    if model.max_positions and max_length > model.max_positions:
        raise UsageError(
            f"--max-length {max_length} exceeds the model's context of {model.max_positions} tokens",
            f"use --max-length {model.max_positions} or less.",
        )
    stride = stride or max(1, max_length // 2)
    ids = np.asarray(model.tokenizer(text)["input_ids"], dtype=np.int64)
    # One row, no past: the cache outputs are discarded.
    cache = model.empty_cache(1)

    def logits_fn(window: np.ndarray) -> np.ndarray:
        length = window.shape[1]
        mask = np.ones((1, length), dtype=np.int64)
        positions = np.arange(length, dtype=np.int64)[None, :]
        return model.forward(window, mask, positions, cache)[0]

    start = time.perf_counter()
    totals = sliding_window_nll(logits_fn, ids, max_length, stride, on_window)
    seconds = time.perf_counter() - start
    n_bytes = len(text.encode("utf-8"))
    return PerplexityResult(
        perplexity=totals.perplexity,
        nll=totals.mean_nll,
        bits_per_byte=totals.nll_sum / math.log(2) / n_bytes,
        tokens=totals.tokens,
        max_length=max_length,
        stride=stride,
        provider=model.provider,
        bytes=n_bytes,
        windows=totals.windows,
        seconds=seconds,
    )
