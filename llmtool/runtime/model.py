"""ONNX Runtime sessions for llmtool exports: provider choice and the cached forward pass.

:class:`OnnxCausalLM` is the one interface generation and evaluation use. It reads the export's
``llmtool.json`` to learn the graph's inputs and how its cache is fed back, so no caller needs
to know whether the cache is attention keys/values or a recurrent state.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmtool import defaults
from llmtool.errors import UsageError
from llmtool.hugepages import HugePageResult, huge_pages_for
from llmtool.manifest import read_manifest, verify_files

PROVIDERS = ("auto", "cuda", "cpu")
ORT_NAMES = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
NP_DTYPES = {"float32": np.float32, "float16": np.float16}


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
    """

    intra_op_threads: int = defaults.ORT_THREADS
    graph_optimization: str = defaults.ORT_GRAPH_OPTIMIZATION
    cpu_arena: bool = defaults.ORT_CPU_ARENA
    dynamic_block_base: int = defaults.ORT_DYNAMIC_BLOCK_BASE
    huge_pages: bool = defaults.ORT_HUGE_PAGES
    cuda_graph: bool = True


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
    so.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }[options.graph_optimization]
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
            so.log_severity_level = (
                3  # ORT only warns when it falls back; we check providers below.
            )
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


class OnnxCausalLM:
    """An llmtool export loaded into an ONNX Runtime session.

    Args:
        directory: The export directory (holds llmtool.json).
        provider: ``auto``, ``cuda`` or ``cpu``.
        verify: Check the ONNX files against the sha256 recorded at export.
        options: Session settings.
    """

    def __init__(
        self,
        directory: str | Path,
        provider: str = defaults.PROVIDER,
        *,
        verify: bool = True,
        options: SessionOptions | None = None,
    ) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise UsageError(
                f"Export directory {self.directory} does not exist",
                "create it with `llmtool export MODEL --out DIR`.",
            )
        self.manifest = read_manifest(self.directory)
        verify_files(self.directory, self.manifest, hashes=verify)
        self.layout: str = self.manifest.get("layout", "standard")
        self.options = options or SessionOptions()
        # CUDA graphs need the fused layout's fixed-shape decode step.
        self.cuda_graph = self.layout == "fused" and self.options.cuda_graph
        cuda_options = {"enable_cuda_graph": "1"} if self.cuda_graph else None
        self.session, self.provider, self.huge_pages = create_session(
            self.directory / self.manifest["model_file"], provider, self.options, cuda_options
        )
        self.cuda_graph = self.cuda_graph and self.provider == "cuda"
        self.run_options = self.graph_run_options(-1)
        self.cache_entries: list[dict[str, Any]] = self.manifest["cache"]
        self.input_names = {i.name for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.max_positions: int | None = self.manifest.get("max_positions")
        self.vocab_size: int = self.manifest["vocab_size"]
        self._tokenizer: Any = None
        self._decoders: dict[tuple[int, int], Any] = {}
        self._next_graph_id = 1

    def graph_run_options(self, graph_id: int) -> Any:
        """RunOptions naming a CUDA graph (-1: run without capturing or replaying one)."""
        import onnxruntime as ort

        ro = ort.RunOptions()
        if self.cuda_graph:
            ro.add_run_config_entry("gpu_graph_id", str(graph_id))
        return ro

    def new_graph_id(self) -> int:
        graph_id, self._next_graph_id = self._next_graph_id, self._next_graph_id + 1
        return graph_id

    def decoder(self, batch: int, max_length: int) -> Any:
        """A :class:`~llmtool.runtime.decoders.Decoder` for ``batch`` rows of up to ``max_length`` tokens.

        Fused exports get preallocated buffers (and a captured CUDA graph), reused across calls
        with the same shape; standard exports get a left-padding decoder over :meth:`forward`.
        """
        from llmtool.runtime.decoders import FusedDecoder, StandardDecoder

        if self.layout != "fused":
            return StandardDecoder(self, batch)
        key = (batch, max_length)
        if key not in self._decoders:
            self._decoders[key] = FusedDecoder(self, batch, max_length)
        return self._decoders[key]

    @property
    def tokenizer(self) -> Any:
        """The tokenizer saved beside the ONNX graph (loaded on first use)."""
        if self._tokenizer is None:
            from llmtool.models.loading import ModelSpec, load_tokenizer

            self._tokenizer = load_tokenizer(
                ModelSpec("hf_dir", self.directory, None, str(self.directory))
            )
        return self._tokenizer

    @property
    def generation_config(self) -> dict[str, Any]:
        path = self.directory / "generation_config.json"
        if path.is_file():
            return json.loads(path.read_text(encoding="utf-8"))
        return {}

    def eos_token_ids(self) -> list[int]:
        """EOS ids as transformers' generate would use them (generation config, then tokenizer)."""
        eos = self.generation_config.get("eos_token_id")
        if eos is None:
            eos = self.tokenizer.eos_token_id
        if eos is None:
            return []
        return [int(e) for e in (eos if isinstance(eos, list) else [eos])]

    def empty_cache(self, batch: int) -> dict[str, np.ndarray]:
        """A cache for ``batch`` sequences that have seen nothing: zero past length or zero state."""
        cache = {}
        for entry in self.cache_entries:
            shape = [
                batch if d == "batch" else 0 if d == "past_sequence" else int(d)
                for d in entry["shape"]
            ]
            cache[entry["input"]] = np.zeros(shape, dtype=NP_DTYPES[entry["dtype"]])
        return cache

    def window_logits(self, input_ids: np.ndarray) -> np.ndarray:
        """Logits [1, L, V] of one unpadded row [1, L] with no past (perplexity windows)."""
        length = input_ids.shape[1]
        mask = np.ones((1, length), dtype=np.int64)
        positions = np.arange(length, dtype=np.int64)[None, :]
        return self.forward(input_ids, mask, positions, self.empty_cache(1))[0]

    def forward(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        cache: dict[str, np.ndarray],
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Run one step.

        The cache grows by ``sequence`` each call. Standard exports take left padding; fused
        exports take right padding (see :mod:`llmtool.export.fused`).

        Args:
            input_ids: [batch, sequence] int64, the new tokens.
            attention_mask: [batch, past + sequence] int64, 0 on padding.
            position_ids: [batch, sequence] int64.
            cache: The cache returned by the previous call (or :meth:`empty_cache`).

        Returns:
            logits [batch, sequence, vocab] float32 and the updated cache.
        """
        feeds = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
        }
        feeds = {k: v for k, v in feeds.items() if k in self.input_names}
        feeds.update(cache)
        names = ["logits", *[entry["output"] for entry in self.cache_entries]]
        outputs = dict(zip(names, self.session.run(names, feeds, self.run_options), strict=True))
        new_cache = {entry["input"]: outputs[entry["output"]] for entry in self.cache_entries}
        return outputs["logits"], new_cache
