"""The fused export (ONNX Runtime contrib ops, right padding, in-place KV cache) on CPU."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import TINY_LLAMA_SHAPE
from llmtool.export import export_model
from llmtool.generate import generate
from llmtool.runtime import OnnxCausalLM
from llmtool.sampling import SamplingConfig

PROMPTS = ["The keeper climbed the steps", "A ship", "Fog until noon, and then the wind"]


@pytest.fixture(scope="module")
def fused_export(tiny_export, tmp_path_factory):
    hf, standard, _ = tiny_export
    out = tmp_path_factory.mktemp("fused") / hf.name
    result = export_model(hf, out, fused=True)
    return hf, standard, out, result


def test_fused_validation_parity(fused_export):
    *_, result = fused_export
    v = result.validation
    assert result.manifest["layout"] == "fused" and result.manifest["padding"] == "right"
    assert v["passed"] and v["greedy_match"] and v["padding"] == "right"
    assert v["prefill_max_abs_diff"] < 1e-4 and v["decode_max_abs_diff"] < 1e-4


def test_fused_io(fused_export):
    *_, out, result = fused_export
    m = result.manifest
    assert {"last_logits", "next_token", "logits"} <= set(m["outputs"])
    assert ("position_ids" in m["inputs"]) == (m["architecture"] == "gpt2")
    assert json.loads((out / "llmtool.json").read_text())["layout"] == "fused"


def test_fused_greedy_equals_standard(fused_export):
    _, standard, fused, _ = fused_export
    a = generate(OnnxCausalLM(standard, "cpu"), PROMPTS, max_new_tokens=20)
    b = generate(OnnxCausalLM(fused, "cpu"), PROMPTS, max_new_tokens=20)
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]


def test_fused_sampling_equals_standard(fused_export):
    _, standard, fused, _ = fused_export
    cfg = SamplingConfig(strategy="top-k", top_k=20, top_p=0.9, seed=5)
    a = generate(OnnxCausalLM(standard, "cpu"), PROMPTS, max_new_tokens=12, sampling=cfg)
    b = generate(OnnxCausalLM(fused, "cpu"), PROMPTS, max_new_tokens=12, sampling=cfg)
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]


def test_decoder_is_reused_and_repeatable(fused_export):
    *_, fused, _ = fused_export
    model = OnnxCausalLM(fused, "cpu")
    first = generate(model, PROMPTS[:2], max_new_tokens=10)
    decoders = dict(model._decoders)
    second = generate(model, PROMPTS[:2], max_new_tokens=10)
    assert model._decoders == decoders and len(decoders) == 1
    assert [o.token_ids for o in first.outputs] == [o.token_ids for o in second.outputs]


def test_fused_fp16(tiny_llama_export, tmp_path):
    hf, _ = tiny_llama_export
    result = export_model(hf, tmp_path / "fp16", fused=True, dtype="fp16")
    assert result.validation["passed"] and result.validation["prefill_max_abs_diff"] < 1e-2


@pytest.mark.parametrize("fused", [False, True], ids=["standard", "fused"])
@pytest.mark.parametrize("arch", ["mistral-window", "qwen2"])
def test_other_llama_family(arch, fused, tokenizer, tmp_path):
    """Mistral with a sliding window shorter than the prompts, and Qwen2's q/k/v biases."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    common = dict(**TINY_LLAMA_SHAPE, vocab_size=len(tokenizer), bos_token_id=0, eos_token_id=0)
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
        with torch.no_grad():  # random biases so they matter
            for layer in model.model.layers:
                layer.self_attn.q_proj.bias.normal_(0, 0.5)
                layer.self_attn.k_proj.bias.normal_(0, 0.5)
    else:
        model = MistralForCausalLM(MistralConfig(sliding_window=4, **common))
    model.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    result = export_model(tmp_path / "hf", tmp_path / "onnx", fused=fused)
    assert result.validation["passed"], result.validation
    assert result.validation["prefill_max_abs_diff"] < 1e-4


def test_fused_perplexity_equals_standard(fused_export, sample_text_file):
    from llmtool.evaluate import evaluate_perplexity

    _, standard, fused, _ = fused_export
    a = evaluate_perplexity(standard, sample_text_file, max_length=64, provider="cpu")
    b = evaluate_perplexity(fused, sample_text_file, max_length=64, provider="cpu")
    assert b.perplexity == pytest.approx(a.perplexity, rel=1e-5)


def test_every_transformer_family_has_a_fused_graph():
    from llmtool.export.registry import ARCHITECTURES, fused_model_types

    transformers_types = {t for t, a in ARCHITECTURES.items() if a.extract is not None}
    # A family without one says why (BLOOM: GroupQueryAttention has no ALiBi bias).
    refused = {t for t in transformers_types if ARCHITECTURES[t].no_fused}
    assert refused == {"bloom"}
    assert transformers_types - refused == set(fused_model_types())


def test_cache_rows_hold_the_prompt(fused_export):
    """The in-place cache holds exactly the keys the growing cache holds, row by row."""
    *_, fused, _ = fused_export
    model = OnnxCausalLM(fused, "cpu")
    rows = [model.tokenizer(p)["input_ids"] for p in PROMPTS[:2]]
    decoder = model.decoder(2, 64)
    decoder.prefill(rows)
    buffer = decoder.cache["past_key_values.0.key"].numpy()
    for b, row in enumerate(rows):
        ids = np.array([row])
        _, cache = model.forward(
            ids, np.ones_like(ids), np.arange(len(row))[None], model.empty_cache(1)
        )
        np.testing.assert_allclose(
            buffer[b, :, : len(row)], cache["past_key_values.0.key"][0], atol=1e-5
        )
