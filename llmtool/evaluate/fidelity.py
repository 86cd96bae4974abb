"""Fidelity of a model to a reference on the same tokens: the numbers an export is judged by.

Both models score the same sliding windows (:func:`llmtool.evaluate.windows.scored_windows`); per
scored position this compares the two next-token distributions:

* KL(P_ref || P_model) in nats, summarized as mean, median, p99 and max,
* top-1 agreement: the share of positions where both rank the same token first,
* non-finite logits (NaN or ±Inf) in the model's output,
* each model's perplexity, ΔPPL = PPL - PPL_ref and ln(PPL / PPL_ref).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from llmtool.evaluate.windows import token_nll


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax of [N, V] logits, in float64."""
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@dataclass
class FidelityReport:
    """Model against reference on the same scored tokens (see the module docstring)."""

    perplexity: float
    reference_perplexity: float
    delta_perplexity: float
    log_ppl_ratio: float
    kl_divergence: dict[str, float]
    top1_agreement: float
    nonfinite_logits: int
    tokens: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FidelityAccumulator:
    """Collects per-position comparisons window by window."""

    kl: list[np.ndarray] = field(default_factory=list)
    agree: int = 0
    nonfinite: int = 0
    nll: float = 0.0
    ref_nll: float = 0.0
    tokens: int = 0

    def add(self, logits: np.ndarray, ref_logits: np.ndarray, targets: np.ndarray) -> None:
        """Compare [n, V] logits with the reference's at the same positions (targets [n])."""
        finite = np.isfinite(logits)
        self.nonfinite += int((~finite).sum())
        logits = np.where(finite, logits, np.float32(-1e30)) if not finite.all() else logits
        logp, ref_logp = log_softmax(logits), log_softmax(ref_logits)
        self.kl.append((np.exp(ref_logp) * (ref_logp - logp)).sum(axis=-1))
        self.agree += int((logits.argmax(-1) == ref_logits.argmax(-1)).sum())
        self.nll += float(token_nll(logits, targets).sum())
        self.ref_nll += float(token_nll(ref_logits, targets).sum())
        self.tokens += len(targets)

    def report(self) -> FidelityReport:
        kl = np.concatenate(self.kl) if self.kl else np.zeros(1)
        kl = np.maximum(kl, 0.0)  # rounding can give -1e-12
        ppl = math.exp(self.nll / self.tokens)
        ref_ppl = math.exp(self.ref_nll / self.tokens)
        return FidelityReport(
            perplexity=ppl,
            reference_perplexity=ref_ppl,
            delta_perplexity=ppl - ref_ppl,
            log_ppl_ratio=(self.nll - self.ref_nll) / self.tokens,
            kl_divergence={
                "mean": float(kl.mean()),
                "median": float(np.median(kl)),
                "p99": float(np.percentile(kl, 99)),
                "max": float(kl.max()),
            },
            top1_agreement=self.agree / self.tokens,
            nonfinite_logits=self.nonfinite,
            tokens=self.tokens,
        )


def compare_on_tokens(
    logits_fn: Any,
    reference_fn: Any,
    token_ids: np.ndarray,
    max_length: int,
    stride: int,
    on_window: Any = None,
) -> FidelityReport:
    """Score the same sliding windows with a model and its reference and compare them.

    Args:
        logits_fn: The model under test: [1, L] ids to [1, L, V] logits.
        reference_fn: The reference, same signature.
        token_ids: [N] int64, the tokenized text.
        max_length: Window length.
        stride: Step between windows.
        on_window: Progress callback ``(done, total)``.
    """
    from llmtool.evaluate.windows import plan_windows

    acc = FidelityAccumulator()
    windows = plan_windows(len(token_ids), max_length, stride)
    for i, w in enumerate(windows):
        ids = token_ids[w.begin : w.end][None, :]
        first, last = w.score_from - w.begin - 1, w.end - w.begin - 1
        targets = token_ids[w.score_from : w.end]
        acc.add(logits_fn(ids)[0][first:last], reference_fn(ids)[0][first:last], targets)
        if on_window is not None:
            on_window(i + 1, len(windows))
    return acc.report()
