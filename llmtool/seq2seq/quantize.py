"""fp16 / int8 / int4 encoder-decoder exports: ONNX Runtime's converters and the fidelity gate.

fp16: ONNX Runtime's ``convert_float_to_float16`` rewrites both graphs (weights and arithmetic
in fp16, inputs / outputs / cache fp32 behind Casts); gated like the quantized ones, with
``QUANT_MAX_RELATIVE_DELTA_PPL["fp16"]``.

The traced graphs (:mod:`llmtool.export.seq2seq`) are rewritten in place by ONNX Runtime's own
``MatMulNBitsQuantizer``: every ``MatMul`` whose weight is an initializer (the attention and
feed-forward projections of both graphs and the LM head) becomes a ``MatMulNBits`` with
``bits`` 8 or 4 in blocks of ``block_size`` along the input dimension, ``accuracy_level`` 4 (int8
activations per block, as the decoder-only exports). Embeddings (Gather) stay fp32. Tied weights
need no care: the tracer folds the LM head's transposed copy of the shared embedding into its own
initializer, so quantizing the head leaves the embedding's Gather untouched.

The gate: the quantized export against the fp32 PyTorch model, teacher-forced on calibration
pairs. Sources are the sentences of the calibration text (default: the text shipped with
llmtool); each target is the fp32 model's own greedy output for its source (no download, and a
target the model finds likely, as a translation user's would be). Both score the same target
tokens; ΔPPL, KL and top-1 agreement come from
:class:`~llmtool.evaluate.metrics.FidelityAccumulator`, and the relative ΔPPL must stay within
:data:`~llmtool.defaults.QUANT_MAX_RELATIVE_DELTA_PPL` for the mode, as for decoders.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from llmtool import defaults
from llmtool.errors import UsageError


def quantize_graphs(
    directory: Path, files: list[str], mode: str, block_size: int, symmetric: bool
) -> None:
    """Rewrite each graph in ``directory`` with MatMulNBits weights (ONNX Runtime's quantizer,
    :func:`llmtool.export.quantize.quantize_traced`)."""
    import onnx

    from llmtool.export.quantize import quantize_traced

    for name in files:
        path = directory / name
        onnx.save(quantize_traced(onnx.load(str(path)), mode, block_size, symmetric), str(path))


def to_fp16(directory: Path, files: list[str]) -> None:
    """Rewrite each graph in ``directory`` with fp16 weights and arithmetic (ONNX Runtime's converter).

    ``keep_io_types``: inputs, outputs and the cache stay fp32 (a Cast at each edge), so the
    runtime feeds every weight format alike; inside, weights and activations are fp16.
    """
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    for name in files:
        path = directory / name
        model = convert_float_to_float16(onnx.load(str(path)), keep_io_types=True)
        onnx.save(model, str(path))


def describe(mode: str, block_size: int, symmetric: bool) -> dict[str, Any]:
    """The manifest's ``quantization`` entry of an encoder-decoder export."""
    from llmtool.export.quantize import describe_traced

    return {**describe_traced(mode, block_size, symmetric), "graphs": "encoder and decoder"}


def calibration_sources(text: str, count: int) -> list[str]:
    """Up to ``count`` sentences of ``text`` (split after . ! ?), the gate's sources."""
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]
    return sentences[:count]


def _greedy_targets(torch_model: Any, rows: list[list[int]], steps: int) -> list[list[int]]:
    """The fp32 model's greedy output ids for each source (no start token), at least one each."""
    import torch

    targets = []
    with torch.no_grad():
        for row in rows:
            out = torch_model.generate(
                torch.tensor([row]),
                max_new_tokens=steps,
                min_new_tokens=1,
                do_sample=False,
                num_beams=1,
            )
            targets.append([int(t) for t in out[0, 1:]])
    return targets


def _torch_teacher_forced(torch_model: Any, row: list[int], target: list[int], start: int) -> Any:
    """PyTorch's [len(target), V] float32 logits for ``target`` given ``row``, unpadded."""
    import torch

    with torch.no_grad():
        out = torch_model(
            input_ids=torch.tensor([row]),
            decoder_input_ids=torch.tensor([[start, *target[:-1]]]),
            use_cache=False,
        )
    return out.logits[0].float().numpy()


def seq2seq_fidelity(
    onnx_model: Any,
    torch_model: Any,
    tokenizer: Any,
    mode: str,
    calibration: str | Path | None = None,
) -> dict[str, Any]:
    """Score the quantized export against the fp32 model on calibration pairs; the manifest entry.

    Raises:
        UsageError: The calibration text is unreadable or has no sentence.
    """
    import numpy as np

    from llmtool.evaluate.metrics import FidelityAccumulator

    path = Path(calibration or defaults.SAMPLE_TEXT)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(
            f"Cannot read the calibration text {path}: {exc.strerror}",
            "pass a readable text file with --calibration.",
        ) from exc
    sources = calibration_sources(text, defaults.SEQ2SEQ_CALIBRATION_PAIRS)
    if not sources:
        raise UsageError(
            f"The calibration text {path} has no sentence", "pass a longer text with --calibration."
        )
    limit = onnx_model.max_source or 10**9
    rows = [list(tokenizer(s)["input_ids"])[:limit] for s in sources]
    targets = _greedy_targets(torch_model, rows, defaults.SEQ2SEQ_CALIBRATION_TARGET_TOKENS)
    start = onnx_model.decoder_start_token_id
    acc = FidelityAccumulator()
    for row, target in zip(rows, targets, strict=True):
        (got,) = onnx_model.teacher_forced([row], [target])  # [T, V]
        ref = _torch_teacher_forced(torch_model, row, target, start)
        acc.add(got.astype(np.float32), ref, np.asarray(target, dtype=np.int64))
    report = acc.report()
    max_rel = defaults.QUANT_MAX_RELATIVE_DELTA_PPL[mode]
    relative = report.delta_perplexity / report.reference_perplexity
    return {
        **report.to_dict(),
        "reference": "the fp32 PyTorch model",
        "calibration": str(path) if calibration else "the text shipped with llmtool",
        "pairs": len(rows),
        "targets": "the fp32 model's greedy outputs (teacher-forced)",
        "relative_delta_perplexity": relative,
        "max_relative_delta_perplexity": max_rel,
        "passed": relative <= max_rel and report.nonfinite_logits == 0,
    }
