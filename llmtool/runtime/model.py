"""An llmtool export loaded for generation and evaluation: the cached forward pass.

:class:`OnnxCausalLM` is the one interface generation and evaluation use. It reads the export's
``llmtool.json`` (as a :class:`~llmtool.manifest.Manifest`) to learn the graph's inputs and how
its cache is fed back, so no caller needs to know whether the cache is attention keys/values or
a recurrent state.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from llmtool import defaults
from llmtool.errors import UsageError
from llmtool.manifest import CacheSpec, verify_files
from llmtool.runtime.decoders import Decoder, FusedDecoder, StandardDecoder, empty_cache
from llmtool.runtime.files import ExportFiles
from llmtool.runtime.foreign import read_contract
from llmtool.runtime.session import SessionOptions, create_session


class OnnxCausalLM(ExportFiles):
    """An llmtool export loaded into an ONNX Runtime session.

    Args:
        directory: The export directory (holds llmtool.json).
        provider: ``auto``, ``cuda`` or ``cpu``.
        verify: Check the ONNX files against the sha256 recorded at export.
        options: Session settings.

    Attributes:
        contract: The typed :class:`~llmtool.manifest.Manifest`.
        manifest: llmtool.json as read (a dict; reports and eval records print its fields).
        layout: ``standard`` or ``fused``.
        padding: The side batches are padded on (``left`` standard, ``right`` fused).
        cache_entries: One :class:`~llmtool.manifest.CacheSpec` per fed-back cache tensor.
        provider: Where the session really runs, ``cuda`` or ``cpu``.
    """

    def __init__(
        self,
        directory: str | Path,
        provider: str = defaults.PROVIDER,
        *,
        verify: bool = True,
        options: SessionOptions | None = None,
    ) -> None:
        self._open_directory(directory)
        # llmtool.json, or the contract inferred from an Optimum / onnxruntime-genai export.
        self.contract = read_contract(self.directory)
        self.manifest = self.contract.raw  # the file as read, for reports and eval records
        if self.manifest.get("kind") == "seq2seq":
            raise UsageError(
                f"{self.directory} is an encoder-decoder export",
                "use llmtool.runtime.seq2seq.OnnxSeq2Seq (the CLI picks it itself).",
            )
        # Whose layout this is: llmtool, or the foreign one recognised (llmtool.runtime.foreign).
        self.recognised: str = self.manifest.get("recognised", "llmtool")
        verify_files(self.directory, self.manifest, hashes=verify)
        self.layout = self.contract.layout
        self.padding = self.contract.padding
        self.options = options or SessionOptions()
        # CUDA graphs need the fused layout's fixed-shape decode step.
        self.cuda_graph = self.layout == "fused" and self.options.cuda_graph
        cuda_options = {"enable_cuda_graph": "1"} if self.cuda_graph else None
        self.session, self.provider, self.huge_pages = create_session(
            self.directory / self.contract.model_file, provider, self.options, cuda_options
        )
        self.cuda_graph = self.cuda_graph and self.provider == "cuda"
        self.run_options = self.graph_run_options(-1)
        self.cache_entries: tuple[CacheSpec, ...] = self.contract.cache
        self.input_names = {i.name for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.max_positions = self.contract.max_positions
        self.vocab_size = self.contract.vocab_size
        self._tokenizer: Any = None
        self._decoders: dict[tuple[int, int], FusedDecoder] = {}
        self._next_graph_id = 1
        self._window_out: np.ndarray | None = None  # window_logits(reuse=True)'s buffer

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

    def decoder(self, batch: int, max_length: int) -> Decoder:
        """A :class:`~llmtool.runtime.decoders.Decoder` for ``batch`` rows of up to ``max_length`` tokens.

        Fused exports get preallocated buffers (and a captured CUDA graph), reused across calls
        with the same shape; standard exports get a left-padding decoder over :meth:`forward`.
        """
        if self.layout != "fused":
            return StandardDecoder(self, batch)
        key = (batch, max_length)
        if key not in self._decoders:
            self._decoders[key] = FusedDecoder(self, batch, max_length)
        return self._decoders[key]

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
        return empty_cache(self.cache_entries, batch)

    def window_logits(self, input_ids: np.ndarray, *, reuse: bool = False) -> np.ndarray:
        """Logits [1, L, V] of one unpadded row [1, L] with no past (perplexity windows).

        Args:
            input_ids: [1, L] int64.
            reuse: On the CPU with float32 logits, have ONNX Runtime write them into a buffer
                this model keeps (IO binding) and return that buffer, which the next call
                overwrites: no 200 MB allocation and copy per 1024-token SmolLM2 window.
        """
        length = input_ids.shape[1]
        feeds = {
            "input_ids": input_ids,
            "attention_mask": np.ones((1, length), dtype=np.int64),
            "position_ids": np.arange(length, dtype=np.int64)[None, :],
        }
        feeds = {k: v for k, v in feeds.items() if k in self.input_names}
        feeds.update(self.empty_cache(1))
        output = next(o for o in self.session.get_outputs() if o.name == "logits")
        if not (reuse and self.provider == "cpu" and output.type == "tensor(float)"):
            # Only the logits: the cache a window leaves is never read, so it is not copied out.
            return self.session.run(["logits"], feeds, self.run_options)[0]
        shape = (1, length, self.vocab_size)
        if self._window_out is None or self._window_out.shape != shape:
            self._window_out = np.empty(shape, np.float32)
        io = self.session.io_binding()
        for name, value in feeds.items():
            io.bind_cpu_input(name, value)
        io.bind_output("logits", "cpu", 0, np.float32, list(shape), self._window_out.ctypes.data)
        self.session.run_with_iobinding(io, self.run_options)
        return self._window_out

    def forward(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        cache: dict[str, np.ndarray],
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Run one step.

        The cache grows by ``sequence`` each call. Rows are padded on :attr:`padding`'s side:
        left for standard exports, right for fused ones (see :mod:`llmtool.export.fused`).

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
        names = ["logits", *[spec.present for spec in self.cache_entries]]
        outputs = dict(zip(names, self.session.run(names, feeds, self.run_options), strict=True))
        new_cache = {spec.name: outputs[spec.present] for spec in self.cache_entries}
        return outputs["logits"], new_cache
