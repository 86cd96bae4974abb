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

if TYPE_CHECKING:
    from llmtool.evaluate.data import Corpus
    from llmtool.evaluate.protocols import Protocol
    from llmtool.evaluate.reference import Reference
    from llmtool.runtime.model import OnnxCausalLM
    from llmtool.runtime.session import SessionOptions

# on_progress(description, done, total): total None while unknown.
ProgressFn = Callable[[str, int, "int | None"], None]


@dataclass
class EvalOptions:
    """What to measure (see ``llmtool eval --help`` for each option).

    Attributes:
        data: Text file, directory of .txt files or JSONL; None for throughput alone.
        protocol: ``hf``, ``lm-eval`` or ``llama-cpp``.
        text_field: JSONL field holding the text.
        max_length: Tokens per forward pass (default min(context, 1024)).
        stride: Step between ``hf`` windows (default max_length / 2).
        reference: PyTorch model spec or export directory to compare with.
        throughput: Run the throughput scenarios.
        batch_sizes: Rows per scenario.
        prompt_lengths: Prompt tokens per row.
        new_tokens: Tokens generated per row.
        warmup: Untimed runs per scenario.
        repeats: Timed runs per scenario.
        backends: ``onnx`` and optionally ``pytorch``.
        provider: ``auto``, ``cuda`` or ``cpu``.
        threads: Intra-op threads of ONNX Runtime, and of PyTorch for a PyTorch reference and
            ``--backend pytorch`` (0: each library's default, all cores).
        graph_optimization: ONNX Runtime's graph optimization level.
        cpu_arena: ONNX Runtime's CPU memory arena.
        huge_pages: Move a CPU session's weights onto 2 MB huge pages once loaded.
        allow_pickle: Accept pickle weights for PyTorch models.
    """

    data: Path | None = None
    protocol: str = defaults.EVAL_PROTOCOL
    text_field: str = defaults.EVAL_TEXT_FIELD
    max_length: int | None = None
    stride: int | None = None
    reference: str | None = None
    throughput: bool = False
    batch_sizes: tuple[int, ...] = defaults.THROUGHPUT_BATCH_SIZES
    prompt_lengths: tuple[int, ...] = defaults.THROUGHPUT_PROMPT_LENGTHS
    new_tokens: int = defaults.THROUGHPUT_NEW_TOKENS
    warmup: int = defaults.THROUGHPUT_WARMUP
    repeats: int = defaults.THROUGHPUT_REPEATS
    backends: tuple[str, ...] = (defaults.THROUGHPUT_BACKEND,)
    provider: str = defaults.PROVIDER
    threads: int = defaults.ORT_THREADS
    graph_optimization: str = defaults.ORT_GRAPH_OPTIMIZATION
    cpu_arena: bool = defaults.ORT_CPU_ARENA
    huge_pages: bool = defaults.ORT_HUGE_PAGES
    allow_pickle: bool = False


@dataclass
class EvalReport:
    """What :func:`run_eval` returns: the ``--json`` record and the gate's verdict, if any."""

    record: dict[str, Any]
    gate: GateResult | None = field(default=None)

    @property
    def passed(self) -> bool:
        return self.gate is None or self.gate.passed


def parse_backends(values: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """``onnx`` first, then ``pytorch`` if asked for (values may be comma-separated).

    Raises:
        UsageError: An unknown backend.
    """
    from llmtool.evaluate.throughput import BACKENDS

    names = [v.strip() for item in values for v in item.split(",") if v.strip()]
    for name in names:
        if name not in BACKENDS:
            raise UsageError(f"Unknown backend {name!r}", f"use one of {', '.join(BACKENDS)}.")
    return ("onnx", "pytorch") if "pytorch" in names else ("onnx",)


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


def _check_options(options: EvalOptions) -> None:
    if options.data is None and not options.throughput:
        raise UsageError(
            "Nothing to evaluate", "pass --data FILE for perplexity, --throughput, or both."
        )
    if options.reference is not None and options.data is None and "pytorch" not in options.backends:
        raise UsageError("--reference compares perplexity and needs --data", "add --data FILE.")
    if "pytorch" in options.backends and not options.throughput:
        raise UsageError("--backend pytorch applies to --throughput", "add --throughput.")


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
    """

    model: OnnxCausalLM
    session_options: SessionOptions
    corpus: Corpus | None = None
    protocol: Protocol | None = None
    pytorch_spec: str | None = None


def resolve(model_dir: str | Path, options: EvalOptions, progress: ProgressFn) -> Settings:
    """Load the export and check every setting (data, window, scenarios, PyTorch model).

    Raises:
        UsageError: Bad data or options.
    """
    from llmtool.evaluate.data import load_corpus
    from llmtool.evaluate.perplexity import check_max_length
    from llmtool.evaluate.protocols import make_protocol
    from llmtool.evaluate.throughput import plan_scenarios
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
    settings = Settings(model, session_options)
    if options.data is not None:
        settings.corpus = load_corpus(options.data, options.text_field)
        max_length = check_max_length(model, options.max_length)
        settings.protocol = make_protocol(
            options.protocol, model.tokenizer, max_length, options.stride
        )
    if options.throughput:
        plan_scenarios(
            model,
            options.batch_sizes,
            options.prompt_lengths,
            options.new_tokens,
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
            "reference": options.reference,
        },
        "throughput": None
        if not options.throughput
        else {
            "batch_sizes": list(options.batch_sizes),
            "prompt_lengths": list(options.prompt_lengths),
            "new_tokens": options.new_tokens,
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
    with torch_threads(options.threads if reference is not None else 0):
        result = evaluate_perplexity(
            settings.model,
            settings.corpus,
            max_length=protocol.max_length,
            stride=protocol.stride if protocol.name == "hf" else None,
            protocol=protocol.name,
            reference=reference,
            on_window=lambda done, total: progress("Scoring", done, total),
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

    _check_options(options)
    tolerance = tolerance or Tolerance()
    baseline_record = read_baseline(baseline) if baseline is not None else None
    settings = resolve(model_dir, options, progress)
    model = settings.model
    config = eval_config(model_dir, options, settings, baseline, tolerance)
    if baseline_record is not None:
        check_config(baseline_record, config, str(baseline))

    scenarios: dict[str, Any] = {
        "batch_sizes": options.batch_sizes,
        "prompt_lengths": options.prompt_lengths,
        "new_tokens": options.new_tokens,
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
    return EvalReport(record, gate)
