"""Next-token choice from logits: greedy or sampling, after penalties and a grammar mask.

Per row and step, in transformers' order (``generation/logits_process.py``):

1. processors over the row's history (:mod:`llmtool.decoding.processors`): repetition
   penalty, presence / frequency penalty, no-repeat n-gram;
2. the structured-output mask (:mod:`llmtool.decoding.structured`), if a schema or regex is set;
3. greedy: argmax; sampling: temperature, top-k, top-p, then min-p, and a seeded draw.

With no processor, no grammar and no logprobs, greedy reads only :meth:`Step.argmax` (on the
device for fused exports). Log-probabilities (``logprobs``) are the log-softmax of the final
distribution the token was chosen from: after processors and mask (greedy), or after
temperature, top-k, top-p and min-p as well (sampling; tokens outside them are not reported).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from llmtool import defaults
from llmtool.decoding.processors import NgramIndex, RowHistory, apply_processors
from llmtool.errors import UsageError

STRATEGIES = ("greedy", "top-k")
MAX_LOGPROBS = 20  # OpenAI's cap on top_logprobs


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen.

    Attributes:
        strategy: ``greedy`` (argmax) or ``top-k`` (sample among the k most likely, then top-p).
        top_k: Candidates kept for sampling (>= 1).
        top_p: Nucleus mass kept among them, in (0, 1].
        temperature: Logit divisor, > 0.
        seed: Seed of the sampler's random generator.
        repetition_penalty: transformers' penalty over prompt + output tokens, > 0 (1: off).
        presence_penalty: OpenAI's, in [-2, 2], over output tokens (0: off).
        frequency_penalty: OpenAI's, in [-2, 2], over output tokens (0: off).
        min_p: Sampling drops tokens below ``min_p`` x the top probability, in [0, 1] (0: off).
        no_repeat_ngram_size: Ban tokens that repeat an n-gram of this size (0: off).
        json_schema: Constrain the output to this JSON schema (JSON text or a dict).
        regex: Constrain the output to this regular expression.
        logprobs: Report each token's log-probability and this many alternatives (0..20).
    """

    strategy: str = defaults.STRATEGY
    top_k: int = defaults.TOP_K
    top_p: float = defaults.TOP_P
    temperature: float = defaults.TEMPERATURE
    seed: int = defaults.SEED
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_p: float = 0.0
    no_repeat_ngram_size: int = 0
    json_schema: str | dict[str, Any] | None = None
    regex: str | None = None
    logprobs: int | None = None

    @property
    def has_processors(self) -> bool:
        """Whether any history processor is on."""
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.no_repeat_ngram_size > 0
        )

    @property
    def structured(self) -> bool:
        return self.json_schema is not None or self.regex is not None

    def validate(self) -> None:
        """Raise :class:`UsageError` for an unknown strategy or out-of-range parameter."""
        if self.strategy not in STRATEGIES:
            raise UsageError(
                f"Unknown strategy {self.strategy!r}", f"use one of {', '.join(STRATEGIES)}."
            )
        self._validate_processors()
        if self.structured:
            from llmtool.decoding.structured import compile_grammar

            compile_grammar(self.json_schema, self.regex)
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

    def _validate_processors(self) -> None:
        if not self.repetition_penalty > 0.0:
            raise UsageError(
                f"--repetition-penalty must be greater than 0, got {self.repetition_penalty}",
                "1 is off; above 1 discourages repeats.",
            )
        for name, value in (
            ("--presence-penalty", self.presence_penalty),
            ("--frequency-penalty", self.frequency_penalty),
        ):
            if not -2.0 <= value <= 2.0:
                raise UsageError(f"{name} must be in [-2, 2], got {value}")
        if not 0.0 <= self.min_p <= 1.0:
            raise UsageError(f"--min-p must be in [0, 1], got {self.min_p}")
        if self.no_repeat_ngram_size < 0:
            raise UsageError(
                f"--no-repeat-ngram-size must be 0 (off) or more, got {self.no_repeat_ngram_size}"
            )
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise UsageError(f"--logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")


class Sampler:
    """Chooses one token per row from [batch, vocab] logits.

    Call :meth:`begin` with the prompts' token ids before the first :meth:`choose` to give the
    processors their history and the grammar its rows; without it the history starts empty.
    """

    def __init__(
        self, config: SamplingConfig, tokenizer: Any = None, eos_ids: Sequence[int] = ()
    ) -> None:
        config.validate()
        self.config = config
        self.rng = np.random.default_rng(config.seed)
        self.row_rngs: list[np.random.Generator] | None = None  # seed_rows: one per row
        self.tokenizer = tokenizer
        self.eos_ids = [int(t) for t in eos_ids]
        self.rows: list[RowHistory] = []
        self.constraint: Any = None
        self.logprobs: list[list[dict[str, Any]]] = []

    @property
    def needs_logits(self) -> bool:
        """False when greedy can read the argmax alone (on the device for fused exports)."""
        c = self.config
        return c.strategy != "greedy" or c.has_processors or c.structured or c.logprobs is not None

    def begin(self, prompts: Sequence[Sequence[int]]) -> None:
        """Start the rows: the prompts are the processors' history; fresh grammar matchers."""
        n = self.config.no_repeat_ngram_size
        self.rows = [
            RowHistory(list(p), len(p), ngrams=NgramIndex(n) if n > 0 else None) for p in prompts
        ]
        self.logprobs = [[] for _ in prompts]
        if self.config.structured:
            from llmtool.decoding.structured import Constraint, compile_grammar

            if self.tokenizer is None:
                raise UsageError("Structured output needs the model's tokenizer")
            grammar = compile_grammar(self.config.json_schema, self.config.regex)
            self.constraint = Constraint(grammar, self.tokenizer, len(prompts), self.eos_ids)

    def seed_rows(self, seeds: Sequence[int]) -> None:
        """Give each row its own random generator, so a row's draws do not depend on the others
        in its batch (batch generation: the same text whatever the batching or the workers)."""
        self.row_rngs = [np.random.default_rng(int(s)) for s in seeds]

    def choose(self, step: Any) -> np.ndarray:
        """Tokens for a :class:`~llmtool.runtime.decoders.Step`: plain greedy reads the argmax."""
        if not self.needs_logits:
            tokens = step.argmax()
            self._record(tokens)
            return tokens
        return self(step.logits())

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        """Return [batch] int64 token ids for [batch, vocab] logits."""
        if not self.needs_logits:
            tokens = np.argmax(logits, axis=-1).astype(np.int64)
        else:
            if len(self.rows) != len(logits):
                self.begin([[] for _ in range(len(logits))])
            tokens = np.array(
                [self._choose_row(i, row) for i, row in enumerate(logits)], dtype=np.int64
            )
        self._record(tokens)
        return tokens

    def _record(self, tokens: np.ndarray) -> None:
        for i, history in enumerate(self.rows):
            history.append(int(tokens[i]))
            if self.constraint is not None:
                self.constraint.consume(i, int(tokens[i]))

    def _choose_row(self, i: int, logits: np.ndarray) -> int:
        cfg = self.config
        scores = logits.astype(np.float64)
        if self.rows:
            apply_processors(
                scores,
                self.rows[i],
                repetition=cfg.repetition_penalty,
                presence=cfg.presence_penalty,
                frequency=cfg.frequency_penalty,
            )
        if self.constraint is not None:
            self.constraint.mask(scores, i)
        if cfg.strategy == "greedy":
            token = int(np.argmax(scores))
            if cfg.logprobs is not None:
                finite = np.flatnonzero(np.isfinite(scores))
                logp = scores[finite] - np.logaddexp.reduce(scores[finite])
                order = np.argsort(-logp, kind="stable")
                self._keep_logprobs(i, token, finite[order], logp[order])
            return token
        top, probs = self._warp(scores)
        rng = self.row_rngs[i] if self.row_rngs is not None else self.rng
        choice = int(np.searchsorted(np.cumsum(probs), rng.random() * 1.0, side="right"))
        token = int(top[min(choice, len(top) - 1)])
        if cfg.logprobs is not None:
            self._keep_logprobs(i, token, top, np.log(probs))
        return token

    def _warp(self, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Temperature, top-k, top-p, min-p: the kept token ids (most likely first), their probs."""
        cfg = self.config
        scores = scores / cfg.temperature
        k = min(cfg.top_k, scores.shape[-1])
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]  # most likely first
        probs = np.exp(scores[top] - scores[top[0]])
        nonzero = probs > 0  # masked (-inf) tokens never stay candidates
        top, probs = top[nonzero], probs[nonzero]
        probs /= probs.sum()
        if cfg.top_p < 1.0:
            # Keep the smallest prefix whose mass reaches top_p (always at least one token).
            keep = int(np.searchsorted(np.cumsum(probs), cfg.top_p) + 1)
            top, probs = top[:keep], probs[:keep] / probs[:keep].sum()
        if cfg.min_p > 0.0:
            # transformers' MinPLogitsWarper: drop tokens below min_p x the top probability.
            keep = max(1, int((probs >= cfg.min_p * probs[0]).sum()))
            top, probs = top[:keep], probs[:keep] / probs[:keep].sum()
        return top, probs

    def _keep_logprobs(self, i: int, token: int, ids: np.ndarray, logp: np.ndarray) -> None:
        """Record the chosen token's log-probability and the top alternatives (sorted ids)."""
        n = self.config.logprobs or 0
        where = np.flatnonzero(ids == token)
        chosen = float(logp[where[0]]) if where.size else float("-inf")
        top = [
            {"token": int(t), "logprob": float(lp)} for t, lp in zip(ids[:n], logp[:n], strict=True)
        ]
        self.logprobs[i].append({"token": token, "logprob": chosen, "top": top})

    def token_logprobs(self, row: int, count: int) -> list[dict[str, Any]] | None:
        """The first ``count`` logprob records of a row, with token texts, or None when off."""
        if self.config.logprobs is None:
            return None
        records = self.logprobs[row][:count]
        if self.tokenizer is not None:
            for record in records:
                record["text"] = self.tokenizer.decode([record["token"]])
                for alt in record["top"]:
                    alt["text"] = self.tokenizer.decode([alt["token"]])
        return records
