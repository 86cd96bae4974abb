"""KV-cache management for generation: one prefill, then one token per row per step.

Two strategies behind one interface (:class:`Decoder`):

* :class:`StandardDecoder` drives a standard export through :meth:`OnnxCausalLM.forward`:
  left padding, numpy feeds, the cache returned by one step fed to the next (it grows).
* :class:`FusedDecoder` drives a fused export with IO binding: right padding, a cache
  preallocated to ``max_length`` and bound as both past and present (GroupQueryAttention updates
  it in place), inputs and outputs in fixed device buffers, and on CUDA the decode step captured
  once as a CUDA graph and replayed. Only the chosen token ids (greedy) or the last-position
  logits (sampling) cross to the host.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from llmtool.errors import UsageError

if TYPE_CHECKING:
    from llmtool.runtime.model import OnnxCausalLM

CACHE_GRANULE = 64


def cache_length(model: OnnxCausalLM, needed: int) -> int:
    """Cache length for ``needed`` tokens, rounded up so decoders (and CUDA graphs) are reused."""
    length = -(-needed // CACHE_GRANULE) * CACHE_GRANULE
    return min(length, model.max_positions) if model.max_positions else length


class Step:
    """The result of one forward step: logits at each row's last position, fetched on demand."""

    def __init__(self, logits: Any = None, next_token: Any = None) -> None:
        self._logits = logits  # np.ndarray [B, V] or an OrtValue
        self._next = next_token  # OrtValue [B] int64 (fused graphs) or None

    def logits(self) -> np.ndarray:
        """[B, V] float32 logits of the last position of each row."""
        value = self._logits
        return value if isinstance(value, np.ndarray) else value.numpy()

    def argmax(self) -> np.ndarray:
        """[B] int64 greedy tokens (computed on the device for fused graphs)."""
        if self._next is not None:
            return self._next.numpy().astype(np.int64, copy=False)
        return np.argmax(self.logits(), axis=-1).astype(np.int64)


class Decoder:
    """Interface: :meth:`prefill` once with the prompts, then :meth:`step` with one token per row."""

    def prefill(self, rows: Sequence[Sequence[int]]) -> Step:
        raise NotImplementedError

    def step(self, tokens: np.ndarray) -> Step:
        raise NotImplementedError


class StandardDecoder(Decoder):
    """Left-padded batches over the standard graph; the cache grows by concatenation."""

    def __init__(self, model: OnnxCausalLM, batch: int) -> None:
        self.model = model
        self.batch = batch
        self.pad_id = 0

    def prefill(self, rows: Sequence[Sequence[int]]) -> Step:
        length = max(len(r) for r in rows)
        n = len(rows)
        ids = np.full((n, length), self.pad_id, dtype=np.int64)
        mask = np.zeros((n, length), dtype=np.int64)
        for i, row in enumerate(rows):
            ids[i, length - len(row) :] = row
            mask[i, length - len(row) :] = 1
        # Positions count real tokens only; padding gets position 0 (masked anyway).
        positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
        logits, self.cache = self.model.forward(ids, mask, positions, self.model.empty_cache(n))
        self.mask = mask
        self.positions = positions[:, -1]
        return Step(logits[:, -1, :])

    def step(self, tokens: np.ndarray) -> Step:
        n = len(tokens)
        self.mask = np.concatenate([self.mask, np.ones((n, 1), dtype=np.int64)], axis=1)
        self.positions = self.positions + 1
        logits, self.cache = self.model.forward(
            tokens[:, None].astype(np.int64), self.mask, self.positions[:, None], self.cache
        )
        return Step(logits[:, -1, :])


class FusedDecoder(Decoder):
    """Right-padded batches over the fused graph with a preallocated, in-place KV cache."""

    def __init__(self, model: OnnxCausalLM, batch: int, max_length: int) -> None:
        import onnxruntime as ort

        self.model = model
        self.batch = batch
        self.max_length = max_length
        self.pad_id = 0
        self.device = "cuda" if model.provider == "cuda" else "cpu"
        new = ort.OrtValue.ortvalue_from_shape_and_type
        dims = {"batch": batch, "past_sequence": max_length}
        # [B, KVH, max_length, D] per layer and kind, bound as past and present alike.
        self.cache = {
            entry["input"]: new(
                [dims.get(d, d) for d in entry["shape"]], _np_dtype(entry["dtype"]), self.device, 0
            )
            for entry in model.cache_entries
        }
        self.uses_positions = "position_ids" in model.input_names
        # Fixed decode-step buffers: a CUDA graph replays with the same addresses every step.
        self.ids = new([batch, 1], np.int64, self.device, 0)
        self.mask_value = new([batch, max_length], np.int64, self.device, 0)
        self.positions = new([batch, 1], np.int64, self.device, 0)
        self.next_token = new([batch], np.int64, self.device, 0)
        self.last_logits = new([batch, model.vocab_size], np.float32, self.device, 0)
        self.graph_id = model.new_graph_id() if model.cuda_graph else -1
        self.step_options = model.graph_run_options(self.graph_id)
        self.step_binding = self._bind(self.ids, self.mask_value, self.positions)
        self.mask = np.zeros((batch, max_length), dtype=np.int64)
        self.lengths = np.zeros(batch, dtype=np.int64)

    def _bind(self, ids: Any, mask: Any, positions: Any) -> Any:
        io = self.model.session.io_binding()
        io.bind_ortvalue_input("input_ids", ids)
        io.bind_ortvalue_input("attention_mask", mask)
        if self.uses_positions:
            io.bind_ortvalue_input("position_ids", positions)
        for entry in self.model.cache_entries:
            io.bind_ortvalue_input(entry["input"], self.cache[entry["input"]])
            io.bind_ortvalue_output(entry["output"], self.cache[entry["input"]])
        io.bind_ortvalue_output("next_token", self.next_token)
        io.bind_ortvalue_output("last_logits", self.last_logits)
        return io

    def prefill(self, rows: Sequence[Sequence[int]]) -> Step:
        import onnxruntime as ort

        if len(rows) != self.batch:
            raise ValueError(f"decoder built for batch {self.batch}, got {len(rows)} rows")
        length = max(len(r) for r in rows)
        if length >= self.max_length:
            raise UsageError(
                f"Prompt of {length} tokens leaves no room in a cache of {self.max_length}"
            )
        ids = np.full((self.batch, length), self.pad_id, dtype=np.int64)
        mask = np.zeros((self.batch, length), dtype=np.int64)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        positions = np.tile(np.arange(length, dtype=np.int64), (self.batch, 1))
        value = ort.OrtValue.ortvalue_from_numpy
        # Prefill shapes vary with the prompt: a regular run (no CUDA graph).
        io = self._bind(
            value(ids, self.device, 0),
            value(mask, self.device, 0),
            value(positions, self.device, 0),
        )
        self.model.session.run_with_iobinding(io, self.model.run_options)
        self.lengths = mask.sum(axis=1)
        self.mask[:] = 0
        self.mask[:, :length] = mask
        return Step(self.last_logits, self.next_token)

    def step(self, tokens: np.ndarray) -> Step:
        if self.lengths.max() >= self.max_length:
            raise UsageError(f"Generation reached the cache length of {self.max_length} tokens")
        rows = np.arange(self.batch)
        self.mask[rows, self.lengths] = 1
        self.ids.update_inplace(np.ascontiguousarray(tokens.reshape(self.batch, 1), dtype=np.int64))
        self.mask_value.update_inplace(self.mask)
        if self.uses_positions:
            self.positions.update_inplace(self.lengths.reshape(self.batch, 1).copy())
        self.model.session.run_with_iobinding(self.step_binding, self.step_options)
        self.lengths = self.lengths + 1
        return Step(self.last_logits, self.next_token)


def _np_dtype(name: str) -> Any:
    return {"float32": np.float32, "float16": np.float16}[name]
