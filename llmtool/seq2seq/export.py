"""``llmtool export`` for encoder-decoders: two validated graphs in one directory.

The same stages as the decoder-only pipeline (:mod:`llmtool.export.pipeline`), which hands any
config with ``is_encoder_decoder`` over to :func:`export_seq2seq`::

    check the request ─► load (AutoModelForSeq2SeqLM) ─► in a temporary directory: trace both
        graphs, write config / generation config / tokenizer / llmtool.json ─► validate against
        PyTorch ─► rename into place

llmtool.json gets ``"kind": "seq2seq"``, a ``graphs`` record (each graph's file, inputs and
outputs), the decoder's ``cache`` entries (``kind`` ``self`` or ``cross``), and the fields the
runtime reads: ``hidden_size``, ``decoder_start_token_id``, ``max_source_positions``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmtool import defaults
from llmtool.errors import UsageError, ValidationError
from llmtool.export.request import MAX_OPSET, MIN_OPSET, timed


@dataclass
class Seq2SeqExportResult:
    """What :func:`export_seq2seq` returns (the fields of the decoder pipeline's result).

    Attributes:
        out: The export directory.
        manifest: The contents of its llmtool.json.
        seconds: Stage timings (load, build, validate).
    """

    out: Path
    manifest: dict[str, Any]
    seconds: dict[str, float]

    @property
    def validation(self) -> dict[str, Any]:
        return dict(self.manifest["validation"])


def wants_seq2seq(model: str | Path) -> bool:
    """Whether ``model`` is a Hugging Face directory of an encoder-decoder (cheap: config only)."""
    import json

    path = Path(str(model)).expanduser() / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and bool(config.get("is_encoder_decoder"))


def check_seq2seq_options(
    dtype: str, opset: int, fused: bool, quantize: str | None, block_size: int = 32
) -> None:
    """Refuse the export variants an encoder-decoder cannot have, before loading anything.

    Raises:
        UsageError: fp16 together with ``--quantize``, ``--fused``, a bad ``--quantize`` /
            ``--block-size`` or an opset outside 17-21.
    """
    from llmtool.export.quantize import check_quantize_options

    if dtype not in ("fp32", "fp16"):
        raise UsageError(f"Unknown dtype {dtype!r}", "use --dtype fp32 or fp16.")
    if dtype == "fp16" and quantize:
        raise UsageError(
            "An encoder-decoder export is either fp16 or --quantize'd, not both",
            "drop --dtype fp16 (the quantized graphs keep fp32 activations) or drop --quantize.",
        )
    if fused:
        raise UsageError(
            "--fused is not available for encoder-decoder models", "export without --fused."
        )
    check_quantize_options(quantize, block_size)
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise UsageError(
            f"Opset {opset} is not supported", f"use an opset from {MIN_OPSET} to {MAX_OPSET}."
        )


def _manifest(
    tmp: Path, loaded: Any, graphs: dict[str, Any], opset: int, weights: str
) -> dict[str, Any]:
    """llmtool.json of the traced graphs (validation is added after it runs)."""
    from llmtool.export.seq2seq import DECODER_FILE, ENCODER_FILE, Seq2SeqDims, cache_entries
    from llmtool.manifest import FORMAT, FORMAT_VERSION, file_record, tool_versions

    model, spec = loaded.model, loaded.spec
    config = model.config
    dims = Seq2SeqDims.of(config)
    start = config.decoder_start_token_id
    if start is None:
        start = loaded.generation_config.decoder_start_token_id
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": "seq2seq",
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "source": {"spec": spec.source, "kind": spec.kind, "path": spec.display},
        "architecture": type(model).__name__,
        "model_type": config.model_type,
        "num_layers": dims.layers,
        "vocab_size": dims.vocab_size,
        "hidden_size": dims.hidden,
        "max_source_positions": dims.max_source,
        "max_positions": dims.max_source,  # learned / sinusoidal positions bound targets too
        "decoder_start_token_id": int(start),
        "layout": "standard",
        "padding": "right",
        # The graphs' inputs and outputs (cache included) stay fp32 for every weight format.
        "dtype": "fp32",
        "weights": weights,
        "opset": opset,
        "model_file": DECODER_FILE,
        "graphs": graphs,
        "files": {name: file_record(tmp / name) for name in (ENCODER_FILE, DECODER_FILE)},
        "inputs": graphs["decoder"]["inputs"],
        "outputs": graphs["decoder"]["outputs"],
        "cache": cache_entries(dims),
        "parameters": sum(p.numel() for p in model.parameters()),
        "versions": tool_versions(),
    }


def export_seq2seq(
    model: str | Path,
    out: str | Path,
    *,
    dtype: str = defaults.EXPORT_DTYPE,
    opset: int = defaults.OPSET,
    fused: bool = False,
    quantize: str | None = None,
    block_size: int = defaults.QUANT_BLOCK_SIZE,
    symmetric: bool = False,
    calibration: str | Path | None = None,
    force: bool = False,
    allow_pickle: bool = False,
    on_stage: Callable[[str], None] | None = None,
) -> Seq2SeqExportResult:
    """Export a T5 / BART / Marian directory to an encoder and a cached decoder graph.

    Args:
        model: A Hugging Face directory of an encoder-decoder.
        out: The directory to create.
        dtype: ``fp32``, or ``fp16`` (weights and arithmetic; gated on fidelity like ``quantize``).
        opset: ONNX opset (17-21).
        fused: Refused (no fused encoder-decoder graph).
        quantize: ``int8`` or ``int4``: both graphs' MatMul weights in blocks (ONNX Runtime's
            quantizer, see :mod:`llmtool.seq2seq.quantize`), gated on fidelity to fp32.
        block_size, symmetric: int4 / int8 block length; int4 without zero points.
        calibration: Text whose sentences are the gate's sources (default: the shipped text).
        force: Replace an existing ``out``.
        allow_pickle: Accept pickle weights.
        on_stage: Called with a short description as each stage starts.

    Raises:
        UsageError: Bad input; nothing is written.
        ValidationError: The graphs fail parity or the fidelity gate; nothing is written.
    """
    from llmtool.export.seq2seq import (
        DECODER_FILE,
        ENCODER_FILE,
        check_seq2seq_supported,
        export_seq2seq_graphs,
    )
    from llmtool.fsutil import atomic_directory, check_output_dir
    from llmtool.manifest import write_manifest
    from llmtool.models.loading import read_config, resolve_spec
    from llmtool.models.seq2seq import load_seq2seq
    from llmtool.runtime.seq2seq import OnnxSeq2Seq
    from llmtool.seq2seq.quantize import quantize_graphs, to_fp16
    from llmtool.seq2seq.validate import failure_reason, validate_seq2seq

    def stage(text: str) -> None:
        if on_stage is not None:
            on_stage(text)

    check_seq2seq_options(dtype, opset, fused, quantize, block_size)
    out = Path(out)
    spec = resolve_spec(model)
    check_output_dir(out, force=force, source=spec.path)
    check_seq2seq_supported(read_config(spec))
    seconds: dict[str, float] = {}
    stage(f"Loading {spec.display}")
    with timed(seconds, "load"):
        loaded = load_seq2seq(spec, allow_pickle=allow_pickle)
    _check_size(loaded, spec.display)
    with atomic_directory(out, force=force) as tmp:
        stage("Tracing the encoder and decoder graphs")
        with timed(seconds, "build"):
            graphs = export_seq2seq_graphs(loaded.model, tmp, opset)
            loaded.config.save_pretrained(tmp)
            loaded.generation_config.save_pretrained(tmp)
            loaded.tokenizer.save_pretrained(tmp)
            if quantize:
                quantize_graphs(tmp, [ENCODER_FILE, DECODER_FILE], quantize, block_size, symmetric)
            elif dtype == "fp16":
                to_fp16(tmp, [ENCODER_FILE, DECODER_FILE])
            gated = quantize or ("fp16" if dtype == "fp16" else None)
            manifest = _manifest(tmp, loaded, graphs, opset, gated or "fp32")
            write_manifest(tmp, manifest)
        stage("Validating ONNX Runtime (CPU) against PyTorch")
        with timed(seconds, "validate"):
            session = OnnxSeq2Seq(tmp, "cpu", verify=False)
            report = validate_seq2seq(session, loaded.model, loaded.tokenizer, dtype=dtype)
        manifest["validation"] = report
        if gated:
            # Rounded weights cannot meet fp32 parity: recorded, the fidelity gate decides.
            report["gate"] = False
            stage(f"Measuring the {gated} export's fidelity to fp32")
            with timed(seconds, "quantize"):
                _check_quantized(
                    session, loaded, manifest, gated, block_size, symmetric, calibration
                )
        elif not report["passed"]:
            raise ValidationError(
                f"Export validation failed: {failure_reason(report)}; nothing was written",
                "report this model as a bug, with the figures above.",
            )
        del session
        write_manifest(tmp, manifest)
    return Seq2SeqExportResult(out.resolve(), manifest, seconds)


_HINTS = {
    "fp16": "export fp32 or --quantize int8 (T5's activations are known to overflow fp16).",
    "int8": "export fp32, or try a smaller --block-size.",
    "int4": "try --quantize int8, a smaller --block-size, or int4 without --symmetric.",
}


def _check_quantized(
    session: Any,
    loaded: Any,
    manifest: dict[str, Any],
    quantize: str,
    block_size: int,
    symmetric: bool,
    calibration: str | Path | None,
) -> None:
    """Record the quantization and gate the export's fidelity to the fp32 PyTorch model.

    Raises:
        ValidationError: The relative ΔPPL exceeds the mode's limit or a logit is not finite.
    """
    from llmtool.seq2seq.quantize import describe, seq2seq_fidelity

    if quantize != "fp16":
        manifest["quantization"] = describe(quantize, block_size, symmetric)
    f = seq2seq_fidelity(session, loaded.model, loaded.tokenizer, quantize, calibration)
    manifest["fidelity"] = f
    if not f["passed"]:
        raise ValidationError(
            f"The {quantize} encoder-decoder export drifts too far from fp32: ΔPPL "
            f"{100 * f['relative_delta_perplexity']:+.2f}% (limit "
            f"{100 * f['max_relative_delta_perplexity']:.0f}%), {f['nonfinite_logits']} non-finite "
            "logits; nothing was written",
            _HINTS.get(quantize, _HINTS["int4"]),
        )


def _check_size(loaded: Any, display: str) -> None:
    """Refuse a model whose fp32 graphs would need external data (over 2 GB).

    Raises:
        UsageError: The fp32 weights exceed :data:`~llmtool.defaults.EXTERNAL_DATA_THRESHOLD`.
    """
    weight_bytes = 4 * sum(p.numel() for p in loaded.model.parameters())
    if weight_bytes > defaults.EXTERNAL_DATA_THRESHOLD:
        raise UsageError(
            f"{display} has {weight_bytes / 2**30:.1f} GiB of fp32 weights; encoder-decoder "
            "graphs over 2 GB (external data) are not supported yet",
            "export a smaller model (T5-base and BART-large fit).",
        )
