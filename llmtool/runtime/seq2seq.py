"""An encoder-decoder export loaded for generation and evaluation: two sessions, two caches.

:class:`OnnxSeq2Seq` holds the encoder and decoder sessions of an export written by
:mod:`llmtool.export.seq2seq` (``"kind": "seq2seq"`` in llmtool.json). :class:`Seq2SeqDecoder`
is the :class:`~llmtool.runtime.decoders.Decoder` generation drives: its ``prefill`` takes the
*sources*, runs the encoder once, and feeds every row the decoder start token; each ``step``
feeds one token per row. The self-attention cache grows by one token a step; the cross-attention
keys/values come out of the first step and are fed back unchanged (the decoder graph then gets
an empty encoder output, see :mod:`llmtool.export.seq2seq`). :meth:`Seq2SeqDecoder.reorder`
gathers the cache rows a beam search keeps.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llmtool import defaults
from llmtool.errors import UsageError
from llmtool.manifest import CacheSpec, Manifest, verify_files
from llmtool.runtime.decoders import Decoder, Step, pad_rows
from llmtool.runtime.files import ExportFiles
from llmtool.runtime.session import SessionOptions, create_session

SEQ2SEQ_KIND = "seq2seq"


def is_seq2seq_export(directory: str | Path) -> bool:
    """Whether ``directory`` holds an encoder-decoder export (False for anything else)."""
    path = Path(directory) / "llmtool.json"
    try:
        return bool(json.loads(path.read_text(encoding="utf-8")).get("kind") == SEQ2SEQ_KIND)
    except (OSError, ValueError, AttributeError):
        return False


class OnnxSeq2Seq(ExportFiles):
    """An llmtool encoder-decoder export in two ONNX Runtime sessions.

    Args:
        directory: The export directory (holds llmtool.json with ``"kind": "seq2seq"``).
        provider: ``auto``, ``cuda`` or ``cpu``.
        verify: Check the ONNX files against the sha256 recorded at export.
        options: Session settings (both sessions).

    Attributes:
        cache_entries: The decoder's cache tensors (self-attention, then cross, per layer).
        self_entries: The self-attention ones (grow by one token a step).
        cross_entries: The cross-attention ones (computed at the first step, then constant).
        max_source: The encoder's limit in tokens (None: unbounded relative positions).
        decoder_start_token_id: What every target starts with.
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
        self.contract = Manifest.read(self.directory)
        self.manifest = self.contract.raw
        if self.manifest.get("kind") != SEQ2SEQ_KIND:
            raise UsageError(
                f"{self.directory} is not an encoder-decoder export",
                "load it with llmtool.runtime.OnnxCausalLM (the CLI picks it itself).",
            )
        verify_files(self.directory, self.manifest, hashes=verify)
        self.options = options or SessionOptions()
        graphs = self.manifest["graphs"]
        self.encoder, self.provider, self.huge_pages = create_session(
            self.directory / graphs["encoder"]["file"], provider, self.options
        )
        self.session, _, _ = create_session(
            self.directory / graphs["decoder"]["file"], provider, self.options
        )
        self.cache_entries: tuple[CacheSpec, ...] = self.contract.cache
        kinds = {e["input"]: e.get("kind") for e in self.manifest["cache"]}
        self.self_entries = [c for c in self.cache_entries if kinds[c.past] == "self"]
        self.cross_entries = [c for c in self.cache_entries if kinds[c.past] == "cross"]
        self.vocab_size = self.contract.vocab_size
        self.max_source: int | None = self.manifest.get("max_source_positions")
        self.hidden_size = int(self.manifest["hidden_size"])
        self.decoder_start_token_id = int(self.manifest["decoder_start_token_id"])
        self._tokenizer: Any = None

    def eos_token_ids(self) -> list[int]:
        """EOS ids as transformers' generate would use them (generation config, then tokenizer)."""
        eos = self.generation_config.get("eos_token_id")
        if eos is None:
            eos = self.tokenizer.eos_token_id
        if eos is None:
            return []
        return [int(e) for e in (eos if isinstance(eos, list) else [eos])]

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad) if pad is not None else 0

    def check_sources(self, rows: Sequence[Sequence[int]]) -> None:
        """Refuse empty sources and sources longer than the encoder's limit.

        Raises:
            UsageError: An empty row, or one past ``max_source`` tokens.
        """
        for i, row in enumerate(rows):
            if not row:
                raise UsageError(f"Source {i + 1} is empty", "give every source some text.")
            if self.max_source is not None and len(row) > self.max_source:
                raise UsageError(
                    f"Source {i + 1} has {len(row)} tokens, more than the encoder's limit of "
                    f"{self.max_source}",
                    "shorten or split the source text.",
                )

    def encode(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Encoder hidden states [batch, source, hidden] of right-padded sources."""
        feeds = {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64)}
        return np.asarray(self.encoder.run(["last_hidden_state"], feeds)[0])

    def empty_cache(self, batch: int) -> dict[str, np.ndarray]:
        """Self- and cross-attention caches holding nothing (the first step's feeds)."""
        return {s.name: np.zeros(s.shape(batch, 0), dtype=s.np_dtype) for s in self.cache_entries}

    def decode(
        self,
        input_ids: np.ndarray,
        encoder_mask: np.ndarray,
        encoder_hidden: np.ndarray,
        cache: dict[str, np.ndarray],
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One decoder call: logits [batch, target, vocab] and the updated cache.

        Args:
            input_ids: [batch, target] the new decoder tokens.
            encoder_mask: [batch, source] 1 on real source tokens.
            encoder_hidden: [batch, source, hidden] at the first call, [batch, 0, hidden] after.
            cache: :meth:`empty_cache` at the first call, then what the previous call returned.
        """
        feeds = {
            "input_ids": input_ids.astype(np.int64),
            "encoder_attention_mask": encoder_mask.astype(np.int64),
            "encoder_hidden_states": encoder_hidden,
            **cache,
        }
        names = ["logits", *[c.present for c in self.cache_entries]]
        outputs = dict(zip(names, self.session.run(names, feeds), strict=True))
        new_cache = {c.name: outputs[c.present] for c in self.self_entries}
        for c in self.cross_entries:
            # Computed at the first call; a later call's present equals its past: keep the past.
            past = cache[c.name]
            new_cache[c.name] = outputs[c.present] if past.shape[2] == 0 else past
        return outputs["logits"], new_cache

    def decoder(self) -> Seq2SeqDecoder:
        """A fresh :class:`Seq2SeqDecoder` over this export."""
        return Seq2SeqDecoder(self)

    def teacher_forced(
        self, sources: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]
    ) -> list[np.ndarray]:
        """Logits of each target token given its source, one decoder call per batch.

        The decoder input is ``[start] + target[:-1]``, right-padded (the padded tail is
        causal-masked away from the real positions, so it changes nothing before it).

        Returns:
            Per row, [len(target), vocab] float32 logits predicting each target token.
        """
        ids, mask = pad_rows(sources, "right", self.pad_token_id)
        hidden = self.encode(ids, mask)
        inputs = [[self.decoder_start_token_id, *t[:-1]] for t in targets]
        dec_ids, _ = pad_rows(inputs, "right", self.pad_token_id)
        logits, _ = self.decode(dec_ids, mask, hidden, self.empty_cache(len(sources)))
        return [logits[i, : len(t)] for i, t in enumerate(targets)]


class Seq2SeqDecoder(Decoder):
    """Generation over an encoder-decoder: ``prefill(sources)`` encodes, then one token a step."""

    def __init__(self, model: OnnxSeq2Seq) -> None:
        self.model = model
        self.mask = np.zeros((0, 0), dtype=np.int64)
        self.cache: dict[str, np.ndarray] = {}
        self.encoder_seconds = 0.0

    def prefill(self, rows: Sequence[Sequence[int]]) -> Step:
        """Encode the sources (right-padded) and run the decoder start token of every row."""
        import time

        model = self.model
        model.check_sources(rows)
        ids, self.mask = pad_rows(rows, "right", model.pad_token_id)
        start = time.perf_counter()
        hidden = model.encode(ids, self.mask)
        self.encoder_seconds = time.perf_counter() - start
        first = np.full((len(rows), 1), model.decoder_start_token_id, dtype=np.int64)
        logits, self.cache = model.decode(first, self.mask, hidden, model.empty_cache(len(rows)))
        return Step(logits[:, -1])

    def step(self, tokens: np.ndarray) -> Step:
        """Feed one token per row [batch]; logits [batch, vocab] of the next position."""
        empty = np.zeros((len(tokens), 0, self.model.hidden_size), dtype=np.float32)
        logits, self.cache = self.model.decode(
            np.asarray(tokens, dtype=np.int64)[:, None], self.mask, empty, self.cache
        )
        return Step(logits[:, -1])

    def reorder(self, index: np.ndarray) -> None:
        """Keep cache rows ``index`` (beam search: rows may repeat or vanish)."""
        self.mask = self.mask[index]
        self.cache = {name: value[index] for name, value in self.cache.items()}

    def expand(self, times: int) -> None:
        """Repeat every row ``times`` times in place (row r becomes rows r*times ... +times-1)."""
        self.reorder(np.repeat(np.arange(len(self.mask)), times))
