"""``llmtool export``: a model spec to a validated ONNX directory.

The directory holds ``model.onnx`` (plus ``model.onnx.data`` for models over 2 GB),
``config.json``, ``generation_config.json``, the tokenizer files and ``llmtool.json``. It is
built in a temporary directory and renamed into place only after validation passes.

:func:`export_model` runs named stages, each a function here (``check_request`` in
:mod:`llmtool.export.request`)::

    check_request ─► load_model ─► build_onnx ─► in a temporary directory: write_files
        ─► validate_against_pytorch ─► check_quantized (--quantize) ─► commit (rename into place)

Memory (benchmarks/results/export_memory.md): unless ``check_quantized`` needs the PyTorch
model afterwards, PyTorch's reference outputs are computed right after loading
(:func:`reference_outputs`), so ``build_onnx`` may consume the model: each linear weight is freed
as soon as the extractor has its MatMul-layout copy (one fp32 copy of the weights at a time, not
two). The graph's weights are freed once written (``write_files`` streams them), and the rest of
the PyTorch model before ONNX Runtime opens the export.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmtool import defaults
from llmtool.errors import ValidationError
from llmtool.export.request import ExportRequest, check_request, timed

if TYPE_CHECKING:
    from llmtool.export.contract import BuiltGraph
    from llmtool.export.validate import TorchReference
    from llmtool.models.loading import LoadedModel
    from llmtool.runtime.model import OnnxCausalLM

MODEL_FILE = "model.onnx"


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


def reference_outputs(request: ExportRequest, loaded: LoadedModel) -> TorchReference | None:
    """Stage 2b: PyTorch's outputs on the validation inputs, before the graph build may consume
    the model's weights; None for a quantized export (its fidelity check still runs PyTorch,
    so the model is kept and validation computes them later)."""
    from llmtool.export.validate import torch_reference

    if request.weights.quantize is not None:
        return None
    return torch_reference(loaded.model, loaded.tokenizer, config_context(loaded.model.config))


def config_context(config: Any) -> int:
    """The context length the extractors give the graph (``max_positions``), read from the
    config before they run; unbounded when it declares none."""
    for name in ("max_position_embeddings", "n_positions", "seq_length"):
        value = getattr(config, name, None)
        if value:
            return int(value)
    return 1 << 30


def build_onnx(request: ExportRequest, loaded: LoadedModel, consume: bool = False) -> BuiltGraph:
    """Stage 3: the ONNX graph of the loaded model, as the registry builds it.

    Args:
        consume: Free each PyTorch linear weight once the graph has its copy
            (:func:`llmtool.export.weights.consume_linear_weights`); the model cannot run after.
    """
    from llmtool.export.contract import GraphOptions
    from llmtool.export.registry import build_graph
    from llmtool.export.weights import consume_linear_weights

    options = GraphOptions(fused=request.fused, weights=request.weights)
    with consume_linear_weights(consume):
        return build_graph(loaded.model, request.dtype, request.opset, options)


def write_files(
    tmp: Path, request: ExportRequest, loaded: LoadedModel, built: BuiltGraph
) -> dict[str, Any]:
    """Stage 4: the graph, config, generation config, tokenizer and llmtool.json into ``tmp``.

    Returns:
        The manifest written (validation and quantization entries are added later).
    """
    import llmtool
    from llmtool.export.genai import write_genai_config
    from llmtool.export.interop import (
        TRANSFORMERS_JS,
        add_transformers_js_config,
        portable_metadata,
        rename_batch_axis,
        transformers_js_file,
    )
    from llmtool.manifest import FORMAT, FORMAT_VERSION, file_record, tool_versions, write_manifest

    model_file, js_dtype = MODEL_FILE, None
    if request.layout == TRANSFORMERS_JS:
        model_file, js_dtype = transformers_js_file(request.dtype, request.weights.quantize)
        (tmp / model_file).parent.mkdir()
        rename_batch_axis([*built.graph.inputs, *built.graph.outputs])
    suffix = "_data" if js_dtype else ".data"
    files = built.graph.save(tmp / model_file, "llmtool", llmtool.__version__, suffix)
    loaded.config.save_pretrained(tmp)
    loaded.generation_config.save_pretrained(tmp)
    loaded.tokenizer.save_pretrained(tmp)
    portable_metadata(tmp)  # the 4.x keys beside the 5.x ones (llmtool.export.interop)
    if js_dtype:
        add_transformers_js_config(tmp, js_dtype, external=len(files) > 1)
    spec, io = request.spec, built.io
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "source": {"spec": spec.source, "kind": spec.kind, "path": spec.display},
        **built.meta,
        "layout": io.layout,
        "padding": "right" if io.layout == "fused" else "left",
        "dtype": request.dtype,
        "opset": request.opset,
        "model_file": model_file,
        "files": {f.relative_to(tmp).as_posix(): file_record(f) for f in files},
        "inputs": io.inputs,
        "outputs": io.outputs,
        "cache": io.cache,
        "parameters": sum(p.numel() for p in loaded.model.parameters()),
        "versions": tool_versions(),
    }
    write_manifest(tmp, manifest)
    write_genai_config(tmp, manifest)
    return manifest


def validate_against_pytorch(
    tmp: Path,
    request: ExportRequest,
    loaded: LoadedModel,
    manifest: dict[str, Any],
    reference: TorchReference | None = None,
) -> OnnxCausalLM:
    """Stage 5: run the written export in ONNX Runtime (CPU) against PyTorch.

    Records ``manifest["validation"]`` and returns the session for the quantization check.

    Args:
        reference: PyTorch's outputs (:func:`reference_outputs`); computed here when None.

    Raises:
        ValidationError: The graph does not match PyTorch.
    """
    from llmtool.export.validate import torch_reference, validate_export
    from llmtool.runtime.model import OnnxCausalLM
    from llmtool.runtime.session import SessionOptions

    context = int(manifest.get("max_positions") or 0) or 1 << 30
    if reference is None:
        reference = torch_reference(loaded.model, loaded.tokenizer, context)
    elif len(reference.long_ids) > context:  # config_context disagreed with the extractor
        raise ValidationError(
            f"The validation sequence ({len(reference.long_ids)} tokens) is longer than the "
            f"graph's context ({context}); nothing was written",
            "report this model as a bug.",
        )
    # Quantized weights cannot meet fp32 parity: their gate is the fidelity check below.
    gated = request.weights.quantize is None
    if gated:  # PyTorch's weights are freed before ONNX Runtime loads its copy
        _release_weights(loaded.model)
    # Without prepacking ONNX Runtime's MatMuls read the weights as loaded instead of keeping a
    # second, repacked copy of each; huge pages would only move them for a few seconds' use.
    options = SessionOptions(prepack=False, huge_pages=False)
    session = OnnxCausalLM(tmp, "cpu", verify=False, options=options)
    report = validate_export(
        session,
        None,
        loaded.tokenizer,
        request.dtype,
        tolerance=None if gated else math.inf,
        reference=reference,
    )
    manifest["validation"] = {**report.to_dict(), "gate": gated}
    if not report.passed:
        raise ValidationError(
            f"Export validation failed: {report.failure_reason()}; nothing was written",
            "report this model as a bug, with the figures above.",
        )
    return session


def _release_weights(model: Any) -> None:
    """Free a PyTorch model's parameters and buffers (moved to the meta device); the model is
    unusable afterwards, which is fine once its reference outputs are computed."""
    model.to("meta")
    _trim_heap()


def _trim_heap() -> None:
    """Collect garbage and hand freed heap pages back to the OS.

    Weights of a few MB each are allocated on glibc's heap (its mmap threshold grows once large
    blocks are freed), where free() keeps their pages; ``malloc_trim`` returns them, so the
    memory freed between stages is really available to the next one. No-op without glibc.
    """
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def check_quantized(
    session: OnnxCausalLM, request: ExportRequest, loaded: LoadedModel, manifest: dict[str, Any]
) -> None:
    """Stage 6 (quantized exports): record the quantization and gate its fidelity to fp32.

    Raises:
        ValidationError: The quantized export drifts too far from the fp32 model.
    """
    from llmtool.evaluate.reference import quantization_fidelity
    from llmtool.export.generic import BUILDER as TRACED
    from llmtool.export.quantize import describe, describe_traced

    fmt, calibration, calibration_text = (
        request.weights,
        request.calibration,
        request.calibration_text,
    )
    quantize = fmt.quantize
    assert quantize is not None and calibration_text is not None
    # A traced graph was quantized by ONNX Runtime's quantizer, a hand-built one by llmtool.
    how = describe_traced if manifest.get("builder") == TRACED else describe
    manifest["quantization"] = how(quantize, fmt.block_size, fmt.symmetric)
    manifest["fidelity"] = quantization_fidelity(
        session,
        loaded.model,
        calibration_text,
        quantize,
        str(calibration or "llmtool/data/sample.txt"),
    )
    if not manifest["fidelity"]["passed"]:
        f = manifest["fidelity"]
        raise ValidationError(
            f"The {quantize} export drifts too far from fp32: ΔPPL "
            f"{100 * f['relative_delta_perplexity']:+.2f}% exceeds "
            f"{100 * f['max_relative_delta_perplexity']:.1f}%; nothing was written",
            "try a smaller --block-size, --quantize int8, or int4 without --symmetric.",
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
    layout: str = defaults.EXPORT_LAYOUT,
    on_notice: Callable[[str], None] | None = None,
) -> ExportResult:
    """Export a causal LM to ONNX with a KV cache and validate it against PyTorch.

    Args:
        model: A Hugging Face directory, a .gguf file or ``smollm2``.
        out: The directory to create.
        dtype: ``fp32`` or ``fp16`` weights, activations and cache.
        opset: ONNX opset.
        fused: Emit ONNX Runtime's fused ops (GroupQueryAttention, SkipSimplifiedLayerNorm) with
            right padding and an in-place KV cache: the fast path for ``generate`` (CUDA needs
            ``dtype="fp16"``); the standard graph, with a notice, where none expresses the model.
        quantize: ``int8`` or ``int4`` weight blocks (see :mod:`llmtool.export.quantize`); the export
            then records and gates its fidelity to the fp32 graph on ``calibration``.
        block_size: int4 block length.
        symmetric: int4 without zero points (default: the exact Q4_1-style grid).
        calibration: Text for the fidelity check of a quantized export (default: the text
            shipped with llmtool).
        force: Replace an existing ``out``.
        allow_pickle: Accept pickle weights (``pytorch_model.bin``).
        on_stage: Called with a short description as each stage starts.
        on_notice: Called with each message to keep visible (default ``on_stage``).
        layout: ``llmtool`` or ``transformers.js`` (the graph as ``onnx/model*.onnx``, named by
            its weight format, and ``transformers.js_config`` in config.json).

    Returns:
        The export directory, its manifest and timings.

    Raises:
        UsageError: Bad input; nothing is written.
        ValidationError: The graph does not match PyTorch; nothing is written.
    """
    from llmtool.fsutil import atomic_directory
    from llmtool.manifest import write_manifest
    from llmtool.models.loading import load_model

    def stage(text: str) -> None:
        if on_stage is not None:
            on_stage(text)

    from llmtool.seq2seq.export import export_seq2seq, wants_seq2seq

    # The options every kind of export takes; T5 / BART / Marian get an encoder and a decoder graph.
    common: dict[str, Any] = {
        "dtype": dtype,
        "opset": opset,
        "fused": fused,
        "quantize": quantize,
        "block_size": block_size,
        "symmetric": symmetric,
        "calibration": calibration,
        "force": force,
    }
    if wants_seq2seq(model):
        return export_seq2seq(  # type: ignore[return-value]
            model, out, **common, allow_pickle=allow_pickle, on_stage=on_stage
        )
    request = check_request(model, out, **common, layout=layout)
    for notice in request.notices:  # never silent: a variant traced, --fused falling back
        (on_notice or stage)(notice)
    seconds: dict[str, float] = {}
    stage(f"Loading {request.spec.display}")
    with timed(seconds, "load"):
        loaded = load_model(request.spec, allow_pickle=allow_pickle)
    stage("Building the ONNX graph")
    with timed(seconds, "build"):  # PyTorch's reference outputs first: the build consumes it
        reference = reference_outputs(request, loaded)
        built = build_onnx(request, loaded, consume=reference is not None)
    with atomic_directory(request.out, force=force) as tmp:
        stage("Writing files")
        with timed(seconds, "save"):
            manifest = write_files(tmp, request, loaded, built)
        del built  # the graph's weights: freed before ONNX Runtime loads its own copy
        _trim_heap()
        stage("Validating ONNX Runtime (CPU) against PyTorch")
        with timed(seconds, "validate"):
            session = validate_against_pytorch(tmp, request, loaded, manifest, reference)
        if quantize:
            stage(f"Measuring the {quantize} export's fidelity to fp32")
            with timed(seconds, "quantize"):
                check_quantized(session, request, loaded, manifest)
        del session, reference
        write_manifest(tmp, manifest)
    # Commit: leaving atomic_directory renamed the finished directory into place.
    return ExportResult(request.out.resolve(), manifest, seconds)
