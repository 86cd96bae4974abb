"""``llmtool eval --throughput`` on an encoder-decoder export: timed generation scenarios.

Each scenario is a batch size, a source length and a number of new tokens. The sources are the
pairs' own text, tokenized, cut to the length and decoded again (so the lengths are real tokens
of real text: the recorded ``source_tokens`` is what the encoder saw). EOS is ignored so every
row generates exactly ``new_tokens`` (greedy, the generation config's rules applied). After
``warmup`` untimed runs, ``repeats`` timed runs give the encoder ms, the time to the first target
token (encoder + first decoder step) and the decoder tok/s after it, reported as medians with the
spread of tok/s ((best - worst) / best) beside them.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Any

from llmtool import defaults
from llmtool.errors import UsageError
from llmtool.runtime.seq2seq import OnnxSeq2Seq
from llmtool.runtime.stopping import StopConditions
from llmtool.seq2seq.pairs import Pair

SOURCE_LENGTHS = (32,)
NEW_TOKENS = 16


def _sources(model: OnnxSeq2Seq, pairs: list[Pair], length: int, batch: int) -> list[str]:
    """``batch`` source texts of about ``length`` tokens, cut from the pairs' sources."""
    tok = model.tokenizer
    ids: list[int] = []
    while len(ids) < length:
        for p in pairs:
            ids += list(tok(p.source, add_special_tokens=False)["input_ids"])
    text = tok.decode(ids[: max(1, length - 1)], skip_special_tokens=True)  # -1: the EOS added
    return [text] * batch


def seq2seq_throughput(
    model: OnnxSeq2Seq,
    pairs: list[Pair],
    *,
    batch_sizes: Sequence[int] = defaults.THROUGHPUT_BATCH_SIZES,
    source_lengths: Sequence[int] = SOURCE_LENGTHS,
    new_tokens: int = NEW_TOKENS,
    warmup: int = defaults.THROUGHPUT_WARMUP,
    repeats: int = defaults.THROUGHPUT_REPEATS,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Time every (batch size, source length) scenario; the record's ``throughput`` section.

    Raises:
        UsageError: ``repeats`` < 1, ``warmup`` < 0, or a source past the encoder's limit.
    """
    from llmtool.seq2seq.generate import generate_seq2seq

    if repeats < 1 or warmup < 0:
        raise UsageError(
            f"--repeats must be at least 1 and --warmup at least 0 (got {repeats}, {warmup})"
        )
    progress = on_progress or (lambda what, done, total: None)
    shapes = [(b, n) for b in batch_sizes for n in source_lengths]
    scenarios = []
    for done, (batch, length) in enumerate(shapes):
        progress(f"Timing batch {batch}, source {length}", done, len(shapes))
        sources = _sources(model, pairs, length, batch)
        runs = []
        for i in range(warmup + repeats):
            result = generate_seq2seq(
                model,
                sources,
                max_new_tokens=new_tokens,
                num_beams=1,
                stop=StopConditions(eos=False),
            )
            if i >= warmup:
                runs.append(result.timing)
        tps = [t.decode_tokens / t.decode_s if t.decode_s > 0 else 0.0 for t in runs]
        scenarios.append(
            {
                "batch_size": batch,
                "source_length": length,
                "source_tokens": len(model.tokenizer(sources[0])["input_ids"]),
                "new_tokens": new_tokens,
                "repeats": repeats,
                "warmup": warmup,
                "encoder_ms": 1000 * statistics.median(getattr(t, "encoder_s", 0.0) for t in runs),
                "ttft_ms": 1000 * statistics.median(t.prefill_s for t in runs),
                "decoder_tokens_per_s": statistics.median(tps),
                "decoder_tokens_per_s_all": tps,
                "spread": (max(tps) - min(tps)) / max(tps) if max(tps) > 0 else 0.0,
            }
        )
    return {
        "batch_sizes": list(batch_sizes),
        "source_lengths": list(source_lengths),
        "new_tokens": new_tokens,
        "execution_provider": model.provider,
        "scenarios": scenarios,
    }
