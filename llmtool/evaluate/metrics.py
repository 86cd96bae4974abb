"""The numbers of an evaluation, from logits and targets: pure numpy, no model, no tokenizer.

* :func:`token_nll`: the negative log-likelihood of each scored token,
* :func:`count_nonfinite`: NaN / ±Inf values among logits,
* :func:`nll_summary`: mean NLL, perplexity, the standard error of the mean and an interval,
* :class:`FidelityAccumulator`: a model against a reference on the same positions:
  KL(P_ref || P_model) in nats (mean, median, p99, max), top-1 agreement, non-finite logits,
  each model's perplexity, ΔPPL = PPL - PPL_ref and ln(PPL / PPL_ref).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from llmtool import defaults


def safe_exp(x: float) -> float:
    """exp that saturates to inf instead of raising on overflow (a diverged model)."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax of [N, V] logits, in float64."""
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def token_nll(logits: np.ndarray, targets: np.ndarray, *, overwrite: bool = False) -> np.ndarray:
    """-log softmax(logits)[target] per row: logits [N, V], targets [N] -> [N] float64.

    Args:
        logits: [N, V] scores (cast to float32).
        targets: [N] token ids.
        overwrite: Use ``logits`` as the scratch buffer (its values are lost): no [N, V]
            temporary is allocated, which on a [512, 49152] window is most of the time.
    """
    logits = logits.astype(np.float32, copy=False)
    picked = logits[np.arange(len(targets)), targets].astype(np.float64)  # [N], before scratch
    # Log-sum-exp with the row maximum taken out: exp never overflows, the sum is in float64.
    peak = logits.max(axis=-1, keepdims=True)  # [N, 1]
    work = logits if overwrite and logits.flags.writeable else np.empty_like(logits)
    np.subtract(logits, peak, out=work)
    np.exp(work, out=work)
    lse = np.log(work.sum(axis=-1, dtype=np.float64)) + peak[:, 0]
    return lse - picked


def count_nonfinite(logits: np.ndarray) -> int:
    """NaN and ±Inf values in ``logits``; two reductions when there are none (the usual case)."""
    # NaN propagates through min and max, and ±Inf is the extreme: both finite means none.
    if logits.size == 0 or (np.isfinite(logits.min()) and np.isfinite(logits.max())):
        return 0
    return int(logits.size - np.isfinite(logits).sum())


def nll_summary(nll: np.ndarray, confidence: float = defaults.EVAL_CONFIDENCE) -> dict[str, Any]:
    """Mean NLL, perplexity, the standard error of the mean and the perplexity interval.

    Args:
        nll: [N] per-token NLL in nats.
        confidence: Two-sided level of the interval (normal approximation).

    Returns:
        ``{"perplexity", "nll", "standard_error", "perplexity_ci"}``; the last two are None
        with fewer than two tokens or a non-finite mean. The interval is
        ``{"low", "high", "confidence"}``: exp(nll ∓ z·standard_error).
    """
    mean = float(nll.mean())
    summary: dict[str, Any] = {
        "perplexity": safe_exp(mean),
        "nll": mean,
        "standard_error": None,
        "perplexity_ci": None,
    }
    if len(nll) >= 2 and np.isfinite(mean):
        se = float(nll.std(ddof=1) / math.sqrt(len(nll)))
        z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
        summary["standard_error"] = se
        summary["perplexity_ci"] = {
            "low": safe_exp(mean - z * se),
            "high": safe_exp(mean + z * se),
            "confidence": confidence,
        }
    return summary


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
    """Collects per-position comparisons pass by pass."""

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
        # A NaN or Inf would poison the softmax of its whole row: count it, then mask it out.
        logits = np.where(finite, logits, np.float32(-1e30)) if not finite.all() else logits
        logp, ref_logp = log_softmax(logits), log_softmax(ref_logits)
        self.kl.append((np.exp(ref_logp) * (ref_logp - logp)).sum(axis=-1))
        self.agree += int((logits.argmax(-1) == ref_logits.argmax(-1)).sum())
        self.nll += float(token_nll(logits, targets).sum())
        self.ref_nll += float(token_nll(ref_logits, targets).sum())
        self.tokens += len(targets)

    def report(self) -> FidelityReport:
        """The summary over every position added so far."""
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
