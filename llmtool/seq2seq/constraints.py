"""The generation-config rules transformers' ``generate`` applies to encoder-decoders by default.

BART-style and Marian checkpoints ship generation configs that change every output: a forced
first token (``forced_bos_token_id``), a forced EOS at the length limit (``forced_eos_token_id``),
a minimum length before EOS (``min_length``, counted with the decoder start token), banned
tokens (``bad_words_ids``, e.g. Marian's pad) and no repeated n-grams (``no_repeat_ngram_size``,
BART's 3). :class:`Constraints` applies them with
transformers' maths (``generation/logits_process.py``): banned scores become ``-inf``, a forced
token's score becomes 0 and every other ``-inf``. Greedy and sampled generation apply it to the
logits (before any warper, as transformers does); beam search to the log-probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Constraints:
    """The rules of one generation config.

    Attributes:
        min_length: EOS banned while the decoder holds fewer tokens (start token included).
        forced_bos: Token forced at the first step (None: off).
        forced_eos: Token forced at the last step allowed by ``max_length`` (None: off).
        banned: Tokens never generated (single-token ``bad_words_ids``).
        eos: EOS ids (for ``min_length``).
        no_repeat_ngram: n of ``no_repeat_ngram_size`` (0: off).
    """

    min_length: int = 0
    forced_bos: int | None = None
    forced_eos: int | None = None
    banned: tuple[int, ...] = field(default_factory=tuple)
    eos: tuple[int, ...] = field(default_factory=tuple)
    no_repeat_ngram: int = 0

    @classmethod
    def of(cls, config: dict[str, Any], eos: list[int]) -> Constraints:
        """The rules a ``generation_config.json`` (as a dict) asks for."""
        bad = config.get("bad_words_ids") or []
        return cls(
            min_length=int(config.get("min_length") or 0),
            forced_bos=config.get("forced_bos_token_id"),
            forced_eos=config.get("forced_eos_token_id"),
            banned=tuple(int(w[0]) for w in bad if isinstance(w, list) and len(w) == 1),
            eos=tuple(eos),
            no_repeat_ngram=int(config.get("no_repeat_ngram_size") or 0),
        )

    @property
    def active(self) -> bool:
        return bool(
            self.min_length > 1
            or self.forced_bos is not None
            or self.forced_eos is not None
            or self.banned
            or self.no_repeat_ngram > 0
        )

    def apply(
        self,
        scores: np.ndarray,
        cur_len: int,
        max_length: int,
        history: np.ndarray | None = None,
    ) -> np.ndarray:
        """``scores`` [rows, vocab] with the rules for a decoder holding ``cur_len`` tokens.

        ``history`` [rows, cur_len] (start token first) is what ``no_repeat_ngram`` looks at.
        """
        if not self.active:
            return scores
        scores = scores.copy()
        n = self.no_repeat_ngram
        if n > 0 and history is not None and cur_len + 1 >= n:
            # transformers' NoRepeatNGramLogitsProcessor: a token that would complete an n-gram
            # already in the row (its n - 1 last tokens seen before, followed by it) is banned.
            for row, seq in enumerate(history[:, :cur_len].tolist()):
                prefix = tuple(seq[cur_len - n + 1 :])
                banned = [
                    seq[i + n - 1]
                    for i in range(cur_len - n + 1)
                    if tuple(seq[i : i + n - 1]) == prefix
                ]
                scores[row, banned] = -np.inf
        if self.banned:
            scores[:, list(self.banned)] = -np.inf
        if cur_len < self.min_length and self.eos:
            scores[:, list(self.eos)] = -np.inf
        for token, when in (
            (self.forced_bos, cur_len == 1),
            (self.forced_eos, cur_len == max_length - 1),
        ):
            if token is not None and when:
                scores[:, :] = -np.inf
                scores[:, int(token)] = 0.0
        return scores
