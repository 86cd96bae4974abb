"""Parity of an encoder-decoder export with PyTorch, recorded in llmtool.json.

Two sources of different lengths run as one right-padded batch through ONNX Runtime and one at a
time (unpadded) through PyTorch. Compared: the logits of the first decoder step, the logits of
:data:`~llmtool.defaults.VALIDATION_DECODE_STEPS` teacher-forced steps that feed PyTorch's greedy
tokens through the export's self- and cross-attention caches, and the greedy tokens themselves
(a mismatch where PyTorch's top-2 logits are closer than the tolerance is a near-tie, recorded
but not a failure). The record has the decoder validation's keys, so the export table reads both.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from llmtool import defaults
from llmtool.runtime.seq2seq import OnnxSeq2Seq

VALIDATION_SOURCES = (
    "translate English to German: The quick brown fox jumps over the lazy dog.",
    "summarize: Once upon a time",
)


def _reference(model: Any, source: list[int], start: int, steps: int) -> list[np.ndarray]:
    """PyTorch's logits [V] at each of ``steps + 1`` greedy steps of one unpadded source."""
    import torch

    src = torch.tensor([source], dtype=torch.long)
    target = [start]
    logits = []
    with torch.no_grad():
        encoded = model.get_encoder()(input_ids=src)
        for _ in range(steps + 1):
            out = model(
                encoder_outputs=encoded,
                decoder_input_ids=torch.tensor([target], dtype=torch.long),
                use_cache=False,
            )
            last = out.logits[0, -1].float().numpy()
            logits.append(last)
            target.append(int(last.argmax()))
    return logits


def validate_seq2seq(
    onnx_model: OnnxSeq2Seq,
    torch_model: Any,
    tokenizer: Any,
    *,
    decode_steps: int = defaults.VALIDATION_DECODE_STEPS,
    tolerance: float | None = None,
    dtype: str = "fp32",
) -> dict[str, Any]:
    """Compare the export with the PyTorch model; the record for ``manifest["validation"]``.

    ``dtype`` is the graphs' weight precision; it picks the logit tolerance when none is given.
    """
    start_time = time.perf_counter()
    tolerance = defaults.PARITY_TOLERANCE[dtype] if tolerance is None else tolerance
    rows = [list(tokenizer(s)["input_ids"]) for s in VALIDATION_SOURCES]
    if onnx_model.max_source is not None:
        rows = [r[: onnx_model.max_source] for r in rows]
    start = onnx_model.decoder_start_token_id
    ref = [_reference(torch_model, r, start, decode_steps) for r in rows]  # [B][steps+1][V]
    tokens = np.array([[int(step.argmax()) for step in r] for r in ref], dtype=np.int64)

    decoder = onnx_model.decoder()
    got = [decoder.prefill(rows).logits().copy()]
    for t in range(decode_steps):
        got.append(decoder.step(tokens[:, t]).logits().copy())
    diffs = [
        max(float(np.abs(got[t][b] - ref[b][t]).max()) for b in range(len(rows)))
        for t in range(decode_steps + 1)
    ]
    near_ties: list[dict[str, Any]] = []
    mismatches: list[dict[str, Any]] = []
    for t, step in enumerate(got):
        for b in range(len(rows)):
            onnx_tok, torch_tok = int(step[b].argmax()), int(tokens[b, t])
            if onnx_tok == torch_tok:
                continue
            top2 = np.sort(ref[b][t])[-2:]
            record = {
                "row": b,
                "step": t,
                "onnx": onnx_tok,
                "torch": torch_tok,
                "torch_top2_gap": float(top2[1] - top2[0]),
            }
            (near_ties if record["torch_top2_gap"] < tolerance else mismatches).append(record)
    first, decode = diffs[0], max(diffs[1:], default=0.0)
    return {
        "passed": first <= tolerance and decode <= tolerance and not mismatches,
        "provider": onnx_model.provider,
        "dtype": dtype,
        "tolerance": tolerance,
        "batch": len(rows),
        "padding": "right",
        "source_tokens": [len(r) for r in rows],
        "decode_steps": decode_steps,
        "prefill_max_abs_diff": first,
        "decode_max_abs_diff": decode,
        "greedy_match": not mismatches,
        "greedy_tokens_compared": len(rows) * (decode_steps + 1),
        "near_ties": near_ties,
        "mismatches": mismatches,
        "gate": True,
        "seconds": time.perf_counter() - start_time,
    }


def failure_reason(report: dict[str, Any]) -> str:
    """One clause saying which check of a failed :func:`validate_seq2seq` record failed."""
    tol = report["tolerance"]
    if report["prefill_max_abs_diff"] > tol:
        return f"first-step max |Δlogits| {report['prefill_max_abs_diff']:.3g} exceeds {tol:g}"
    if report["decode_max_abs_diff"] > tol:
        return f"decode max |Δlogits| {report['decode_max_abs_diff']:.3g} exceeds {tol:g}"
    m = report["mismatches"][0]
    return f"greedy token differs at row {m['row']} step {m['step']} ({m['onnx']} vs {m['torch']})"
