"""ONNX Runtime sessions: provider choice (CUDA when usable, else CPU) and session settings."""

from __future__ import annotations

import contextlib
import ctypes
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmtool import defaults
from llmtool.errors import UsageError
from llmtool.hugepages import HugePageResult, huge_pages_for

PROVIDERS = ("auto", "cuda", "cpu")


@functools.lru_cache(maxsize=1)
def cuda_device_count() -> int:
    """Number of CUDA devices the driver reports (0 without a driver), without initializing ORT."""
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        count = ctypes.c_int(0)
        if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
        return count.value
    return 0


def cuda_available() -> bool:
    """Whether the CUDA execution provider can actually run here (EP built in and a GPU present)."""
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers() and cuda_device_count() > 0


@dataclass
class SessionOptions:
    """ONNX Runtime session settings chosen by llmtool (exposed as CLI options where useful).

    Attributes:
        intra_op_threads: Threads inside one operator; 0 lets ORT use every physical core.
        graph_optimization: ``all``, ``extended``, ``basic`` or ``disable``.
        cpu_arena: ONNX Runtime's CPU memory arena (buffers reused across runs).
        dynamic_block_base: Work split of the intra-op thread pool (0: ONNX Runtime's default).
        huge_pages: Move a CPU session's weights onto 2 MB huge pages once loaded (Linux; see
            :mod:`llmtool.hugepages`).
        cuda_graph: Capture decode steps of fused exports as CUDA graphs (CUDA only).
        prepack: Let ONNX Runtime repack constant MatMul weights for its kernels (faster runs,
            a second copy of those weights); False for export validation, which runs briefly.
    """

    intra_op_threads: int = defaults.ORT_THREADS
    graph_optimization: str = defaults.ORT_GRAPH_OPTIMIZATION
    cpu_arena: bool = defaults.ORT_CPU_ARENA
    dynamic_block_base: int = defaults.ORT_DYNAMIC_BLOCK_BASE
    huge_pages: bool = defaults.ORT_HUGE_PAGES
    cuda_graph: bool = True
    prepack: bool = True


def ort_session_options(options: SessionOptions) -> Any:
    """``onnxruntime.SessionOptions`` for llmtool's settings.

    Raises:
        UsageError: An unknown graph optimization level or a negative thread count.
    """
    import onnxruntime as ort

    if options.graph_optimization not in defaults.ORT_GRAPH_OPTIMIZATIONS:
        raise UsageError(
            f"Unknown graph optimization level {options.graph_optimization!r}",
            f"use one of {', '.join(defaults.ORT_GRAPH_OPTIMIZATIONS)}.",
        )
    if options.intra_op_threads < 0:
        raise UsageError(
            f"--threads must be 0 (one per core) or more, got {options.intra_op_threads}"
        )
    so = ort.SessionOptions()
    so.intra_op_num_threads = options.intra_op_threads
    so.enable_cpu_mem_arena = options.cpu_arena
    if options.dynamic_block_base > 0:
        so.add_session_config_entry("session.dynamic_block_base", str(options.dynamic_block_base))
    if not options.prepack:
        so.add_session_config_entry("session.disable_prepacking", "1")
    so.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }[options.graph_optimization]
    return so


def create_session(
    model_path: Path,
    provider: str = defaults.PROVIDER,
    options: SessionOptions | None = None,
    cuda_options: dict[str, str] | None = None,
) -> tuple[Any, str, HugePageResult]:
    """Create an inference session on the requested provider.

    Args:
        model_path: The .onnx file.
        provider: ``auto`` (CUDA when a GPU is usable, else CPU), ``cuda`` or ``cpu``.
        options: Session settings.
        cuda_options: CUDA execution provider options (e.g. ``enable_cuda_graph``).

    Returns:
        The session, the provider it really runs on (``cuda`` or ``cpu``) and what moving its
        weights onto huge pages did (CPU sessions only).

    Raises:
        UsageError: ``cuda`` was asked for and the CUDA execution provider is not usable.
    """
    import onnxruntime as ort

    if provider not in PROVIDERS:
        raise UsageError(f"Unknown provider {provider!r}", f"use one of {', '.join(PROVIDERS)}.")
    options = options or SessionOptions()
    so = ort_session_options(options)
    want_cuda = provider == "cuda" or (provider == "auto" and cuda_available())
    if provider == "cuda" and not cuda_available():
        raise UsageError(
            "The CUDA execution provider is not usable here (no GPU, driver or onnxruntime-gpu)",
            "run with --provider cpu, or install onnxruntime-gpu on a machine with an NVIDIA GPU.",
        )
    if want_cuda and hasattr(ort, "preload_dlls"):
        # Lets onnxruntime-gpu find the CUDA and cuDNN libraries that pip-installed torch brings.
        with contextlib.suppress(Exception):
            ort.preload_dlls(cuda=True, cudnn=True, msvc=False)
    try:
        if want_cuda:
            so.log_severity_level = 3  # ORT only warns when it falls back; checked below.
            session = ort.InferenceSession(
                str(model_path),
                so,
                providers=[("CUDAExecutionProvider", cuda_options or {}), "CPUExecutionProvider"],
            )
            if session.get_providers()[0] == "CUDAExecutionProvider":
                return session, "cuda", HugePageResult(reason="weights on the GPU")
            if provider == "cuda":
                raise UsageError(
                    "onnxruntime created the session on CPU although CUDA was requested",
                    "check the CUDA and cuDNN libraries onnxruntime-gpu needs, or run with --provider cpu.",
                )
        with huge_pages_for(options.huge_pages) as huge_pages:
            session = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
    except UsageError:
        raise
    except Exception as e:  # onnxruntime raises its own exception types for unreadable graphs
        raise UsageError(
            f"onnxruntime cannot load {model_path} ({str(e).splitlines()[0][:200]})",
            "re-export the model with `llmtool export --force`.",
        ) from e
    return session, "cpu", huge_pages
