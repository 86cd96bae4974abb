"""Tiny random T5 (v1.1 gated-GELU), mT5, BART and Marian models for the seq2seq tests."""

from __future__ import annotations

from pathlib import Path

SEQ2SEQ_ARCHS = ("t5", "mt5", "bart", "marian")


def build_tiny_seq2seq(arch: str, vocab_size: int, seed: int = 0):
    """A random tiny encoder-decoder; weights larger than the default init so greedy varies."""
    import torch
    from transformers import (
        BartConfig,
        BartForConditionalGeneration,
        MarianConfig,
        MarianMTModel,
        MT5Config,
        MT5ForConditionalGeneration,
        T5Config,
        T5ForConditionalGeneration,
    )

    torch.manual_seed(seed)
    # The BPE test tokenizer has one special token (id 0): pad, EOS and decoder start.
    special = {"pad_token_id": 0, "eos_token_id": 0, "decoder_start_token_id": 0}
    if arch in ("t5", "mt5"):
        # mT5 is T5 v1.1's layout under its own classes (model_type "mt5").
        config_class = MT5Config if arch == "mt5" else T5Config
        config = config_class(
            vocab_size=vocab_size,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            feed_forward_proj="gated-gelu",  # T5 v1.1 / Flan-T5
            tie_word_embeddings=False,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=16,
            initializer_factor=1.0,
            **special,
        )
        if arch == "mt5":
            return MT5ForConditionalGeneration(config).eval()
        return T5ForConditionalGeneration(config).eval()
    shape = dict(
        vocab_size=vocab_size,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=128,
        init_std=0.2,
        bos_token_id=0,
        forced_eos_token_id=None,
        **special,
    )
    if arch == "bart":
        return BartForConditionalGeneration(BartConfig(**shape)).eval()
    return MarianMTModel(MarianConfig(**shape)).eval()


SOURCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time",
    "It was the best of times, it was the worst of times, it was the age of wisdom",
)


def pick_eos(model, tokenizer) -> int:
    """A token the random model emits mid-way, made its EOS so that rows end at different steps."""
    import collections

    import torch

    enc = tokenizer(list(SOURCES), return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    counts = collections.Counter(out[:, 3:].flatten().tolist())
    counts.pop(model.config.decoder_start_token_id, None)
    return counts.most_common(3)[-1][0]


def save_tiny_seq2seq(arch: str, tokenizer, path: Path, seed: int = 0) -> Path:
    model = build_tiny_seq2seq(arch, len(tokenizer), seed)
    eos = pick_eos(model, tokenizer)
    model.config.eos_token_id = model.generation_config.eos_token_id = eos
    model.save_pretrained(path)
    model.generation_config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


_EXPORTS: dict[str, tuple] = {}


def tiny_seq2seq_export(arch: str, tokenizer, tmp_path_factory) -> tuple:
    """(hf_dir, onnx_dir) of a tiny ``arch`` model, exported once per test session."""
    if arch not in _EXPORTS:
        from llmtool.export import export_model

        hf = save_tiny_seq2seq(arch, tokenizer, tmp_path_factory.mktemp(f"hf-{arch}"))
        out = tmp_path_factory.mktemp(f"onnx-{arch}") / "model"
        _EXPORTS[arch] = (hf, out, export_model(hf, out))
    return _EXPORTS[arch]
