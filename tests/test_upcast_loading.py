"""Half-precision checkpoints: llmtool's load in the file's dtype + widening equals transformers'
own fp32 load, tensor for tensor (parameters and every buffer, including the ones a model
computes at init such as rotary tables and Gemma's embedding scale), and logits exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_families import FAMILIES, build_family

from conftest import TINY_LLAMA_SHAPE, build_tiny_model, families_params

# Families whose init-time buffers differ once rounded to bf16 (embed_scale, rope tables with a
# local base, longrope factors), plus the two built-in tiny archs; the rest run under `families`.
DEFAULT_RUN = {"gemma3_text", "phi3_partial_rotary", "gpt2", "llama", "bloom"}
CONVERTED_ON_LOAD = {"gpt_neox", "gpt_neox_sequential", "mixtral", "qwen3_moe"}
NAMES = sorted([*FAMILIES, "gpt2", "llama"])


def _build(name: str, vocab_size: int) -> Any:
    if name in ("gpt2", "llama"):
        return build_tiny_model(name, vocab_size)
    return build_family(name, vocab_size)


def _save_half(name: str, tokenizer: Any, path: Path, dtype: str = "bfloat16") -> Path:
    import torch

    model = _build(name, len(tokenizer)).to(getattr(torch, dtype))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _save(model: Any, tokenizer: Any, path: Path) -> None:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def _assert_same_model(ours: Any, ref: Any) -> None:
    import torch

    for kind in ("named_parameters", "named_buffers"):
        a, b = dict(getattr(ours, kind)()), dict(getattr(ref, kind)())
        assert a.keys() == b.keys(), kind
        for key in a:
            assert a[key].dtype == b[key].dtype, (key, a[key].dtype, b[key].dtype)
            assert torch.equal(a[key], b[key]), key
    ids = torch.arange(3, 40).reshape(1, -1) % ours.config.vocab_size
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, ref(ids).logits)


def _reference(path: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    ).eval()


@pytest.mark.parametrize(
    "name",
    families_params(NAMES, DEFAULT_RUN),
)
def test_bf16_checkpoint_loads_as_transformers_fp32(name, tokenizer, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from llmtool.models.loading import load_model
    from llmtool.models.upcast import plan_half_load, stored_half_dtype

    path = _save_half(name, tokenizer, tmp_path / name)
    assert stored_half_dtype(path)[0] == "bfloat16"
    loaded = load_model(path)
    assert next(loaded.model.parameters()).dtype == torch.float32
    assert loaded.config.dtype == torch.float32
    # Checkpoints whose names transformers converts on load (GPT-NeoX's embed_out, per-expert
    # MoE weights) take transformers' fp32 load: correct, without the memory saving.
    fast = plan_half_load(AutoModelForCausalLM, loaded.config, path) is not None
    assert fast == (name not in CONVERTED_ON_LOAD)
    _assert_same_model(loaded.model, _reference(path))


def test_init_buffers_are_recomputed_in_fp32(tokenizer, tmp_path):
    """Gemma 3 scales embeddings by sqrt(hidden): 9.798 in fp32, 9.8125 once computed in bf16."""
    import math

    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from llmtool.models.loading import load_model

    config = Gemma3TextConfig(**TINY_LLAMA_SHAPE, head_dim=16, vocab_size=len(tokenizer))
    config.hidden_size = 96
    _save(Gemma3ForCausalLM(config).to(torch.bfloat16), tokenizer, tmp_path)
    model = load_model(tmp_path).model
    scale = model.model.embed_tokens.embed_scale
    assert scale.dtype == torch.float32
    assert scale.item() == pytest.approx(math.sqrt(96), rel=1e-7)
    _assert_same_model(model, _reference(tmp_path))


def test_fp16_checkpoint_and_tied_head(tokenizer, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmtool.models.loading import load_model

    config = LlamaConfig(**TINY_LLAMA_SHAPE, vocab_size=len(tokenizer), tie_word_embeddings=True)
    _save(LlamaForCausalLM(config).half(), tokenizer, tmp_path)
    model = load_model(tmp_path).model
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the tie survives widening
    _assert_same_model(model, _reference(tmp_path))


def test_mixed_or_fp32_checkpoints_take_transformers_fp32_load(tokenizer, tmp_path):
    """Only a checkpoint stored wholly in one half dtype is loaded in it (nothing is narrowed)."""
    import torch
    from safetensors.torch import load_file, save_file

    from llmtool.models.upcast import stored_half_dtype

    path = _save_half("llama", tokenizer, tmp_path / "mixed")
    weights = load_file(path / "model.safetensors")
    norm = next(k for k in weights if "norm" in k)
    weights[norm] = weights[norm].float()
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    assert stored_half_dtype(path)[0] is None
    fp32 = tmp_path / "fp32"
    build_tiny_model("llama", len(tokenizer)).save_pretrained(fp32)
    assert stored_half_dtype(fp32)[0] is None
    from llmtool.models.loading import load_model

    tokenizer.save_pretrained(path)
    model = load_model(path).model
    assert model.get_parameter(norm).dtype == torch.float32
    assert torch.equal(model.get_parameter(norm), weights[norm])


@pytest.mark.parametrize("arch", ["t5", "bart", "marian"])
def test_bf16_encoder_decoder_loads_as_transformers_fp32(arch, tokenizer, tmp_path):
    """The encoder-decoders (T5 relative-position buckets, BART learned, Marian sinusoidal positions)."""
    import torch
    from _seq2seq import build_tiny_seq2seq
    from transformers import AutoModelForSeq2SeqLM

    from llmtool.models.loading import resolve_spec
    from llmtool.models.seq2seq import load_seq2seq
    from llmtool.models.upcast import plan_half_load

    build_tiny_seq2seq(arch, len(tokenizer)).to(torch.bfloat16).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    ours = load_seq2seq(resolve_spec(tmp_path)).model
    # Marian's sinusoidal position tables are computed at init, not stored: fp32 load instead.
    fast = plan_half_load(AutoModelForSeq2SeqLM, ours.config, tmp_path) is not None
    assert fast == (arch != "marian")
    ref = AutoModelForSeq2SeqLM.from_pretrained(
        tmp_path, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    for kind in ("named_parameters", "named_buffers"):
        a, b = dict(getattr(ours, kind)()), dict(getattr(ref, kind)())
        assert a.keys() == b.keys()
        assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a), kind
    ids = torch.arange(3, 20).reshape(1, -1)
    with torch.no_grad():
        assert torch.equal(
            ours(input_ids=ids, decoder_input_ids=ids[:, :5]).logits,
            ref(input_ids=ids, decoder_input_ids=ids[:, :5]).logits,
        )
