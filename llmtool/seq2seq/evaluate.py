"""``llmtool eval`` on an encoder-decoder export: target perplexity, BLEU, chrF, timings.

* Perplexity of each target given its source, token-weighted over every target token (EOS
  included), from one teacher-forced decoder call per batch
  (:meth:`~llmtool.runtime.seq2seq.OnnxSeq2Seq.teacher_forced`), with the standard error of
  the mean NLL and its interval (:func:`llmtool.evaluate.metrics.nll_summary`).
* BLEU and chrF of generated targets (greedy, or ``num_beams``) against the references, with
  sacrebleu's defaults (corpus BLEU with its 13a tokenizer, chrF with n=6, beta=2) and its
  signature recorded, so scores compare with published ones.
* Timing of that generation: encoder seconds, time to the first target token, decoder tok/s.
* With ``throughput``, timed scenarios (:mod:`llmtool.seq2seq.throughput`); with ``baseline``,
  the gate (:mod:`llmtool.seq2seq.gate`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from llmtool import defaults
from llmtool.errors import UsageError
from llmtool.evaluate.metrics import FidelityAccumulator, nll_summary, token_nll
from llmtool.runtime.seq2seq import OnnxSeq2Seq
from llmtool.seq2seq.gate import (
    SCHEMA,
    SCHEMA_VERSION,
    Seq2SeqTolerance,
    compare_seq2seq,
    read_seq2seq_baseline,
)
from llmtool.seq2seq.pairs import Pair, pairs_sha256, read_pairs, target_ids

EVAL_BATCH = 8


def _batches(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def target_nll(
    model: OnnxSeq2Seq,
    pairs: list[Pair],
    batch_size: int = EVAL_BATCH,
    fidelity: tuple[Any, FidelityAccumulator] | None = None,
) -> np.ndarray:
    """[N] NLL (nats) of every target token given its source, over all pairs in order.

    With ``fidelity`` (a PyTorch model and an accumulator), the reference's logits at the same
    positions are compared with the export's (KL, top-1, ΔPPL).
    """
    return np.concatenate(pair_nlls(model, pairs, batch_size, fidelity))


def pair_nlls(
    model: OnnxSeq2Seq,
    pairs: list[Pair],
    batch_size: int = EVAL_BATCH,
    fidelity: tuple[Any, FidelityAccumulator] | None = None,
) -> list[np.ndarray]:
    """Per pair, the [len(target)] NLL (nats) of its target tokens (see :func:`target_nll`)."""
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
        refs = (
            _torch_logits(fidelity[0], model, [sources[i] for i in idx], [targets[i] for i in idx])
            if fidelity
            else None
        )
        for j, (i, row) in enumerate(zip(idx, logits, strict=True)):
            tgt = np.array(targets[i], dtype=np.int64)
            nll.append(token_nll(row, tgt))
            if fidelity is not None and refs is not None:
                fidelity[1].add(row, refs[j], tgt)
    return nll


def _torch_logits(
    reference: Any, model: OnnxSeq2Seq, sources: list[list[int]], targets: list[list[int]]
) -> list[np.ndarray]:
    """The PyTorch reference's teacher-forced logits, per row [len(target), vocab]."""
    import torch

    from llmtool.runtime.decoders import pad_rows

    ids, mask = pad_rows(sources, "right", model.pad_token_id)
    inputs = [[model.decoder_start_token_id, *t[:-1]] for t in targets]
    dec, _ = pad_rows(inputs, "right", model.pad_token_id)
    with torch.no_grad():
        logits = (
            reference(
                input_ids=torch.from_numpy(ids),
                attention_mask=torch.from_numpy(mask),
                decoder_input_ids=torch.from_numpy(dec),
            )
            .logits.float()
            .numpy()
        )
    return [logits[i, : len(t)] for i, t in enumerate(targets)]


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
    reference: str | Path | None = None,
    baseline: str | Path | None = None,
    tolerance: Seq2SeqTolerance | None = None,
    throughput: dict[str, Any] | None = None,
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
        reference: A PyTorch encoder-decoder directory scored on the same tokens: the record
            gets ``fidelity`` (ΔPPL, ln(PPL/PPL_ref), KL divergence, top-1 agreement).
        baseline: An earlier record (its ``--json`` file): the record gets ``gate``
            (:func:`llmtool.seq2seq.gate.compare_seq2seq`; ``gate["passed"]`` says if it passed).
        tolerance: What that gate lets pass (default: :class:`Seq2SeqTolerance`'s).
        throughput: Keyword arguments of
            :func:`llmtool.seq2seq.throughput.seq2seq_throughput` (``{}``: its defaults): the
            record gets ``throughput`` (medians over repeats per scenario). None: not timed.
        on_progress: Called as ``(what, done, total)``.

    Returns:
        The record: ``perplexity`` (with ``standard_error`` and ``perplexity_ci``), ``tokens``,
        ``pairs``, ``data_sha256``, ``pair_nll`` / ``pair_tokens`` (per-pair NLL sums and
        target lengths, the gate's pairing unit) and, with ``generate``, ``bleu``, ``chrf`` and
        ``timing``.

    Raises:
        UsageError: Bad pairs, or a baseline that is not comparable (exit code 2).
    """
    if not isinstance(model, OnnxSeq2Seq):
        model = OnnxSeq2Seq(model, provider)
    pairs = read_pairs(data, source_field, target_field)
    old = read_seq2seq_baseline(baseline) if baseline is not None else None
    progress = on_progress or (lambda what, done, total: None)
    progress("Scoring targets", 0, len(pairs))
    fidelity = None
    if reference is not None:
        from llmtool.models.loading import resolve_spec
        from llmtool.models.seq2seq import load_seq2seq

        fidelity = (load_seq2seq(resolve_spec(reference)).model, FidelityAccumulator())
    per_pair = pair_nlls(model, pairs, batch_size, fidelity)
    nll = np.concatenate(per_pair)
    record: dict[str, Any] = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "model": str(model.directory),
        "model_type": model.manifest.get("model_type"),
        "data": str(data),
        "data_sha256": pairs_sha256(pairs),
        "pairs": len(pairs),
        "tokens": len(nll),
        **nll_summary(nll),
        "pair_nll": [float(x.sum(dtype=np.float64)) for x in per_pair],
        "pair_tokens": [len(x) for x in per_pair],
    }
    if fidelity is not None:
        record["fidelity"] = {"reference": str(reference), **fidelity[1].report().to_dict()}
    if generate:
        record.update(_generation(model, pairs, num_beams, max_new_tokens, batch_size, progress))
    if throughput is not None:
        from llmtool.seq2seq.throughput import seq2seq_throughput

        record["throughput"] = seq2seq_throughput(model, pairs, on_progress=progress, **throughput)
    if old is not None:
        rows = compare_seq2seq(old, record, tolerance or Seq2SeqTolerance(), baseline)
        record["gate"] = {
            "baseline": str(baseline),
            "passed": not any(r.status == "worse" for r in rows),
            "rows": [asdict(r) for r in rows],
        }
    return record


def _generation(
    model: OnnxSeq2Seq,
    pairs: list[Pair],
    num_beams: int,
    max_new_tokens: int,
    batch_size: int,
    progress: Callable[[str, int, int], None],
) -> dict[str, Any]:
    """Generate every target: BLEU, chrF, timing and the hypotheses, as record keys."""
    from llmtool.seq2seq.generate import generate_seq2seq

    record: dict[str, Any] = {}
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
    record["max_new_tokens"] = max_new_tokens
    record["timing"] = {
        "encoder_s_per_batch": encoder_s / batches,
        "ttft_s_per_batch": first_s / batches if num_beams == 1 else None,
        "decoder_tokens_per_s": decode_tokens / decode_s if decode_s > 0 else 0.0,
        "batch_size": batch_size,
    }
    record["hypotheses"] = hypotheses
    return record
