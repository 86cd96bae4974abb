"""Training text: read and check it, tokenize it, hold out the validation tail, cut batches.

The corpus is one UTF-8 file or every ``*.txt`` file under a directory (sorted by path),
joined with the tokenizer's end-of-text token between files. The last ``val_fraction`` of the
tokens is the validation split. A BPE tokenizer is trained on the first ``1 - val_fraction`` of
the characters: the training split, give or take a few characters at the boundary.

Training windows are ``seq_len + 1`` tokens (inputs and shifted targets) cut every ``seq_len``
tokens from a random offset, in a shuffled order per epoch: a pure function of the seed, the
epoch and the position in it, which is what a checkpoint records to resume exactly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmtool.errors import UsageError
from llmtool.fsutil import decode_text


@dataclass
class Corpus:
    """The training text.

    Attributes:
        files: The files read, in order.
        texts: Their contents.
    """

    files: list[Path]
    texts: list[str]

    @property
    def chars(self) -> int:
        return sum(len(t) for t in self.texts)

    def head(self, fraction: float) -> list[str]:
        """The first ``fraction`` of the characters, as pieces of whole lines (tokenizer training)."""
        budget = int(self.chars * fraction)
        pieces: list[str] = []
        for text in self.texts:
            if budget <= 0:
                break
            part = text[:budget]
            budget -= len(part)
            pieces.extend(part.splitlines(keepends=True))
        return pieces


def read_corpus(path: str | Path) -> Corpus:
    """Read a text file, or every ``*.txt`` file under a directory.

    Raises:
        UsageError: The path does not exist, a directory holds no .txt file, a file is not
            UTF-8 (the message names the file and the byte offset), or there is no text at all.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise UsageError(
            f"Training data {path} does not exist",
            "pass a UTF-8 text file or a directory of .txt files with --data.",
        )
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise UsageError(
                f"Directory {path} holds no .txt files",
                "put UTF-8 .txt files in it or pass a file.",
            )
    else:
        files = [path]
    texts = [decode_text(f.read_bytes(), f) for f in files]
    if not any(t.strip() for t in texts):
        where = f"{path}" if path.is_file() else f"the .txt files under {path}"
        raise UsageError(f"Training data {where} is empty", "pass a file with text in it.")
    return Corpus(files, texts)


def tokenize_corpus(corpus: Corpus, tokenizer: Any) -> np.ndarray:
    """Token ids [N] of the whole corpus, files separated by the end-of-text token (if any)."""
    sep = tokenizer.eos_token_id
    ids: list[int] = []
    for i, text in enumerate(corpus.texts):
        if i and sep is not None:
            ids.append(int(sep))
        if text:
            ids.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    return np.asarray(ids, dtype=np.int64)


@dataclass
class Splits:
    """Train and validation token ids.

    Attributes:
        train: [N_train] int64.
        val: [N_val] int64, the tail of the corpus.
        fingerprint: sha256 of all the ids (a checkpoint refuses other data).
    """

    train: np.ndarray
    val: np.ndarray
    fingerprint: str


def split_tokens(ids: np.ndarray, val_fraction: float, seq_len: int) -> Splits:
    """Hold out the last ``val_fraction`` of ``ids``.

    Raises:
        UsageError: Too few tokens for one training window of ``seq_len + 1`` and a validation
            split of at least 2 tokens.
    """
    n_val = max(2, round(len(ids) * val_fraction))
    n_train = len(ids) - n_val
    if n_train < seq_len + 1:
        raise UsageError(
            f"The training split has {max(n_train, 0)} tokens, fewer than one window of "
            f"--seq-len {seq_len} plus 1",
            "give more text or a smaller --seq-len.",
        )
    fingerprint = hashlib.sha256(ids.tobytes()).hexdigest()
    return Splits(ids[:n_train], ids[n_train:], fingerprint)


class BatchSampler:
    """Shuffled training windows, resumable from ``(epoch, cursor)``.

    Each epoch cuts windows of ``seq_len + 1`` tokens every ``seq_len`` tokens, starting at an
    offset in ``[0, seq_len)``, and visits them in a random order; offset and order depend only
    on ``(seed, epoch)``.

    Under torchrun every rank walks the same global order: a batch is the next
    ``world_size * batch_size`` windows, of which rank ``r`` keeps rows ``[r * b, (r + 1) * b)``,
    so ranks never share a window, none is skipped, and ``(epoch, cursor)`` counts global windows
    (the same position at any world size for the same global batch).

    Args:
        tokens: [N] training ids.
        seq_len: Tokens per input row.
        batch_size: Rows per batch (per rank).
        seed: Seed of the order.
        rank: This process's rank.
        world_size: Ranks drawing from the order.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        seq_len: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.tokens = tokens
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.cursor = 0
        self._starts = self._epoch_starts(0)

    def _epoch_starts(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        span = len(self.tokens) - self.seq_len - 1  # last valid start
        offset = int(rng.integers(0, min(self.seq_len, span + 1)))
        starts = np.arange(offset, span + 1, self.seq_len)
        return rng.permutation(starts)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._starts = self._epoch_starts(self.epoch)

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """This rank's inputs and targets, [batch_size, seq_len] int64 each."""
        rows = []
        for _ in range(self.batch_size * self.world_size):
            if self.cursor >= len(self._starts):
                self.epoch += 1
                self.cursor = 0
                self._starts = self._epoch_starts(self.epoch)
            start = int(self._starts[self.cursor])
            self.cursor += 1
            rows.append(self.tokens[start : start + self.seq_len + 1])
        mine = rows[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        window = np.stack(mine)  # [B, seq_len + 1]
        return window[:, :-1], window[:, 1:]


def val_windows(
    tokens: np.ndarray, seq_len: int, batch_size: int, max_tokens: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Consecutive, non-overlapping validation windows, in batches of at most ``batch_size``.

    Every held-out token after the first (up to ``max_tokens``) is scored exactly once, each
    window from a fresh context. Yields inputs and targets [rows, length] (the last window may be
    shorter, so it comes as a batch of its own).
    """
    tokens = tokens[: max_tokens + 1]
    full = (len(tokens) - 1) // seq_len
    starts = [i * seq_len for i in range(full)]
    for i in range(0, len(starts), batch_size):
        window = np.stack([tokens[s : s + seq_len + 1] for s in starts[i : i + batch_size]])
        yield window[:, :-1], window[:, 1:]
    rest = tokens[full * seq_len :]
    if len(rest) >= 2:
        yield rest[None, :-1], rest[None, 1:]
