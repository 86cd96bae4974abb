"""Fidelity to a reference: a model against itself, against its PyTorch source, and bad pairs."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import save_tiny_model
from llmtool.errors import UsageError
from llmtool.evaluate.perplexity import evaluate_perplexity
from llmtool.evaluate.reference import load_reference
from llmtool.runtime import OnnxCausalLM


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """PyTorch on one thread: on a small shared CPU its thread pool only adds waiting."""
    from llmtool.evaluate.run import torch_threads

    with torch_threads(1):
        yield


def test_an_export_against_itself_is_identical(tiny_llama_export, sample_text_file):
    _, onnx_dir = tiny_llama_export
    r = evaluate_perplexity(
        onnx_dir, sample_text_file, max_length=64, provider="cpu", reference=str(onnx_dir)
    )
    ref = r.reference
    assert ref["kind"] == "onnx" and ref["tokens"] == r.tokens
    assert ref["kl_divergence"] == {"mean": 0.0, "median": 0.0, "p99": 0.0, "max": 0.0}
    assert ref["top1_agreement"] == 1.0
    assert ref["delta_perplexity"] == 0.0 and ref["log_ppl_ratio"] == 0.0
    assert ref["perplexity"] == r.perplexity and ref["nonfinite_logits"] == 0
    assert ref["standard_error"] == r.standard_error


def test_an_export_against_its_pytorch_source(tiny_llama_export, sample_text_file):
    hf_dir, onnx_dir = tiny_llama_export
    r = evaluate_perplexity(
        onnx_dir,
        sample_text_file,
        protocol="lm-eval",
        max_length=48,
        provider="cpu",
        reference=str(hf_dir),
    )
    ref = r.reference
    assert ref["kind"] == "pytorch" and ref["device"] == "cpu"
    assert ref["top1_agreement"] == 1.0
    assert (
        0.0
        <= ref["kl_divergence"]["mean"]
        <= ref["kl_divergence"]["p99"]
        <= ref["kl_divergence"]["max"]
        < 1e-6
    )
    assert ref["perplexity"] == pytest.approx(r.perplexity, rel=1e-5)
    assert abs(ref["log_ppl_ratio"]) < 1e-5
    assert ref["delta_perplexity"] == pytest.approx(r.perplexity - ref["perplexity"], abs=1e-9)


def test_nonfinite_logits_are_counted(tiny_llama_export, sample_text_file):
    """A model emitting NaN and Inf: counted in the scored logits and in the fidelity report."""
    _, onnx_dir = tiny_llama_export
    model = OnnxCausalLM(onnx_dir, "cpu")
    clean = model.window_logits
    poisoned = []

    def window_logits(ids: np.ndarray, reuse: bool = False) -> np.ndarray:
        logits = clean(ids).copy()
        logits[0, -2, :3] = [
            np.nan,
            np.inf,
            -np.inf,
        ]  # the second-to-last position is always scored
        poisoned.append(1)
        return logits

    reference = load_reference(onnx_dir, "cpu")
    model.window_logits = window_logits  # type: ignore[method-assign]
    r = evaluate_perplexity(
        model, sample_text_file, max_length=64, provider="cpu", reference=reference
    )
    assert r.nonfinite_logits == 3 * len(poisoned) == 3 * r.windows
    assert r.reference["nonfinite_logits"] == 3 * r.windows
    assert r.reference["top1_agreement"] < 1.0


def test_a_reference_with_another_tokenizer_is_refused(
    tiny_llama_export, sample_text_file, tmp_path
):
    from llmtool.train.tokenizer import train_bpe_tokenizer

    other = train_bpe_tokenizer(["completely different words " * 50], vocab_size=300)
    hf = save_tiny_model("llama", other, tmp_path / "other")
    with pytest.raises(
        UsageError, match=r"encodes sample\.txt differently .*first difference at token"
    ):
        evaluate_perplexity(
            tiny_llama_export[1], sample_text_file, max_length=64, provider="cpu", reference=str(hf)
        )


def test_a_missing_reference_is_a_usage_error(tiny_llama_export, sample_text_file, tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        evaluate_perplexity(
            tiny_llama_export[1], sample_text_file, provider="cpu", reference=str(tmp_path / "nope")
        )
