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
from llmtool.chat_template import end_of_turn_ids
from llmtool.prompts import (
    Prompt,
    check_max_new_tokens,
    is_messages,
    tokenize_prompts,
)
from llmtool.runtime.decoders import Decoder, Step, cache_length
from llmtool.runtime.model import OnnxCausalLM
from llmtool.runtime.session import SessionOptions
from llmtool.runtime.stopping import Detokenizer, RowStops, StopConditions, decode_new_tokens
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
        finish_reason: ``eos`` (an EOS or end-of-turn token), ``stop`` (a stop string),
            ``length`` (``max_new_tokens``) or ``time`` (``max_time``).
        prompt_ids: The token ids fed to the model (the rendered chat template with ``chat``).
        logprobs: Per token, its log-probability and the top alternatives (``logprobs`` set).
    """

    prompt: str
    text: str
    token_ids: list[int]
    new_tokens: int
    finish_reason: str
    prompt_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[str, Any]] | None = None

    @property
    def ended_at_once(self) -> bool:
        """True when the first token ended the row (nothing was said)."""
        return self.finish_reason == "eos" and self.new_tokens == 1


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


def token_steps(
    decoder: Decoder,
    sampler: Sampler,
    prefill: Callable[[], Step],
    max_new_tokens: int,
    stops: RowStops,
    pad_id: int,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The token-step layer: prefill once (``prefill()``), then one decode step per yield.

    Yields:
        Per step, tokens [batch] int64 (``pad_id`` on rows already finished) and live [batch]
        bool, the rows that take their token. The first yield follows the prefill; the
        generator ends when every row has finished (``stops``: EOS, time, or a stop string the
        consumer marked between yields) or after ``max_new_tokens`` tokens.
    """
    tokens = sampler.choose(prefill())
    for step in range(max_new_tokens):
        live = ~stops.finished
        tokens = np.where(live, tokens, pad_id)
        yield tokens, live
        stops.after_step(np.where(live, tokens, -1))
        if stops.finished.all() or step == max_new_tokens - 1:
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
    stops: RowStops,
    on_text: TextCallback | None,
) -> Streamed:
    """The streaming layer: collect each row's tokens, call ``on_text`` as its text grows, time.

    A row whose text reaches a stop string is marked finished in ``stops`` (the token layer
    then feeds it padding). Prefill time runs to the first tokens (time to first token); decode
    time covers every later step, streaming included.
    """
    batch = len(stops.finished)
    generated: list[list[int]] = [[] for _ in range(batch)]
    detok = [Detokenizer(tokenizer, stops.stop, stops.eos) for _ in range(batch)]
    decode_tokens = 0
    start = time.perf_counter()
    prefill_s = decode_start = 0.0
    for step, (tokens, live) in enumerate(steps):
        if step == 0:
            decode_start = time.perf_counter()
            prefill_s = decode_start - start
        for i in np.flatnonzero(live):
            generated[i].append(int(tokens[i]))
            if on_text is not None or stops.stop:
                delta = detok[i].push(generated[i])
                if delta and on_text is not None:
                    on_text(int(i), delta)
                if detok[i].cut is not None:
                    stops.finish(int(i), "stop")
        if step > 0:
            decode_tokens += int(live.sum())
    decode_s = time.perf_counter() - decode_start
    return Streamed(generated, detok, prefill_s, decode_s, decode_tokens)


def prompt_label(prompt: Prompt, ids: Sequence[int], tokenizer: Any) -> str:
    """The prompt as shown: its text, a conversation's last message, or the decoded ids."""
    if isinstance(prompt, str):
        return prompt
    if is_messages(prompt):
        return str(prompt[-1]["content"])  # type: ignore[index]
    return str(tokenizer.decode(list(ids)))


def finish_outputs(
    prompts: Sequence[Prompt],
    rows: Sequence[Sequence[int]],
    streamed: Streamed,
    tokenizer: Any,
    stops: RowStops,
    on_text: TextCallback | None,
) -> list[GeneratedText]:
    """Each row's final text (streaming its held-back rest) and why it stopped."""
    outputs = []
    for row, (prompt, ids) in enumerate(zip(prompts, streamed.generated, strict=True)):
        cut = streamed.detokenizers[row].cut
        text = cut if cut is not None else decode_new_tokens(tokenizer, ids, stops.eos)
        if on_text is not None and (rest := streamed.detokenizers[row].flush(text)):
            on_text(row, rest)
        outputs.append(
            GeneratedText(
                prompt=prompt_label(prompt, rows[row], tokenizer),
                text=text,
                token_ids=ids,
                new_tokens=len(ids),
                finish_reason=stops.reasons[row],
                prompt_ids=list(rows[row]),
            )
        )
    return outputs


def stop_token_ids(model: OnnxCausalLM, chat: bool, eos: bool = True) -> np.ndarray:
    """Token ids that end a row: the model's EOS ids, plus the template's end-of-turn in chat."""
    if not eos:
        return np.array([], dtype=np.int64)
    ids = list(model.eos_token_ids())
    if chat:
        ids += [t for t in end_of_turn_ids(model.tokenizer) if t not in ids]
    return np.array(ids, dtype=np.int64)


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
    stop: StopConditions | None = None,
    chat: bool = False,
    system: str | None = None,
    row_seeds: Sequence[int] | None = None,
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
        stop: Stop strings and a time limit (:class:`StopConditions`).
        chat: Render text prompts as user turns with the chat template and its generation
            prompt (conversations, lists of ``{"role", "content"}`` messages, always are); the
            template's end-of-turn token then ends rows too.
        system: A system message put before each chat prompt that has none.
        row_seeds: One sampling seed per prompt (instead of ``sampling.seed`` for the batch).

    Returns:
        The texts, token ids and timing.

    Raises:
        UsageError: Bad prompts or parameters.
    """
    check_max_new_tokens(max_new_tokens)
    sampling = sampling or SamplingConfig()
    stop = stop or StopConditions(eos=stop_at_eos)
    stop.validate()
    if not isinstance(model, OnnxCausalLM):
        model = OnnxCausalLM(model, provider, options=session_options)
    tokenizer = model.tokenizer
    rows = tokenize_prompts(model, prompts, max_new_tokens, chat, system)
    chat = chat or any(is_messages(p) for p in prompts)
    stops = RowStops(len(rows), stop_token_ids(model, chat, stop.eos and stop_at_eos), stop)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    decoder = model.decoder(
        len(rows), cache_length(model, max(len(r) for r in rows) + max_new_tokens)
    )
    sampler = Sampler(sampling, tokenizer, stops.eos.tolist() or model.eos_token_ids())
    sampler.begin(rows)  # the processors' history and the grammar's rows
    if row_seeds is not None:
        sampler.seed_rows(row_seeds)
    steps = token_steps(
        decoder, sampler, lambda: decoder.prefill(rows), max_new_tokens, stops, pad_id
    )
    streamed = stream_tokens(steps, tokenizer, stops, on_text)
    outputs = finish_outputs(prompts, rows, streamed, tokenizer, stops, on_text)
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
