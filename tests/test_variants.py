"""Variants of registered families that their hand-built graph cannot express.

The registry reads each from the config (``Architecture.variant``) and sends it down the generic
torch.onnx path, with a message: fp32 only, no ``--fused`` (both refused with exit 2 before any
weight loads). Per variant (tiny seeded random models from transformers' config classes): export
validation passes, the manifest names the generic builder and the reason, and ORT greedy equals
transformers greedy over 24 tokens at batch 1 and batch 2 left-padded. OPT with post-LayerNorm
runs by default; the others are behind ``families``.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_families import (
    assert_greedy_equals_transformers,
)
from typer.testing import CliRunner

from conftest import TINY_LLAMA_SHAPE, families_params

# variant -> (config class, model class, shape on top of TINY_LLAMA_SHAPE, the variant's fields,
# the reason's words in the message).
VARIANTS: dict[str, tuple[str, str, dict[str, Any], dict[str, Any], str]] = {
    "opt_post_layernorm": (
        "OPTConfig",
        "OPTForCausalLM",
        {"ffn_dim": 128},
        {"do_layer_norm_before": False},
        "opt with post-LayerNorm (do_layer_norm_before=False)",
    ),
    "opt_projected_embeddings": (  # OPT-350m's project_in / project_out
        "OPTConfig",
        "OPTForCausalLM",
        {"ffn_dim": 128},
        {"word_embed_proj_dim": 32},
        "opt with projected embeddings (word_embed_proj_dim 32 != hidden_size 64)",
    ),
    "falcon_alibi": (  # Falcon computes its ALiBi in bfloat16: widened for ONNX Runtime's CPU
        "FalconConfig",
        "FalconForCausalLM",
        {"ffn_hidden_size": 128},
        {"alibi": True},
        "falcon with ALiBi (alibi=True)",
    ),
    "cohere_qk_norm": (
        "CohereConfig",
        "CohereForCausalLM",
        {"logit_scale": 0.5},
        {"use_qk_norm": True},
        "cohere with LayerNorm on q and k (use_qk_norm=True)",
    ),
    "phi_qk_layernorm": (
        "PhiConfig",
        "PhiForCausalLM",
        {"num_attention_heads": 2, "partial_rotary_factor": 0.5},
        {"qk_layernorm": True},
        "phi with LayerNorm on q and k (qk_layernorm=True)",
    ),
    "stablelm_qk_layernorm": (
        "StableLmConfig",
        "StableLmForCausalLM",
        {"partial_rotary_factor": 0.25},
        {"qk_layernorm": True},
        "stablelm with per-head LayerNorm on q and k (qk_layernorm=True)",
    ),
    "stablelm_parallel_residual": (
        "StableLmConfig",
        "StableLmForCausalLM",
        {"partial_rotary_factor": 0.25},
        {"use_parallel_residual": True},
        "stablelm with a parallel residual (use_parallel_residual=True)",
    ),
    "bloom_post_layernorm_residual": (
        "BloomConfig",
        "BloomForCausalLM",
        {"n_head": 4},
        {"apply_residual_connection_post_layernorm": True},
        "bloom with a post-LayerNorm residual (apply_residual_connection_post_layernorm=True)",
    ),
    "gpt2_reorder_and_upcast_attn": (
        "GPT2Config",
        "GPT2LMHeadModel",
        {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256},
        {"reorder_and_upcast_attn": True},
        "gpt2 with upcast, reordered attention (reorder_and_upcast_attn=True)",
    ),
}
DEFAULT_RUN = {"opt_post_layernorm"}


def variant_config(name: str, vocab_size: int, *, plain: bool = False) -> Any:
    """The variant's config (``plain``: the same family and shape without the variant)."""
    transformers = importlib.import_module("transformers")
    config_cls, _, shape, variant, _ = VARIANTS[name]
    return getattr(transformers, config_cls)(
        **{**TINY_LLAMA_SHAPE, **shape, **({} if plain else variant)},
        vocab_size=vocab_size,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        tie_word_embeddings=False,
    )


def save_variant(name: str, tokenizer, root: Path) -> Path:
    """A seeded tiny model of the variant, norm gains away from 1 (so a skipped norm shows)."""
    import torch

    transformers = importlib.import_module("transformers")
    hf = root / f"hf-{name}"
    if hf.exists():
        return hf
    torch.manual_seed(0)
    model = getattr(transformers, VARIANTS[name][1])(variant_config(name, len(tokenizer))).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname or ".ln" in pname:
                p.normal_(0.0 if pname.endswith("bias") else 1.0, 0.3)
    model.save_pretrained(hf)
    tokenizer.save_pretrained(hf)
    return hf


def _export(args: list[str], in_process: bool) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``llmtool export``: CliRunner or a real process."""
    if in_process:
        from llmtool.cli import app

        done = CliRunner().invoke(app, ["export", *args])
        return done.exit_code, done.stdout, done.stderr
    process = subprocess.run(
        [sys.executable, "-m", "llmtool", "export", *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    return process.returncode, process.stdout, process.stderr


@pytest.fixture(scope="module")
def variants_tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("variants")


@pytest.fixture(
    scope="module",
    params=families_params(VARIANTS, DEFAULT_RUN),
)
def variant_export(request, tokenizer, variants_tmp):
    """(variant, hf dir, export dir, manifest, stderr) from ``llmtool export --json``."""
    name = request.param
    hf = save_variant(name, tokenizer, variants_tmp)
    out = variants_tmp / f"onnx-{name}"
    code, stdout, stderr = _export([str(hf), "--out", str(out), "--json"], name in DEFAULT_RUN)
    assert code == 0, stderr[-3000:]
    return name, hf, out, json.loads(stdout), stderr


def test_each_variant_is_routed_to_the_generic_path(tokenizer):
    """From the config alone: the variant takes GENERIC, the family without it its own entry."""
    from transformers import Qwen2MoeConfig

    from llmtool.export.registry import ARCHITECTURES, GENERIC, architecture, variant_reason

    for name, (*_, reason) in VARIANTS.items():
        config = variant_config(name, len(tokenizer))
        assert architecture(config) is GENERIC, name
        assert reason in (variant_reason(config) or ""), (name, variant_reason(config))
        plain = variant_config(name, len(tokenizer), plain=True)
        assert variant_reason(plain) is None, (name, variant_reason(plain))
        assert architecture(plain) is ARCHITECTURES[plain.model_type], name
    # A shared expert (Qwen2-MoE): no registry entry, so GENERIC without a variant.
    moe = Qwen2MoeConfig(num_experts=4, shared_expert_intermediate_size=64)
    assert architecture(moe) is GENERIC and variant_reason(moe) is None


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_fused_falls_back_and_fp16_is_refused_before_loading(name, tokenizer, tmp_path):
    """``--fused`` falls back to the traced standard graph, naming the variant and the reason;
    fp16: exit 2 naming them; the directory holds no weights to load."""
    from llmtool.export.registry import fused_fallback

    message = fused_fallback(variant_config(name, len(tokenizer))) or ""
    assert "--fused is not available for" in message and VARIANTS[name][4] in message
    assert "writing the standard graph instead" in message
    hf = tmp_path / "hf"
    variant_config(name, len(tokenizer)).save_pretrained(hf)
    for extra, words in (
        (["--dtype", "fp16"], "--dtype fp16 is not available for"),
        (["--fused", "--dtype", "fp16"], "--dtype fp16 is not available for"),
    ):
        code, _, stderr = _export([str(hf), "--out", str(tmp_path / "o"), *extra], True)
        message = " ".join(stderr.split())
        assert code == 2, (name, message)
        assert words in message and VARIANTS[name][4] in message, message
        assert "the hand-built graph cannot express it" in message
        assert not (tmp_path / "o").exists()


def test_export_validates_through_the_generic_path(variant_export):
    from llmtool.manifest import read_manifest

    name, _, out, manifest, stderr = variant_export
    v = manifest["validation"]
    assert v["passed"] and v["gate"], (name, v)
    assert v["prefill_max_abs_diff"] < 1e-4 and v["decode_max_abs_diff"] < 1e-4
    assert manifest["builder"] == "torch.onnx.dynamo" == read_manifest(out)["builder"]
    assert VARIANTS[name][4] in manifest["builder_reason"]
    # The message, printed (stderr) before the export runs: the variant, the reason, the path.
    message = " ".join(stderr.split())
    assert VARIANTS[name][4] in message and "exporting through torch.onnx (dynamo)" in message


def test_greedy_equals_transformers(variant_export, tokenizer):
    _, hf, out, _, _ = variant_export
    assert_greedy_equals_transformers(hf, out, tokenizer)


def test_export_table_says_why(variant_export):
    from rich.console import Console

    from llmtool.reports import export_table

    name, _, out, manifest, _ = variant_export
    console = Console(width=300, record=True)
    console.print(export_table(manifest, out))
    text = " ".join(console.export_text().split())
    assert "torch.onnx.dynamo graph" in text and VARIANTS[name][4] in text


@pytest.mark.families
def test_int8_export_of_a_variant_is_gated_on_fidelity(tokenizer, variants_tmp):
    """``--quantize`` on a routed variant: ORT's quantizer over the traced graph, gated."""
    hf = save_variant("opt_post_layernorm", tokenizer, variants_tmp)
    out = variants_tmp / "opt-int8"
    code, _, stderr = _export([str(hf), "--out", str(out), "--quantize", "int8"], True)
    assert code == 0, stderr[-3000:]
    manifest = json.loads((out / "llmtool.json").read_text(encoding="utf-8"))
    assert manifest["builder"] == "torch.onnx.dynamo" and manifest["fidelity"]["passed"]
    assert "MatMulNBitsQuantizer" in manifest["quantization"]["method"]


def test_bfloat16_arithmetic_runs_in_float32_with_torch_rounding():
    """A traced bfloat16 Mul (Falcon's ALiBi) loads in ONNX Runtime's CPU and rounds as torch."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper

    from llmtool.export.generic import _widen_bfloat16

    bf16 = TensorProto.BFLOAT16
    nodes = [
        helper.make_node("Cast", ["a"], ["a16"], to=bf16),
        helper.make_node("Cast", ["b"], ["b16"], to=bf16),
        helper.make_node("Mul", ["a16", "b16"], ["p16"], name="mul"),
        helper.make_node("Cast", ["p16"], ["p"], to=TensorProto.FLOAT),
    ]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [64]) for n in ("a", "b", "p")]
    graph = helper.make_graph(nodes, "g", io[:2], io[2:])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    _widen_bfloat16(model)
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node].count("Cast") == 6  # two in, one out, added
    rng = np.random.default_rng(0)
    a, b = (rng.normal(0, 30, 64).astype(np.float32) for _ in range(2))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"a": a, "b": b})
    expected = (torch.tensor(a).bfloat16() * torch.tensor(b).bfloat16()).float().numpy()
    np.testing.assert_array_equal(got, expected)
