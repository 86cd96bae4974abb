"""The config of llmtool's recurrent LMs, readable without importing torch.

:mod:`llmtool.models.loading` and the runtime use it to recognize a recurrent model directory; the
model itself is :class:`llmtool.models.recurrent.RecurrentLM`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from llmtool.errors import UsageError
from llmtool.fsutil import atomic_write_text

LSTM_TYPE = "llmtool_lstm"
RNN_TYPE = "llmtool_rnn"
# config.json model_type -> recurrent cell.
MODEL_TYPES = {LSTM_TYPE: "lstm", RNN_TYPE: "rnn"}
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class RecurrentConfig:
    """Sizes of a :class:`RecurrentLM`, saved as its config.json.

    Attributes:
        model_type: ``llmtool_lstm`` or ``llmtool_rnn``.
        vocab_size: Rows of the embedding and of the output head.
        hidden_size: Embedding width and state width of every layer.
        num_layers: Stacked recurrent layers.
        dropout: On the embedding, between layers and before the head (training only).
        tie_word_embeddings: The head's weight is the embedding matrix.
        bos_token_id: Beginning-of-text id (for the generation config).
        eos_token_id: End-of-text id.
        pad_token_id: Padding id.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    dropout: float = 0.0
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise UsageError(
                f"Unknown recurrent model_type {self.model_type!r}",
                f"use one of {', '.join(MODEL_TYPES)}.",
            )

    @property
    def cell(self) -> str:
        """``lstm`` or ``rnn``."""
        return MODEL_TYPES[self.model_type]

    @property
    def state_names(self) -> tuple[str, ...]:
        """The per-layer state tensors: ``("h", "c")`` for an LSTM, ``("h",)`` for an RNN."""
        return ("h", "c") if self.cell == "lstm" else ("h",)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "architectures": ["RecurrentLM"]}

    def save_pretrained(self, directory: str | Path) -> None:
        """Write config.json into ``directory`` (created if missing)."""
        path = Path(directory) / CONFIG_NAME
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RecurrentConfig:
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as e:
            raise UsageError(f"Invalid recurrent model config ({e})") from e

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> RecurrentConfig:
        """Read config.json from ``directory``."""
        path = Path(directory) / CONFIG_NAME
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UsageError(f"Cannot read {path} ({e})") from e
        return cls.from_dict(data)


def read_model_type(directory: str | Path) -> str | None:
    """``model_type`` from ``directory``/config.json, or None when it cannot be read."""
    try:
        data = json.loads((Path(directory) / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    model_type = data.get("model_type") if isinstance(data, dict) else None
    return model_type if isinstance(model_type, str) else None
