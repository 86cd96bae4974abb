"""Named model sizes and training schedules for ``llmtool train``, and the models they build.

``tiny`` trains on a laptop CPU in minutes; ``small`` (about 13M parameters as a Llama) and
``base`` (about 100M, GPT-2 small's shape, for corpora of 100M tokens and more) are sized for
one GPU. The Transformer archs are transformers' own ``LlamaForCausalLM`` / ``GPT2LMHeadModel``,
so the output directory is a plain Hugging Face model; ``lstm`` and ``rnn`` are
:class:`llmtool.models.recurrent.RecurrentLM`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llmtool.errors import UsageError

ARCHS = ("llama", "gpt2", "lstm", "rnn")
TRANSFORMER_ARCHS = ("llama", "gpt2")
RECURRENT_ARCHS = ("lstm", "rnn")


@dataclass(frozen=True)
class Preset:
    """One size class.

    Attributes:
        name: ``tiny``, ``small`` or ``base``.
        hidden_size: Transformer width.
        num_layers: Transformer layers.
        num_heads: Attention heads.
        num_kv_heads: Key/value heads (Llama; GPT-2 has one per head).
        intermediate_size: MLP width (Llama's SwiGLU; GPT-2 uses 4 x hidden_size).
        rnn_hidden_size: Embedding and state width of the recurrent archs.
        rnn_layers: Stacked recurrent layers.
        vocab_size: BPE vocabulary trained when no tokenizer is given.
        seq_len: Tokens per training row; also the Transformers' context length.
        batch_size: Rows per micro-batch.
        grad_accum: Micro-batches per optimizer step.
        steps: Optimizer steps.
        lr: Peak AdamW learning rate of the Transformer archs.
        rnn_lr: Peak AdamW learning rate of the recurrent archs.
        warmup_steps: Linear warmup before the cosine decay.
        eval_every: Steps between validations.
        checkpoint_every: Steps between checkpoints.
        dropout: Dropout probability (0 for tiny: short runs do not overfit).
    """

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    rnn_hidden_size: int
    rnn_layers: int
    vocab_size: int
    seq_len: int
    batch_size: int
    grad_accum: int
    steps: int
    lr: float
    rnn_lr: float
    warmup_steps: int
    eval_every: int
    checkpoint_every: int
    dropout: float

    def learning_rate(self, arch: str) -> float:
        return self.rnn_lr if arch in RECURRENT_ARCHS else self.lr


PRESETS: dict[str, Preset] = {
    # CPU: 1-2M parameters, a few minutes on two cores.
    "tiny": Preset(
        name="tiny",
        hidden_size=128,
        num_layers=4,
        num_heads=4,
        num_kv_heads=4,
        intermediate_size=384,
        rnn_hidden_size=256,
        rnn_layers=2,
        vocab_size=4096,
        seq_len=128,
        batch_size=16,
        grad_accum=1,
        steps=600,
        lr=3e-3,
        rnn_lr=3e-3,
        warmup_steps=30,
        eval_every=50,
        checkpoint_every=200,
        dropout=0.0,
    ),
    # One GPU, minutes: nanoGPT's Shakespeare shape (6 x 384, ~13M parameters as a Llama with its
    # 8K embedding), 256-token context, dropout against overfitting a corpus of ~1M tokens.
    "small": Preset(
        name="small",
        hidden_size=384,
        num_layers=6,
        num_heads=6,
        num_kv_heads=6,
        intermediate_size=1024,
        rnn_hidden_size=768,
        rnn_layers=2,
        vocab_size=8192,
        seq_len=256,
        batch_size=64,
        grad_accum=1,
        steps=3000,
        lr=1e-3,
        rnn_lr=2e-3,
        warmup_steps=100,
        eval_every=250,
        checkpoint_every=1000,
        dropout=0.2,
    ),
    # One GPU, hours: GPT-2 small's shape (~100M parameters), 16K BPE, 1024-token context.
    "base": Preset(
        name="base",
        hidden_size=768,
        num_layers=12,
        num_heads=12,
        num_kv_heads=12,
        intermediate_size=2048,
        rnn_hidden_size=1536,
        rnn_layers=3,
        vocab_size=16384,
        seq_len=1024,
        batch_size=16,
        grad_accum=4,
        steps=10000,
        lr=6e-4,
        rnn_lr=1e-3,
        warmup_steps=1000,
        eval_every=500,
        checkpoint_every=2000,
        dropout=0.1,
    ),
}


def get_preset(name: str) -> Preset:
    """The preset called ``name``.

    Raises:
        UsageError: No such preset.
    """
    if name not in PRESETS:
        raise UsageError(f"Unknown preset {name!r}", f"use one of {', '.join(PRESETS)}.")
    return PRESETS[name]


def check_arch(arch: str) -> None:
    """Raise a :class:`UsageError` unless ``arch`` is one ``llmtool train`` builds."""
    if arch not in ARCHS:
        raise UsageError(f"Unknown architecture {arch!r}", f"use one of {', '.join(ARCHS)}.")


def build_model(
    arch: str,
    preset: Preset,
    vocab_size: int,
    seq_len: int,
    special_ids: dict[str, int | None],
) -> Any:
    """A freshly initialized model (call ``torch.manual_seed`` first for reproducibility).

    Args:
        arch: ``llama``, ``gpt2``, ``lstm`` or ``rnn``.
        preset: The sizes.
        vocab_size: Rows of the embedding (the tokenizer's length).
        seq_len: Context length of the Transformers (their position limit).
        special_ids: ``bos_token_id``, ``eos_token_id`` and ``pad_token_id``.
    """
    check_arch(arch)
    p = preset
    common: dict[str, Any] = {"vocab_size": vocab_size, "tie_word_embeddings": True, **special_ids}
    if arch in RECURRENT_ARCHS:
        from llmtool.models.recurrent import LSTM_TYPE, RNN_TYPE, RecurrentConfig, RecurrentLM

        return RecurrentLM(
            RecurrentConfig(
                model_type=LSTM_TYPE if arch == "lstm" else RNN_TYPE,
                hidden_size=p.rnn_hidden_size,
                num_layers=p.rnn_layers,
                dropout=p.dropout,
                **common,
            )
        )
    if arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        llama = LlamaConfig(
            hidden_size=p.hidden_size,
            intermediate_size=p.intermediate_size,
            num_hidden_layers=p.num_layers,
            num_attention_heads=p.num_heads,
            num_key_value_heads=p.num_kv_heads,
            max_position_embeddings=seq_len,
            attention_dropout=p.dropout,
            **common,
        )
        return LlamaForCausalLM(llama)
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2Config(
        n_embd=p.hidden_size,
        n_layer=p.num_layers,
        n_head=p.num_heads,
        n_positions=seq_len,
        resid_pdrop=p.dropout,
        embd_pdrop=p.dropout,
        attn_pdrop=p.dropout,
        **common,
    )
    return GPT2LMHeadModel(gpt2)
