"""Perplexity of an export on some documents, and its fidelity to a reference: :func:`evaluate_perplexity`.

The data is scored document by document under one of the protocols of
:mod:`llmtool.evaluate.protocols`. Per scored token this keeps the NLL, so the result carries the
standard error of the mean NLL and a confidence interval for perplexity beside the point values
(:mod:`llmtool.evaluate.metrics`). With a reference (a PyTorch model or another export,
:mod:`llmtool.evaluate.reference`) both models score the same passes and their next-token
distributions are compared.

Stages: :func:`prepare` (corpus, model, protocol, token ids, reference, passes), :func:`score`
(the forward passes), :func:`summarize` (the result) and :func:`reference_summary`.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmtool import defaults
from llmtool.errors import UsageError
from llmtool.evaluate.data import Corpus, load_corpus
from llmtool.evaluate.metrics import FidelityAccumulator, nll_summary, safe_exp
from llmtool.evaluate.passes import add_pass, score_pass
from llmtool.evaluate.protocols import (
    Pass,
    Protocol,
    check_llama_cpp_length,
    make_protocol,
)
from llmtool.evaluate.reference import Reference, check_same_tokens, load_reference
from llmtool.runtime.model import OnnxCausalLM
from llmtool.runtime.session import SessionOptions


@dataclass
class PerplexityResult:
    """Perplexity of one model on some documents under one protocol.

    The first ten attributes are the walking skeleton's ``--json`` keys and keep their meaning.

    Attributes:
        perplexity: exp(mean NLL) over scored tokens.
        nll: Mean negative log-likelihood per scored token, in nats.
        bits_per_byte: Total NLL in bits over the documents' UTF-8 bytes (None for
            ``llama-cpp``, which scores only half of each chunk).
        tokens: Tokens scored.
        max_length: Tokens per forward pass.
        stride: Step between windows (``max_length`` for the disjoint protocols).
        provider: Execution provider used.
        bytes: UTF-8 bytes of the scored documents.
        windows: Forward passes run.
        seconds: Wall-clock time of the scoring.
        protocol: ``hf``, ``lm-eval`` or ``llama-cpp``.
        standard_error: Standard error of the mean NLL (nats): sample std / sqrt(tokens).
        perplexity_ci: ``{"low", "high", "confidence"}``: exp(nll ∓ z·standard_error).
        word_perplexity: exp(ΣNLL / Σwords) (None for ``llama-cpp``).
        byte_perplexity: exp(ΣNLL / Σbytes) (None for ``llama-cpp``).
        words: Words of the scored documents, counted as lm-evaluation-harness does.
        nonfinite_logits: NaN or ±Inf values among the scored logits.
        documents: Documents scored.
        skipped_documents: Documents too short for the protocol, or empty.
        data: ``{"path", "format", "sha256", "text_field"}``.
        per_document: One ``{"name", "tokens", "nll", "perplexity", "words", "bytes"}`` per
            scored document.
        reference: The fidelity report against ``--reference`` (see :func:`evaluate_perplexity`).
        window_nll: ΣNLL of each forward pass, in pass order: what the baseline gate pairs
            (:mod:`llmtool.evaluate.gate`).
        window_tokens: Tokens scored by each pass.
        preprocess: The task preprocessing applied to each document before tokenizing
            (``wikitext``), or None.
    """

    perplexity: float
    nll: float
    bits_per_byte: float | None
    tokens: int
    max_length: int
    stride: int
    provider: str
    bytes: int
    windows: int
    seconds: float
    protocol: str = defaults.EVAL_PROTOCOL
    standard_error: float | None = None
    perplexity_ci: dict[str, float] | None = None
    word_perplexity: float | None = None
    byte_perplexity: float | None = None
    words: int = 0
    nonfinite_logits: int = 0
    documents: int = 1
    skipped_documents: int = 0
    data: dict[str, Any] = field(default_factory=dict)
    per_document: list[dict[str, Any]] = field(default_factory=list)
    reference: dict[str, Any] | None = None
    window_nll: list[float] = field(default_factory=list)
    window_tokens: list[int] = field(default_factory=list)
    preprocess: str | None = None

    def to_dict(self) -> dict[str, Any]:
        record = asdict(self)
        if record["reference"] is None:
            del record["reference"]
        return record


def default_max_length(model: OnnxCausalLM, protocol: str = defaults.EVAL_PROTOCOL) -> int:
    """The window the protocol's own tool would use.

    ``lm-eval``: the model's context (lm-evaluation-harness' ``max_length`` is the model's
    ``max_position_embeddings``). ``hf`` and ``llama-cpp``: min(model context, 1024), the
    transformers guide's window and a ``-c`` that fits every small model.
    """
    context = model.max_positions or defaults.MAX_EVAL_LENGTH
    if protocol == "lm-eval":
        return context
    return min(context, defaults.MAX_EVAL_LENGTH)


def check_max_length(
    model: OnnxCausalLM, max_length: int | None, protocol: str = defaults.EVAL_PROTOCOL
) -> int:
    """The window length to use: ``max_length`` or the protocol's default, within the context.

    Raises:
        UsageError: ``max_length`` exceeds the model's context.
    """
    max_length = max_length or default_max_length(model, protocol)
    if model.max_positions and max_length > model.max_positions:
        raise UsageError(
            f"--max-length {max_length} exceeds the model's context of {model.max_positions} tokens",
            f"use --max-length {model.max_positions} or less.",
        )
    return max_length


@dataclass
class Plan:
    """What :func:`score` runs: the passes over every document, and what they need.

    Attributes:
        model: The export under test.
        corpus: The documents.
        protocol: The protocol, with its settings and special tokens.
        passes: ``(document index, pass)`` for every forward pass, in document order.
        reference: The model compared with, if any.
        truncated: ``max_tokens`` left passes out (so no per-word or per-byte figures).
    """

    model: OnnxCausalLM
    corpus: Corpus
    protocol: Protocol
    passes: list[tuple[int, Pass]]
    reference: Reference | None = None
    truncated: bool = False

    @property
    def tokens(self) -> int:
        """Tokens the passes score."""
        return sum(len(p.targets) for _, p in self.passes)


@dataclass
class Scores:
    """What :func:`score` measured.

    Attributes:
        per_document: Per document, the [n] NLL arrays of its passes (empty if none ran).
        nonfinite: NaN or ±Inf values among the model's scored logits.
        seconds: Wall-clock time of the passes.
        fidelity: The comparison with the reference (None without one).
        reference_nll: The reference's [n] NLL arrays, pass by pass.
    """

    per_document: list[list[np.ndarray]]
    nonfinite: int
    seconds: float
    fidelity: FidelityAccumulator | None = None
    reference_nll: list[np.ndarray] = field(default_factory=list)


def prepare(
    model: OnnxCausalLM,
    corpus: Corpus,
    protocol: Protocol,
    reference: Reference | None,
    max_tokens: int | None = None,
) -> Plan:
    """Tokenize the documents, check the reference tokenizes them alike, list the passes.

    With ``max_tokens``, only the first passes are kept, up to the first that brings the scored
    tokens to ``max_tokens`` or more (a bounded run, for CI).

    Raises:
        UsageError: The reference tokenizes differently, or no document is long enough.
    """
    token_ids = protocol.encode(model.tokenizer, [d.text for d in corpus.documents])
    if protocol.name == "llama-cpp":
        check_llama_cpp_length([d.name for d in corpus.documents], token_ids, protocol.max_length)
    if reference is not None:
        check_same_tokens(protocol, reference, corpus, token_ids)
    passes = [(d, p) for d, ids in enumerate(token_ids) for p in protocol.passes(ids)]
    if not passes:
        raise UsageError(
            f"No document of {corpus.path} has the {protocol.min_tokens} tokens --protocol {protocol.name} needs",
            "lower --max-length or score a longer text.",
        )
    if max_tokens is not None:
        if max_tokens < 1:
            raise UsageError(f"--max-tokens must be at least 1, got {max_tokens}")
        scored = np.cumsum([len(p.targets) for _, p in passes])
        kept = passes[: int(np.searchsorted(scored, max_tokens)) + 1]
        return Plan(model, corpus, protocol, kept, reference, len(kept) < len(passes))
    return Plan(model, corpus, protocol, passes, reference)


def score(plan: Plan, on_window: Callable[[int, int], None] | None = None) -> Scores:
    """Run every pass of ``plan`` (and the reference on the same pass), keeping per-token NLL.

    Raises:
        UsageError: The reference has another vocabulary size.
    """
    reference = plan.reference
    fidelity = FidelityAccumulator() if reference is not None else None
    scores = Scores([[] for _ in plan.corpus.documents], 0, 0.0, fidelity)
    # Every pass's logits land in one reused buffer and are scored in place (no [n, V] copies).
    window = functools.partial(plan.model.window_logits, reuse=True)
    start = time.perf_counter()
    for i, (d, p) in enumerate(plan.passes):
        add_pass(scores, d, score_pass(window, reference, p))
        if on_window is not None:
            on_window(i + 1, len(plan.passes))
    scores.seconds = time.perf_counter() - start
    return scores


def summarize(plan: Plan, scores: Scores) -> PerplexityResult:
    """The result over the scored documents (those with at least one pass)."""
    corpus, proto = plan.corpus, plan.protocol
    scored = [
        (doc, np.concatenate(parts))
        for doc, parts in zip(corpus.documents, scores.per_document, strict=True)
        if parts
    ]
    nll = np.concatenate([x for _, x in scored])  # [tokens]
    nll_sum = float(nll.sum())
    n_bytes = sum(doc.bytes for doc, _ in scored)
    n_words = sum(doc.words for doc, _ in scored)
    summary = nll_summary(nll)
    # llama-cpp scores half of each chunk: per-word and per-byte figures would mean nothing.
    per_word = proto.scores_every_token and not plan.truncated
    return PerplexityResult(
        perplexity=summary["perplexity"],
        nll=summary["nll"],
        bits_per_byte=nll_sum / math.log(2) / n_bytes if per_word else None,
        tokens=len(nll),
        max_length=proto.max_length,
        stride=proto.stride,
        provider=plan.model.provider,
        bytes=n_bytes,
        windows=len(plan.passes),
        seconds=scores.seconds,
        protocol=proto.name,
        standard_error=summary["standard_error"],
        perplexity_ci=summary["perplexity_ci"],
        word_perplexity=safe_exp(nll_sum / n_words) if per_word else None,
        byte_perplexity=safe_exp(nll_sum / n_bytes) if per_word else None,
        words=n_words,
        nonfinite_logits=scores.nonfinite,
        documents=len(scored),
        skipped_documents=len(corpus.documents) - len(scored) + corpus.skipped,
        data={
            "path": str(corpus.path),
            "format": corpus.format,
            "sha256": corpus.sha256,
            "text_field": corpus.text_field,
        },
        per_document=[
            {
                "name": doc.name,
                "tokens": len(x),
                "nll": float(x.mean()),
                "perplexity": safe_exp(float(x.mean())),
                "words": doc.words,
                "bytes": doc.bytes,
            }
            for doc, x in scored
        ],
        # Rounded to 1e-6 nats: far below any difference the gate judges, and compact.
        window_nll=[round(float(x.sum()), 6) for parts in scores.per_document for x in parts],
        window_tokens=[len(x) for parts in scores.per_document for x in parts],
        preprocess=corpus.preprocess,
    )


def reference_summary(reference: Reference, scores: Scores) -> dict[str, Any]:
    """The result's ``reference`` entry: the reference's perplexity and the fidelity figures."""
    assert scores.fidelity is not None
    report = scores.fidelity.report()
    ref = nll_summary(np.concatenate(scores.reference_nll))
    kl = np.maximum(np.concatenate(scores.fidelity.kl), 1e-12)
    # 40 log-spaced bins from the least to the largest KL: the plot's distribution.
    edges = np.geomspace(kl.min(), max(kl.max(), kl.min() * 10), 41)
    return {
        "model": reference.spec,
        "kind": reference.kind,
        "device": reference.device,
        "perplexity": report.reference_perplexity,
        "standard_error": ref["standard_error"],
        "perplexity_ci": ref["perplexity_ci"],
        "delta_perplexity": report.delta_perplexity,
        "log_ppl_ratio": report.log_ppl_ratio,
        "kl_divergence": report.kl_divergence,
        "top1_agreement": report.top1_agreement,
        "nonfinite_logits": report.nonfinite_logits,
        "tokens": report.tokens,
        "window_nll": [round(float(x.sum()), 6) for x in scores.reference_nll],
        "kl_histogram": {
            "edges": edges.tolist(),
            "counts": np.histogram(kl, edges)[0].tolist(),
        },
    }


def evaluate_perplexity(
    model: OnnxCausalLM | str | Path,
    data: str | Path | Corpus,
    *,
    max_length: int | None = None,
    stride: int | None = None,
    provider: str = defaults.PROVIDER,
    session_options: SessionOptions | None = None,
    on_window: Callable[[int, int], None] | None = None,
    protocol: str = defaults.EVAL_PROTOCOL,
    text_field: str = defaults.EVAL_TEXT_FIELD,
    reference: str | Path | Reference | None = None,
    preprocess: str | None = None,
    max_tokens: int | None = None,
    on_plan: Callable[[Plan], None] | None = None,
    score_fn: Callable[..., Scores] | None = None,
) -> PerplexityResult:
    """Perplexity of an export on a text file, a directory of .txt files or JSONL.

    Args:
        model: An :class:`OnnxCausalLM` or an export directory.
        data: The data path, or a :class:`~llmtool.evaluate.data.Corpus` already read.
        max_length: Tokens per forward pass; default the model's context for ``lm-eval``,
            else min(model context, 1024).
        stride: Step between windows (``hf`` only); default ``max_length // 2``.
        provider: ``auto``, ``cuda`` or ``cpu``.
        session_options: ONNX Runtime settings.
        on_window: Progress callback ``(done, total)`` over forward passes.
        protocol: ``hf``, ``lm-eval`` or ``llama-cpp`` (see :mod:`llmtool.evaluate.protocols`).
        text_field: The text field of JSONL data.
        reference: A PyTorch model spec or an export directory (or a loaded
            :class:`~llmtool.evaluate.reference.Reference`) scored on the same passes; adds
            ``reference`` to the result: its perplexity, ΔPPL, ln(PPL/PPL_ref),
            KL(P_ref || P) mean / median / p99 / max, top-1 agreement and the model's
            non-finite logits.
        preprocess: ``wikitext`` to score lm-evaluation-harness' detokenized text (words and
            bytes counted on the original); ignored when ``data`` is a Corpus already read.
        max_tokens: Score only the first passes, up to about this many tokens (see
            :func:`prepare`).
        on_plan: Called with the plan before scoring (how many passes and tokens will run).
        score_fn: Runs the passes instead of :func:`score`, same signature (``--ray``:
            :func:`llmtool.batch.ray.ray_scorer`).

    Raises:
        UsageError: Bad data or options, or a reference with another tokenizer or vocabulary.
    """
    corpus = data if isinstance(data, Corpus) else load_corpus(data, text_field, preprocess)
    if not isinstance(model, OnnxCausalLM):
        model = OnnxCausalLM(model, provider, options=session_options)
    max_length = check_max_length(model, max_length, protocol)
    proto = make_protocol(protocol, model.tokenizer, max_length, stride)
    if reference is not None and not isinstance(reference, Reference):
        reference = load_reference(reference, provider, session_options)
    plan = prepare(model, corpus, proto, reference, max_tokens)
    if on_plan is not None:
        on_plan(plan)
    scores = (score_fn or score)(plan, on_window)
    result = summarize(plan, scores)
    if reference is not None:
        result.reference = reference_summary(reference, scores)
    return result
