"""Decoder families: tiny random models of each registered family against transformers.

Per family: export validation passes (it includes one sequence longer than every window and rope
threshold), ORT greedy equals transformers greedy over 24 tokens at batch 1 and batch 2
left-padded, the fused graph's greedy equals the standard graph's, and sliding-window perplexity
equals transformers'. Plus the refusals that must be exit 2 with a reason.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_perplexity import transformers_sliding_window
from typer.testing import CliRunner

from conftest import TINY_LLAMA_SHAPE, families_params

GREEDY_TOKENS = 24
PROMPTS = ("the king said to the", "once upon a time there was a queen who")
# A window shorter than the prompts plus the generated tokens, so it is crossed everywhere.
WINDOW = 12

# family -> (config class, model class, config overrides on top of TINY_LLAMA_SHAPE)
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "qwen2_max_window_layers": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1},
    ),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "qwen3_sliding": (
        "Qwen3Config",
        "Qwen3ForCausalLM",
        {"head_dim": 16, "use_sliding_window": True, "sliding_window": WINDOW},
    ),
    "granite": (
        "GraniteConfig",
        "GraniteForCausalLM",
        {
            "embedding_multiplier": 4.0,
            "residual_multiplier": 0.5,
            "attention_multiplier": 0.3,
            "logits_scaling": 0.5,
        },
    ),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": WINDOW}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    # Phi-4-mini style partial rotary: 16 of 32 head dims turn (fused: GroupQueryAttention).
    "phi3_partial_rotary": (
        "Phi3Config",
        "Phi3ForCausalLM",
        {"hidden_size": 128, "partial_rotary_factor": 0.5},
    ),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 16}),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {
            "head_dim": 16,
            "sliding_window": WINDOW,
            "attn_logit_softcapping": 5.0,
            "final_logit_softcapping": 3.0,
            "query_pre_attn_scalar": 24,
        },
    ),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "gemma3_text": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {
            "head_dim": 16,
            "sliding_window": WINDOW,
            "layer_types": ["sliding_attention", "full_attention"],
            "rope_parameters": {
                "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
            },
        },
    ),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", {"no_rope_layers": [1, 0]}),
    # 16 of 64 head dims turn, so the fused graph applies.
    "stablelm": (
        "StableLmConfig",
        "StableLmForCausalLM",
        {"hidden_size": 256, "partial_rotary_factor": 0.25, "use_qkv_bias": True},
    ),
    "starcoder2": (
        "Starcoder2Config",
        "Starcoder2ForCausalLM",
        {"sliding_window": WINDOW, "hidden_act": "gelu_pytorch_tanh"},
    ),
    # Parallel residual, partial rotary: 16 of 32 head dims turn (fused: GroupQueryAttention).
    "gpt_neox": (
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        {"num_attention_heads": 2, "rotary_pct": 0.5},
    ),
    "gpt_neox_sequential": (
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        {"num_attention_heads": 2, "rotary_pct": 0.5, "use_parallel_residual": False},
    ),
    "phi": (
        "PhiConfig",
        "PhiForCausalLM",
        {"num_attention_heads": 2, "partial_rotary_factor": 0.5},
    ),
    # Interleaved rotary on 16 of 32 head dims.
    "gptj": ("GPTJConfig", "GPTJForCausalLM", {"num_attention_heads": 2, "rotary_dim": 16}),
    "falcon": (
        "FalconConfig",
        "FalconForCausalLM",
        {"new_decoder_architecture": True, "num_kv_heads": 2, "ffn_hidden_size": 128},
    ),
    # Falcon-7B's layout: one shared key/value head, one LayerNorm, parallel attention.
    "falcon_multi_query": (
        "FalconConfig",
        "FalconForCausalLM",
        {"multi_query": True, "parallel_attn": True, "ffn_hidden_size": 128, "bias": True},
    ),
    "cohere": ("CohereConfig", "CohereForCausalLM", {"logit_scale": 0.5}),
    "opt": ("OPTConfig", "OPTForCausalLM", {"ffn_dim": 128, "word_embed_proj_dim": 64}),
    "bloom": ("BloomConfig", "BloomForCausalLM", {"n_head": 4}),
    "gpt_bigcode": ("GPTBigCodeConfig", "GPTBigCodeForCausalLM", {"n_inner": 128}),
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        {"num_local_experts": 4, "num_experts_per_tok": 2},
    ),
    # One sparse layer, one dense (mlp_only_layers), per-head qk-norm.
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        {
            "head_dim": 16,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 64,
            "mlp_only_layers": [1],
        },
    ),
}


# Run by default (one per group of features); the rest carry the ``families`` marker and run in
# ``nox -s families`` (``pytest -m families``).
DEFAULT_RUN = {
    "qwen2_max_window_layers",
    "gemma2",
    "olmo2",
    "phi3_partial_rotary",
    "gptj",  # parallel residual, one shared norm, interleaved partial rotary, fused
    "mixtral",  # routed experts, fused
}


def _family_params() -> list[Any]:
    return families_params(FAMILIES, DEFAULT_RUN)


def build_family(name: str, vocab_size: int, seed: int = 0) -> Any:
    """A seeded tiny model of one family; weights scaled up so greedy has clear margins."""
    import torch

    transformers = importlib.import_module("transformers")
    config_cls, model_cls, overrides = FAMILIES[name]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(
        **{**TINY_LLAMA_SHAPE, **overrides},
        vocab_size=vocab_size,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # norm gains away from 1, so a graph that skips one is caught
        for pname, p in model.named_parameters():
            if "norm" in pname or ".ln" in pname:  # gains around 1, LayerNorm biases around 0
                p.normal_(0.0 if pname.endswith("bias") else 1.0, 0.3)
    return model


@pytest.fixture(scope="module", params=_family_params())
def family_export(request, tokenizer, tmp_path_factory):
    """(family, hf dir, standard export dir, fused export dir or None, validations)."""
    from llmtool.export import export_model
    from llmtool.export.registry import ARCHITECTURES

    name = request.param
    hf = tmp_path_factory.mktemp(f"hf-{name}")
    model = build_family(name, len(tokenizer))
    model.save_pretrained(hf)
    tokenizer.save_pretrained(hf)
    root = tmp_path_factory.mktemp(f"onnx-{name}")
    standard = export_model(hf, root / "standard")
    fused = None
    if ARCHITECTURES[model.config.model_type].build_fused is not None:
        fused = export_model(hf, root / "fused", fused=True)
    return name, hf, root / "standard", fused and root / "fused", (standard, fused)


def torch_greedy(model: Any, ids: list[int], steps: int) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=steps, do_sample=False, min_new_tokens=steps
        )
    return out[0, len(ids) :].tolist()


def onnx_greedy(onnx_dir: Path, rows: list[list[int]], steps: int) -> list[list[int]]:
    from llmtool.runtime.model import OnnxCausalLM

    def pick(logits: np.ndarray) -> np.ndarray:
        # transformers' min_new_tokens (torch_greedy) masks EOS (id 0 in these models): so here.
        logits = logits.copy()
        logits[:, 0] = -np.inf
        return logits.argmax(-1)

    model = OnnxCausalLM(onnx_dir, "cpu")
    decoder = model.decoder(len(rows), max(len(r) for r in rows) + steps + 1)
    tokens = pick(decoder.prefill(rows).logits())
    out = [tokens]
    for _ in range(steps - 1):
        tokens = pick(decoder.step(tokens).logits())
        out.append(tokens)
    return np.stack(out, 1).tolist()


def assert_greedy_equals_transformers(hf: Path, onnx_dir: Path, tokenizer: Any) -> None:
    """ORT greedy == transformers greedy over GREEDY_TOKENS, batch 1 and batch 2 left-padded."""
    from conftest import load_hf

    model = load_hf(hf).model
    rows = [list(tokenizer(p)["input_ids"]) for p in PROMPTS]
    expected = [torch_greedy(model, r, GREEDY_TOKENS) for r in rows]
    assert onnx_greedy(onnx_dir, rows[:1], GREEDY_TOKENS) == expected[:1]
    assert onnx_greedy(onnx_dir, rows, GREEDY_TOKENS) == expected  # left-padded batch of 2
    assert len({t for row in expected for t in row}) > 3  # not a degenerate repeat


def test_export_validation_passes(family_export):
    name, _, _, _, results = family_export
    for result in results:
        if result is None:
            continue
        v = result.validation
        assert v["passed"], (name, v)
        assert v["prefill_max_abs_diff"] < 1e-4
        if (
            "sliding" in name
            or "window" in name
            or name in ("mistral", "gemma2", "starcoder2", "gemma3_text")
        ):
            assert v["long_tokens"] > WINDOW  # the long check crossed the window


def test_greedy_equals_transformers(family_export, tokenizer):
    from conftest import load_hf

    _, hf, standard, fused, _ = family_export
    model = load_hf(hf).model
    rows = [list(tokenizer(p)["input_ids"]) for p in PROMPTS]
    assert len(rows[1]) + GREEDY_TOKENS > WINDOW
    expected = [torch_greedy(model, r, GREEDY_TOKENS) for r in rows]
    assert onnx_greedy(standard, rows[:1], GREEDY_TOKENS) == expected[:1]
    assert onnx_greedy(standard, rows, GREEDY_TOKENS) == expected  # left-padded batch of 2
    if fused is not None:
        assert onnx_greedy(fused, rows, GREEDY_TOKENS) == expected
    assert len({t for row in expected for t in row}) > 3  # not a degenerate repeat


def test_perplexity_equals_transformers(family_export, sample_text_file, tmp_path):
    from llmtool.evaluate import evaluate_perplexity

    _, hf, standard, _, _ = family_export
    text = sample_text_file.read_text(encoding="utf-8")[:3000]
    path = tmp_path / "text.txt"
    path.write_text(text, encoding="utf-8")
    expected, tokens = transformers_sliding_window(hf, text, 48, 24)
    result = evaluate_perplexity(standard, path, max_length=48, stride=24, provider="cpu")
    assert result.tokens == tokens
    assert result.perplexity == pytest.approx(expected, rel=1e-4)


def test_families_are_registered():
    from llmtool.export.registry import supported_model_types

    expected = {
        "qwen2",
        "qwen3",
        "granite",
        "mistral",
        "phi3",
        "gemma",
        "gemma2",
        "olmo2",
        "smollm3",
        "stablelm",
        "gpt_neox",
        "phi",
        "gptj",
        "falcon",
        "cohere",
        "opt",
        "bloom",
        "gpt_bigcode",
        "qwen3_moe",
        "mixtral",
    }
    assert expected <= set(supported_model_types())


def test_new_families_record_their_features(family_export):
    """The manifest names the features each family's graph uses (checked where they are new)."""
    import json

    name, _, standard, _, _ = family_export
    features = set(json.loads((standard / "llmtool.json").read_text())["features"])
    expected = {
        "gptj": {"parallel_residual", "interleaved_rotary", "partial_rotary"},
        "gpt_neox": {"parallel_residual", "partial_rotary"},
        "phi": {"parallel_residual", "partial_rotary"},
        "falcon": {"parallel_residual"},
        "cohere": {"parallel_residual", "interleaved_rotary", "multipliers"},
        "bloom": {"alibi", "embedding_norm"},
        "mixtral": {"moe"},
        "qwen3_moe": {"moe", "qk_norm"},
    }.get(name, set())
    assert expected <= features, (name, features)


# Refusals ---------------------------------------------------------------------------------------


def _save_llama(tmp_path: Path, tokenizer, **overrides: Any) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        **{**TINY_LLAMA_SHAPE, **overrides}, vocab_size=len(tokenizer), bos_token_id=0
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def _cli_export(hf: Path, out: Path, *extra: str):
    from llmtool.cli import app

    return CliRunner().invoke(app, ["export", str(hf), "--out", str(out), *extra])


def test_bloom_fused_falls_back_to_the_standard_graph_with_the_reason(tmp_path, tokenizer):
    """ALiBi has no GroupQueryAttention input: ``--fused`` writes the standard graph (validated)
    and says why on stderr before the export starts; the manifest records the standard layout."""
    import torch
    from transformers import BloomConfig, BloomForCausalLM

    from llmtool.manifest import read_manifest

    torch.manual_seed(0)
    config = BloomConfig(hidden_size=32, n_layer=1, n_head=2, vocab_size=len(tokenizer))
    BloomForCausalLM(config).save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    result = _cli_export(tmp_path / "hf", tmp_path / "onnx", "--fused")
    assert result.exit_code == 0, result.output
    message = " ".join(result.stderr.split())
    assert "--fused is not available for 'bloom' (GroupQueryAttention has no ALiBi bias)" in message
    assert "writing the standard graph instead" in message
    manifest = read_manifest(tmp_path / "onnx")
    assert manifest["layout"] == "standard" and manifest["validation"]["passed"]


def test_fused_head_dim_not_multiple_of_16_falls_back(tmp_path, tokenizer):
    """GroupQueryAttention's rotary kernel needs a multiple of 16: the reason, then the
    standard graph (decided from the config before any weight loads)."""
    from llmtool.export.registry import fused_fallback
    from llmtool.models.loading import read_config, resolve_spec

    hf = _save_llama(tmp_path, tokenizer, head_dim=8)
    message = fused_fallback(read_config(resolve_spec(hf))) or ""
    assert "divisible by 16" in message and "writing the standard graph instead" in message
    assert (
        fused_fallback(read_config(resolve_spec(_save_llama(tmp_path / "ok", tokenizer)))) is None
    )


def _longrope(original: int) -> dict[str, Any]:
    half = TINY_LLAMA_SHAPE["hidden_size"] // TINY_LLAMA_SHAPE["num_attention_heads"] // 2
    return {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "short_factor": [1.0 + 0.1 * i for i in range(half)],
        "long_factor": [2.0 + 0.3 * i for i in range(half)],
        "original_max_position_embeddings": original,
    }


def test_longrope_switching_inside_the_context_is_refused(tmp_path, tokenizer):
    hf = _save_llama(tmp_path, tokenizer, rope_parameters=_longrope(64))
    result = _cli_export(hf, tmp_path / "onnx")
    assert result.exit_code == 2, result.output
    assert "longrope" in result.output and "original_max_position_embeddings" in result.output


def test_static_longrope_exports_and_validates(tmp_path, tokenizer):
    """longrope whose context ends at original_max_position_embeddings: short factors, static."""
    from llmtool.export import export_model

    hf = _save_llama(tmp_path, tokenizer, rope_parameters=_longrope(256))
    v = export_model(hf, tmp_path / "onnx").validation
    assert v["passed"], v
    assert v["long_tokens"] == 256  # bounded by the context


def test_partial_rotary_factor_is_read_from_rope_parameters():
    from transformers import StableLmConfig

    from llmtool.export.extractors import partial_rotary_factor

    config = StableLmConfig(partial_rotary_factor=0.25)
    assert config.rope_parameters.get("partial_rotary_factor") == 0.25
    assert partial_rotary_factor(config) == 0.25
