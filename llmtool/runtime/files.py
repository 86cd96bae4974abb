"""The files beside an export's graphs that every runtime class reads the same way."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmtool.errors import UsageError


class ExportFiles:
    """The tokenizer and generation config saved in an export directory.

    A base of :class:`~llmtool.runtime.model.OnnxCausalLM` and
    :class:`~llmtool.runtime.seq2seq.OnnxSeq2Seq`, which set ``directory``.
    """

    directory: Path
    _tokenizer: Any = None

    def _open_directory(self, directory: str | Path) -> None:
        """Set ``directory``, refusing one that does not exist (exit 2, with what to do)."""
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise UsageError(
                f"Export directory {self.directory} does not exist",
                "create it with `llmtool export MODEL --out DIR`.",
            )

    @property
    def tokenizer(self) -> Any:
        """The tokenizer saved beside the graphs (loaded on first use)."""
        if self._tokenizer is None:
            from llmtool.models.loading import ModelSpec, load_tokenizer

            self._tokenizer = load_tokenizer(
                ModelSpec("hf_dir", self.directory, None, str(self.directory))
            )
        return self._tokenizer

    @property
    def generation_config(self) -> dict[str, Any]:
        """``generation_config.json`` as a dict (empty when the export has none)."""
        path = self.directory / "generation_config.json"
        if path.is_file():
            return dict(json.loads(path.read_text(encoding="utf-8")))
        return {}
