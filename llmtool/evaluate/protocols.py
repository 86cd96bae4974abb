"""Perplexity protocols: which tokens each forward pass feeds and which it scores.

Three conventions give three different numbers on the same text; each is reproduced exactly.
A document's tokens are ``t[0..N)``; every pass runs one row with no past.

``hf`` (transformers' perplexity guide; :func:`plan_windows`)
    The text tokenized with the tokenizer's special tokens. Windows of ``max_length`` tokens start
    every ``stride`` tokens; each scores only the tokens no earlier window scored, so every token
    but ``t[0]`` is scored once. PPL = exp(ΣNLL / scored tokens).

``lm-eval`` (lm-evaluation-harness ``loglikelihood_rolling``, as its wikitext task runs it)
    The document tokenized without special tokens and prefixed with one token (BOS, else EOS),
    so ``t[0]`` is scored too. Disjoint windows: the first feeds ``[prefix] + t[0..L-1)`` and
    scores ``t[0..L)``; each later one scores the next ``L`` tokens (fewer at the end) from the
    ``L`` tokens before them. Word perplexity = exp(-ΣLL / Σwords), byte perplexity =
    exp(-ΣLL / Σbytes), bits per byte = -ΣLL / Σbytes / ln 2, with words
    (``len(re.split(r"\\s+", text))``) and UTF-8 bytes counted on the original text.

``llama-cpp`` (llama.cpp ``llama-perplexity``)
    The text tokenized with special tokens, cut into ``N // L`` chunks of ``L = max_length``
    tokens (the remainder is dropped). A chunk's first token is replaced by BOS when the tokenizer
    adds BOS; only the second half is scored: the logits at chunk positions ``L/2 .. L-2`` score
    the tokens at ``L/2 + 1 .. L-1`` (``L - 1 - L/2`` tokens a chunk).

:meth:`Protocol.passes` is the one walk over a document: ``llmtool eval``, the comparison with a
reference and the fidelity gate of a quantized export all score the :class:`Pass` es it yields.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from llmtool.errors import UsageError

PROTOCOLS = ("hf", "lm-eval", "llama-cpp")

# logits_fn(input_ids [1, L] int64) -> logits [1, L, V] float32, for one row with no past.
LogitsFn = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Window:
    """One ``hf`` window: tokens [begin, end) are fed, targets [score_from, end) are scored."""

    begin: int
    end: int
    score_from: int


def plan_windows(n_tokens: int, max_length: int, stride: int) -> list[Window]:
    """The windows of the transformers guide's loop over ``n_tokens`` tokens.

    Windows of ``max_length`` tokens start every ``stride`` tokens; each scores only the tokens no
    earlier window scored (never a window's first token, which has no context in it).

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


@dataclass(frozen=True)
class Pass:
    """One forward pass: feed ``input_ids``; ``logits[first : first + len(targets)]`` score ``targets``.

    Attributes:
        input_ids: [L] int64, fed as one row with no past.
        first: Position whose logits predict ``targets[0]``.
        targets: [n] int64, the scored tokens.
    """

    input_ids: np.ndarray
    first: int
    targets: np.ndarray


def hf_passes(ids: np.ndarray, max_length: int, stride: int) -> Iterator[Pass]:
    """Passes of the transformers guide's sliding window (see :func:`plan_windows`)."""
    for w in plan_windows(len(ids), max_length, stride):
        # Target t is predicted at position t - 1 (window-relative).
        yield Pass(ids[w.begin : w.end], w.score_from - w.begin - 1, ids[w.score_from : w.end])


def lm_eval_passes(ids: np.ndarray, max_length: int, prefix_id: int) -> Iterator[Pass]:
    """Passes of lm-evaluation-harness' rolling windows (``context_len=1``) over one document."""
    n = len(ids)
    if n == 0:
        return
    first_len = min(max_length, n)
    prefixed = np.concatenate([np.array([prefix_id], dtype=np.int64), ids[: first_len - 1]])
    yield Pass(prefixed, 0, ids[:first_len])
    predicted = first_len
    while predicted < n:
        count = min(n - predicted, max_length)
        end = predicted + count
        # The max_length tokens before the last target (fewer only at the document's start).
        begin = max(end - max_length - 1, 0)
        window = ids[begin : end - 1]
        yield Pass(window, len(window) - count, ids[end - count : end])
        predicted = end


def llama_cpp_passes(ids: np.ndarray, max_length: int, bos_id: int | None) -> Iterator[Pass]:
    """Passes of llama.cpp's perplexity: whole chunks, the second half scored."""
    first = max_length // 2
    for i in range(len(ids) // max_length):
        chunk = ids[i * max_length : (i + 1) * max_length]
        if bos_id is not None:
            chunk = chunk.copy()
            chunk[0] = bos_id
        targets = ids[i * max_length + first + 1 : (i + 1) * max_length]
        yield Pass(chunk, first, targets)


@dataclass(frozen=True)
class Protocol:
    """A protocol with its settings and the special tokens it uses.

    Attributes:
        name: One of :data:`PROTOCOLS`.
        max_length: Tokens per forward pass.
        stride: Step between windows (``hf``); ``max_length`` for the disjoint protocols.
        prefix_id: The token before each document (``lm-eval``).
        bos_id: The token that replaces each chunk's first (``llama-cpp``), None when the
            tokenizer adds no BOS.
    """

    name: str
    max_length: int
    stride: int
    prefix_id: int | None = None
    bos_id: int | None = None

    @property
    def min_tokens(self) -> int:
        """Fewest tokens a document needs to be scored at all."""
        return {"hf": 2, "lm-eval": 1, "llama-cpp": self.max_length}[self.name]

    @property
    def scores_every_token(self) -> bool:
        """Whether (nearly) every token is scored, so per-word and per-byte figures mean something."""
        return self.name != "llama-cpp"

    def encode(self, tokenizer: Any, texts: list[str]) -> list[np.ndarray]:
        """Token ids of each document as this protocol tokenizes it."""
        special = self.name != "lm-eval"
        encoded = tokenizer(texts, add_special_tokens=special)["input_ids"]
        return [np.asarray(ids, dtype=np.int64) for ids in encoded]

    def passes(self, ids: np.ndarray) -> Iterator[Pass]:
        """The forward passes over one document's tokens (none if it is too short)."""
        if len(ids) < self.min_tokens:
            return iter(())
        if self.name == "hf":
            return hf_passes(ids, self.max_length, self.stride)
        if self.name == "lm-eval":
            assert self.prefix_id is not None
            return lm_eval_passes(ids, self.max_length, self.prefix_id)
        return llama_cpp_passes(ids, self.max_length, self.bos_id)


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    """Whether tokenizing text with special tokens puts BOS first (llama.cpp's ``add_bos``)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return (
        bool(ids)
        and ids[0] == bos
        and tokenizer("a", add_special_tokens=False)["input_ids"][:1] != [bos]
    )


def make_protocol(
    name: str, tokenizer: Any, max_length: int, stride: int | None = None
) -> Protocol:
    """Check a protocol's settings and read its special tokens from ``tokenizer``.

    Args:
        name: One of :data:`PROTOCOLS`.
        tokenizer: The model's tokenizer.
        max_length: Tokens per pass.
        stride: Step between windows; ``hf`` only (default ``max_length // 2``).

    Raises:
        UsageError: Unknown protocol, bad lengths, a stride with a disjoint protocol, or no token
            to prefix documents with.
    """
    if name not in PROTOCOLS:
        raise UsageError(f"Unknown protocol {name!r}", f"use one of {', '.join(PROTOCOLS)}.")
    least = 3 if name == "llama-cpp" else 2 if name == "hf" else 1
    if max_length < least:
        raise UsageError(
            f"--max-length must be at least {least} for --protocol {name}, got {max_length}"
        )
    if name != "hf":
        if stride is not None and stride != max_length:
            raise UsageError(
                f"--stride applies to --protocol hf only ({name} uses disjoint windows)",
                "drop --stride.",
            )
        stride = max_length
    else:
        stride = stride or max(1, max_length // 2)
        if not 1 <= stride <= max_length:
            raise UsageError(
                f"--stride must be between 1 and --max-length ({max_length}), got {stride}"
            )
    prefix_id = bos_id = None
    if name == "lm-eval":
        prefix_id = tokenizer.bos_token_id
        if prefix_id is None:
            prefix_id = tokenizer.eos_token_id
        if prefix_id is None:
            raise UsageError(
                "--protocol lm-eval prefixes each document with BOS or EOS, and the tokenizer has neither",
                "use --protocol hf.",
            )
    if name == "llama-cpp" and tokenizer_adds_bos(tokenizer):
        bos_id = tokenizer.bos_token_id
    return Protocol(name, max_length, stride, prefix_id, bos_id)


def check_llama_cpp_length(names: list[str], token_ids: list[np.ndarray], n_ctx: int) -> None:
    """Refuse a document shorter than 2 × n_ctx tokens, as ``llama-perplexity`` does.

    Raises:
        UsageError: Some document has fewer than ``2 * n_ctx`` tokens.
    """
    for name, ids in zip(names, token_ids, strict=True):
        if len(ids) < 2 * n_ctx:
            raise UsageError(
                f"{name} has {len(ids):,} tokens; --protocol llama-cpp needs at least "
                f"2 × --max-length = {2 * n_ctx:,}, as llama-perplexity does",
                f"lower --max-length to {max(3, len(ids) // 2)} or less, or score a longer text.",
            )


def scored_logits(logits_fn: LogitsFn, p: Pass) -> np.ndarray:
    """Run one pass: the [n, V] float32 logits that score ``p.targets``."""
    logits = logits_fn(p.input_ids[None, :])[0]
    return logits[p.first : p.first + len(p.targets)]
