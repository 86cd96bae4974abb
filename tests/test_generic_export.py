"""The generic path: families without an extractor, traced by torch.onnx.export(dynamo=True).

Per family (tiny seeded random models from transformers' config classes): export validation
passes, the manifest names the generic builder, ORT greedy equals transformers greedy over 24
tokens at batch 1 and batch 2 left-padded, and sliding-window perplexity equals transformers' to
1e-4. GPT-Neo (with a local-attention layer) runs by default; the others are behind ``families``.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from typing import Any

import pytest
from test_families import GREEDY_TOKENS, PROMPTS, onnx_greedy, torch_greedy
from test_perplexity import transformers_sliding_window

# family -> (config class, model class, config fields); each a type ARCHITECTURES lacks.
# (BioGPT and XGLM need larger weights than the others before greedy stops repeating a token.)
GENERIC_FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "gpt_neo": (
        "GPTNeoConfig",
        "GPTNeoForCausalLM",
        {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_layers": 2,
            "num_heads": 4,
            # a local-attention layer whose window the long validation check crosses
            "attention_types": [[["global", "local"], 1]],
            "window_size": 32,
            "max_position_embeddings": 256,
        },
    ),
    "codegen": (
        "CodeGenConfig",
        "CodeGenForCausalLM",
        {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256, "rotary_dim": 8},
    ),
    "biogpt": (
        "BioGptConfig",
        "BioGptForCausalLM",
        {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 256,
        },
    ),
    "xglm": (
        "XGLMConfig",
        "XGLMForCausalLM",
        {
            "d_model": 64,
            "ffn_dim": 128,
            "num_layers": 2,
            "attention_heads": 4,
            "max_position_embeddings": 256,
        },
    ),
}
DEFAULT_RUN = {"gpt_neo"}
WEIGHT_STD = {"biogpt": 0.5, "xglm": 0.5}


def build_generic_family(name: str, vocab_size: int, seed: int = 0) -> Any:
    """A seeded tiny model of one family, weights scaled so greedy has clear margins."""
    import torch

    transformers = importlib.import_module("transformers")
    config_cls, model_cls, fields = GENERIC_FAMILIES[name]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(
        **fields, vocab_size=vocab_size, bos_token_id=0, eos_token_id=0, pad_token_id=0
    )
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname or ".ln" in pname:  # gains away from 1: a skipped norm shows
                p.normal_(0.0 if pname.endswith("bias") else 1.0, 0.3)
            elif p.dim() == 2:
                p.normal_(0.0, WEIGHT_STD.get(name, 0.2))
    return model


@pytest.fixture(scope="module")
def generic_tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("generic")


@pytest.fixture(
    scope="module",
    params=[
        pytest.param(n, marks=() if n in DEFAULT_RUN else pytest.mark.families)
        for n in sorted(GENERIC_FAMILIES)
    ],
)
def generic_export(request, tokenizer, generic_tmp):
    """(family, hf dir, export dir, ExportResult)."""
    from llmtool.export import export_model

    name = request.param
    hf = generic_tmp / f"hf-{name}"
    model = build_generic_family(name, len(tokenizer))
    model.save_pretrained(hf)
    tokenizer.save_pretrained(hf)
    result = export_model(hf, generic_tmp / f"onnx-{name}")
    return name, hf, generic_tmp / f"onnx-{name}", result


def test_families_have_no_extractor():
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from llmtool.export.registry import ARCHITECTURES

    for name in GENERIC_FAMILIES:
        assert name not in ARCHITECTURES and name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def test_validation_passes_and_manifest_names_the_builder(generic_export):
    from llmtool.manifest import read_manifest

    name, _, out, result = generic_export
    v = result.validation
    assert v["passed"] and v["gate"], (name, v)
    assert v["prefill_max_abs_diff"] < 1e-4 and v["decode_max_abs_diff"] < 1e-4
    assert result.manifest["builder"] == "torch.onnx.dynamo"
    if name == "gpt_neo":  # the long check crossed the local layer's window
        assert v["long_tokens"] > GENERIC_FAMILIES[name][2]["window_size"]
    assert result.manifest["model_type"] == name and result.manifest["layout"] == "standard"
    assert read_manifest(out)["builder"] == "torch.onnx.dynamo"  # as written to llmtool.json


def test_greedy_equals_transformers(generic_export, tokenizer):
    from conftest import load_hf

    _, hf, out, _ = generic_export
    model = load_hf(hf).model
    rows = [list(tokenizer(p)["input_ids"]) for p in PROMPTS]
    expected = [torch_greedy(model, r, GREEDY_TOKENS) for r in rows]
    assert onnx_greedy(out, rows[:1], GREEDY_TOKENS) == expected[:1]
    assert onnx_greedy(out, rows, GREEDY_TOKENS) == expected  # left-padded batch of 2
    assert len({t for row in expected for t in row}) > 3  # not a degenerate repeat


def test_perplexity_equals_transformers(generic_export, sample_text_file, tmp_path):
    from llmtool.evaluate import evaluate_perplexity

    _, hf, out, _ = generic_export
    text = sample_text_file.read_text(encoding="utf-8")[:3000]
    path = tmp_path / "text.txt"
    path.write_text(text, encoding="utf-8")
    expected, tokens = transformers_sliding_window(hf, text, 48, 24)
    result = evaluate_perplexity(out, path, max_length=48, stride=24, provider="cpu")
    assert result.tokens == tokens
    assert result.perplexity == pytest.approx(expected, rel=1e-4)
