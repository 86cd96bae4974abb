"""KV-cache management for generation: one prefill, then one token per row per step.

This module holds the cache side of the runtime: the empty cache, the padding of prompt rows
(:func:`pad_rows`), the cache length a generation asks for (:func:`cache_length`) and two
strategies behind one interface (:class:`Decoder`):

* :class:`StandardDecoder` drives a standard export through :meth:`OnnxCausalLM.forward`:
  left padding, numpy feeds, the cache returned by one step fed to the next (it grows).
* :class:`FusedDecoder` drives a fused export with IO binding: right padding, a cache
  preallocated to ``max_length`` and bound as both past and present (GroupQueryAttention updates
  it in place), inputs and outputs in fixed device buffers, and on CUDA the decode step captured
  once as a CUDA graph and replayed. Only the chosen token ids (greedy) or the last-position
  logits (sampling) cross to the host.

Decoders drive a :class:`DecoderModel`: in practice the
:class:`~llmtool.runtime.model.OnnxCausalLM` that builds them, which this module need not import.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from llmtool.errors import UsageError
from llmtool.manifest import CacheSpec


class DecoderModel(Protocol):
    """What a decoder needs of the model it drives (:class:`~llmtool.runtime.model.OnnxCausalLM`)."""

    session: Any
    provider: str
    padding: str
    cuda_graph: bool
    run_options: Any
    input_names: set[str]
    cache_entries: tuple[CacheSpec, ...]
    vocab_size: int
    max_positions: int | None

    def forward(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        cache: dict[str, np.ndarray],
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]: ...

    def graph_run_options(self, graph_id: int) -> Any: ...

    def new_graph_id(self) -> int: ...


def empty_cache(specs: Sequence[CacheSpec], batch: int) -> dict[str, np.ndarray]:
    """A cache for ``batch`` sequences that have seen nothing: zero past length or zero state."""
    return {s.name: np.zeros(s.shape(batch, 0), dtype=s.np_dtype) for s in specs}


def pad_rows(
    rows: Sequence[Sequence[int]], side: str, pad_id: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Pad token rows of different lengths into one batch.

    Args:
        rows: Token ids of each row.
        side: ``left`` (standard exports: every row ends at the last column) or ``right``
            (fused exports: every row starts at column 0).
        pad_id: Token id put in the padding.

    Returns:
        ids [batch, length] int64 and attention mask [batch, length] int64 (1 on real tokens),
        ``length`` being the longest row's.
    """
    length = max(len(r) for r in rows)
    ids = np.full((len(rows), length), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), length), dtype=np.int64)
    for i, row in enumerate(rows):
        span = slice(length - len(row), length) if side == "left" else slice(0, len(row))
        ids[i, span], mask[i, span] = row, 1
    return ids, mask


def mask_positions(mask: np.ndarray) -> np.ndarray:
    """Position ids [batch, length] that count real tokens only; padding gets 0 (masked anyway)."""
    return np.clip(np.cumsum(mask, axis=1) - 1, 0, None)


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
    """Interface: :meth:`prefill` once with the prompts, then :meth:`step` with one token per row.

    A chat continues one row's cache: :meth:`extend` feeds a turn's tokens after what the cache
    holds and :meth:`truncate` forgets its tail (False where the cache cannot, e.g. a state).
    """

    def prefill(self, rows: Sequence[Sequence[int]]) -> Step:
        raise NotImplementedError

    def step(self, tokens: np.ndarray) -> Step:
        raise NotImplementedError

    def extend(self, tokens: Sequence[int]) -> Step:
        """Feed ``tokens`` to the single row after the tokens already cached."""
        step = Step()
        for token in tokens:
            step = self.step(np.array([token], dtype=np.int64))
        return step

    def truncate(self, length: int) -> bool:
        """Keep only the first ``length`` cached tokens; False when this cache cannot."""
        return False


class StandardDecoder(Decoder):
    """Padded batches over a graph that returns its grown cache; fed back each step.

    Left padding for llmtool's standard graph (and Optimum's). A foreign GroupQueryAttention
    graph (onnxruntime-genai's) needs right padding: it reads each row's length from the mask's
    sum, so the step's mask column is appended after the padding and it still counts.
    """

    def __init__(self, model: DecoderModel, batch: int) -> None:
        self.model = model
        self.batch = batch
        self.pad_id = 0
        self.padding = getattr(model, "padding", "left")

    def prefill(self, rows: Sequence[Sequence[int]]) -> Step:
        ids, mask = pad_rows(rows, self.padding, self.pad_id)  # [B, L] each
        positions = mask_positions(mask)
        cache = empty_cache(self.model.cache_entries, len(rows))
        logits, self.cache = self.model.forward(ids, mask, positions, cache)
        self.mask = mask
        self.positions = mask.sum(axis=1) - 1  # [B] each row's last position
        if self.padding == "right":  # each row's last real token
            return Step(logits[np.arange(len(rows)), self.positions, :])
        return Step(logits[:, -1, :])

    def step(self, tokens: np.ndarray) -> Step:
        n = len(tokens)
        self.mask = np.concatenate([self.mask, np.ones((n, 1), dtype=np.int64)], axis=1)
        self.positions = self.positions + 1
        logits, self.cache = self.model.forward(
            tokens[:, None].astype(np.int64), self.mask, self.positions[:, None], self.cache
        )
        return Step(logits[:, -1, :])

    def extend(self, tokens: Sequence[int]) -> Step:
        # One forward over the whole turn [1, n], positions continuing the cache's.
        n = len(tokens)
        mask = np.concatenate([self.mask, np.ones((1, n), dtype=np.int64)], axis=1)
        positions = self.positions + np.arange(1, n + 1, dtype=np.int64)
        ids = np.asarray(tokens, dtype=np.int64)[None, :]
        logits, self.cache = self.model.forward(ids, mask, positions[None, :], self.cache)
        self.mask, self.positions = mask, positions[-1:]
        return Step(logits[:, -1, :])

    def truncate(self, length: int) -> bool:
        specs = self.model.cache_entries
        if self.batch != 1 or any(s.sequence_axis is None for s in specs):
            return False
        for spec in specs:
            index = [slice(None)] * self.cache[spec.name].ndim
            index[spec.sequence_axis] = slice(0, length)  # type: ignore[index]
            self.cache[spec.name] = self.cache[spec.name][tuple(index)]
        self.mask = self.mask[:, :length]
        self.positions = np.array([length - 1], dtype=np.int64)
        return True


class FusedDecoder(Decoder):
    """Right-padded batches over the fused graph with a preallocated, in-place KV cache."""

    padding = "right"

    def __init__(self, model: DecoderModel, batch: int, max_length: int) -> None:
        import onnxruntime as ort

        self.model = model
        self.batch = batch
        self.max_length = max_length
        self.pad_id = 0
        self.device = "cuda" if model.provider == "cuda" else "cpu"
        new = ort.OrtValue.ortvalue_from_shape_and_type
        # [B, KVH, max_length, D] per layer and kind, bound as past and present alike.
        self.cache = {
            s.name: new(s.shape(batch, max_length), s.np_dtype, self.device, 0)
            for s in model.cache_entries
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
        for spec in self.model.cache_entries:
            io.bind_ortvalue_input(spec.past, self.cache[spec.name])
            io.bind_ortvalue_output(spec.present, self.cache[spec.name])
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
        ids, mask = pad_rows(rows, self.padding, self.pad_id)  # [B, L] each
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

    def truncate(self, length: int) -> bool:
        # The preallocated cache keeps its size; positions past ``length`` are masked and
        # overwritten by the next tokens.
        self.lengths[:] = length
        self.mask[:, length:] = 0
        return True


CACHE_GRANULE = 64


def cache_length(model: DecoderModel, needed: int) -> int:
    """Cache length for ``needed`` tokens, rounded up so decoders (and CUDA graphs) are reused."""
    length = -(-needed // CACHE_GRANULE) * CACHE_GRANULE
    return min(length, model.max_positions) if model.max_positions else length
