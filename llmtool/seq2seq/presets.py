"""The model presets of ``llmtool train --arch t5|bart``: transformers' own classes, built fresh.

T5 uses the v1.1 layout (gated-GELU, untied head); BART its standard one. Dropout is off: the
tiny preset learns its synthetic tasks faster without it, and runs stay reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SEQ2SEQ_ARCHS = ("t5", "bart")


@dataclass(frozen=True)
class Seq2SeqPreset:
    """Model size and schedule of a seq2seq preset."""

    d_model: int = 64
    layers: int = 2
    heads: int = 4
    ffn: int = 256
    vocab_size: int = 512
    max_positions: int = 256
    steps: int = 1500
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 100
    eval_every: int = 100


PRESETS = {"tiny": Seq2SeqPreset()}


def build_seq2seq(arch: str, preset: Seq2SeqPreset, vocab_size: int, special: int) -> Any:
    """A freshly initialized transformers model of ``arch`` (special token = pad, EOS, start)."""
    from transformers import (
        BartConfig,
        BartForConditionalGeneration,
        T5Config,
        T5ForConditionalGeneration,
    )

    ids: dict[str, Any] = {
        "pad_token_id": special,
        "eos_token_id": special,
        "decoder_start_token_id": special,
    }
    if arch == "t5":
        config: Any = T5Config(  # type: ignore[call-arg]
            vocab_size=vocab_size,
            d_model=preset.d_model,
            d_kv=preset.d_model // preset.heads,
            d_ff=preset.ffn,
            num_layers=preset.layers,
            num_decoder_layers=preset.layers,
            num_heads=preset.heads,
            feed_forward_proj="gated-gelu",
            tie_word_embeddings=False,
            dropout_rate=0.0,
            **ids,
        )
        return T5ForConditionalGeneration(config)
    config = BartConfig(
        vocab_size=vocab_size,
        d_model=preset.d_model,
        encoder_layers=preset.layers,
        decoder_layers=preset.layers,
        encoder_attention_heads=preset.heads,
        decoder_attention_heads=preset.heads,
        encoder_ffn_dim=preset.ffn,
        decoder_ffn_dim=preset.ffn,
        max_position_embeddings=preset.max_positions,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        bos_token_id=special,
        forced_eos_token_id=None,
        **ids,
    )
    return BartForConditionalGeneration(config)
