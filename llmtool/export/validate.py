"""Export validation: the ONNX graph against the PyTorch model it came from.

A fixed batch of two prompts of different lengths (so one row is left-padded) is run through
both. Compared: logits at every real prompt position (prefill), logits over teacher-forced
decode steps that feed PyTorch's greedy tokens through ORT's KV cache, and the greedy tokens
themselves. A greedy mismatch where PyTorch's own top-2 logits are closer than the tolerance is a
near-tie, recorded but not a failure.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from llmtool import defaults
from llmtool.generate import Batch
from llmtool.runtime import OnnxCausalLM

VALIDATION_PROMPTS = (
    "The quick brown fox jumps over the lazy dog, and then it runs into the forest to",
    "Once upon a time",
)


@dataclass
class ValidationReport:
    """The parity figures recorded in llmtool.json.

    Attributes:
        passed: All checks within tolerance.
        tolerance: Max |Δlogits| allowed.
        prefill_max_abs_diff: Over all real prompt positions of both rows.
        decode_max_abs_diff: Over the teacher-forced decode steps.
        greedy_match: ORT's argmax equals PyTorch's greedy token at every step (near-ties aside).
    """

    passed: bool
    provider: str
    dtype: str
    tolerance: float
    batch: int
    prompt_tokens: list[int]
    decode_steps: int
    prefill_max_abs_diff: float
    decode_max_abs_diff: float
    greedy_match: bool
    greedy_tokens_compared: int
    near_ties: list[dict[str, Any]] = field(default_factory=list)
    mismatches: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def failure_reason(self) -> str:
        if self.prefill_max_abs_diff > self.tolerance:
            return (
                f"prefill max |Δlogits| {self.prefill_max_abs_diff:.3g} exceeds {self.tolerance:g}"
            )
        if self.decode_max_abs_diff > self.tolerance:
            return f"decode max |Δlogits| {self.decode_max_abs_diff:.3g} exceeds {self.tolerance:g}"
        m = self.mismatches[0]
        return (
            f"greedy token differs at row {m['row']} step {m['step']} ({m['onnx']} vs {m['torch']})"
        )


def _torch_logits(
    model: Any, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray
) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            position_ids=torch.from_numpy(positions),
            use_cache=False,
        )
    return out.logits.float().numpy()


def validate_export(
    onnx_model: OnnxCausalLM,
    torch_model: Any,
    tokenizer: Any,
    dtype: str,
    *,
    decode_steps: int = defaults.VALIDATION_DECODE_STEPS,
    tolerance: float | None = None,
) -> ValidationReport:
    """Compare ``onnx_model`` (an ORT session) with ``torch_model`` on the validation batch."""
    start = time.perf_counter()
    tolerance = defaults.PARITY_TOLERANCE[dtype] if tolerance is None else tolerance
    rows = [list(tokenizer(p)["input_ids"]) for p in VALIDATION_PROMPTS]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batch = Batch.left_padded(rows, pad_id)
    real = batch.attention_mask.astype(bool)
    n = len(rows)

    # PyTorch: full forward passes, greedy token appended each step (no cache involved).
    ids, mask, pos = batch.input_ids, batch.attention_mask, batch.position_ids
    ref_prefill = _torch_logits(torch_model, ids, mask, pos)
    ref_steps = [ref_prefill[:, -1]]
    for _ in range(decode_steps):
        nxt = ref_steps[-1].argmax(-1)[:, None]
        ids = np.concatenate([ids, nxt], axis=1)
        mask = np.concatenate([mask, np.ones((n, 1), np.int64)], axis=1)
        pos = np.concatenate([pos, pos[:, -1:] + 1], axis=1)
        ref_steps.append(_torch_logits(torch_model, ids, mask, pos)[:, -1])
    greedy = np.stack([s.argmax(-1) for s in ref_steps], axis=1)  # [B, steps + 1]

    # ONNX Runtime: prefill, then PyTorch's greedy tokens fed through the KV cache.
    logits, cache = onnx_model.forward(
        batch.input_ids, batch.attention_mask, batch.position_ids, onnx_model.empty_cache(n)
    )
    prefill_diff = float(np.abs(logits - ref_prefill)[real].max())
    got_steps = [logits[:, -1]]
    mask, pos = batch.attention_mask, batch.position_ids[:, -1]
    for t in range(decode_steps):
        mask = np.concatenate([mask, np.ones((n, 1), np.int64)], axis=1)
        pos = pos + 1
        logits, cache = onnx_model.forward(greedy[:, t : t + 1], mask, pos[:, None], cache)
        got_steps.append(logits[:, -1])
    decode_diff = max(
        float(np.abs(g - r).max()) for g, r in zip(got_steps[1:], ref_steps[1:], strict=True)
    )

    near_ties: list[dict[str, Any]] = []
    mismatches: list[dict[str, Any]] = []
    for step, (got, ref) in enumerate(zip(got_steps, ref_steps, strict=True)):
        for row in range(n):
            onnx_tok, torch_tok = int(got[row].argmax()), int(greedy[row, step])
            if onnx_tok == torch_tok:
                continue
            top2 = np.sort(ref[row])[-2:]
            record = {
                "row": row,
                "step": step,
                "onnx": onnx_tok,
                "torch": torch_tok,
                "torch_top2_gap": float(top2[1] - top2[0]),
            }
            (near_ties if record["torch_top2_gap"] < tolerance else mismatches).append(record)
    report = ValidationReport(
        passed=prefill_diff <= tolerance and decode_diff <= tolerance and not mismatches,
        provider=onnx_model.provider,
        dtype=dtype,
        tolerance=tolerance,
        batch=n,
        prompt_tokens=[len(r) for r in rows],
        decode_steps=decode_steps,
        prefill_max_abs_diff=prefill_diff,
        decode_max_abs_diff=decode_diff,
        greedy_match=not mismatches,
        greedy_tokens_compared=n * (decode_steps + 1),
        near_ties=near_ties,
        mismatches=mismatches,
        seconds=time.perf_counter() - start,
    )
    return report
