"""The generic path: families without an extractor, traced by torch.onnx.export(dynamo=True).

Per family (tiny seeded random models from transformers' config classes): export validation
passes, the manifest names the generic builder, ORT greedy equals transformers greedy over 24
tokens at batch 1 and batch 2 left-padded, and sliding-window perplexity equals transformers' to
1e-4. GPT-Neo (with a local-attention layer) runs by default; the others are behind ``families``.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from typing import Any

import pytest
from test_families import (
    assert_greedy_equals_transformers,
)
from test_perplexity import transformers_sliding_window

from conftest import families_params

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


def save_family(name: str, tokenizer, root) -> Any:
    hf = root / f"hf-{name}"
    if not hf.exists():
        build_generic_family(name, len(tokenizer)).save_pretrained(hf)
        tokenizer.save_pretrained(hf)
    return hf


@pytest.fixture(
    scope="module",
    params=families_params(GENERIC_FAMILIES, DEFAULT_RUN),
)
def generic_export(request, tokenizer, generic_tmp):
    """(family, hf dir, export dir, manifest) from ``llmtool export --json``.

    The default run's family goes through CliRunner (the dynamo trace alone takes ~8 s); the
    ``families`` run exports through a real ``llmtool export`` process.
    """
    from typer.testing import CliRunner

    from llmtool.cli import app

    name = request.param
    hf = save_family(name, tokenizer, generic_tmp)
    out = generic_tmp / f"onnx-{name}"
    args = ["export", str(hf), "--out", str(out), "--json"]
    if name in DEFAULT_RUN:
        done = CliRunner().invoke(app, args)
        assert done.exit_code == 0, done.output
        return name, hf, out, json.loads(done.stdout)
    process = subprocess.run(
        [sys.executable, "-m", "llmtool", *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    return name, hf, out, json.loads(process.stdout)


def test_families_have_no_extractor():
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from llmtool.export.registry import ARCHITECTURES

    for name in GENERIC_FAMILIES:
        assert name not in ARCHITECTURES and name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def test_validation_passes_and_manifest_names_the_builder(generic_export):
    from llmtool.manifest import read_manifest

    name, _, out, manifest = generic_export
    v = manifest["validation"]
    assert v["passed"] and v["gate"], (name, v)
    assert v["prefill_max_abs_diff"] < 1e-4 and v["decode_max_abs_diff"] < 1e-4
    assert manifest["builder"] == "torch.onnx.dynamo"
    if name == "gpt_neo":  # the long check crossed the local layer's window
        assert v["long_tokens"] > GENERIC_FAMILIES[name][2]["window_size"]
    assert manifest["model_type"] == name and manifest["layout"] == "standard"
    assert read_manifest(out)["builder"] == "torch.onnx.dynamo"  # as written to llmtool.json


def test_export_table_names_the_builder(generic_export, tokenizer):
    from rich.console import Console

    from conftest import build_tiny_model
    from llmtool.export.registry import build_graph
    from llmtool.reports import export_table

    _, _, out, manifest = generic_export
    console = Console(width=200, record=True)
    console.print(export_table(manifest, out))
    assert "torch.onnx.dynamo graph" in console.export_text()
    # A family with an extractor: the registry records the hand-built path.
    built = build_graph(build_tiny_model("llama", len(tokenizer)), "fp32", 17)
    assert built.meta["builder"] == "hand-built"


def test_greedy_equals_transformers(generic_export, tokenizer):
    _, hf, out, _ = generic_export
    assert_greedy_equals_transformers(hf, out, tokenizer)


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


def test_fused_falls_back_and_fp16_is_refused_before_loading(tokenizer, generic_tmp):
    """No fused graph without an extractor: ``--fused`` falls back to the traced standard graph
    with the reason; the trace is fp32: ``--dtype fp16`` (with or without --fused) exit 2."""
    from typer.testing import CliRunner

    from llmtool.cli import app
    from llmtool.export.registry import fused_fallback
    from llmtool.models.loading import read_config, resolve_spec

    hf = save_family("gpt_neo", tokenizer, generic_tmp)
    message = fused_fallback(read_config(resolve_spec(hf))) or ""
    assert "--fused is not available for 'gpt_neo' (no extractor" in message
    assert "writing the standard graph instead" in message
    fp16 = "'gpt_neo' takes the generic torch.onnx path, which exports fp32"
    for extra, reason in ((["--dtype", "fp16"], fp16), (["--fused", "--dtype", "fp16"], fp16)):
        out = generic_tmp / "refused"
        refused = CliRunner().invoke(app, ["export", str(hf), "--out", str(out), *extra])
        assert refused.exit_code == 2 and reason in " ".join(refused.stderr.split())
        assert not out.exists()


@pytest.mark.families
def test_int4_export_is_gated_on_fidelity(tokenizer, generic_tmp):
    """``--quantize int4``: ORT's MatMulNBits quantizer over the traced graph, gated on its
    fidelity to fp32 like every quantized export; the table names the builder."""
    import onnx
    from typer.testing import CliRunner

    from llmtool.cli import app

    hf = save_family("gpt_neo", tokenizer, generic_tmp)
    out = generic_tmp / "neo-int4"
    done = CliRunner().invoke(app, ["export", str(hf), "--out", str(out), "--quantize", "int4"])
    assert done.exit_code == 0, done.output
    text = " ".join(done.stdout.split())
    assert "torch.onnx.dynamo graph" in text and "int4 weights" in text
    manifest = json.loads((out / "llmtool.json").read_text(encoding="utf-8"))
    assert manifest["fidelity"]["passed"] and manifest["quantization"]["mode"] == "int4"
    # The record says what quantized it: ORT's quantizer, the LM head at 4 bits too.
    q = manifest["quantization"]
    assert "MatMulNBitsQuantizer" in q["method"] and q["lm_head"].startswith("4-bit")
    ops = [n.op_type for n in onnx.load(out / "model.onnx").graph.node]
    assert ops.count("MatMulNBits") >= 4 * 2  # q/k/v/out of each layer at least


# Mixture-of-experts without an extractor: transformers' grouped expert matmul has no ONNX
# lowering. (model type, config class, model class, config fields)
UNTRACEABLE = {
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", {"intermediate_size": 32}),
    # A shared expert beside the routed ones (a variant no registered MoE family has).
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        {
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 32,
            "num_key_value_heads": 2,
        },
    ),
}


@pytest.mark.families
@pytest.mark.parametrize("model_type", sorted(UNTRACEABLE))
def test_exporter_failure_is_refused_with_the_type_and_reason(model_type, tokenizer, tmp_path):
    """The exporter cannot trace it: exit 2, the type and the reason named, nothing written."""
    import torch
    import transformers
    from typer.testing import CliRunner

    from llmtool.cli import app

    config_cls, model_cls, fields = UNTRACEABLE[model_type]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        **fields,
    )
    getattr(transformers, model_cls)(config).eval().save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    refused = CliRunner().invoke(
        app, ["export", str(tmp_path / "hf"), "--out", str(tmp_path / "o")]
    )
    message = " ".join(refused.stderr.split())
    assert refused.exit_code == 2, refused.output
    assert f"torch.onnx (dynamo) cannot export '{model_type}'" in message
    assert "Traceback" not in message and not (tmp_path / "o").exists()
