"""Text generation on an ONNX export: batched, left-padded, KV cache fed back step to step.

Structure follows the usual fast-generation split: :func:`prefill` runs the prompts once,
:func:`decode_one_token` extends every row by one token, and :class:`~llmtool.sampling.Sampler`
chooses tokens. Rows stop independently at EOS (the export's generation config, as
transformers does); finished rows are fed the pad token until every row is done.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmtool import defaults
from llmtool.errors import UsageError
from llmtool.runtime import OnnxCausalLM, SessionOptions
from llmtool.sampling import Sampler, SamplingConfig

TextCallback = Callable[[int, str], None]


@dataclass
class GeneratedText:
    """One prompt's result.

    Attributes:
        prompt: The prompt text.
        text: The generated continuation, special tokens removed.
        token_ids: The generated token ids (EOS included when it was produced).
        new_tokens: ``len(token_ids)``.
        finish_reason: ``eos`` or ``length``.
    """

    prompt: str
    text: str
    token_ids: list[int]
    new_tokens: int
    finish_reason: str


@dataclass
class GenerationTiming:
    """Wall-clock timing of one :func:`generate` call.

    Attributes:
        prefill_s: Prompt forward pass plus the first token's choice (time to first token).
        decode_s: Every later step.
        decode_tokens: Tokens produced by the decode steps, summed over rows.
        decode_tokens_per_s: ``decode_tokens / decode_s`` (all rows together).
        prompt_tokens: Prompt tokens, summed over rows (padding excluded).
    """

    prefill_s: float
    decode_s: float
    decode_tokens: int
    decode_tokens_per_s: float
    prompt_tokens: int


@dataclass
class GenerationResult:
    """What :func:`generate` returns."""

    provider: str
    outputs: list[GeneratedText]
    timing: GenerationTiming
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` form: provider, outputs and timing."""
        return {
            "provider": self.provider,
            "outputs": [asdict(o) for o in self.outputs],
            "timing": asdict(self.timing),
            "sampling": asdict(self.sampling),
        }


@dataclass
class Batch:
    """Left-padded prompts: every row's last prompt token sits in the last column."""

    input_ids: np.ndarray  # [B, L] int64
    attention_mask: np.ndarray  # [B, L] int64
    position_ids: np.ndarray  # [B, L] int64

    @classmethod
    def left_padded(cls, rows: Sequence[Sequence[int]], pad_id: int) -> Batch:
        length = max(len(r) for r in rows)
        ids = np.full((len(rows), length), pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), length), dtype=np.int64)
        for i, row in enumerate(rows):
            ids[i, length - len(row) :] = row
            mask[i, length - len(row) :] = 1
        # Positions count real tokens only; padding gets position 0 (masked anyway).
        positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
        return cls(ids, mask, positions)


def prefill(model: OnnxCausalLM, batch: Batch) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Run the prompts; returns last-position logits [B, V] and the cache."""
    logits, cache = model.forward(
        batch.input_ids,
        batch.attention_mask,
        batch.position_ids,
        model.empty_cache(len(batch.input_ids)),
    )
    return logits[:, -1, :], cache


def decode_one_token(
    model: OnnxCausalLM,
    tokens: np.ndarray,
    attention_mask: np.ndarray,
    positions: np.ndarray,
    cache: dict[str, np.ndarray],
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Feed one token per row ([B]); returns logits [B, V] and the extended cache."""
    logits, cache = model.forward(tokens[:, None], attention_mask, positions[:, None], cache)
    return logits[:, -1, :], cache


class _Detokenizer:
    """Incremental detokenization: emits only complete new text (no half UTF-8 characters)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.emitted = ""

    def push(self, token_ids: list[int]) -> str:
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(self.emitted):
            return ""
        delta, self.emitted = text[len(self.emitted) :], text
        return delta

    def flush(self, text: str) -> str:
        """The rest of the final text (held-back partial characters included)."""
        delta = text[len(self.emitted) :] if text.startswith(self.emitted) else ""
        self.emitted = text
        return delta


def tokenize_prompts(
    model: OnnxCausalLM, prompts: Sequence[str], max_new_tokens: int
) -> list[list[int]]:
    """Token ids of each prompt, checked against the model's context length."""
    if not prompts:
        raise UsageError("No prompt given", "pass --prompt TEXT or --prompt-file FILE.")
    rows = []
    for prompt in prompts:
        if not prompt.strip():
            raise UsageError("A prompt is empty", "give every --prompt some text.")
        ids = model.tokenizer(prompt)["input_ids"]
        if not ids:
            raise UsageError(
                f"The prompt {prompt[:40]!r} encodes to no tokens", "give it some text."
            )
        if model.max_positions and len(ids) + max_new_tokens > model.max_positions:
            raise UsageError(
                f"A prompt of {len(ids)} tokens plus {max_new_tokens} new tokens exceeds the model's "
                f"context of {model.max_positions} tokens",
                "shorten the prompt or lower --max-new-tokens.",
            )
        rows.append(list(ids))
    return rows


def generate(
    model: OnnxCausalLM | str | Path,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = defaults.MAX_NEW_TOKENS,
    sampling: SamplingConfig | None = None,
    provider: str = defaults.PROVIDER,
    on_text: TextCallback | None = None,
    session_options: SessionOptions | None = None,
) -> GenerationResult:
    """Generate a continuation for each prompt, batched.

    Args:
        model: An :class:`OnnxCausalLM` or an export directory.
        prompts: Prompt texts; all run as one left-padded batch.
        max_new_tokens: Upper bound on tokens generated per prompt (>= 1).
        sampling: Token choice; greedy by default.
        provider: ``auto``, ``cuda`` or ``cpu`` (used when ``model`` is a directory).
        on_text: Called as ``on_text(row, new_text)`` whenever a row's text grows (streaming).
        session_options: ONNX Runtime settings (used when ``model`` is a directory).

    Returns:
        The texts, token ids and timing.

    Raises:
        UsageError: Bad prompts or parameters.
    """
    if max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    sampling = sampling or SamplingConfig()
    sampler = Sampler(sampling)
    if not isinstance(model, OnnxCausalLM):
        model = OnnxCausalLM(model, provider, options=session_options)
    tokenizer = model.tokenizer
    rows = tokenize_prompts(model, prompts, max_new_tokens)
    eos = np.array(model.eos_token_ids(), dtype=np.int64)
    pad_id = (
        tokenizer.pad_token_id
        if tokenizer.pad_token_id is not None
        else (int(eos[0]) if eos.size else 0)
    )
    batch = Batch.left_padded(rows, pad_id)
    n = len(rows)

    start = time.perf_counter()
    logits, cache = prefill(model, batch)
    tokens = sampler(logits)
    prefill_s = time.perf_counter() - start

    generated: list[list[int]] = [[] for _ in range(n)]
    finished = np.zeros(n, dtype=bool)
    detok = [_Detokenizer(tokenizer) for _ in range(n)]
    mask = batch.attention_mask
    positions = batch.position_ids[:, -1]
    decode_tokens = 0
    decode_start = time.perf_counter()
    for step in range(max_new_tokens):
        tokens = np.where(finished, pad_id, tokens)
        for i in np.flatnonzero(~finished):
            generated[i].append(int(tokens[i]))
            if on_text is not None:
                delta = detok[i].push(generated[i])
                if delta:
                    on_text(int(i), delta)
        if step > 0:
            decode_tokens += int((~finished).sum())
        finished |= np.isin(tokens, eos)
        if finished.all() or step == max_new_tokens - 1:
            break
        mask = np.concatenate([mask, np.ones((n, 1), dtype=np.int64)], axis=1)
        positions = positions + 1
        logits, cache = decode_one_token(model, tokens, mask, positions, cache)
        tokens = sampler(logits)
    decode_s = time.perf_counter() - decode_start

    outputs = []
    for row, (prompt, ids) in enumerate(zip(prompts, generated, strict=True)):
        stopped = bool(ids) and ids[-1] in eos
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if on_text is not None and (rest := detok[row].flush(text)):
            on_text(row, rest)
        outputs.append(
            GeneratedText(
                prompt=prompt,
                text=text,
                token_ids=ids,
                new_tokens=len(ids),
                finish_reason="eos" if stopped else "length",
            )
        )
    timing = GenerationTiming(
        prefill_s=prefill_s,
        decode_s=decode_s,
        decode_tokens=decode_tokens,
        decode_tokens_per_s=decode_tokens / decode_s if decode_tokens and decode_s > 0 else 0.0,
        prompt_tokens=int(batch.attention_mask.sum()),
    )
    return GenerationResult(model.provider, outputs, timing, sampling)
