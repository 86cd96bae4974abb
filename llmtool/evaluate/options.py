"""The options of ``llmtool eval`` (:class:`EvalOptions`) and their checks, before anything loads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llmtool import defaults
from llmtool.errors import UsageError


@dataclass
class EvalOptions:
    """What to measure (see ``llmtool eval --help`` for each option).

    Attributes:
        data: Text file, directory of .txt files or JSONL; None for throughput alone.
        protocol: ``hf``, ``lm-eval`` or ``llama-cpp``.
        text_field: JSONL field holding the text.
        max_length: Tokens per forward pass (default: the context for ``lm-eval``, else
            min(context, 1024)).
        stride: Step between ``hf`` windows (default max_length / 2).
        preprocess: Task preprocessing of each document (``wikitext``), or None.
        max_tokens: Score only about this many tokens (the first passes); None: all.
        reference: PyTorch model spec or export directory to compare with.
        throughput: Run the throughput scenarios.
        batch_sizes: Rows per scenario.
        prompt_lengths: Prompt tokens per row (None: the defaults, fitted to the context).
        new_tokens: Tokens generated per row (None: the default, fitted to the context).
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
        ray: Score the perplexity passes on Ray Data actors: ``local`` or a cluster address.
    """

    data: Path | None = None
    protocol: str = defaults.EVAL_PROTOCOL
    text_field: str = defaults.EVAL_TEXT_FIELD
    max_length: int | None = None
    stride: int | None = None
    preprocess: str | None = None
    max_tokens: int | None = None
    reference: str | None = None
    throughput: bool = False
    batch_sizes: tuple[int, ...] = defaults.THROUGHPUT_BATCH_SIZES
    prompt_lengths: tuple[int, ...] | None = None
    new_tokens: int | None = None
    warmup: int = defaults.THROUGHPUT_WARMUP
    repeats: int = defaults.THROUGHPUT_REPEATS
    backends: tuple[str, ...] = (defaults.THROUGHPUT_BACKEND,)
    provider: str = defaults.PROVIDER
    threads: int = defaults.ORT_THREADS
    graph_optimization: str = defaults.ORT_GRAPH_OPTIMIZATION
    cpu_arena: bool = defaults.ORT_CPU_ARENA
    huge_pages: bool = defaults.ORT_HUGE_PAGES
    allow_pickle: bool = False
    ray: str | None = None


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


def check_options(options: EvalOptions) -> None:
    """Refuse option combinations that measure nothing or make no sense.

    Raises:
        UsageError: No --data nor --throughput, or an option without what it needs.
    """
    if options.data is None and not options.throughput:
        raise UsageError(
            "Nothing to evaluate", "pass --data FILE for perplexity, --throughput, or both."
        )
    if options.reference is not None and options.data is None and "pytorch" not in options.backends:
        raise UsageError("--reference compares perplexity and needs --data", "add --data FILE.")
    if "pytorch" in options.backends and not options.throughput:
        raise UsageError("--backend pytorch applies to --throughput", "add --throughput.")
