"""Export validation: the ONNX graph against the PyTorch model it came from.

A fixed batch of two prompts of different lengths (so one row is padded) is run through both.
Compared: logits at every real prompt position (prefill), logits over teacher-forced decode steps
that feed PyTorch's greedy tokens through ORT's KV cache, and the greedy tokens themselves. A
greedy mismatch where PyTorch's own top-2 logits are closer than the tolerance is a near-tie,
recorded but not a failure.

The prompts are short, so anything that depends on the position (sliding windows, rope scaling
past ``original_max_position_embeddings``) is checked once more on one long sequence: longer
than every window and rope threshold the config declares (bounded by the context), prefilled up
to just before the largest threshold and then fed token by token through the cache.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from llmtool import defaults
from llmtool.runtime.decoders import mask_positions, pad_rows
from llmtool.runtime.model import OnnxCausalLM

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
    padding: str
    prompt_tokens: list[int]
    decode_steps: int
    prefill_max_abs_diff: float
    decode_max_abs_diff: float
    greedy_match: bool
    greedy_tokens_compared: int
    near_ties: list[dict[str, Any]] = field(default_factory=list)
    mismatches: list[dict[str, Any]] = field(default_factory=list)
    long_tokens: int = 0  # length of the long sequence (0: the config declares no threshold)
    long_max_abs_diff: float = 0.0
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
        if self.long_max_abs_diff > self.tolerance:
            return (
                f"max |Δlogits| {self.long_max_abs_diff:.3g} over a {self.long_tokens}-token "
                f"sequence exceeds {self.tolerance:g}"
            )
        m = self.mismatches[0]
        return (
            f"greedy token differs at row {m['row']} step {m['step']} ({m['onnx']} vs {m['torch']})"
        )


def _torch_logits(model: Any, ids: list[int]) -> np.ndarray:
    """[L, V] float32 logits of one unpadded row."""
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids], dtype=torch.long), use_cache=False)
    return out.logits[0].float().numpy()


# Positions checked past the largest threshold (and fed one by one through the cache).
LONG_TAIL = 16


def position_thresholds(config: Any) -> list[int]:
    """The positions past which the model behaves differently, as its config declares them."""
    found: list[int] = []
    for name in ("sliding_window", "attention_chunk_size", "window_size"):  # GPT-Neo: window_size
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            found.append(value)
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    for params in _rope_dicts(rope):
        original = params.get("original_max_position_embeddings")
        if isinstance(original, int) and original > 0:
            found.append(original)
    return sorted(set(found))


def _rope_dicts(rope: Any) -> list[dict[str, Any]]:
    """The rope parameter sets of a config (one, or one per layer type as in Gemma 3)."""
    if not isinstance(rope, dict):
        return []
    nested = [v for v in rope.values() if isinstance(v, dict)]
    return nested or [rope]


def _long_reference(
    torch_model: Any, tokenizer: Any, context: int
) -> tuple[list[int], np.ndarray | None, int]:
    """(ids, PyTorch logits [L, V], split) of one sequence past every threshold; ([], None, 0)
    when the config declares none."""
    thresholds = position_thresholds(torch_model.config)
    if not thresholds:
        return [], None, 0
    length = min(context, thresholds[-1] + LONG_TAIL)
    ids: list[int] = []
    text = " ".join(VALIDATION_PROMPTS)
    while len(ids) < length:
        ids.extend(tokenizer(text)["input_ids"])
    ids = ids[:length]
    split = max(1, min(thresholds[-1], length) - LONG_TAIL // 2)
    return ids, _torch_logits(torch_model, ids), split


def _long_sequence_diff(
    onnx_model: OnnxCausalLM, ids: list[int], reference: np.ndarray | None, split: int
) -> tuple[int, float]:
    """(length, max |Δlogits|) over the long sequence, prefilled to ``split`` then fed one
    token at a time through the cache; (0, 0) when there is none."""
    if reference is None:
        return 0, 0.0
    length = len(ids)
    row = np.array([ids], dtype=np.int64)
    cache = onnx_model.empty_cache(1)
    logits, cache = onnx_model.forward(
        row[:, :split],
        np.ones((1, split), np.int64),
        np.arange(split, dtype=np.int64)[None],
        cache,
    )
    got = [logits[0]]
    for t in range(split, length):
        logits, cache = onnx_model.forward(
            row[:, t : t + 1], np.ones((1, t + 1), np.int64), np.array([[t]], np.int64), cache
        )
        got.append(logits[0])
    return length, float(np.abs(np.concatenate(got) - reference).max())


@dataclass
class TorchReference:
    """What PyTorch computed on the validation inputs, so its model can be freed before ONNX
    Runtime loads the export (the two fp32 copies of the weights are never held together)."""

    rows: list[list[int]]  # the prompts' token ids
    prefill: list[np.ndarray]  # [L_b, V] per row
    steps: list[list[np.ndarray]]  # [B][steps + 1] -> [V]: the last-position logits per step
    tokens: np.ndarray  # [B, steps + 1] PyTorch's greedy tokens
    long_ids: list[int]
    long_logits: np.ndarray | None  # [L, V]
    long_split: int


def torch_reference(
    torch_model: Any,
    tokenizer: Any,
    context: int,
    decode_steps: int = defaults.VALIDATION_DECODE_STEPS,
) -> TorchReference:
    """PyTorch's logits and greedy tokens on the validation inputs.

    Each prompt runs alone (no padding) with full forward passes, appending its greedy token each
    step; then the long sequence past every position threshold (bounded by ``context``).
    """
    rows = [list(tokenizer(p)["input_ids"]) for p in VALIDATION_PROMPTS]
    ref_prefill = [_torch_logits(torch_model, row) for row in rows]
    greedy = [[int(ref[-1].argmax())] for ref in ref_prefill]  # [B][steps + 1]
    ref_steps = [[ref[-1]] for ref in ref_prefill]  # [B][steps + 1] -> [V]
    for _ in range(decode_steps):
        for b, row in enumerate(rows):
            last = _torch_logits(torch_model, row + greedy[b])[-1]
            ref_steps[b].append(last)
            greedy[b].append(int(last.argmax()))
    long_ids, long_logits, split = _long_reference(torch_model, tokenizer, context)
    tokens = np.array(greedy, dtype=np.int64)
    return TorchReference(rows, ref_prefill, ref_steps, tokens, long_ids, long_logits, split)


def validate_export(
    onnx_model: OnnxCausalLM,
    torch_model: Any,
    tokenizer: Any,
    dtype: str,
    *,
    decode_steps: int = defaults.VALIDATION_DECODE_STEPS,
    tolerance: float | None = None,
    reference: TorchReference | None = None,
) -> ValidationReport:
    """Compare ``onnx_model`` (an ORT session) with PyTorch on the validation batch.

    PyTorch's side is ``reference`` when given (``torch_model`` is then not used), else computed
    from ``torch_model`` (:func:`torch_reference`). ONNX Runtime runs the two prompts as one
    padded batch (left-padded for standard exports, right-padded for fused ones): one forward
    pass for the prefill logits at every real position, then the export's own decoder fed
    PyTorch's greedy tokens; then the long sequence through the cache.
    """
    start = time.perf_counter()
    tolerance = defaults.PARITY_TOLERANCE[dtype] if tolerance is None else tolerance
    context = int(getattr(onnx_model, "max_positions", 0) or 0) or 1 << 30
    if reference is None:
        reference = torch_reference(torch_model, tokenizer, context, decode_steps)
    rows, ref_prefill, ref_steps, tokens = (
        reference.rows,
        reference.prefill,
        reference.steps,
        reference.tokens,
    )
    n = len(rows)
    decode_steps = tokens.shape[1] - 1

    side = onnx_model.padding
    ids, mask = pad_rows(rows, side)
    positions = mask_positions(mask)
    logits, _ = onnx_model.forward(ids, mask, positions, onnx_model.empty_cache(n))
    prefill_diff = 0.0
    for b in range(n):
        real = logits[b][mask[b].astype(bool)]
        prefill_diff = max(prefill_diff, float(np.abs(real - ref_prefill[b]).max()))

    decoder = onnx_model.decoder(n, max(len(r) for r in rows) + decode_steps + 1)
    got_steps = [decoder.prefill(rows).logits().copy()]
    for t in range(decode_steps):
        got_steps.append(decoder.step(tokens[:, t]).logits().copy())
    decode_diff = 0.0
    for t in range(1, decode_steps + 1):
        for b in range(n):
            decode_diff = max(decode_diff, float(np.abs(got_steps[t][b] - ref_steps[b][t]).max()))

    long_tokens, long_diff = _long_sequence_diff(
        onnx_model, reference.long_ids, reference.long_logits, reference.long_split
    )

    near_ties: list[dict[str, Any]] = []
    mismatches: list[dict[str, Any]] = []
    for step, got in enumerate(got_steps):
        for r in range(n):
            onnx_tok, torch_tok = int(got[r].argmax()), int(tokens[r, step])
            if onnx_tok == torch_tok:
                continue
            top2 = np.sort(ref_steps[r][step])[-2:]
            record: dict[str, Any] = {
                "row": r,
                "step": step,
                "onnx": onnx_tok,
                "torch": torch_tok,
                "torch_top2_gap": float(top2[1] - top2[0]),
            }
            (near_ties if record["torch_top2_gap"] < tolerance else mismatches).append(record)
    return ValidationReport(
        passed=prefill_diff <= tolerance
        and decode_diff <= tolerance
        and long_diff <= tolerance
        and not mismatches,
        provider=onnx_model.provider,
        dtype=dtype,
        tolerance=tolerance,
        batch=n,
        padding=side,
        prompt_tokens=[len(r) for r in rows],
        decode_steps=decode_steps,
        prefill_max_abs_diff=prefill_diff,
        decode_max_abs_diff=decode_diff,
        greedy_match=not mismatches,
        greedy_tokens_compared=n * (decode_steps + 1),
        near_ties=near_ties,
        mismatches=mismatches,
        long_tokens=long_tokens,
        long_max_abs_diff=long_diff,
        seconds=time.perf_counter() - start,
    )
