"""The model an export is compared with, and the comparisons made on the same passes.

A reference is a PyTorch model spec or another llmtool export (:func:`load_reference`); both
models must tokenize the data alike (:func:`check_same_tokens`) so that they score the same
:class:`~llmtool.evaluate.protocols.Pass` es, and :class:`~llmtool.evaluate.metrics.FidelityAccumulator`
compares their next-token distributions position by position.

:func:`quantization_fidelity` is the gate of a quantized export (``llmtool export --quantize``):
the export against the fp32 PyTorch model it came from, on the ``hf`` protocol's passes over the
calibration text.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmtool import defaults
from llmtool.errors import UsageError
from llmtool.evaluate.data import Corpus
from llmtool.evaluate.metrics import FidelityAccumulator, FidelityReport
from llmtool.evaluate.protocols import LogitsFn, Pass, Protocol, make_protocol, scored_logits
from llmtool.runtime.model import OnnxCausalLM
from llmtool.runtime.session import SessionOptions


@dataclass
class Reference:
    """A model to compare with, loaded.

    Attributes:
        spec: The spec as given.
        kind: ``pytorch`` or ``onnx``.
        tokenizer: Its tokenizer.
        logits_fn: [1, L] int64 ids -> [1, L, V] float32 logits.
        model: The :class:`~llmtool.models.loading.LoadedModel` or :class:`OnnxCausalLM`.
        device: Where it runs (``cpu``, ``cuda``).
    """

    spec: str
    kind: str
    tokenizer: Any
    logits_fn: LogitsFn
    model: Any
    device: str


def torch_device(provider: str) -> str:
    """``cuda`` when the provider allows it and PyTorch sees a GPU, else ``cpu``."""
    if provider == "cpu":
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_logits_fn(model: Any, device: str) -> LogitsFn:
    """Logits of a PyTorch causal LM for one unpadded row with no past."""
    import torch

    def logits_fn(input_ids: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = model(torch.from_numpy(np.ascontiguousarray(input_ids)).to(device))
        return out.logits.float().cpu().numpy()

    return logits_fn


def load_reference(
    spec: str | Path,
    provider: str = defaults.PROVIDER,
    session_options: SessionOptions | None = None,
    *,
    allow_pickle: bool = False,
) -> Reference:
    """Load a reference: an llmtool export (ONNX Runtime) or a PyTorch model spec.

    Raises:
        UsageError: The spec is not a loadable model.
    """
    from llmtool.models.loading import load_model, resolve_spec

    resolved = resolve_spec(spec)
    if resolved.kind == "onnx_dir":
        onnx = OnnxCausalLM(resolved.path, provider, options=session_options)
        return Reference(str(spec), "onnx", onnx.tokenizer, onnx.window_logits, onnx, onnx.provider)
    loaded = load_model(resolved, allow_pickle=allow_pickle)
    device = torch_device(provider)
    loaded.model.to(device)
    return Reference(
        str(spec),
        "pytorch",
        loaded.tokenizer,
        torch_logits_fn(loaded.model, device),
        loaded,
        device,
    )


def check_same_tokens(
    protocol: Protocol,
    reference: Reference,
    corpus: Corpus,
    token_ids: list[np.ndarray],
) -> None:
    """Require the reference's tokenizer to give the model's token ids on every document.

    Raises:
        UsageError: The special tokens or the ids of some document differ.
    """
    hint = "pass a reference that uses the same tokenizer as the model."
    ref_protocol = make_protocol(
        protocol.name, reference.tokenizer, protocol.max_length, protocol.stride
    )
    if (ref_protocol.prefix_id, ref_protocol.bos_id) != (protocol.prefix_id, protocol.bos_id):
        raise UsageError(
            f"The reference's tokenizer has other special tokens than the model's for --protocol {protocol.name}",
            hint,
        )
    ref_ids = protocol.encode(reference.tokenizer, [d.text for d in corpus.documents])
    for doc, ids, ref in zip(corpus.documents, token_ids, ref_ids, strict=True):
        if len(ids) != len(ref) or not np.array_equal(ids, ref):
            n = min(len(ids), len(ref))
            differ = np.flatnonzero(ids[:n] != ref[:n])
            at = int(differ[0]) if len(differ) else n
            raise UsageError(
                f"The reference's tokenizer encodes {doc.name} differently from the model's "
                f"(first difference at token {at})",
                hint,
            )


def compare_passes(
    logits_fn: LogitsFn,
    reference_fn: LogitsFn,
    passes: Iterable[Pass],
    on_pass: Callable[[int, int], None] | None = None,
) -> FidelityReport:
    """Score the same passes with a model and its reference and compare them.

    Args:
        logits_fn: The model under test: [1, L] ids to [1, L, V] logits.
        reference_fn: The reference, same signature.
        passes: The passes of a protocol (see :meth:`Protocol.passes`); at least one.
        on_pass: Progress callback ``(done, total)``.
    """
    passes = list(passes)
    acc = FidelityAccumulator()
    for i, p in enumerate(passes):
        acc.add(scored_logits(logits_fn, p), scored_logits(reference_fn, p), p.targets)
        if on_pass is not None:
            on_pass(i + 1, len(passes))
    return acc.report()


def quantization_fidelity(
    quantized: OnnxCausalLM, torch_model: Any, text: str, mode: str, calibration: str
) -> dict[str, Any]:
    """Compare a quantized export with the fp32 PyTorch model on ``text``; the manifest entry.

    Both score the ``hf`` protocol's passes over the text: windows of
    :data:`~llmtool.defaults.QUANT_CALIBRATION_LENGTH` tokens (at most the context) with a
    stride of half a window. The export passes when its relative ΔPPL stays within
    :data:`~llmtool.defaults.QUANT_MAX_RELATIVE_DELTA_PPL` for ``mode`` and no logit is
    non-finite.

    Args:
        quantized: The export, loaded on the CPU.
        torch_model: The fp32 model it came from (on the CPU).
        text: Calibration text.
        mode: ``int4`` or ``int8`` (selects the threshold).
        calibration: Where the text came from (recorded).

    Raises:
        UsageError: The text has fewer than two tokens.
    """
    length = min(defaults.QUANT_CALIBRATION_LENGTH, quantized.max_positions or 10**9)
    protocol = make_protocol("hf", quantized.tokenizer, length, length // 2)
    (ids,) = protocol.encode(quantized.tokenizer, [text])
    passes = list(protocol.passes(ids))
    if not passes:
        raise UsageError(
            f"The calibration text {calibration} has fewer than 2 tokens",
            "pass a longer text with --calibration.",
        )
    report = compare_passes(quantized.window_logits, torch_logits_fn(torch_model, "cpu"), passes)
    limit = defaults.QUANT_MAX_RELATIVE_DELTA_PPL[mode]
    relative = report.delta_perplexity / report.reference_perplexity
    return {
        **report.to_dict(),
        "reference": "the fp32 PyTorch model",
        "calibration": calibration,
        "window": length,
        "relative_delta_perplexity": relative,
        "max_relative_delta_perplexity": limit,
        "passed": relative <= limit and report.nonfinite_logits == 0,
    }
