"""``llmtool eval``: perplexity of an ONNX export, and its fidelity to a reference model.

The data is scored document by document under one of the protocols of :mod:`llmtool.evaluate.protocols`.
Per scored token this keeps the NLL, so the report carries the standard error of the mean NLL and
a confidence interval for perplexity beside the point values. With a reference (a PyTorch model
or another export) both models score the same passes and :mod:`llmtool.evaluate.fidelity` compares their
next-token distributions.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmtool import defaults
from llmtool.errors import UsageError
from llmtool.evaluate.data import Corpus, decode_text, load_corpus
from llmtool.evaluate.fidelity import FidelityAccumulator
from llmtool.evaluate.protocols import LogitsFn, Protocol, make_protocol, scored_logits
from llmtool.evaluate.windows import token_nll
from llmtool.runtime.model import OnnxCausalLM, SessionOptions


@dataclass
class PerplexityResult:
    """Perplexity of one model on some documents under one protocol.

    The first ten attributes are the walking skeleton's ``--json`` keys and keep their meaning.

    Attributes:
        perplexity: exp(mean NLL) over scored tokens.
        nll: Mean negative log-likelihood per scored token, in nats.
        bits_per_byte: Total NLL in bits over the documents' UTF-8 bytes (None for
            ``llama-cpp``, which scores only half of each chunk).
        tokens: Tokens scored.
        max_length: Tokens per forward pass.
        stride: Step between windows (``max_length`` for the disjoint protocols).
        provider: Execution provider used.
        bytes: UTF-8 bytes of the scored documents.
        windows: Forward passes run.
        seconds: Wall-clock time of the scoring.
        protocol: ``hf``, ``lm-eval`` or ``llama-cpp``.
        standard_error: Standard error of the mean NLL (nats): sample std / sqrt(tokens).
        perplexity_ci: ``{"low", "high", "confidence"}``: exp(nll ∓ z·standard_error).
        word_perplexity: exp(ΣNLL / Σwords) (None for ``llama-cpp``).
        byte_perplexity: exp(ΣNLL / Σbytes) (None for ``llama-cpp``).
        words: Words of the scored documents, counted as lm-evaluation-harness does.
        nonfinite_logits: NaN or ±Inf values among the scored logits.
        documents: Documents scored.
        skipped_documents: Documents too short for the protocol, or empty.
        data: ``{"path", "format", "sha256", "text_field"}``.
        per_document: One ``{"name", "tokens", "nll", "perplexity", "words", "bytes"}`` per
            scored document.
        reference: The fidelity report against ``--reference`` (see :func:`evaluate_perplexity`).
    """

    perplexity: float
    nll: float
    bits_per_byte: float | None
    tokens: int
    max_length: int
    stride: int
    provider: str
    bytes: int
    windows: int
    seconds: float
    protocol: str = defaults.EVAL_PROTOCOL
    standard_error: float | None = None
    perplexity_ci: dict[str, float] | None = None
    word_perplexity: float | None = None
    byte_perplexity: float | None = None
    words: int = 0
    nonfinite_logits: int = 0
    documents: int = 1
    skipped_documents: int = 0
    data: dict[str, Any] = field(default_factory=dict)
    per_document: list[dict[str, Any]] = field(default_factory=list)
    reference: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        record = asdict(self)
        if record["reference"] is None:
            del record["reference"]
        return record


def read_text(path: str | Path) -> str:
    """Read a UTF-8 text file, with clear errors for a missing, empty or non-UTF-8 file."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"Data file {path} does not exist", "pass a UTF-8 text file with --data.")
    text = decode_text(path.read_bytes(), path)
    if not text.strip():
        raise UsageError(f"Data file {path} is empty", "pass a file with text in it.")
    return text


def default_max_length(model: OnnxCausalLM) -> int:
    """min(model context, 1024)."""
    context = model.max_positions or defaults.MAX_EVAL_LENGTH
    return min(context, defaults.MAX_EVAL_LENGTH)


def check_max_length(model: OnnxCausalLM, max_length: int | None) -> int:
    """The window length to use: ``max_length`` or the default, within the model's context.

    Raises:
        UsageError: ``max_length`` exceeds the model's context.
    """
    max_length = max_length or default_max_length(model)
    if model.max_positions and max_length > model.max_positions:
        raise UsageError(
            f"--max-length {max_length} exceeds the model's context of {model.max_positions} tokens",
            f"use --max-length {model.max_positions} or less.",
        )
    return max_length


def nll_summary(nll: np.ndarray, confidence: float = defaults.EVAL_CONFIDENCE) -> dict[str, Any]:
    """Mean NLL, perplexity, the standard error of the mean and the perplexity interval.

    Args:
        nll: [N] per-token NLL in nats.
        confidence: Two-sided level of the interval (normal approximation).
    """
    mean = float(nll.mean())
    summary: dict[str, Any] = {
        "perplexity": _exp(mean),
        "nll": mean,
        "standard_error": None,
        "perplexity_ci": None,
    }
    if len(nll) >= 2 and np.isfinite(mean):
        se = float(nll.std(ddof=1) / math.sqrt(len(nll)))
        z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
        summary["standard_error"] = se
        summary["perplexity_ci"] = {
            "low": _exp(mean - z * se),
            "high": _exp(mean + z * se),
            "confidence": confidence,
        }
    return summary


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


def evaluate_perplexity(
    model: OnnxCausalLM | str | Path,
    data: str | Path | Corpus,
    *,
    max_length: int | None = None,
    stride: int | None = None,
    provider: str = defaults.PROVIDER,
    session_options: SessionOptions | None = None,
    on_window: Callable[[int, int], None] | None = None,
    protocol: str = defaults.EVAL_PROTOCOL,
    text_field: str = defaults.EVAL_TEXT_FIELD,
    reference: str | Path | Reference | None = None,
) -> PerplexityResult:
    """Perplexity of an export on a text file, a directory of .txt files or JSONL.

    Args:
        model: An :class:`OnnxCausalLM` or an export directory.
        data: The data path, or a :class:`~llmtool.evaluate.data.Corpus` already read.
        max_length: Tokens per forward pass; default min(model context, 1024).
        stride: Step between windows (``hf`` only); default ``max_length // 2``.
        provider: ``auto``, ``cuda`` or ``cpu``.
        session_options: ONNX Runtime settings.
        on_window: Progress callback ``(done, total)`` over forward passes.
        protocol: ``hf``, ``lm-eval`` or ``llama-cpp`` (see :mod:`llmtool.evaluate.protocols`).
        text_field: The text field of JSONL data.
        reference: A PyTorch model spec or an export directory (or a loaded
            :class:`Reference`) scored on the same passes; adds ``reference`` to the result:
            its perplexity, ΔPPL, ln(PPL/PPL_ref), KL(P_ref || P) mean / median / p99 / max,
            top-1 agreement and the model's non-finite logits.

    Raises:
        UsageError: Bad data or options, or a reference with another tokenizer or vocabulary.
    """
    corpus = data if isinstance(data, Corpus) else load_corpus(data, text_field)
    if not isinstance(model, OnnxCausalLM):
        model = OnnxCausalLM(model, provider, options=session_options)
    max_length = check_max_length(model, max_length)
    proto = make_protocol(protocol, model.tokenizer, max_length, stride)
    token_ids = proto.encode(model.tokenizer, [d.text for d in corpus.documents])
    if reference is not None and not isinstance(reference, Reference):
        reference = load_reference(reference, provider, session_options)
    if reference is not None:
        check_same_tokens(proto, reference, corpus, token_ids)
    passes = [(d, p) for d, ids in enumerate(token_ids) for p in proto.passes(ids)]
    if not passes:
        raise UsageError(
            f"No document of {corpus.path} has the {proto.min_tokens} tokens --protocol {proto.name} needs",
            "lower --max-length or score a longer text.",
        )

    per_doc: list[list[np.ndarray]] = [[] for _ in token_ids]
    ref_nll: list[np.ndarray] = []
    fidelity = FidelityAccumulator()
    nonfinite = 0
    start = time.perf_counter()
    for i, (d, p) in enumerate(passes):
        logits = scored_logits(model.window_logits, p)
        nonfinite += int(logits.size - np.isfinite(logits).sum())
        per_doc[d].append(token_nll(logits, p.targets))
        if reference is not None:
            ref_logits = scored_logits(reference.logits_fn, p)
            if ref_logits.shape[-1] != logits.shape[-1]:
                raise UsageError(
                    f"The reference has {ref_logits.shape[-1]} logits per token and the model {logits.shape[-1]}",
                    "compare models with the same vocabulary.",
                )
            fidelity.add(logits, ref_logits, p.targets)
            ref_nll.append(token_nll(ref_logits, p.targets))
        if on_window is not None:
            on_window(i + 1, len(passes))
    seconds = time.perf_counter() - start

    scored = [
        (doc, np.concatenate(parts))
        for doc, parts in zip(corpus.documents, per_doc, strict=True)
        if parts
    ]
    nll = np.concatenate([x for _, x in scored])
    nll_sum = float(nll.sum())
    n_bytes = sum(doc.bytes for doc, _ in scored)
    n_words = sum(doc.words for doc, _ in scored)
    summary = nll_summary(nll)
    per_word = proto.scores_every_token
    result = PerplexityResult(
        perplexity=summary["perplexity"],
        nll=summary["nll"],
        bits_per_byte=nll_sum / math.log(2) / n_bytes if per_word else None,
        tokens=len(nll),
        max_length=max_length,
        stride=proto.stride,
        provider=model.provider,
        bytes=n_bytes,
        windows=len(passes),
        seconds=seconds,
        protocol=proto.name,
        standard_error=summary["standard_error"],
        perplexity_ci=summary["perplexity_ci"],
        word_perplexity=_exp(nll_sum / n_words) if per_word else None,
        byte_perplexity=_exp(nll_sum / n_bytes) if per_word else None,
        words=n_words,
        nonfinite_logits=nonfinite,
        documents=len(scored),
        skipped_documents=len(corpus.documents) - len(scored) + corpus.skipped,
        data={
            "path": str(corpus.path),
            "format": corpus.format,
            "sha256": corpus.sha256,
            "text_field": corpus.text_field,
        },
        per_document=[
            {
                "name": doc.name,
                "tokens": len(x),
                "nll": float(x.mean()),
                "perplexity": _exp(float(x.mean())),
                "words": doc.words,
                "bytes": doc.bytes,
            }
            for doc, x in scored
        ],
    )
    if reference is not None:
        report = fidelity.report()
        ref = nll_summary(np.concatenate(ref_nll))
        result.reference = {
            "model": reference.spec,
            "kind": reference.kind,
            "device": reference.device,
            "perplexity": report.reference_perplexity,
            "standard_error": ref["standard_error"],
            "perplexity_ci": ref["perplexity_ci"],
            "delta_perplexity": report.delta_perplexity,
            "log_ppl_ratio": report.log_ppl_ratio,
            "kl_divergence": report.kl_divergence,
            "top1_agreement": report.top1_agreement,
            "nonfinite_logits": report.nonfinite_logits,
            "tokens": report.tokens,
        }
    return result


def _exp(x: float) -> float:
    """exp that saturates to inf instead of raising on overflow (a diverged model)."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf
