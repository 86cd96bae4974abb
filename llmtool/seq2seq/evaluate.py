"""``llmtool eval`` on an encoder-decoder export: target perplexity, BLEU, chrF, timings.

* Perplexity of each target given its source, token-weighted over every target token (EOS
  included), from one teacher-forced decoder call per batch
  (:meth:`~llmtool.runtime.seq2seq.OnnxSeq2Seq.teacher_forced`), with the standard error of
  the mean NLL and its interval (:func:`llmtool.evaluate.metrics.nll_summary`).
* BLEU and chrF of generated targets (greedy, or ``num_beams``) against the references, with
  sacrebleu's defaults (corpus BLEU with its 13a tokenizer, chrF with n=6, beta=2) and its
  signature recorded, so scores compare with published ones.
* Timing of that generation: encoder seconds, time to the first target token, decoder tok/s.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from llmtool import defaults
from llmtool.errors import UsageError
from llmtool.evaluate.metrics import nll_summary, token_nll
from llmtool.runtime.seq2seq import OnnxSeq2Seq
from llmtool.seq2seq.pairs import Pair, pairs_sha256, read_pairs, target_ids

EVAL_BATCH = 8
SCHEMA = "llmtool-seq2seq-eval"


def _batches(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def target_nll(model: OnnxSeq2Seq, pairs: list[Pair], batch_size: int = EVAL_BATCH) -> np.ndarray:
    """[N] NLL (nats) of every target token given its source, over all pairs in order."""
    tok = model.tokenizer
    eos_ids = model.eos_token_ids()
    eos = eos_ids[0] if eos_ids else None
    sources = [list(tok(p.source)["input_ids"]) for p in pairs]
    model.check_sources(sources)
    targets = [target_ids(tok, p.target, eos) for p in pairs]
    limit = model.contract.max_positions
    for p, t in zip(pairs, targets, strict=True):
        if limit is not None and len(t) > limit:
            raise UsageError(
                f"The target of {p.where} has {len(t)} tokens, more than the decoder's {limit}",
                "shorten it.",
            )
    nll = []
    for idx in _batches(list(range(len(pairs))), batch_size):
        logits = model.teacher_forced([sources[i] for i in idx], [targets[i] for i in idx])
        for i, row in zip(idx, logits, strict=True):
            nll.append(token_nll(row, np.array(targets[i], dtype=np.int64)))
    return np.concatenate(nll)


def translation_scores(hypotheses: list[str], references: list[str]) -> dict[str, Any]:
    """sacrebleu's corpus BLEU and chrF, with their signatures.

    Raises:
        UsageError: sacrebleu is not installed.
    """
    try:
        import sacrebleu
    except ImportError as e:
        raise UsageError(
            "BLEU and chrF need sacrebleu", "pip install 'llmtool[seq2seq]' (or sacrebleu)."
        ) from e
    bleu = sacrebleu.metrics.BLEU()
    chrf = sacrebleu.metrics.CHRF()
    b = bleu.corpus_score(hypotheses, [references])
    c = chrf.corpus_score(hypotheses, [references])
    return {
        "bleu": b.score,
        "bleu_signature": str(bleu.get_signature()),
        "chrf": c.score,
        "chrf_signature": str(chrf.get_signature()),
    }


def evaluate_seq2seq(
    model: OnnxSeq2Seq | str | Path,
    data: str | Path,
    *,
    source_field: str = "source",
    target_field: str = "target",
    generate: bool = True,
    num_beams: int = 1,
    max_new_tokens: int = defaults.MAX_NEW_TOKENS,
    batch_size: int = EVAL_BATCH,
    provider: str = defaults.PROVIDER,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Score an encoder-decoder export on a pairs file.

    Args:
        model: An :class:`OnnxSeq2Seq` or its export directory.
        data: A TSV or JSONL file of pairs (:func:`llmtool.seq2seq.pairs.read_pairs`).
        source_field: The source's field (JSONL, or a TSV header).
        target_field: The target's field.
        generate: Also generate every target and score BLEU / chrF and timing.
        num_beams: Beams for that generation (1: greedy).
        max_new_tokens: Longest generated target.
        batch_size: Pairs per batch.
        provider: ``auto``, ``cuda`` or ``cpu`` (when ``model`` is a directory).
        on_progress: Called as ``(what, done, total)``.

    Returns:
        The record: ``perplexity`` (with ``standard_error`` and ``perplexity_ci``), ``tokens``,
        ``pairs``, ``data_sha256`` and, with ``generate``, ``bleu``, ``chrf`` and ``timing``.
    """
    from llmtool.seq2seq.generate import generate_seq2seq

    if not isinstance(model, OnnxSeq2Seq):
        model = OnnxSeq2Seq(model, provider)
    pairs = read_pairs(data, source_field, target_field)
    progress = on_progress or (lambda what, done, total: None)
    progress("Scoring targets", 0, len(pairs))
    nll = target_nll(model, pairs, batch_size)
    record: dict[str, Any] = {
        "schema": SCHEMA,
        "model": str(model.directory),
        "model_type": model.manifest.get("model_type"),
        "data": str(data),
        "data_sha256": pairs_sha256(pairs),
        "pairs": len(pairs),
        "tokens": len(nll),
        **nll_summary(nll),
    }
    if not generate:
        return record
    hypotheses: list[str] = []
    encoder_s = first_s = decode_s = 0.0
    decode_tokens = 0
    for done, batch in enumerate(_batches(pairs, batch_size)):
        progress("Generating targets", done * batch_size, len(pairs))
        start = time.perf_counter()
        result = generate_seq2seq(
            model, [p.source for p in batch], max_new_tokens=max_new_tokens, num_beams=num_beams
        )
        hypotheses += [o.text.strip() for o in result.outputs]
        timing = result.timing
        encoder_s += getattr(timing, "encoder_s", 0.0)
        first_s += timing.prefill_s if num_beams == 1 else time.perf_counter() - start
        decode_s += timing.decode_s
        decode_tokens += timing.decode_tokens
    record.update(translation_scores(hypotheses, [p.target for p in pairs]))
    batches = len(_batches(pairs, batch_size))
    record["num_beams"] = num_beams
    record["timing"] = {
        "encoder_s_per_batch": encoder_s / batches,
        "ttft_s_per_batch": first_s / batches if num_beams == 1 else None,
        "decoder_tokens_per_s": decode_tokens / decode_s if decode_s > 0 else 0.0,
        "batch_size": batch_size,
    }
    record["hypotheses"] = hypotheses
    return record
