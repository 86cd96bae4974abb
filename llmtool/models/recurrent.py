"""The recurrent baselines: embedding → stacked LSTM or Elman RNN → linear head.

The model is PyTorch's classic word-language-model (``examples/word_language_model``) with the
calling convention of a transformers causal LM, so export validation and the training loop treat
it like one: ``model(input_ids, attention_mask=..., position_ids=..., use_cache=...)`` returns an
object with ``.logits`` [batch, sequence, vocab]. Where ``attention_mask`` is 0 the state is
left unchanged, so a left-padded row gives the same logits as the row alone.

A trained model is a directory with ``config.json`` (``model_type`` ``llmtool_lstm`` or
``llmtool_rnn``) and ``model.safetensors``; :func:`llmtool.models.loading.load_model` reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmtool.errors import UsageError
from llmtool.models.recurrent_config import (
    LSTM_TYPE,
    MODEL_TYPES,
    RNN_TYPE,
    WEIGHTS_NAME,
    RecurrentConfig,
    read_model_type,
)

__all__ = [
    "LSTM_TYPE",
    "MODEL_TYPES",
    "RNN_TYPE",
    "RecurrentConfig",
    "RecurrentLM",
    "RecurrentLMOutput",
    "read_model_type",
]

# The recurrent state of every layer: (h,) for an RNN, (h, c) for an LSTM, each [layers, B, H].
State = tuple[torch.Tensor, ...]


@dataclass
class RecurrentLMOutput:
    """What :meth:`RecurrentLM.forward` returns.

    Attributes:
        logits: [batch, sequence, vocab].
        state: The state after the last position, one [layers, batch, hidden] tensor per name.
    """

    logits: torch.Tensor
    state: State


class RecurrentLM(nn.Module):
    """Embedding → stacked LSTM or Elman RNN (tanh) → linear head, optionally tied.

    Args:
        config: The sizes.
    """

    def __init__(self, config: RecurrentConfig) -> None:
        super().__init__()
        self.config = config
        size, layers = config.hidden_size, config.num_layers
        self.embed_tokens = nn.Embedding(config.vocab_size, size)
        self.dropout = nn.Dropout(config.dropout)
        between = config.dropout if layers > 1 else 0.0
        self.rnn: nn.LSTM | nn.RNN
        if config.cell == "lstm":
            self.rnn = nn.LSTM(size, size, layers, batch_first=True, dropout=between)
        else:
            self.rnn = nn.RNN(
                size, size, layers, nonlinearity="tanh", batch_first=True, dropout=between
            )
        self.lm_head = nn.Linear(size, config.vocab_size)
        self.reset_parameters()
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def reset_parameters(self) -> None:
        """The word-language-model initialization: U(-0.1, 0.1) embedding, zero head bias."""
        nn.init.uniform_(self.embed_tokens.weight, -0.1, 0.1)
        nn.init.uniform_(self.lm_head.weight, -0.1, 0.1)
        nn.init.zeros_(self.lm_head.bias)
        # nn.LSTM / nn.RNN keep their own U(-1/sqrt(H), 1/sqrt(H)) initialization.

    def zero_state(self, batch: int, device: Any = None, dtype: Any = None) -> State:
        """The initial state: zeros, [layers, batch, hidden] per state name."""
        c = self.config
        like = self.embed_tokens.weight
        return tuple(
            torch.zeros(
                c.num_layers,
                batch,
                c.hidden_size,
                device=device or like.device,
                dtype=dtype or like.dtype,
            )
            for _ in c.state_names
        )

    def _run(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        # x [B, S, H] -> y [B, S, H], state; nn.LSTM takes (h, c), nn.RNN takes h.
        if self.config.cell == "lstm":
            y, (h, c) = self.rnn(x, (state[0], state[1]))
            return y, (h, c)
        y, h = self.rnn(x, state[0])
        return y, (h,)

    def _run_masked(
        self, x: torch.Tensor, mask: torch.Tensor, state: State
    ) -> tuple[torch.Tensor, State]:
        # One step at a time; where mask[:, t] is False the state keeps its value.
        outputs = []
        for t in range(x.shape[1]):
            _, new = self._run(x[:, t : t + 1], state)
            keep = mask[:, t].view(1, -1, 1)  # [1, B, 1] over [layers, B, H]
            state = tuple(torch.where(keep, n, o) for n, o in zip(new, state, strict=True))
            outputs.append(state[0][-1])  # top layer's h: [B, H]
        return torch.stack(outputs, dim=1), state

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        use_cache: bool = False,
        state: State | None = None,
        **_: Any,
    ) -> RecurrentLMOutput:
        """Logits for every position.

        Args:
            input_ids: [batch, sequence] int64.
            attention_mask: [batch, past + sequence]; its last ``sequence`` columns apply to these
                tokens, and where they are 0 the state is not updated (left padding).
            position_ids: Ignored (a recurrent model counts positions itself).
            use_cache: Ignored: the state after the last position is always returned.
            state: The state to start from; zeros when None.

        Returns:
            logits [batch, sequence, vocab] and the final state.
        """
        batch, length = input_ids.shape
        x = self.dropout(self.embed_tokens(input_ids))  # [B, S, H]
        if state is None:
            state = self.zero_state(batch, dtype=torch.float32)
        mask = None
        if attention_mask is not None:
            mask = attention_mask[:, -length:].to(device=x.device, dtype=torch.bool)
            if bool(mask.all()):
                mask = None
        # The recurrence runs in float32 under autocast too: the state accumulates rounding
        # error step after step, and oneDNN / cuDNN lack some reduced-precision RNN kernels.
        with torch.autocast(x.device.type, enabled=False):
            x, state = x.float(), tuple(s.float() for s in state)
            y, state = self._run(x, state) if mask is None else self._run_masked(x, mask, state)
        logits = self.lm_head(self.dropout(y))  # [B, S, V]
        return RecurrentLMOutput(logits=logits, state=state)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write config.json and model.safetensors into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(directory)
        save_weights(self, directory / WEIGHTS_NAME)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> RecurrentLM:
        """Load a model saved by :meth:`save_pretrained` (safetensors only), in eval mode.

        Raises:
            UsageError: The config or the weights are missing or do not match.
        """
        from safetensors.torch import load_model

        directory = Path(directory)
        config = RecurrentConfig.from_pretrained(directory)
        weights = directory / WEIGHTS_NAME
        if not weights.is_file():
            raise UsageError(
                f"{directory} has a recurrent config.json but no {WEIGHTS_NAME}",
                "point at a directory written by `llmtool train`.",
            )
        model = cls(config)
        try:
            load_model(model, str(weights), strict=True)
        except (RuntimeError, OSError, ValueError) as e:
            raise UsageError(
                f"Cannot load {weights} ({str(e).splitlines()[0][:200]})",
                "the weights do not match config.json; retrain or restore the directory.",
            ) from e
        return model.eval()


def save_weights(model: Any, path: str | Path) -> None:
    """Save a module's weights as safetensors (tied parameters once), from a CPU copy.

    On the GPU cuDNN packs an LSTM's weights into one flat buffer, which
    ``safetensors.torch.save_model`` refuses as shared storage; on the CPU every weight has its
    own, so a CPU copy saves cleanly and the training model is left untouched.
    """
    import copy

    from safetensors.torch import save_model

    if any(p.device.type != "cpu" for p in model.parameters()):
        model = copy.deepcopy(model).to("cpu")
    save_model(model, str(path))
