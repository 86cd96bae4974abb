"""Text generation on an ONNX export: batched prompts, KV cache fed back step to step.

The loop is the usual fast-generation split: a :class:`~llmtool.runtime.decoders.Decoder`
prefills the prompts once and then extends every row by one token per step, and
:class:`~llmtool.sampling.Sampler` chooses the tokens (greedy ones on the device for fused
exports). Rows stop independently at EOS (the export's generation config, as transformers
does); finished rows are fed the pad token until every row is done.

Three layers, each small:

* :func:`token_steps` yields each step's tokens [batch] and which rows take them,
* :func:`stream_tokens` collects them per row, streams the text as it grows and times the run,
* :func:`generate` tokenizes, runs both and returns a :class:`GenerationResult`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmtool import defaults
from llmtool.errors import UsageError
from llmtool.runtime.decoders import Decoder, cache_length
from llmtool.runtime.model import OnnxCausalLM
from llmtool.runtime.session import SessionOptions
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
        logprobs: Per token, its log-probability and the top alternatives (``logprobs`` set).
    """

    prompt: str
    text: str
    token_ids: list[int]
    new_tokens: int
    finish_reason: str
    logprobs: list[dict[str, Any]] | None = None


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
    huge_pages: dict[str, Any] | None = None  # HugePageResult.to_dict() of the session

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` form: provider, outputs, timing, sampling and the session's huge pages."""
        return {
            "provider": self.provider,
            "outputs": [asdict(o) for o in self.outputs],
            "timing": asdict(self.timing),
            "sampling": asdict(self.sampling),
            "huge_pages": self.huge_pages,
        }


class Detokenizer:
    """Incremental detokenization: emits only complete new text (no half UTF-8 characters)."""

    def __init__(self, tokenizer: Any, eos: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.eos = eos
        self.emitted = ""

    def push(self, token_ids: list[int]) -> str:
        """The text ``token_ids`` add to what was emitted ("" while a character is incomplete)."""
        text = decode_new_tokens(self.tokenizer, token_ids, self.eos)
        if text.endswith("\ufffd") or not text.startswith(self.emitted):
            return ""
        delta, self.emitted = text[len(self.emitted) :], text
        return delta

    def flush(self, text: str) -> str:
        """The rest of the final text (held-back partial characters included)."""
        delta = text[len(self.emitted) :] if text.startswith(self.emitted) else ""
        self.emitted = text
        return delta


def decode_new_tokens(tokenizer: Any, token_ids: Sequence[int], eos: Sequence[int]) -> str:
    """The text of generated tokens: a final stop token is dropped, nothing else is.

    Special tokens inside the text stay (``<|im_start|>assistant``, an EOS that ``--ignore-eos``
    went past): stripping them would leave their neighbours (bare role words) looking like
    ordinary text.
    """
    ids = list(token_ids)
    if ids and ids[-1] in eos:
        ids = ids[:-1]
    return str(tokenizer.decode(ids, skip_special_tokens=False))


Prompt = str | Sequence[int]


def check_request(
    directory: str | Path, prompts: Sequence[Prompt], max_new_tokens: int
) -> list[list[int]]:
    """Check a generation request against an export's manifest and tokenizer, no session opened.

    Returns:
        The token ids of each prompt.

    Raises:
        UsageError: Not an export, ``max_new_tokens`` < 1, or a prompt that is empty, outside
            the vocabulary or too long for the context.
    """
    from llmtool.manifest import Manifest
    from llmtool.models.loading import ModelSpec, load_tokenizer

    check_max_new_tokens(max_new_tokens)
    directory = Path(directory)
    if not directory.is_dir():
        raise UsageError(
            f"Export directory {directory} does not exist",
            "create it with `llmtool export MODEL --out DIR`.",
        )
    contract = Manifest.read(directory)
    tokenizer = load_tokenizer(ModelSpec("hf_dir", directory, None, str(directory)))
    return tokenize_checked(
        tokenizer, prompts, max_new_tokens, contract.vocab_size, contract.max_positions
    )


def check_max_new_tokens(max_new_tokens: int) -> None:
    """Raises: UsageError: ``max_new_tokens`` < 1."""
    if max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")


def tokenize_prompts(
    model: OnnxCausalLM, prompts: Sequence[Prompt], max_new_tokens: int
) -> list[list[int]]:
    """Token ids of each prompt (text is tokenized, id lists pass through), checked against the context."""
    return tokenize_checked(
        model.tokenizer, prompts, max_new_tokens, model.vocab_size, model.max_positions
    )


def tokenize_checked(
    tokenizer: Any,
    prompts: Sequence[Prompt],
    max_new_tokens: int,
    vocab_size: int,
    max_positions: int | None,
) -> list[list[int]]:
    """Token ids of each prompt, checked against the vocabulary and the context."""
    if not prompts:
        raise UsageError("No prompt given", "pass --prompt TEXT or --prompt-file FILE.")
    rows = []
    for prompt in prompts:
        if isinstance(prompt, str):
            if not prompt.strip():
                raise UsageError("A prompt is empty", "give every --prompt some text.")
            ids = list(tokenizer(prompt)["input_ids"])
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise UsageError(
                f"The prompt {str(prompt)[:40]!r} encodes to no tokens", "give it some text."
            )
        if max(ids) >= vocab_size or min(ids) < 0:
            raise UsageError(f"A prompt holds token ids outside the vocabulary of {vocab_size}")
        if max_positions and len(ids) + max_new_tokens > max_positions:
            raise UsageError(
                f"A prompt of {len(ids)} tokens plus {max_new_tokens} new tokens exceeds the model's "
                f"context of {max_positions} tokens",
                "shorten the prompt or lower --max-new-tokens.",
            )
        rows.append(ids)
    return rows


def token_steps(
    decoder: Decoder,
    sampler: Sampler,
    rows: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos: np.ndarray,
    pad_id: int,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The token-step layer: prefill once, then one decode step per yield.

    Yields:
        Per step, tokens [batch] int64 (``pad_id`` on rows already finished) and live [batch]
        bool, the rows that take their token. The first yield follows the prefill; the
        generator ends when every row met EOS or after ``max_new_tokens`` tokens.
    """
    sampler.begin(rows)  # the processors' history and the grammar's rows
    tokens = sampler.choose(decoder.prefill(rows))
    finished = np.zeros(len(rows), dtype=bool)
    for step in range(max_new_tokens):
        tokens = np.where(finished, pad_id, tokens)
        yield tokens, ~finished
        finished |= np.isin(tokens, eos)
        if finished.all() or step == max_new_tokens - 1:
            return
        tokens = sampler.choose(decoder.step(tokens))


@dataclass
class Streamed:
    """What :func:`stream_tokens` collected: each row's tokens, its streamed text, the timing."""

    generated: list[list[int]]  # [batch][new tokens], EOS included
    detokenizers: list[Detokenizer]
    prefill_s: float
    decode_s: float
    decode_tokens: int


def stream_tokens(
    steps: Iterator[tuple[np.ndarray, np.ndarray]],
    tokenizer: Any,
    batch: int,
    on_text: TextCallback | None,
    eos: Sequence[int] = (),
) -> Streamed:
    """The streaming layer: collect each row's tokens, call ``on_text`` as its text grows, time.

    Prefill time runs to the first tokens (time to first token); decode time covers every
    later step, streaming included.
    """
    generated: list[list[int]] = [[] for _ in range(batch)]
    detok = [Detokenizer(tokenizer, eos) for _ in range(batch)]
    decode_tokens = 0
    start = time.perf_counter()
    prefill_s = decode_start = 0.0
    for step, (tokens, live) in enumerate(steps):
        if step == 0:
            decode_start = time.perf_counter()
            prefill_s = decode_start - start
        for i in np.flatnonzero(live):
            generated[i].append(int(tokens[i]))
            if on_text is not None and (delta := detok[i].push(generated[i])):
                on_text(int(i), delta)
        if step > 0:
            decode_tokens += int(live.sum())
    decode_s = time.perf_counter() - decode_start
    return Streamed(generated, detok, prefill_s, decode_s, decode_tokens)


def finish_outputs(
    prompts: Sequence[Prompt],
    streamed: Streamed,
    tokenizer: Any,
    eos: np.ndarray,
    on_text: TextCallback | None,
) -> list[GeneratedText]:
    """Each row's final text (streaming its held-back rest) and why it stopped."""
    outputs = []
    for row, (prompt, ids) in enumerate(zip(prompts, streamed.generated, strict=True)):
        stopped = bool(ids) and ids[-1] in eos
        text = decode_new_tokens(tokenizer, ids, eos.tolist())
        if on_text is not None and (rest := streamed.detokenizers[row].flush(text)):
            on_text(row, rest)
        outputs.append(
            GeneratedText(
                prompt=prompt if isinstance(prompt, str) else tokenizer.decode(list(prompt)),
                text=text,
                token_ids=ids,
                new_tokens=len(ids),
                finish_reason="eos" if stopped else "length",
            )
        )
    return outputs


def generate(
    model: OnnxCausalLM | str | Path,
    prompts: Sequence[Prompt],
    *,
    max_new_tokens: int = defaults.MAX_NEW_TOKENS,
    sampling: SamplingConfig | None = None,
    provider: str = defaults.PROVIDER,
    on_text: TextCallback | None = None,
    session_options: SessionOptions | None = None,
    stop_at_eos: bool = True,
) -> GenerationResult:
    """Generate a continuation for each prompt, batched.

    Args:
        model: An :class:`OnnxCausalLM` or an export directory.
        prompts: Prompt texts (or token id lists); all run as one batch.
        max_new_tokens: Upper bound on tokens generated per prompt (>= 1).
        sampling: Token choice; greedy by default.
        provider: ``auto``, ``cuda`` or ``cpu`` (used when ``model`` is a directory).
        on_text: Called as ``on_text(row, new_text)`` whenever a row's text grows (streaming).
        session_options: ONNX Runtime settings (used when ``model`` is a directory).
        stop_at_eos: Stop rows at EOS; ``False`` always generates ``max_new_tokens`` (benchmarks).

    Returns:
        The texts, token ids and timing.

    Raises:
        UsageError: Bad prompts or parameters.
    """
    check_max_new_tokens(max_new_tokens)
    sampling = sampling or SamplingConfig()
    if not isinstance(model, OnnxCausalLM):
        model = OnnxCausalLM(model, provider, options=session_options)
    tokenizer = model.tokenizer
    rows = tokenize_prompts(model, prompts, max_new_tokens)
    eos = np.array(model.eos_token_ids() if stop_at_eos else [], dtype=np.int64)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    decoder = model.decoder(
        len(rows), cache_length(model, max(len(r) for r in rows) + max_new_tokens)
    )
    sampler = Sampler(sampling, tokenizer, eos.tolist() or model.eos_token_ids())
    steps = token_steps(decoder, sampler, rows, max_new_tokens, eos, pad_id)
    streamed = stream_tokens(steps, tokenizer, len(rows), on_text, eos.tolist())
    outputs = finish_outputs(prompts, streamed, tokenizer, eos, on_text)
    for row, out in enumerate(outputs):
        out.logprobs = sampler.token_logprobs(row, len(out.token_ids))
    decode_s, decode_tokens = streamed.decode_s, streamed.decode_tokens
    timing = GenerationTiming(
        prefill_s=streamed.prefill_s,
        decode_s=decode_s,
        decode_tokens=decode_tokens,
        decode_tokens_per_s=decode_tokens / decode_s if decode_tokens and decode_s > 0 else 0.0,
        prompt_tokens=sum(len(r) for r in rows),
    )
    return GenerationResult(
        model.provider, outputs, timing, sampling, huge_pages=model.huge_pages.to_dict()
    )
