"""``llmtool eval`` as one library call: perplexity, fidelity, throughput and the baseline gate.

:func:`run_eval` resolves every setting first (:func:`resolve`: data hash, window, stride,
shapes, execution provider; :func:`eval_config`), refuses a baseline measured with another config
before measuring anything, then runs, in this order so that the PyTorch model does not sit in
memory during the ONNX timings: ONNX throughput, perplexity with the reference
(:func:`measure_perplexity`), PyTorch throughput (:func:`measure_pytorch_throughput`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmtool import defaults
from llmtool.errors import UsageError
from llmtool.evaluate.gate import GateResult, Tolerance
from llmtool.evaluate.options import EvalOptions, check_options, parse_backends  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    from llmtool.evaluate.data import Corpus
    from llmtool.evaluate.perplexity import Plan
    from llmtool.evaluate.protocols import Protocol
    from llmtool.evaluate.reference import Reference
    from llmtool.runtime.model import OnnxCausalLM
    from llmtool.runtime.session import SessionOptions

# on_progress(description, done, total): total None while unknown.
ProgressFn = Callable[[str, int, "int | None"], None]


@dataclass
class EvalReport:
    """What :func:`run_eval` returns: the ``--json`` record, the gate's verdict and the baseline."""

    record: dict[str, Any]
    gate: GateResult | None = field(default=None)
    baseline: dict[str, Any] | None = None

    @property
    def passed(self) -> bool:
        return self.gate is None or self.gate.passed


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run PyTorch on ``threads`` intra-op threads inside the block (its default when 0)."""
    if threads <= 0:
        yield
        return
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _pytorch_spec(model: Any, options: EvalOptions) -> str:
    """The PyTorch model of ``--backend pytorch``: a PyTorch ``--reference``, else the export's source."""
    from llmtool.models.loading import resolve_spec

    if options.reference is not None and resolve_spec(options.reference).kind != "onnx_dir":
        return options.reference
    source = (model.manifest.get("source") or {}).get("spec")
    if not source or (source.lower() != defaults.SMOLLM2_ALIAS and not Path(source).exists()):
        raise UsageError(
            f"--backend pytorch needs the PyTorch model, and the export's source {source!r} is not here",
            "pass the PyTorch model with --reference MODEL.",
        )
    return str(source)


@dataclass
class Settings:
    """Every setting of a run, resolved before anything is measured.

    Attributes:
        model: The export, loaded.
        session_options: ONNX Runtime settings (also used for an ONNX reference).
        corpus: The documents to score (None without ``--data``).
        protocol: The perplexity protocol (None without ``--data``).
        pytorch_spec: The PyTorch model of ``--backend pytorch`` (None without it).
        prompt_lengths: The scenarios' prompt lengths, fitted to the context when defaulted.
        new_tokens: The scenarios' new tokens, fitted likewise.
        shapes_note: What fitting the default shapes changed (None: nothing).
    """

    model: OnnxCausalLM
    session_options: SessionOptions
    corpus: Corpus | None = None
    protocol: Protocol | None = None
    pytorch_spec: str | None = None
    prompt_lengths: tuple[int, ...] = defaults.THROUGHPUT_PROMPT_LENGTHS
    new_tokens: int = defaults.THROUGHPUT_NEW_TOKENS
    shapes_note: str | None = None


def resolve(model_dir: str | Path, options: EvalOptions, progress: ProgressFn) -> Settings:
    """Load the export and check every setting (data, window, scenarios, PyTorch model).

    Raises:
        UsageError: Bad data or options.
    """
    from llmtool.evaluate.data import load_corpus
    from llmtool.evaluate.perplexity import check_max_length
    from llmtool.evaluate.protocols import make_protocol
    from llmtool.evaluate.throughput import fit_default_shapes, plan_scenarios
    from llmtool.runtime.model import OnnxCausalLM
    from llmtool.runtime.session import SessionOptions

    session_options = SessionOptions(
        intra_op_threads=options.threads,
        graph_optimization=options.graph_optimization,
        cpu_arena=options.cpu_arena,
        huge_pages=options.huge_pages,
    )
    progress("Loading the export", 0, None)
    model = OnnxCausalLM(model_dir, options.provider, options=session_options)
    if model.recognised != "llmtool":
        progress(
            f"Recognised an {model.recognised} export (cache inferred from its graph)", 0, None
        )
    settings = Settings(model, session_options)
    if options.data is not None:
        settings.corpus = load_corpus(options.data, options.text_field, options.preprocess)
        max_length = check_max_length(model, options.max_length, options.protocol)
        settings.protocol = make_protocol(
            options.protocol, model.tokenizer, max_length, options.stride
        )
    if options.throughput:
        settings.prompt_lengths, settings.new_tokens, settings.shapes_note = fit_default_shapes(
            model.max_positions, options.prompt_lengths, options.new_tokens
        )
        plan_scenarios(
            model,
            options.batch_sizes,
            settings.prompt_lengths,
            settings.new_tokens,
            options.warmup,
            options.repeats,
        )
    if "pytorch" in options.backends:
        settings.pytorch_spec = _pytorch_spec(model, options)
    return settings


def eval_config(
    model_dir: str | Path,
    options: EvalOptions,
    settings: Settings,
    baseline: str | Path | None,
    tolerance: Tolerance,
) -> dict[str, Any]:
    """The record's ``config``: what was measured and how (the gate compares it first)."""
    model, corpus, protocol = settings.model, settings.corpus, settings.protocol
    return {
        "model": str(model_dir),
        "model_type": model.manifest.get("model_type"),
        "dtype": model.manifest.get("dtype"),
        "layout": model.layout,
        **({"recognised": model.recognised} if model.recognised != "llmtool" else {}),
        "quantization": (model.manifest.get("quantization") or {}).get("mode"),
        "provider": options.provider,
        "execution_provider": model.provider,
        "threads": options.threads,
        "graph_optimization": options.graph_optimization,
        "cpu_arena": options.cpu_arena,
        "huge_pages": model.huge_pages.to_dict(),
        "perplexity": None
        if corpus is None or protocol is None
        else {
            "data": str(corpus.path),
            "data_sha256": corpus.sha256,
            "format": corpus.format,
            "text_field": corpus.text_field,
            "documents": len(corpus.documents),
            "protocol": protocol.name,
            "max_length": protocol.max_length,
            "stride": protocol.stride,
            "preprocess": corpus.preprocess,
            "max_tokens": options.max_tokens,
            "reference": options.reference,
        },
        "throughput": None
        if not options.throughput
        else {
            "batch_sizes": list(options.batch_sizes),
            "prompt_lengths": list(settings.prompt_lengths),
            "new_tokens": settings.new_tokens,
            "shapes_note": settings.shapes_note,
            "warmup": options.warmup,
            "repeats": options.repeats,
            "backends": list(options.backends),
            "pytorch_model": settings.pytorch_spec,
        },
        "baseline": None if baseline is None else str(baseline),
        "tolerance": asdict(tolerance) if baseline is not None else None,
    }


def measure_perplexity(
    settings: Settings, options: EvalOptions, progress: ProgressFn
) -> tuple[dict[str, Any], Reference | None]:
    """Perplexity (and fidelity to ``--reference``) on the corpus; the reference, for reuse."""
    from llmtool.evaluate.perplexity import evaluate_perplexity
    from llmtool.evaluate.reference import load_reference

    assert settings.corpus is not None and settings.protocol is not None
    protocol = settings.protocol
    reference = None
    if options.reference is not None:
        progress(f"Loading the reference {options.reference}", 0, None)
        reference = load_reference(
            options.reference,
            options.provider,
            settings.session_options,
            allow_pickle=options.allow_pickle,
        )
    label = ["Scoring"]

    def on_plan(plan: Plan) -> None:
        # Said up front: how much will be scored, so a user can bound a long run.
        label[0] = f"Scoring {len(plan.passes):,} windows, {plan.tokens:,} tokens"
        if plan.truncated:
            label[0] += f" (--max-tokens {options.max_tokens:,})"
        progress(label[0], 0, len(plan.passes))

    score_fn = None
    if options.ray is not None:
        from llmtool.batch.ray import ray_scorer

        score_fn = ray_scorer(
            options.ray,
            threads=options.threads,
            reference=options.reference,
            allow_pickle=options.allow_pickle,
            session_options=settings.session_options,
        )
    with torch_threads(options.threads if reference is not None else 0):
        result = evaluate_perplexity(
            settings.model,
            settings.corpus,
            max_length=protocol.max_length,
            stride=protocol.stride if protocol.name == "hf" else None,
            protocol=protocol.name,
            reference=reference,
            max_tokens=options.max_tokens,
            on_plan=on_plan,
            on_window=lambda done, total: progress(label[0], done, total),
            score_fn=score_fn,
        )
    return result.to_dict(), reference


def measure_pytorch_throughput(
    settings: Settings,
    options: EvalOptions,
    reference: Reference | None,
    scenarios: dict[str, Any],
    progress: ProgressFn,
) -> dict[str, Any]:
    """Throughput of the PyTorch model (``--backend pytorch``), reusing a PyTorch reference."""
    from llmtool.evaluate.reference import torch_device
    from llmtool.evaluate.throughput import measure_throughput

    spec, model = settings.pytorch_spec, settings.model
    if reference is not None and reference.kind == "pytorch" and reference.spec == spec:
        torch_model, device = reference.model.model, reference.device
    else:
        from llmtool.models.loading import load_model

        progress(f"Loading the PyTorch model {spec}", 0, None)
        torch_model = load_model(str(spec), allow_pickle=options.allow_pickle).model
        device = torch_device(options.provider)
        torch_model.to(device)
    if device == "cuda" and model.manifest.get("dtype") == "fp16":
        import torch

        torch_model.to(torch.float16)
    with torch_threads(options.threads):
        return measure_throughput(
            model, **scenarios, onnx=False, pytorch=torch_model, pytorch_device=device
        )


def run_eval(
    model_dir: str | Path,
    options: EvalOptions,
    *,
    baseline: str | Path | None = None,
    tolerance: Tolerance | None = None,
    on_progress: ProgressFn | None = None,
) -> EvalReport:
    """Evaluate an export: perplexity and fidelity on data, throughput, and a baseline gate.

    Args:
        model_dir: The export directory.
        options: What to measure.
        baseline: An earlier ``--json`` report to compare with.
        tolerance: How much worse a metric may get (defaults in :mod:`llmtool.defaults`).
        on_progress: Progress callback ``(description, done, total)``.

    Returns:
        The record and, with a baseline, the gate's verdict (the caller decides the exit code).

    Raises:
        UsageError: Bad input, or a baseline measured with another config (exit code 2).
    """
    from llmtool.evaluate.gate import check_config, compare, read_baseline
    from llmtool.evaluate.record import build_record
    from llmtool.evaluate.throughput import measure_throughput
    from llmtool.hardware import environment

    def progress(description: str, done: int, total: int | None) -> None:
        if on_progress is not None:
            on_progress(description, done, total)

    check_options(options)
    tolerance = tolerance or Tolerance()
    baseline_record = read_baseline(baseline) if baseline is not None else None
    settings = resolve(model_dir, options, progress)
    model = settings.model
    config = eval_config(model_dir, options, settings, baseline, tolerance)
    if baseline_record is not None:
        check_config(baseline_record, config, str(baseline))

    scenarios: dict[str, Any] = {
        "batch_sizes": options.batch_sizes,
        "prompt_lengths": settings.prompt_lengths,
        "new_tokens": settings.new_tokens,
        "warmup": options.warmup,
        "repeats": options.repeats,
        "on_scenario": lambda label, done, total: progress(f"Timing {label}", done, total),
    }
    throughput = measure_throughput(model, **scenarios) if options.throughput else None
    perplexity = reference = None
    if settings.corpus is not None:
        perplexity, reference = measure_perplexity(settings, options, progress)
    if settings.pytorch_spec is not None and throughput is not None:
        timed = measure_pytorch_throughput(settings, options, reference, scenarios, progress)
        throughput["scenarios"] += timed["scenarios"]
        throughput["peak_bandwidth"].update(timed["peak_bandwidth"])

    record = build_record(
        model=str(model_dir),
        provider=model.provider,
        config=config,
        environment=environment(model.provider, model.manifest.get("dtype")),
        perplexity=perplexity,
        throughput=throughput,
    )
    gate = None
    if baseline_record is not None:
        gate = compare(baseline_record, record, tolerance, str(baseline))
        record["gate"] = gate.to_dict()
    return EvalReport(record, gate, baseline_record)
