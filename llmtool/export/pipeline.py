"""``llmtool export``: a model spec to a validated ONNX directory.

The directory holds ``model.onnx`` (plus ``model.onnx.data`` for models over 2 GB),
``config.json``, ``generation_config.json``, the tokenizer files and ``llmtool.json``. It is
built in a temporary directory and renamed into place only after validation passes.
"""

from __future__ import annotations

import datetime as dt
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmtool import defaults
from llmtool.errors import UsageError, ValidationError

MODEL_FILE = "model.onnx"
DTYPES = ("fp32", "fp16")
MIN_OPSET = 17
MAX_OPSET = 21


@dataclass
class ExportResult:
    """What :func:`export_model` returns.

    Attributes:
        out: The export directory.
        manifest: The contents of its llmtool.json.
        seconds: Stage timings (load, build, save, validate).
    """

    out: Path
    manifest: dict[str, Any]
    seconds: dict[str, float]

    @property
    def validation(self) -> dict[str, Any]:
        return self.manifest["validation"]


def _check_options(dtype: str, opset: int) -> None:
    if dtype not in DTYPES:
        raise UsageError(f"Unknown dtype {dtype!r}", f"use one of {', '.join(DTYPES)}.")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise UsageError(
            f"Opset {opset} is not supported", f"use an opset from {MIN_OPSET} to {MAX_OPSET}."
        )


def export_model(
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
) -> ExportResult:
    """Export a causal LM to ONNX with a KV cache and validate it against PyTorch.

    Args:
        model: A Hugging Face directory, a .gguf file or ``smollm2``.
        out: The directory to create.
        dtype: ``fp32`` or ``fp16`` weights, activations and cache.
        opset: ONNX opset.
        fused: Emit ONNX Runtime's fused ops (GroupQueryAttention, SkipSimplifiedLayerNorm) with
            right padding and an in-place KV cache: the fast path for ``generate`` (CUDA needs
            ``dtype="fp16"``). See :mod:`llmtool.export.fused`.
        quantize: ``int8`` or ``int4`` weight blocks (see :mod:`llmtool.export.quantize`); the export
            then records and gates its fidelity to the fp32 graph on ``calibration``.
        block_size: int4 block length.
        symmetric: int4 without zero points (default: the exact Q4_1-style grid).
        calibration: Text for the fidelity check of a quantized export (default: the text
            shipped with llmtool).
        force: Replace an existing ``out``.
        allow_pickle: Accept pickle weights (``pytorch_model.bin``).
        on_stage: Called with a short description as each stage starts.

    Returns:
        The export directory, its manifest and timings.

    Raises:
        UsageError: Bad input; nothing is written.
        ValidationError: The graph does not match PyTorch; nothing is written.
    """
    from llmtool.evaluate.data import read_text
    from llmtool.evaluate.reference import quantization_fidelity
    from llmtool.export.builders import GraphOptions, build_graph
    from llmtool.export.quantize import (
        check_quantize_options,
        describe,
    )
    from llmtool.export.transformer import WeightFormat
    from llmtool.export.validate import validate_export
    from llmtool.fsutil import atomic_directory, check_output_dir
    from llmtool.manifest import (
        FORMAT,
        FORMAT_VERSION,
        file_record,
        tool_versions,
        write_manifest,
    )
    from llmtool.models.loading import load_model, resolve_spec
    from llmtool.runtime.model import OnnxCausalLM

    def stage(text: str) -> None:
        if on_stage is not None:
            on_stage(text)

    _check_options(dtype, opset)
    check_quantize_options(quantize, block_size)
    if quantize and dtype != "fp32":
        raise UsageError("--quantize starts from fp32 weights", "drop --dtype or use --dtype fp32.")
    calibration_text = read_text(calibration or defaults.SAMPLE_TEXT) if quantize else None
    out = Path(out)
    spec = resolve_spec(model)
    if spec.kind == "onnx_dir":
        raise UsageError(
            f"{spec.path} is already an llmtool export", "pass the PyTorch model it came from."
        )
    check_output_dir(out, force=force, source=spec.path if spec.kind == "hf_dir" else None)
    seconds: dict[str, float] = {}

    stage(f"Loading {spec.display}")
    t = time.perf_counter()
    loaded = load_model(spec, allow_pickle=allow_pickle)
    seconds["load"] = time.perf_counter() - t

    stage("Building the ONNX graph")
    t = time.perf_counter()
    fmt = WeightFormat(
        quantize=quantize,
        block_size=block_size,
        symmetric=symmetric,
        head_matmul=quantize is not None,
    )
    built = build_graph(loaded.model, dtype, opset, GraphOptions(fused=fused, weights=fmt))
    graph, io, meta = built.graph, built.io, built.meta
    del built
    n_params = sum(p.numel() for p in loaded.model.parameters())
    seconds["build"] = time.perf_counter() - t

    with atomic_directory(out, force=force) as tmp:
        stage("Writing files")
        t = time.perf_counter()
        import llmtool

        files = graph.save(tmp / MODEL_FILE, "llmtool", llmtool.__version__)
        del graph
        loaded.config.save_pretrained(tmp)
        loaded.generation_config.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "source": {"spec": spec.source, "kind": spec.kind, "path": spec.display},
            **meta,
            "layout": io.layout,
            "padding": "right" if io.layout == "fused" else "left",
            "dtype": dtype,
            "opset": opset,
            "model_file": MODEL_FILE,
            "files": {f.name: file_record(f) for f in files},
            "inputs": io.inputs,
            "outputs": io.outputs,
            "cache": io.cache,
            "parameters": n_params,
            "versions": tool_versions(),
        }
        write_manifest(tmp, manifest)
        seconds["save"] = time.perf_counter() - t

        stage("Validating ONNX Runtime (CPU) against PyTorch")
        t = time.perf_counter()
        session = OnnxCausalLM(tmp, "cpu", verify=False)
        # Quantized weights cannot meet fp32 parity: their gate is the fidelity check below.
        gated = quantize is None
        report = validate_export(
            session, loaded.model, loaded.tokenizer, dtype, tolerance=None if gated else math.inf
        )
        seconds["validate"] = time.perf_counter() - t
        manifest["validation"] = {**report.to_dict(), "gate": gated}
        if not report.passed:
            raise ValidationError(
                f"Export validation failed: {report.failure_reason()}; nothing was written",
                "report this model as a bug, with the figures above.",
            )
        if quantize:
            assert calibration_text is not None
            stage(f"Measuring the {quantize} export's fidelity to fp32")
            t = time.perf_counter()
            manifest["quantization"] = describe(quantize, block_size, symmetric)
            manifest["fidelity"] = quantization_fidelity(
                session,
                loaded.model,
                calibration_text,
                quantize,
                str(calibration or "llmtool/data/sample.txt"),
            )
            seconds["quantize"] = time.perf_counter() - t
            if not manifest["fidelity"]["passed"]:
                f = manifest["fidelity"]
                raise ValidationError(
                    f"The {quantize} export drifts too far from fp32: ΔPPL "
                    f"{100 * f['relative_delta_perplexity']:+.2f}% exceeds "
                    f"{100 * f['max_relative_delta_perplexity']:.1f}%; nothing was written",
                    "try a smaller --block-size, --quantize int8, or int4 without --symmetric.",
                )
        del session
        write_manifest(tmp, manifest)
    return ExportResult(out.resolve(), manifest, seconds)
