"""One forward pass scored, and passes merged back in order: the unit that work is split into.

:func:`score_pass` is everything :func:`llmtool.evaluate.perplexity.score` measures on one pass
(the model's token NLL, non-finite logits, and with a reference its NLL and the fidelity
figures); :func:`add_pass` adds a :class:`PassScore` to the run's
:class:`~llmtool.evaluate.perplexity.Scores` doing the same float operations in the same order
as one process would. So passes scored anywhere (Ray actors: :mod:`llmtool.batch.ray`) and
added in pass order give a record equal to the single-process one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from llmtool.errors import UsageError
from llmtool.evaluate.metrics import FidelityAccumulator, count_nonfinite, token_nll
from llmtool.evaluate.protocols import Pass, scored_logits


@dataclass
class PassScore:
    """What one pass measured.

    Attributes:
        nll: [n] the model's NLL of each scored token.
        nonfinite: NaN or ±Inf values among the model's scored logits.
        ref_nll: [n] the reference's NLL (None without a reference).
        fidelity: This pass alone in a :class:`FidelityAccumulator` (None without a reference).
    """

    nll: np.ndarray
    nonfinite: int
    ref_nll: np.ndarray | None = None
    fidelity: FidelityAccumulator | None = None


def score_pass(logits_fn: Any, reference: Any, p: Pass) -> PassScore:
    """Run ``p`` on the model (``logits_fn``) and on ``reference`` (a Reference, or None).

    Raises:
        UsageError: The reference has another vocabulary size.
    """
    # logits may be the model's reused output buffer: token_nll overwrites it, so it goes last.
    logits = scored_logits(logits_fn, p)  # [n, V]
    nonfinite = count_nonfinite(logits)
    fidelity, ref_nll = None, None
    if reference is not None:
        ref_logits = scored_logits(reference.logits_fn, p)
        if ref_logits.shape[-1] != logits.shape[-1]:
            raise UsageError(
                f"The reference has {ref_logits.shape[-1]} logits per token and the model {logits.shape[-1]}",
                "compare models with the same vocabulary.",
            )
        fidelity = FidelityAccumulator()
        fidelity.add(logits, ref_logits, p.targets)
        ref_nll = token_nll(ref_logits, p.targets, overwrite=True)
    return PassScore(token_nll(logits, p.targets, overwrite=True), nonfinite, ref_nll, fidelity)


def add_pass(scores: Any, document: int, piece: PassScore) -> None:
    """Add one pass's figures to ``scores``, a :class:`~llmtool.evaluate.perplexity.Scores`
    (call in pass order for an exact result)."""
    scores.nonfinite += piece.nonfinite
    scores.per_document[document].append(piece.nll)
    if piece.fidelity is not None and scores.fidelity is not None:
        total, one = scores.fidelity, piece.fidelity
        total.kl.extend(one.kl)
        total.agree += one.agree
        total.nonfinite += one.nonfinite
        total.nll += one.nll  # one.nll is 0.0 + this pass's sum: the same addition as in-process
        total.ref_nll += one.ref_nll
        total.tokens += one.tokens
    if piece.ref_nll is not None:
        scores.reference_nll.append(piece.ref_nll)
