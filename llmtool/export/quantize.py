"""Weight quantization of an exported graph with ONNX Runtime's quantizers.

* ``int4``: weight-only, blockwise (``MatMulNBits``): each MatMul weight becomes 4-bit blocks of
  ``block_size`` values along the input dimension with an fp32 scale per block (and a zero point
  when asymmetric). Activations stay fp32; ``accuracy_level`` 4 lets the CPU kernel compute
  in int8 with fp32 accumulation, the fast path on x86.
* ``int8``: dynamic quantization (``MatMulInteger``): int8 weights per tensor (or per output
  channel), activations quantized on the fly per call.

What is quantized: every MatMul, the LM head included. The head is exported as its own
[hidden, vocab] MatMul (untied from the embedding) because it is the largest matrix read per
decoded token (SmolLM2: 28M of 135M parameters). The token embedding stays fp32: a Gather reads
one row per token, so quantizing it would save memory but no time. Attention, norms and softmax
are untouched.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from llmtool.errors import UsageError

QUANTIZE_MODES = ("int8", "int4")


def check_quantize_options(mode: str | None, block_size: int) -> None:
    if mode is None:
        return
    if mode not in QUANTIZE_MODES:
        raise UsageError(
            f"Unknown quantization {mode!r}", f"use one of {', '.join(QUANTIZE_MODES)}."
        )
    if block_size < 16 or block_size & (block_size - 1):
        raise UsageError(f"--block-size must be a power of two of at least 16, got {block_size}")


def quantize_file(
    source: Path,
    target: Path,
    mode: str,
    *,
    block_size: int = 32,
    symmetric: bool = True,
    accuracy_level: int = 4,
) -> list[Path]:
    """Quantize the model at ``source`` into ``target``; returns the files written.

    Args:
        source: An fp32 .onnx file (inline weights).
        target: Where to write the quantized model.
        mode: ``int4`` or ``int8``.
        block_size: int4 block length along the input dimension.
        symmetric: int4 blocks without zero points.
        accuracy_level: int4 compute type for the CPU kernel (4: int8 compute).
    """
    import logging

    import onnx

    # onnxruntime's quantizers log every node they touch at INFO level.
    for name in ("onnxruntime.quantization", "onnxruntime", "root"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if mode == "int4":
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(
            onnx.load(str(source)),
            bits=4,
            block_size=block_size,
            is_symmetric=symmetric,
            accuracy_level=accuracy_level,
            op_types_to_quantize=("MatMul",),
        )
        quantizer.process()
        quantizer.model.save_model_to_file(str(target), use_external_data_format=False)
    else:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(
            source,
            target,
            op_types_to_quantize=["MatMul"],
            per_channel=True,
            weight_type=QuantType.QInt8,
            extra_options={"MatMulConstBOnly": True},
        )
    return [target]


def quantize_export(
    directory: Path,
    reference: Any,
    mode: str,
    text: str,
    *,
    calibration: str,
    block_size: int = 32,
    symmetric: bool = True,
    accuracy_level: int = 4,
) -> dict[str, Any]:
    """Quantize ``directory``'s model.onnx in place and measure it against the fp32 graph.

    Args:
        directory: The export being written (holds the fp32 model.onnx and llmtool.json).
        reference: An :class:`~llmtool.runtime.OnnxCausalLM` already loaded from the fp32 file.
        mode: ``int4`` or ``int8``.
        text: Calibration text for the fidelity check.
        calibration: Where the text came from (recorded).
        block_size: int4 block length.
        symmetric: int4 without zero points.
        accuracy_level: int4 CPU compute type.

    Returns:
        The manifest entries ``quantization`` and ``fidelity``.
    """
    from llmtool import defaults
    from llmtool.fidelity import compare_on_tokens
    from llmtool.manifest import file_record, read_manifest, write_manifest
    from llmtool.runtime import OnnxCausalLM

    model_file = directory / "model.onnx"
    staged = directory / "model.quantized.onnx"
    quantize_file(
        model_file,
        staged,
        mode,
        block_size=block_size,
        symmetric=symmetric,
        accuracy_level=accuracy_level,
    )
    os.replace(staged, model_file)
    manifest = read_manifest(directory)
    manifest["files"] = {model_file.name: file_record(model_file)}
    write_manifest(directory, manifest)
    quantized = OnnxCausalLM(directory, "cpu", verify=False)
    ids = np.asarray(reference.tokenizer(text)["input_ids"], dtype=np.int64)
    length = min(defaults.QUANT_CALIBRATION_LENGTH, reference.max_positions or 10**9)
    report = compare_on_tokens(
        quantized.window_logits, reference.window_logits, ids, length, length // 2
    )
    limit = defaults.QUANT_MAX_RELATIVE_DELTA_PPL[mode]
    relative = report.delta_perplexity / report.reference_perplexity
    quantization: dict[str, Any] = {"mode": mode, "embedding": "fp32", "lm_head": "quantized"}
    if mode == "int4":
        quantization.update(
            method="MatMulNBits (weight-only, blockwise)",
            block_size=block_size,
            symmetric=symmetric,
            accuracy_level=accuracy_level,
        )
    else:
        quantization.update(
            method="dynamic (MatMulInteger)",
            weights="int8 per output channel",
            activations="uint8, per call",
        )
    fidelity = {
        **report.to_dict(),
        "reference": "the fp32 ONNX graph of this export",
        "calibration": calibration,
        "window": length,
        "relative_delta_perplexity": relative,
        "max_relative_delta_perplexity": limit,
        "passed": relative <= limit and report.nonfinite_logits == 0,
    }
    return {"quantization": quantization, "fidelity": fidelity}
