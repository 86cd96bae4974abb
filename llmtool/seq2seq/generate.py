"""Generation on an encoder-decoder export: the encoder once, then the decoder loop.

Greedy and sampled generation reuse the decoder-only layers of :mod:`llmtool.generate`
(:func:`~llmtool.generate.token_steps`, :func:`~llmtool.generate.stream_tokens`,
:func:`~llmtool.generate.finish_outputs`) over a :class:`~llmtool.runtime.seq2seq.Seq2SeqDecoder`,
so the sampling, penalty, stop-string, time-limit and streaming options behave the same; the
processors' history is the decoder's (start token + output), as in transformers. ``num_beams``
> 1 runs :func:`llmtool.seq2seq.beam.beam_search` (no sampling options, no streaming: a beam's
text is known at the end).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmtool import defaults
from llmtool.errors import UsageError
from llmtool.generate import (
    GeneratedText,
    GenerationResult,
    GenerationTiming,
    TextCallback,
    finish_outputs,
    stream_tokens,
    token_steps,
)
from llmtool.prompts import check_max_new_tokens
from llmtool.runtime.decoders import Decoder, Step
from llmtool.runtime.seq2seq import OnnxSeq2Seq, Seq2SeqDecoder
from llmtool.runtime.session import SessionOptions
from llmtool.runtime.stopping import RowStops, StopConditions, decode_new_tokens
from llmtool.sampling import Sampler, SamplingConfig
from llmtool.seq2seq.constraints import Constraints


@dataclass
class Seq2SeqTiming(GenerationTiming):
    """:class:`~llmtool.generate.GenerationTiming` plus the encoder's share of the prefill."""

    encoder_s: float = 0.0


class ConstrainedDecoder(Decoder):
    """A :class:`Seq2SeqDecoder` whose logits follow the generation config's :class:`Constraints`."""

    def __init__(self, inner: Seq2SeqDecoder, constraints: Constraints, max_new_tokens: int):
        self.inner, self.constraints = inner, constraints
        self.max_length = 1 + max_new_tokens  # the decoder start token counts, as in transformers
        self.cur_len = 1
        self.history: np.ndarray | None = None  # [rows, cur_len]: start token + tokens fed

    def _step(self, step: Step) -> Step:
        logits = self.constraints.apply(step.logits(), self.cur_len, self.max_length, self.history)
        self.cur_len += 1
        return Step(logits)

    def prefill(self, rows: Any) -> Step:
        start = self.inner.model.decoder_start_token_id
        self.history = np.full((len(rows), 1), start, dtype=np.int64)
        return self._step(self.inner.prefill(rows))

    def step(self, tokens: np.ndarray) -> Step:
        if self.history is not None:
            fed = np.asarray(tokens, dtype=np.int64).reshape(len(self.history), 1)
            self.history = np.concatenate([self.history, fed], axis=1)
        return self._step(self.inner.step(tokens))


def constraints_of(model: OnnxSeq2Seq) -> Constraints:
    """The export's generation-config rules (forced / banned tokens, minimum length)."""
    return Constraints.of(model.generation_config, model.eos_token_ids())


def config_defaults(model: OnnxSeq2Seq) -> dict[str, Any]:
    """The generation-config settings ``generate`` applies without being asked, for the report."""
    config = model.generation_config
    keys = (
        "num_beams",
        "no_repeat_ngram_size",
        "length_penalty",
        "early_stopping",
        "min_length",
        "forced_bos_token_id",
        "forced_eos_token_id",
        "bad_words_ids",
    )
    return {k: config[k] for k in keys if config.get(k) not in (None, 0, [], False)}


def default_beams(model: OnnxSeq2Seq, sampling: SamplingConfig, stop: StopConditions) -> int:
    """The generation config's ``num_beams`` when the request is a plain search, else 1.

    transformers would run a beam *sampling* for ``do_sample`` with ``num_beams`` > 1; llmtool
    has no beam sampling, so sampling, stop strings and structured output keep one beam.
    """
    plain = (
        sampling.strategy == "greedy" and not sampling.has_processors and not sampling.structured
    )
    if not plain or stop.stop or stop.max_time is not None:
        return 1
    return max(1, int(model.generation_config.get("num_beams") or 1))


def beam_defaults(model: OnnxSeq2Seq) -> tuple[float, bool | str]:
    """``length_penalty`` and ``early_stopping`` as transformers' generation config gives them."""
    config = model.generation_config
    return float(config.get("length_penalty", 1.0)), config.get("early_stopping", False)


def tokenize_sources(model: OnnxSeq2Seq, sources: Sequence[str]) -> list[list[int]]:
    """Token ids of each source (with the tokenizer's special tokens, e.g. T5's ``</s>``).

    Raises:
        UsageError: No source, an empty one, or one longer than the encoder's limit.
    """
    if not sources:
        raise UsageError("No source given", "pass --prompt TEXT or --prompt-file FILE.")
    rows = [list(model.tokenizer(s)["input_ids"]) for s in sources]
    model.check_sources(rows)
    return rows


def check_target_length(model: OnnxSeq2Seq, max_new_tokens: int) -> None:
    """Refuse more new tokens than the decoder's learned positions hold (BART, Marian).

    Raises:
        UsageError: ``max_new_tokens`` out of range.
    """
    check_max_new_tokens(max_new_tokens)
    limit = model.contract.max_positions
    if limit is not None and max_new_tokens + 1 > limit:
        raise UsageError(
            f"--max-new-tokens {max_new_tokens} exceeds the decoder's {limit} positions",
            f"use at most {limit - 1}.",
        )


def generate_seq2seq(
    model: OnnxSeq2Seq | str | Path,
    sources: Sequence[str],
    *,
    max_new_tokens: int = defaults.MAX_NEW_TOKENS,
    sampling: SamplingConfig | None = None,
    num_beams: int | None = None,
    length_penalty: float | None = None,
    early_stopping: bool | str | None = None,
    provider: str = defaults.PROVIDER,
    on_text: TextCallback | None = None,
    session_options: SessionOptions | None = None,
    stop: StopConditions | None = None,
) -> GenerationResult:
    """Generate a target for each source, batched (sources right-padded).

    Args:
        model: An :class:`OnnxSeq2Seq` or an encoder-decoder export directory.
        sources: Source texts; all run as one batch.
        max_new_tokens: Upper bound on target tokens (EOS included).
        sampling: Token choice for ``num_beams == 1``; greedy by default.
        num_beams: Beam search with this many beams when > 1 (as transformers' ``num_beams``;
            default: the generation config's for a plain search, see :func:`default_beams`).
        length_penalty: Beam search's length exponent (default: the generation config's, else 1).
        early_stopping: Beam search's stop rule (default: the generation config's, else False).
        provider: ``auto``, ``cuda`` or ``cpu`` (when ``model`` is a directory).
        on_text: Streaming callback ``on_text(row, new_text)`` (greedy / sampling only).
        session_options: ONNX Runtime settings (when ``model`` is a directory).
        stop: Stop strings, a time limit, EOS on or off (greedy / sampling only).

    Raises:
        UsageError: Bad sources or options.
    """
    sampling = sampling or SamplingConfig()
    stop = stop or StopConditions()
    stop.validate()
    if not isinstance(model, OnnxSeq2Seq):
        model = OnnxSeq2Seq(model, provider, options=session_options)
    if num_beams is None:
        num_beams = default_beams(model, sampling, stop)
    if num_beams < 1:
        raise UsageError(f"--num-beams must be at least 1, got {num_beams}")
    if num_beams > 1 and (sampling.strategy != "greedy" or sampling.has_processors):
        raise UsageError(
            "--num-beams runs a plain beam search",
            "drop the sampling and penalty options, or use --num-beams 1.",
        )
    if num_beams > 1 and (stop.stop or stop.max_time is not None or sampling.structured):
        raise UsageError(
            "--stop, --max-time and structured output need --num-beams 1",
            "drop them or use --num-beams 1.",
        )
    check_target_length(model, max_new_tokens)
    rows = tokenize_sources(model, sources)
    if num_beams > 1:
        penalty, early = beam_defaults(model)
        return _beam(
            model,
            sources,
            rows,
            max_new_tokens,
            num_beams,
            penalty if length_penalty is None else length_penalty,
            early if early_stopping is None else early_stopping,
            sampling,
        )
    eos = np.array(model.eos_token_ids() if stop.eos else [], dtype=np.int64)
    stops = RowStops(len(rows), eos, stop)
    inner = model.decoder()
    decoder = ConstrainedDecoder(inner, constraints_of(model), max_new_tokens)
    sampler = Sampler(sampling, model.tokenizer, model.eos_token_ids())
    sampler.begin([[model.decoder_start_token_id]] * len(rows))
    steps = token_steps(
        decoder, sampler, lambda: decoder.prefill(rows), max_new_tokens, stops, model.pad_token_id
    )
    streamed = stream_tokens(steps, model.tokenizer, stops, on_text)
    outputs = finish_outputs(list(sources), rows, streamed, model.tokenizer, stops, on_text)
    for row, out in enumerate(outputs):
        out.logprobs = sampler.token_logprobs(row, len(out.token_ids))
    timing = _timing(streamed.prefill_s, streamed.decode_s, streamed.decode_tokens, rows)
    timing.encoder_s = inner.encoder_seconds
    return GenerationResult(
        model.provider, outputs, timing, sampling, huge_pages=model.huge_pages.to_dict()
    )


def _timing(prefill: float, decode: float, tokens: int, rows: list[list[int]]) -> Seq2SeqTiming:
    return Seq2SeqTiming(
        prefill_s=prefill,
        decode_s=decode,
        decode_tokens=tokens,
        decode_tokens_per_s=tokens / decode if tokens and decode > 0 else 0.0,
        prompt_tokens=sum(len(r) for r in rows),
    )


def _beam(
    model: OnnxSeq2Seq,
    sources: Sequence[str],
    rows: list[list[int]],
    max_new_tokens: int,
    num_beams: int,
    length_penalty: float,
    early_stopping: Any,
    sampling: SamplingConfig,
) -> GenerationResult:
    """The beam-search branch of :func:`generate_seq2seq`."""
    from llmtool.seq2seq.beam import BeamSettings, beam_search

    settings = BeamSettings(num_beams, length_penalty, early_stopping, max_new_tokens)
    eos = model.eos_token_ids()
    decoder = model.decoder()
    start = time.perf_counter()
    result = beam_search(
        decoder,
        rows,
        settings,
        model.decoder_start_token_id,
        eos,
        model.pad_token_id,
        constraints_of(model),
    )
    seconds = time.perf_counter() - start
    outputs = []
    for source, ids, ids_in in zip(sources, result.token_ids, rows, strict=True):
        reason = "eos" if ids and ids[-1] in eos else "length"
        outputs.append(
            GeneratedText(
                prompt=source,
                text=decode_new_tokens(model.tokenizer, ids, eos),
                token_ids=ids,
                new_tokens=len(ids),
                finish_reason=reason,
                prompt_ids=ids_in,
            )
        )
    tokens = sum(len(o.token_ids) for o in outputs)
    timing = _timing(0.0, seconds, tokens, rows)
    timing.encoder_s = decoder.encoder_seconds
    return GenerationResult(
        model.provider, outputs, timing, sampling, huge_pages=model.huge_pages.to_dict()
    )
