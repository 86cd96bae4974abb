"""Throughput of an export, and of its PyTorch model side by side, over batch × prompt-length scenarios.

Each scenario feeds ``batch_size`` random prompts of ``prompt_length`` tokens and generates
``new_tokens`` greedy tokens per row, ``warmup`` times untimed and ``repeats`` times timed. A run
is timed step by step, each step ending when its tokens are on the host:

* prefill latency (time to first token) and prefill tok/s = batch × prompt_length / TTFT,
* decode tok/s = batch × (new_tokens - 1) / decode time, inter-token latency p50 / p90 / p99
  over every decode step of every timed run, end-to-end latency,
* peak host RSS of the process over the timed runs and the device memory in use (NVML for ONNX
  Runtime on CUDA, the allocator's peak for PyTorch on CUDA),
* memory-bandwidth utilization: (weight bytes + KV-cache bytes read per decode step) × steps/s
  over the device's peak bandwidth (:func:`llmtool.hardware.peak_bandwidth`), and what bounds
  decoding (:func:`classify_bound`: ``cache`` when a step's bytes fit in the last-level cache,
  ``bandwidth`` at or above :data:`~llmtool.defaults.BANDWIDTH_BOUND_UTILIZATION` of the peak,
  else ``launch``).

Throughput figures are "best of repeats" (the least disturbed run) with the median beside them.
"""

from __future__ import annotations

import gc
import inspect
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from llmtool import defaults

# Re-exported: the scenarios were planned here first.
from llmtool.evaluate.scenarios import (  # noqa: F401
    Scenario,
    fit_default_shapes,
    parse_sizes,
    plan_scenarios,
)
from llmtool.hardware import PeakRss, cpu_cache_bytes, gpu_memory_used, peak_bandwidth
from llmtool.manifest import CacheSpec
from llmtool.runtime.decoders import cache_length
from llmtool.runtime.model import OnnxCausalLM

BACKENDS = ("onnx", "pytorch")


@dataclass
class RunTiming:
    """One timed run: prefill (to the first tokens on the host), each decode step, the whole."""

    prefill_s: float
    step_s: list[float]
    total_s: float


def cache_bytes(
    entries: Sequence[CacheSpec | dict[str, Any]],
    batch: int,
    length: int,
    itemsize: int | None = None,
) -> int:
    """Bytes of a KV cache (or recurrent state) for ``batch`` rows holding ``length`` tokens.

    Args:
        entries: The export's cache specs (or its llmtool.json ``cache`` entries).
        batch: Rows.
        length: Tokens in the cache.
        itemsize: Bytes per element; default each entry's dtype.
    """
    specs = [e if isinstance(e, CacheSpec) else CacheSpec.from_entry(e) for e in entries]
    return sum(spec.nbytes(batch, length, itemsize) for spec in specs)


class OnnxBackend:
    """Runs scenarios on an export through its :meth:`~OnnxCausalLM.decoder`."""

    name = "onnx"

    def __init__(self, model: OnnxCausalLM) -> None:
        self.model = model
        self.device = "cuda" if model.provider == "cuda" else "cpu"
        self.weight_bytes = sum(int(r["bytes"]) for r in model.manifest.get("files", {}).values())
        self.cache_itemsize: int | None = None

    def run(self, prompts: np.ndarray, new_tokens: int) -> RunTiming:
        batch, length = prompts.shape
        decoder = self.model.decoder(batch, cache_length(self.model, length + new_tokens))
        rows = prompts.tolist()
        start = time.perf_counter()
        tokens = decoder.prefill(rows).argmax()
        stamps = [time.perf_counter()]
        for _ in range(new_tokens - 1):
            tokens = decoder.step(tokens).argmax()
            stamps.append(time.perf_counter())
        return RunTiming(stamps[0] - start, np.diff(stamps).tolist(), stamps[-1] - start)

    def reset_device_memory(self) -> None:
        pass

    def device_memory(self) -> int | None:
        # ONNX Runtime's arena keeps what it grew to, so the use after the runs is their peak.
        return gpu_memory_used() if self.device == "cuda" else None


class TorchBackend:
    """Runs scenarios on the PyTorch model with its own cache (transformers' or a recurrent state)."""

    name = "pytorch"

    def __init__(self, model: Any, device: str) -> None:
        import torch

        self.model = model
        self.device = device
        self.torch = torch
        params = {id(p): p for p in model.parameters()}.values()
        self.weight_bytes = sum(p.numel() * p.element_size() for p in params)
        self.cache_itemsize = next(iter(params)).element_size()
        self.recurrent = "state" in inspect.signature(model.forward).parameters

    def _forward(self, ids: Any, cache: Any) -> tuple[Any, Any]:
        if cache is None:
            out = self.model(input_ids=ids, use_cache=True)
        elif self.recurrent:
            out = self.model(input_ids=ids, state=cache)
        else:
            out = self.model(input_ids=ids, past_key_values=cache, use_cache=True)
        cache = out.state if self.recurrent else out.past_key_values
        return out.logits[:, -1, :].argmax(dim=-1), cache

    def run(self, prompts: np.ndarray, new_tokens: int) -> RunTiming:
        torch = self.torch
        ids = torch.from_numpy(prompts).to(self.device)
        with torch.inference_mode():
            start = time.perf_counter()
            tokens, cache = self._forward(ids, None)
            tokens.cpu()  # the tokens on the host, as ONNX Runtime's loop has them
            stamps = [time.perf_counter()]
            for _ in range(new_tokens - 1):
                tokens, cache = self._forward(tokens[:, None], cache)
                tokens.cpu()
                stamps.append(time.perf_counter())
        return RunTiming(stamps[0] - start, np.diff(stamps).tolist(), stamps[-1] - start)

    def reset_device_memory(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.reset_peak_memory_stats()

    def device_memory(self) -> int | None:
        return int(self.torch.cuda.max_memory_allocated()) if self.device == "cuda" else None


def classify_bound(
    bytes_per_step: int, utilization: float | None, cache_bytes: int | None
) -> str | None:
    """What limits decoding, from the bytes a step reads, the measured utilization and the cache.

    * ``cache``: weights and KV cache fit in the last-level cache, so main-memory bandwidth is
      not what a step waits for (its "utilization" of DRAM bandwidth means nothing);
    * ``bandwidth``: the step streams more than the cache holds and reaches at least
      :data:`~llmtool.defaults.BANDWIDTH_BOUND_UTILIZATION` of the peak;
    * ``launch``: neither; per-step overheads (kernel launches, host work) dominate.

    None when the peak bandwidth is unknown.
    """
    if cache_bytes and bytes_per_step <= cache_bytes:
        return "cache"
    if utilization is None:
        return None
    return "bandwidth" if utilization >= defaults.BANDWIDTH_BOUND_UTILIZATION else "launch"


def _spread(values: Sequence[float]) -> float:
    """(best − worst) / best of the repeats' tok/s: the run-to-run noise the gate allows."""
    best = max(values)
    return (best - min(values)) / best if best > 0 else 0.0


def _percentile(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else 0.0


def summarize(
    backend: Any,
    scenario: Scenario,
    runs: list[RunTiming],
    cache_entries: Sequence[CacheSpec],
    peak: dict[str, Any],
    peak_rss: int,
    device_memory: int | None,
) -> dict[str, Any]:
    """The figures of one scenario on one backend (see the module docstring)."""
    b, p, n = scenario.batch_size, scenario.prompt_length, scenario.new_tokens
    prefill = [r.prefill_s for r in runs]
    decode = [sum(r.step_s) for r in runs]
    e2e = [r.total_s for r in runs]
    steps = np.array([s for r in runs for s in r.step_s])
    decode_tps = [b * (n - 1) / d if d > 0 else 0.0 for d in decode]
    prefill_tps = [b * p / t if t > 0 else 0.0 for t in prefill]
    # Decode step s (1..n-1) reads a cache of p + s tokens per row: p + n/2 on average.
    per_token = cache_bytes(cache_entries, b, 1, backend.cache_itemsize) - cache_bytes(
        cache_entries, b, 0, backend.cache_itemsize
    )
    constant = cache_bytes(cache_entries, b, 0, backend.cache_itemsize)
    kv_per_step = int(per_token * (p + n / 2) + constant)
    bytes_per_step = backend.weight_bytes + kv_per_step
    best_decode = min(decode)
    bytes_per_s = bytes_per_step * (n - 1) / best_decode if best_decode > 0 else 0.0
    utilization = bytes_per_s / peak["bytes_per_s"] if peak.get("bytes_per_s") else None
    bound = classify_bound(bytes_per_step, utilization, peak.get("cache_bytes"))
    return {
        "key": scenario.key,
        "backend": backend.name,
        "device": backend.device,
        "batch_size": b,
        "prompt_length": p,
        "new_tokens": n,
        "ttft_s": {"best": min(prefill), "median": statistics.median(prefill)},
        "prefill_tokens_per_s": {
            "best": max(prefill_tps),
            "median": statistics.median(prefill_tps),
            "spread": _spread(prefill_tps),
        },
        "decode_tokens_per_s": {
            "best": max(decode_tps),
            "median": statistics.median(decode_tps),
            "spread": _spread(decode_tps),
        },
        "inter_token_latency_s": {
            "p50": _percentile(steps, 50),
            "p90": _percentile(steps, 90),
            "p99": _percentile(steps, 99),
        },
        "e2e_latency_s": {"best": min(e2e), "median": statistics.median(e2e)},
        "peak_rss_bytes": peak_rss,
        "device_memory_bytes": device_memory,
        "bandwidth": {
            "weight_bytes": backend.weight_bytes,
            "kv_bytes_per_step": kv_per_step,
            "bytes_per_s": bytes_per_s,
            "peak_bytes_per_s": peak.get("bytes_per_s"),
            "peak_source": peak.get("source"),
            "utilization": utilization,
            "bound": bound,
        },
        "runs": {"ttft_s": prefill, "decode_s": decode, "e2e_s": e2e},
    }


def measure(
    backend: Any, prompts: np.ndarray, new_tokens: int, warmup: int, repeats: int
) -> tuple[list[RunTiming], int, int | None]:
    """Warm up, then time ``repeats`` runs: the timings, peak RSS and device memory."""
    for _ in range(warmup):
        backend.run(prompts, new_tokens)
    backend.reset_device_memory()
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()  # no collector pauses inside timed steps
    try:
        with PeakRss() as rss:
            runs = [backend.run(prompts, new_tokens) for _ in range(repeats)]
    finally:
        if enabled:
            gc.enable()
    return runs, rss.peak, backend.device_memory()


def _cache_bytes(device: str) -> int | None:
    return cpu_cache_bytes() if device == "cpu" else None


def measure_throughput(
    model: OnnxCausalLM,
    *,
    batch_sizes: Sequence[int] = defaults.THROUGHPUT_BATCH_SIZES,
    prompt_lengths: Sequence[int] = defaults.THROUGHPUT_PROMPT_LENGTHS,
    new_tokens: int = defaults.THROUGHPUT_NEW_TOKENS,
    warmup: int = defaults.THROUGHPUT_WARMUP,
    repeats: int = defaults.THROUGHPUT_REPEATS,
    onnx: bool = True,
    pytorch: Any = None,
    pytorch_device: str = "cpu",
    on_scenario: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Time every scenario on the export, and on the PyTorch model too when one is given.

    Args:
        model: The export.
        batch_sizes: Rows per scenario.
        prompt_lengths: Prompt tokens per row.
        new_tokens: Tokens generated per row (>= 2).
        warmup: Untimed runs per scenario.
        repeats: Timed runs per scenario.
        onnx: Time the export (False: only the PyTorch model).
        pytorch: A PyTorch causal LM (``torch.nn.Module``) for the side-by-side backend.
        pytorch_device: ``cpu`` or ``cuda``.
        on_scenario: Progress callback ``(label, done, total)``.

    Returns:
        ``{"scenarios": [...], "warmup", "repeats", "peak_bandwidth": {device: {...}}}``.
    """
    plan = plan_scenarios(model, batch_sizes, prompt_lengths, new_tokens, warmup, repeats)
    backends: list[Any] = [OnnxBackend(model)] if onnx else []
    if pytorch is not None:
        backends.append(TorchBackend(pytorch, pytorch_device))
    peaks = {
        b.device: {**peak_bandwidth(b.device), "cache_bytes": _cache_bytes(b.device)}
        for b in backends
    }
    results: list[dict[str, Any]] = []
    total = len(plan) * len(backends)
    for backend in backends:
        for scenario in plan:
            if on_scenario is not None:
                on_scenario(f"{backend.name} {scenario.key}", len(results), total)
            rng = np.random.default_rng(defaults.SEED)
            prompts = rng.integers(
                0, model.vocab_size, (scenario.batch_size, scenario.prompt_length)
            )
            runs, rss, device_memory = measure(
                backend, prompts.astype(np.int64), scenario.new_tokens, warmup, repeats
            )
            results.append(
                summarize(
                    backend,
                    scenario,
                    runs,
                    model.cache_entries,
                    peaks[backend.device],
                    rss,
                    device_memory,
                )
            )
    if on_scenario is not None:
        on_scenario("done", total, total)
    return {"scenarios": results, "warmup": warmup, "repeats": repeats, "peak_bandwidth": peaks}
