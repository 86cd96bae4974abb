"""Next-token choice from logits: greedy, or sampling with temperature, top-k and top-p.

The order of the filters is transformers' (temperature, then top-k, then top-p), so a seeded
run is reproducible and comparable to ``model.generate``'s semantics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from llmtool import defaults
from llmtool.errors import UsageError

STRATEGIES = ("greedy", "top-k")


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen.

    Attributes:
        strategy: ``greedy`` (argmax) or ``top-k`` (sample among the k most likely, then top-p).
        top_k: Candidates kept for sampling (>= 1).
        top_p: Nucleus mass kept among them, in (0, 1].
        temperature: Logit divisor, > 0.
        seed: Seed of the sampler's random generator.
    """

    strategy: str = defaults.STRATEGY
    top_k: int = defaults.TOP_K
    top_p: float = defaults.TOP_P
    temperature: float = defaults.TEMPERATURE
    seed: int = defaults.SEED

    def validate(self) -> None:
        """Raise :class:`UsageError` for an unknown strategy or out-of-range parameter."""
        if self.strategy not in STRATEGIES:
            raise UsageError(
                f"Unknown strategy {self.strategy!r}", f"use one of {', '.join(STRATEGIES)}."
            )
        if self.strategy == "greedy":
            return
        if self.top_k < 1:
            raise UsageError(f"--top-k must be at least 1, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise UsageError(f"--top-p must be in (0, 1], got {self.top_p}")
        if not self.temperature > 0.0:
            raise UsageError(
                f"--temperature must be greater than 0 when sampling, got {self.temperature}"
            )


class Sampler:
    """Chooses one token per row from [batch, vocab] logits."""

    def __init__(self, config: SamplingConfig) -> None:
        config.validate()
        self.config = config
        self.rng = np.random.default_rng(config.seed)

    def choose(self, step: Any) -> np.ndarray:
        """Tokens for a :class:`~llmtool.runtime.decoders.Step`: greedy reads only the argmax."""
        if self.config.strategy == "greedy":
            return step.argmax()
        return self(step.logits())

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        """Return [batch] int64 token ids for [batch, vocab] logits."""
        if self.config.strategy == "greedy":
            return np.argmax(logits, axis=-1).astype(np.int64)
        return np.array([self._sample_row(row) for row in logits], dtype=np.int64)

    def _sample_row(self, logits: np.ndarray) -> int:
        cfg = self.config
        scores = logits.astype(np.float64) / cfg.temperature
        k = min(cfg.top_k, scores.shape[-1])
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]  # most likely first
        probs = np.exp(scores[top] - scores[top[0]])
        probs /= probs.sum()
        if cfg.top_p < 1.0:
            # Keep the smallest prefix whose mass reaches top_p (always at least one token).
            keep = int(np.searchsorted(np.cumsum(probs), cfg.top_p) + 1)
            top, probs = top[:keep], probs[:keep] / probs[:keep].sum()
        choice = int(np.searchsorted(np.cumsum(probs), self.rng.random() * 1.0, side="right"))
        return int(top[min(choice, len(top) - 1)])
