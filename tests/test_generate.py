"""Generation: ORT against transformers' generate, sampling properties, streaming, errors."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import load_hf
from llmtool.errors import UsageError
from llmtool.generate import generate
from llmtool.runtime import OnnxCausalLM
from llmtool.sampling import SamplingConfig

PROMPTS = ["The keeper climbed the steps", "A ship"]


def transformers_greedy(hf_dir, prompts, max_new_tokens):
    """New tokens per prompt from transformers' own generate (left padding, greedy)."""
    import torch

    loaded = load_hf(hf_dir)
    tok = loaded.tokenizer
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = loaded.model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            generation_config=loaded.generation_config,
        )
    eos = loaded.generation_config.eos_token_id
    rows = []
    for row in out[:, enc["input_ids"].shape[1] :].tolist():
        if eos in row:
            row = row[: row.index(eos) + 1]
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def onnx_model(tiny_export):
    return OnnxCausalLM(tiny_export[1], "cpu")


@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS], ids=["batch1", "batch2-left-padded"])
def test_greedy_matches_transformers(tiny_export, onnx_model, prompts):
    hf, _, _ = tiny_export
    expected = transformers_greedy(hf, prompts, max_new_tokens=24)
    result = generate(onnx_model, prompts, max_new_tokens=24)
    assert [o.token_ids for o in result.outputs] == expected
    assert result.provider == "cpu"


def test_batched_rows_equal_single_runs(onnx_model):
    batched = generate(onnx_model, PROMPTS, max_new_tokens=16)
    for prompt, out in zip(PROMPTS, batched.outputs, strict=True):
        assert (
            generate(onnx_model, [prompt], max_new_tokens=16).outputs[0].token_ids == out.token_ids
        )


def test_top_k_1_equals_greedy(onnx_model):
    greedy = generate(onnx_model, PROMPTS, max_new_tokens=16)
    sampled = generate(
        onnx_model,
        PROMPTS,
        max_new_tokens=16,
        sampling=SamplingConfig(strategy="top-k", top_k=1, seed=7),
    )
    assert [o.token_ids for o in sampled.outputs] == [o.token_ids for o in greedy.outputs]


def test_sampled_tokens_inside_top_k(onnx_model):
    k = 5
    result = generate(
        onnx_model,
        PROMPTS[:1],
        max_new_tokens=20,
        sampling=SamplingConfig(strategy="top-k", top_k=k, temperature=1.5, seed=1),
    )
    tok = onnx_model.tokenizer
    prompt_ids = tok(PROMPTS[0])["input_ids"]
    ids = np.array([prompt_ids + result.outputs[0].token_ids])
    n = ids.shape[1]
    logits, _ = onnx_model.forward(
        ids, np.ones_like(ids), np.arange(n)[None], onnx_model.empty_cache(1)
    )
    for step, token in enumerate(result.outputs[0].token_ids):
        row = logits[0, len(prompt_ids) - 1 + step]
        assert token in np.argsort(-row)[:k], f"step {step}: token {token} outside the top {k}"


def test_seeded_sampling_is_reproducible(onnx_model):
    cfg = SamplingConfig(strategy="top-k", top_k=50, top_p=0.95, temperature=1.0, seed=1234)
    a = generate(onnx_model, PROMPTS, max_new_tokens=20, sampling=cfg)
    b = generate(onnx_model, PROMPTS, max_new_tokens=20, sampling=cfg)
    c = generate(
        onnx_model,
        PROMPTS,
        max_new_tokens=20,
        sampling=SamplingConfig(strategy="top-k", top_k=50, top_p=0.95, seed=99),
    )
    assert [o.text for o in a.outputs] == [o.text for o in b.outputs]
    assert [o.token_ids for o in a.outputs] != [o.token_ids for o in c.outputs]


def test_streaming_reassembles_the_text(onnx_model):
    pieces: list[str] = []
    result = generate(
        onnx_model, PROMPTS[:1], max_new_tokens=20, on_text=lambda row, s: pieces.append(s)
    )
    assert "".join(pieces) == result.outputs[0].text


def test_stops_at_eos_per_row(tiny_export, onnx_model):
    """Rows end at EOS independently: make EOS the first greedy token of one prompt."""
    import json

    _, out, _ = tiny_export
    first = generate(onnx_model, PROMPTS, max_new_tokens=1).outputs
    config = json.loads((out / "generation_config.json").read_text())
    original = config.get("eos_token_id")
    try:
        config["eos_token_id"] = first[0].token_ids[0]
        (out / "generation_config.json").write_text(json.dumps(config))
        result = generate(onnx_model, PROMPTS, max_new_tokens=10)
    finally:
        config["eos_token_id"] = original
        (out / "generation_config.json").write_text(json.dumps(config))
    assert result.outputs[0].token_ids == first[0].token_ids[:1]
    assert result.outputs[0].finish_reason == "eos"
    assert result.outputs[1].new_tokens == 10 or result.outputs[1].finish_reason == "eos"


def test_timing_is_reported(onnx_model):
    result = generate(onnx_model, PROMPTS, max_new_tokens=8)
    t = result.timing
    assert t.prefill_s > 0 and t.decode_s > 0
    assert t.decode_tokens == sum(max(o.new_tokens - 1, 0) for o in result.outputs)
    assert t.decode_tokens_per_s == pytest.approx(t.decode_tokens / t.decode_s)
    d = result.to_dict()
    assert set(d) >= {"provider", "outputs", "timing"}
    assert set(d["outputs"][0]) >= {"prompt", "text", "token_ids", "new_tokens"}
    assert set(d["timing"]) >= {"prefill_s", "decode_tokens_per_s"}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_new_tokens": 0}, "max-new-tokens"),
        ({"sampling": SamplingConfig(strategy="top-k", top_k=0)}, "top-k"),
        ({"sampling": SamplingConfig(strategy="top-k", top_p=1.5)}, "top-p"),
        ({"sampling": SamplingConfig(strategy="top-k", temperature=0.0)}, "temperature"),
        ({"sampling": SamplingConfig(strategy="beam")}, "strategy"),
        ({"max_new_tokens": 10_000}, "context"),
    ],
)
def test_bad_parameters(onnx_model, kwargs, match):
    with pytest.raises(UsageError, match=match):
        generate(onnx_model, PROMPTS, **kwargs)


def test_empty_prompt_refused(onnx_model):
    with pytest.raises(UsageError, match="empty"):
        generate(onnx_model, ["   "])
