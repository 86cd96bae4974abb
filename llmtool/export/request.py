"""Stage 1 of ``llmtool export`` (every option and the architecture checked before loading),
and the stage timer every export pipeline (decoder-only and encoder-decoder) shares."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from llmtool import defaults
from llmtool.errors import UsageError

if TYPE_CHECKING:
    from llmtool.export.contract import WeightFormat
    from llmtool.models.loading import ModelSpec

DTYPES = ("fp32", "fp16")
MIN_OPSET = 17
MAX_OPSET = 21


@contextlib.contextmanager
def timed(seconds: dict[str, float], name: str) -> Iterator[None]:
    """Record the block's wall time in ``seconds[name]`` (an export's per-stage timings)."""
    start = time.perf_counter()
    yield
    seconds[name] = time.perf_counter() - start


def _check_options(dtype: str, opset: int) -> None:
    if dtype not in DTYPES:
        raise UsageError(f"Unknown dtype {dtype!r}", f"use one of {', '.join(DTYPES)}.")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise UsageError(
            f"Opset {opset} is not supported", f"use an opset from {MIN_OPSET} to {MAX_OPSET}."
        )


@dataclass(frozen=True)
class ExportRequest:
    """Checked export options: what every stage after :func:`check_request` reads.

    Attributes:
        spec: The resolved PyTorch model spec.
        out: The directory to create.
        dtype: ``fp32`` or ``fp16``.
        opset: ONNX opset.
        fused: The fused graph.
        weights: How linear weights are stored (``weights.quantize``: None, ``int8``, ``int4``).
        calibration: Where the fidelity text of a quantized export comes from (recorded).
        calibration_text: That text (None without ``--quantize``).
        layout: File layout: ``llmtool`` (model.onnx at the top) or ``transformers.js``
            (``onnx/model{_fp16,_q4,_quantized}.onnx``).
        notices: Messages the export prints before it starts (never silent): a variant the
            registry sends down the generic torch.onnx path
            (:func:`~llmtool.export.registry.generic_notice`), ``--fused`` falling back to the
            standard graph (:func:`~llmtool.export.registry.fused_fallback`).
    """

    spec: ModelSpec
    out: Path
    dtype: str
    opset: int
    fused: bool
    weights: WeightFormat
    calibration: str | Path | None
    calibration_text: str | None
    layout: str = "llmtool"
    notices: tuple[str, ...] = ()


def check_request(
    model: str | Path,
    out: str | Path,
    *,
    dtype: str,
    opset: int,
    fused: bool,
    quantize: str | None,
    block_size: int,
    symmetric: bool,
    calibration: str | Path | None,
    force: bool,
    layout: str = defaults.EXPORT_LAYOUT,
) -> ExportRequest:
    """Stage 1: check every option and the model's architecture before anything is loaded.

    Raises:
        UsageError: A bad option, an existing ``out``, or an architecture export cannot build.
    """
    from llmtool.evaluate.data import read_text
    from llmtool.export.contract import WeightFormat
    from llmtool.export.interop import LAYOUTS
    from llmtool.export.quantize import check_quantize_options
    from llmtool.export.registry import check_supported, fused_fallback, generic_notice
    from llmtool.fsutil import check_output_dir
    from llmtool.models.loading import read_config, resolve_spec

    _check_options(dtype, opset)
    if layout not in LAYOUTS:
        raise UsageError(f"Unknown layout {layout!r}", f"use one of {', '.join(LAYOUTS)}.")
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
    # Loading accepts any causal LM; export refuses what it cannot build before reading weights.
    config = read_config(spec)
    # --fused where no fused graph expresses the model: the standard graph, with the reason.
    fallback = fused_fallback(config, quantize=quantize, dtype=dtype) if fused else None
    fused = fused and fallback is None
    check_supported(config, fused=fused, quantize=quantize, dtype=dtype)
    weights = WeightFormat(
        quantize=quantize,
        block_size=block_size,
        symmetric=symmetric,
        head_matmul=quantize is not None,
    )
    return ExportRequest(
        spec,
        out,
        dtype,
        opset,
        fused,
        weights,
        calibration,
        calibration_text,
        layout,
        tuple(n for n in (generic_notice(config), fallback) if n is not None),
    )
