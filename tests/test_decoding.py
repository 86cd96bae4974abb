"""Penalties, min-p, structured output and logprobs: against transformers and numpy references."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from conftest import load_hf
from llmtool.decoding.processors import NgramIndex, RowHistory, apply_processors
from llmtool.errors import UsageError
from llmtool.generate import generate
from llmtool.runtime import OnnxCausalLM
from llmtool.sampling import Sampler, SamplingConfig

PENALTIES = {"repetition_penalty": 1.3, "no_repeat_ngram_size": 3}
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "ok"],
    "additionalProperties": False,
}


def transformers_penalized(loaded, prompt_ids, max_new_tokens):
    """transformers' greedy generate with repetition_penalty=1.3 and no_repeat_ngram_size=3."""
    import torch

    with torch.no_grad():
        out = loaded.model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=loaded.tokenizer.pad_token_id or 0,
            generation_config=loaded.generation_config,
            **PENALTIES,
        )
    row = out[0, len(prompt_ids) :].tolist()
    eos = loaded.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    for i, t in enumerate(row):
        if t in eos:
            return row[: i + 1]
    return row


@pytest.fixture(scope="module")
def onnx_model(tiny_export):
    return OnnxCausalLM(tiny_export[1], "cpu")


def test_penalized_greedy_matches_transformers(tiny_export, onnx_model):
    loaded = load_hf(tiny_export[0])
    for prompt in ["The keeper climbed the steps", "A ship, a ship"]:
        ids = list(loaded.tokenizer(prompt)["input_ids"])
        expected = transformers_penalized(loaded, ids, 40)
        got = generate(onnx_model, [ids], max_new_tokens=40, sampling=SamplingConfig(**PENALTIES))
        assert got.outputs[0].token_ids == expected
        plain = generate(onnx_model, [ids], max_new_tokens=40).outputs[0].token_ids
        # The penalties change the text (else this test could not fail), and no generated token
        # completes a 3-gram seen before it (the prompt itself may repeat one).
        assert plain != expected
        seq = ids + got.outputs[0].token_ids
        grams = [tuple(seq[i : i + 3]) for i in range(len(seq) - 2)]
        for end in range(len(ids), len(seq)):
            assert tuple(seq[end - 2 : end + 1]) not in grams[: end - 2]


def test_processors_match_transformers_processors():
    """Repetition penalty and no-repeat n-gram on random scores vs transformers' own classes."""
    import torch
    from transformers import NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 4):
        history = rng.integers(0, 12, size=30).tolist()
        scores = rng.normal(scale=3, size=50)
        ours = scores.copy()
        row = RowHistory(list(history), 10, ngrams=NgramIndex(n))
        apply_processors(ours, row, repetition=1.7)
        ids, ref = torch.tensor([history]), torch.tensor([scores])
        ref = RepetitionPenaltyLogitsProcessor(1.7)(ids, ref)
        ref = NoRepeatNGramLogitsProcessor(n)(ids, ref)
        np.testing.assert_allclose(ours, ref[0].numpy())


def test_presence_frequency_follow_openai_definition():
    """OpenAI: logit -= count * frequency + (count > 0) * presence, over generated tokens only."""
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(1, 40)).astype(np.float32)
    cfg = SamplingConfig(presence_penalty=0.7, frequency_penalty=0.4, logprobs=20)
    sampler = Sampler(cfg)
    prompt = [3, 3, 5]  # prompt tokens are not penalized
    sampler.begin([prompt])
    generated: list[int] = []
    for _ in range(8):
        token = int(sampler(logits)[0])
        counts = Counter(generated)
        ref = logits[0].astype(np.float64).copy()
        for t, c in counts.items():
            ref[t] -= c * 0.4 + 0.7
        logp = ref - np.log(np.exp(ref).sum())
        record = sampler.logprobs[0][-1]
        assert token == int(np.argmax(ref)) and record["logprob"] == pytest.approx(logp[token])
        order = np.argsort(-logp, kind="stable")[:20]
        assert [a["token"] for a in record["top"]] == order.tolist()
        np.testing.assert_allclose([a["logprob"] for a in record["top"]], logp[order], rtol=1e-9)
        generated.append(token)
    assert len(set(generated)) > 1  # the penalties moved greedy off its first choice


def test_min_p_matches_definition_and_transformers():
    import torch
    from transformers import MinPLogitsWarper

    rng = np.random.default_rng(2)
    logits = rng.normal(scale=2, size=(1, 60)).astype(np.float32)
    for min_p in (0.05, 0.2, 0.6):
        cfg = SamplingConfig(strategy="top-k", top_k=60, temperature=0.8, min_p=min_p, seed=0)
        top, probs = Sampler(cfg)._warp(logits[0].astype(np.float64))
        scaled = logits[0].astype(np.float64) / 0.8
        full = np.exp(scaled - scaled.max())
        full /= full.sum()
        kept = np.flatnonzero(full >= min_p * full.max())  # the definition
        assert sorted(top.tolist()) == kept.tolist()
        np.testing.assert_allclose(probs, full[top] / full[kept].sum(), rtol=1e-9)
        warped = MinPLogitsWarper(min_p)(None, torch.tensor(logits / 0.8))
        assert np.flatnonzero(np.isfinite(warped[0].numpy())).tolist() == kept.tolist()
        sampler = Sampler(cfg)
        draws = {int(sampler(logits)[0]) for _ in range(300)}
        assert draws <= set(kept.tolist())


def test_plain_greedy_reads_only_the_argmax():
    """No processor: greedy never fetches logits (the fused CUDA path keeps argmax on device)."""

    class ArgmaxOnly:
        def argmax(self):
            return np.array([7], dtype=np.int64)

        def logits(self):
            raise AssertionError("logits fetched")

    assert Sampler(SamplingConfig()).choose(ArgmaxOnly()).tolist() == [7]
    for cfg in (SamplingConfig(**PENALTIES), SamplingConfig(logprobs=2)):
        assert Sampler(cfg).needs_logits


def test_logprobs_match_transformers_logits(tiny_export, onnx_model):
    import torch

    loaded = load_hf(tiny_export[0])
    ids = list(loaded.tokenizer("The keeper climbed")["input_ids"])
    out = generate(onnx_model, [ids], max_new_tokens=6, sampling=SamplingConfig(logprobs=3))
    records = out.outputs[0].logprobs
    assert [r["token"] for r in records] == out.outputs[0].token_ids
    with torch.no_grad():
        logits = loaded.model(torch.tensor([ids + out.outputs[0].token_ids])).logits[0]
    ref = torch.log_softmax(logits.double(), -1).numpy()
    for i, record in enumerate(records):
        row = ref[len(ids) - 1 + i]
        assert record["logprob"] == pytest.approx(row[record["token"]], abs=1e-4)
        assert [a["token"] for a in record["top"]] == np.argsort(-row)[:3].tolist()
        assert record["top"][0]["logprob"] == pytest.approx(row.max(), abs=1e-4)
        assert isinstance(record["text"], str)


def test_json_schema_outputs_validate(onnx_model):
    jsonschema = pytest.importorskip("jsonschema")
    texts = []
    for seed in range(20):
        cfg = SamplingConfig(strategy="top-k", top_k=40, seed=seed, json_schema=json.dumps(SCHEMA))
        out = generate(onnx_model, ["A ship"], max_new_tokens=80, sampling=cfg).outputs[0]
        assert out.finish_reason == "eos"
        value = json.loads(out.text)
        jsonschema.validate(value, SCHEMA)
        texts.append(out.text)
    assert len(set(texts)) > 10  # sampled, not one forced string


def test_regex_outputs_match(onnx_model):
    import re

    pattern = r"[A-Z][a-z]{2,6} (yes|no)\."
    for seed in range(5):
        cfg = SamplingConfig(strategy="top-k", seed=seed, regex=pattern)
        out = generate(onnx_model, ["A ship"], max_new_tokens=40, sampling=cfg).outputs[0]
        assert re.fullmatch(pattern, out.text), out.text


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"repetition_penalty": 0.0}, "repetition-penalty"),
        ({"presence_penalty": 2.5}, "presence-penalty"),
        ({"frequency_penalty": -3.0}, "frequency-penalty"),
        ({"min_p": 1.5}, "min-p"),
        ({"no_repeat_ngram_size": -1}, "no-repeat-ngram-size"),
        ({"logprobs": 21}, "logprobs"),
        ({"json_schema": "{not json"}, "not valid JSON"),
        ({"json_schema": '{"type": "wrong"}'}, "JSON schema cannot be compiled"),
        ({"regex": "a(b"}, "regex cannot be compiled"),
        ({"regex": "a", "json_schema": "{}"}, "exactly one"),
    ],
)
def test_bad_settings_are_usage_errors(kwargs, match):
    with pytest.raises(UsageError, match=match):
        SamplingConfig(**kwargs).validate()


def test_cli_schema_logprobs_json(tiny_export, tmp_path):
    from typer.testing import CliRunner

    from llmtool.cli import app

    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    args = ["generate", str(tiny_export[1]), "-p", "A ship", "--provider", "cpu", "--json"]
    args += ["--json-schema", str(schema), "--strategy", "top-k", "--max-new-tokens", "80"]
    args += ["--logprobs", "2", "--repetition-penalty", "1.1", "--min-p", "0.05"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    out = data["outputs"][0]
    assert json.loads(out["text"]).keys() == SCHEMA["properties"].keys()
    assert len(out["logprobs"]) == out["new_tokens"]
    assert all(len(r["top"]) <= 2 and r["logprob"] <= 0 for r in out["logprobs"])
    assert data["sampling"]["min_p"] == 0.05


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--repetition-penalty", "-1"], "--repetition-penalty must be greater than 0"),
        (["--presence-penalty", "3"], "--presence-penalty must be in [-2, 2]"),
        (["--regex", "a("], "The regex cannot be compiled"),
        (["--json-schema", "/nonexistent.json"], "Cannot read the JSON schema"),
    ],
)
def test_cli_bad_settings_exit_2(tiny_export, args, message):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "llmtool", "generate", str(tiny_export[1]), "-p", "hi", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
