"""Quantized exports: int8 and int4 weight blocks for ONNX Runtime's ``MatMulNBits``.

**int4** (weight-only, ``MatMulNBits``): every linear weight [K, N] is cut into blocks of
``block_size`` values along K. By default a block is stored as Q4_1 stores it (llama.cpp):
4-bit codes ``q``, a scale ``d = (max - min) / 15`` and the block's minimum, so
``w ≈ d * q + min``. MatMulNBits only takes integer zero points on its fast path (a float zero
point makes ONNX Runtime de-quantize the whole matrix on every call, ~20x slower), so the graph
uses the nearest one, ``zp = round(-min / d)``, and adds back what it misses,
``r = min + d * zp`` per block, through the input: the block means of x are appended to x as
K / block_size extra features, and block_size * R [K / block_size, N] as the matching extra
weight rows (themselves 4-bit blocks):

    y = MatMulNBits([x, blockmean(x)]; [q; q_R], [d; d_R], [zp; zp_R])

    x [B, S, K] ─┬────────────────────────────────────────────┐
                 └─AveragePool(bs, stride bs)─► [B, S, K/bs] ─┴─Concat(-1)─► [B, S, K + K/bs]
                                                                                     │
    [q; q_R], [d; d_R], [zp; zp_R] ───────────────────────────────────────────► MatMulNBits
                                                                                     │
                                                                                y [B, S, N]

This costs an AveragePool and a Concat per linear layer and 1/block_size more weights, and it
leaves only the rounding of R (at most d / 30, against d / 2 without it): the grid of a model
that already is Q4_1 (a GGUF file) is reproduced instead of being rounded a second time
(SmolLM2: WikiText-2 perplexity +0.7% against fp32, +29% with the nearest integer zero point
alone).
``symmetric`` drops zero points and the correction (``w ≈ d * (q - 8)``): smaller and faster,
less exact. The CPU kernel runs with ``accuracy_level`` 4 (int8 activations, fp32
accumulation), as llama.cpp multiplies Q4_1 weights with Q8_1 activations.

**int8**: every linear weight in symmetric 8-bit blocks (Q8_0's grid, ``d = absmax / 127``),
multiplied with activations that the kernel quantizes to int8 per block of ``block_size`` on
each call (``accuracy_level`` 4: dynamic quantization at block granularity). ONNX Runtime's
``quantize_dynamic`` (``MatMulInteger``, one activation scale per tensor) is not used: on
SmolLM2 the outlier channels of the activations made its logits useless (top-1 agreement with
fp32 of 0-85% on a single prompt), where per-block scales keep ΔPPL within 1%.

Both quantize every linear layer including the LM head (exported as its own [hidden, vocab]
MatMul, untied from the embedding), because it is the largest matrix read per decoded token
(SmolLM2: 28M of 135M parameters). In int4 exports the head gets 8-bit blocks (Q8_0's grid,
``d = absmax / 127``), as llama.cpp's 4-bit files keep their output matrix at 8 or 6 bits: on
SmolLM2 a 4-bit head alone cost +8.7% perplexity, the 8-bit head is within noise. The token
embedding stays fp32: a Gather reads one row per token, so quantizing it would save memory but
no time. Norms, attention and softmax are not quantized.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from llmtool.errors import UsageError
from llmtool.export.contract import MS_DOMAIN

QUANTIZE_MODES = ("int8", "int4")


def check_quantize_options(mode: str | None, block_size: int) -> None:
    """Refuse an unknown mode or a block size MatMulNBits does not take.

    Raises:
        UsageError: ``mode`` is not None, ``int8`` or ``int4``, or ``block_size`` is not a power
            of two of at least 16.
    """
    if mode is None:
        return
    if mode not in QUANTIZE_MODES:
        raise UsageError(
            f"Unknown quantization {mode!r}", f"use one of {', '.join(QUANTIZE_MODES)}."
        )
    if block_size < 16 or block_size & (block_size - 1):
        raise UsageError(
            f"--block-size must be a power of two of at least 16, got {block_size}",
            "use 32 (the default, as llama.cpp's Q4_1 and Q8_0) or 64, 128.",
        )


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """Two 4-bit codes per byte along the last axis, low nibble first (odd lengths padded)."""
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.zeros((*codes.shape[:-1], 1), np.uint8)], axis=-1)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def _blocks(w: np.ndarray, block_size: int) -> np.ndarray:
    """w [K, N] as blocks [N, ceil(K / bs), bs] along K, the last one padded with zeros."""
    k, n = w.shape
    blocks = -(-k // block_size)
    padded = np.zeros((blocks * block_size, n), dtype=np.float32)
    padded[:k] = w
    return padded.T.reshape(n, blocks, block_size)


def _scale(spread: np.ndarray, levels: float) -> np.ndarray:
    """Per-block scale spread / levels; 1 for an all-zero block (any scale reproduces it)."""
    scale = spread / levels
    return np.where(scale == 0, 1.0, scale).astype(np.float32)


def pack_int4(
    w: np.ndarray, block_size: int, symmetric: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Quantize w [K, N] into 4-bit blocks along K.

    Returns:
        codes [N, K/bs, bs/2] uint8 (two per byte, low nibble first), scales [N, K/bs] float32,
        zero points [N, K/bs] uint8 (unpacked; None when symmetric), and the per-block
        residual R [K/bs, N] float32 that makes the asymmetric grid exact (None when symmetric).
    """
    wb = _blocks(w, block_size)  # [N, nb, bs]
    if symmetric:
        scale = _scale(np.abs(wb).max(-1), 7.0)
        q = np.clip(np.round(wb / scale[..., None]) + 8, 0, 15).astype(np.uint8)
        return pack_nibbles(q), scale, None, None
    low, high = wb.min(-1), wb.max(-1)
    scale = _scale(high - low, 15.0)
    q = np.clip(np.round((wb - low[..., None]) / scale[..., None]), 0, 15).astype(np.uint8)
    zp = np.clip(np.round(-low / scale), 0, 15).astype(np.uint8)  # [N, nb]
    residual = (low + scale * zp).astype(np.float32).T.copy()  # [nb, N]
    return pack_nibbles(q), scale, zp, residual


def pack_int8(w: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric 8-bit blocks of w [K, N] (Q8_0's grid: d = absmax / 127, codes offset by 128).

    Returns:
        codes [N, K/bs, bs] uint8 and scales [N * K/bs] float32.
    """
    wb = _blocks(w, block_size)  # [N, nb, bs]
    scale = _scale(np.abs(wb).max(-1), 127.0)
    q = (np.clip(np.round(wb / scale[..., None]), -127, 127) + 128).astype(np.uint8)
    return q, scale.reshape(-1)


def int8_matmul(g: Any, x: str, name: str, w: np.ndarray, block_size: int) -> str:
    """Emit x @ w with w [K, N] as symmetric 8-bit blocks (int8 exports, and int4's LM head)."""
    k, n = w.shape
    codes, scales = pack_int8(w, block_size)
    inputs = [x, g.weight(f"{name}.qweight", codes), g.weight(f"{name}.scales", scales)]
    return g.op(
        "MatMulNBits",
        inputs,
        domain=MS_DOMAIN,
        K=k,
        N=n,
        bits=8,
        block_size=block_size,
        accuracy_level=4,
    )


def int4_matmul(g: Any, x: str, name: str, w: np.ndarray, block_size: int, symmetric: bool) -> str:
    """Emit x @ w with w [K, N] as int4 blocks (and the exactness correction); see the module."""
    k, n = w.shape
    codes, scales, zp, residual = pack_int4(w, block_size, symmetric)
    if residual is not None and k % block_size == 0:  # block means need whole blocks of x
        blocks = k // block_size
        # The correction rides along as extra input features: x [B, S, K] -> [B, S, K + K/bs].
        # Block means (one pooling op, read as [N=B, C=S, W=K]) with R scaled by bs, rather
        # than block sums (a Reshape and a ReduceSum): every op costs a dispatch per step.
        means = g.op("AveragePool", [x], kernel_shape=[block_size], strides=[block_size])
        x = g.op("Concat", [x, means], axis=-1)
        residual = residual * block_size
        r_codes, r_scales, r_zp, _ = pack_int4(residual, block_size, symmetric=False)
        codes = np.concatenate([codes, r_codes], axis=1)
        scales = np.concatenate([scales, r_scales], axis=1)
        zp = np.concatenate([zp, r_zp], axis=1)  # type: ignore[list-item]
        k += blocks
    inputs = [x, g.weight(f"{name}.qweight", codes), g.weight(f"{name}.scales", scales.reshape(-1))]
    if zp is not None:
        inputs.append(g.weight(f"{name}.zero_points", pack_nibbles(zp).reshape(-1)))
    return g.op(
        "MatMulNBits",
        inputs,
        domain=MS_DOMAIN,
        K=k,
        N=n,
        bits=4,
        block_size=block_size,
        accuracy_level=4,
    )


def describe(mode: str, block_size: int, symmetric: bool) -> dict[str, Any]:
    """The manifest's ``quantization`` entry."""
    q8 = f"8-bit symmetric blocks of {block_size} (Q8_0 grid)"
    if mode == "int4":
        grid = "symmetric (d * (q - 8))" if symmetric else "Q4_1 (d * q + min, exact up to d/30)"
        weights = f"4-bit blocks of {block_size}, {grid}"
    else:
        weights = q8
    return {
        "mode": mode,
        "method": "MatMulNBits (weight blocks along the input dimension)",
        "weights": weights,
        "lm_head": q8,
        "embedding": "fp32",
        "block_size": block_size,
        "activations": "int8 per block, quantized on each call (accuracy_level 4)",
        "accuracy_level": 4,
    }


def quantize_traced(model: Any, mode: str, block_size: int, symmetric: bool) -> Any:
    """A traced graph (torch.onnx: the generic path, encoder-decoders) with every MatMul whose
    weight is an initializer turned into ``MatMulNBits`` by ONNX Runtime's own quantizer.

    Graphs llmtool builds itself pack their blocks above; a traced graph has no neutral weight
    description, so ORT's quantizer rewrites the ModelProto. int8 is always symmetric, as above.

    Args:
        model: The ``onnx.ModelProto``.
        mode: ``int8`` or ``int4``.
        block_size: Block length along the input dimension.
        symmetric: int4 without zero points.

    Returns:
        The rewritten ModelProto.
    """
    import logging

    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    # The quantizer logs a line per node at INFO; the export's own stages say what happens.
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    quantizer = MatMulNBitsQuantizer(
        model,
        bits=8 if mode == "int8" else 4,
        block_size=block_size,
        is_symmetric=symmetric or mode == "int8",
        accuracy_level=4,
    )
    quantizer.process()
    return quantizer.model.model


def describe_traced(mode: str, block_size: int, symmetric: bool) -> dict[str, Any]:
    """The manifest's ``quantization`` entry of a graph :func:`quantize_traced` rewrote."""
    bits = 8 if mode == "int8" else 4
    grid = "symmetric" if symmetric or mode == "int8" else "asymmetric (zero points)"
    return {
        "mode": mode,
        "method": "onnxruntime MatMulNBitsQuantizer (weight blocks along the input dimension)",
        "weights": f"{bits}-bit {grid} blocks of {block_size}, every MatMul with a weight",
        "lm_head": f"{bits}-bit blocks of {block_size}",
        "embedding": "fp32",
        "block_size": block_size,
        "activations": "int8 per block, quantized on each call (accuracy_level 4)",
        "accuracy_level": 4,
    }
