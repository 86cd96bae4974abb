"""llmtool's protocols against the tools they are named after, run for real (``nox -s crosscheck``).

* lm-evaluation-harness (``lm-eval``): its HF model's ``loglikelihood_rolling`` on the same model
  (a tiny random Llama, and SmolLM2-135M) and documents, its wikitext task's own detokenizer and word/byte counts; llmtool's
  ``--protocol lm-eval --preprocess wikitext`` must give the same figures within 1e-4.
* llama.cpp (``llama-cpp-python``): llama-perplexity's procedure on the SmolLM2 GGUF; llmtool's
  ``--protocol llama-cpp`` on the export of the same GGUF within 1e-2 (llama.cpp's quantized
  arithmetic).

Each test is skipped when its peer is not installed; the ``crosscheck`` marker keeps them out of
the default run.
"""

from __future__ import annotations

import importlib.util
import math
import re

import numpy as np
import pytest

from conftest import SHARED_DATA
from llmtool.evaluate.perplexity import evaluate_perplexity
from llmtool.evaluate.preprocess import wikitext_detokenize

pytestmark = pytest.mark.crosscheck
WIKITEXT = SHARED_DATA / "wikitext-2-raw-test.txt"


def wikitext_pages(limit: int) -> list[str]:
    """The first pages of the WikiText-2 raw test split, split at top-level headings."""
    if not WIKITEXT.is_file():
        pytest.skip(f"{WIKITEXT} is not here")
    text = WIKITEXT.read_text(encoding="utf-8")
    starts = [m.start() for m in re.finditer(r"^ = [^=].* = \n", text, flags=re.M)]
    pages = [text[a:b] for a, b in zip(starts, [*starts[1:], len(text)], strict=False)]
    return pages[:limit]


def test_wikitext_detokenizer_equals_lm_evals():
    pytest.importorskip("lm_eval")
    from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer

    pages = wikitext_pages(10_000)
    assert len(pages) > 50
    for page in pages:
        assert wikitext_detokenize(page) == wikitext_detokenizer({"page": page})


def test_lm_eval_wikitext_figures(tiny_llama_export, tmp_path):
    """lm-eval's rolling loglikelihood and word perplexity on the same tiny model and pages."""
    pytest.importorskip("lm_eval")
    from conftest import load_hf

    hf_dir, onnx_dir = tiny_llama_export
    check_lm_eval_figures(load_hf(hf_dir), onnx_dir, tmp_path)


@pytest.mark.slow
def test_lm_eval_wikitext_figures_on_smollm2(smollm2_export, tmp_path):
    """The same on the real SmolLM2-135M: its PyTorch model in lm-eval, its export in llmtool."""
    pytest.importorskip("lm_eval")
    from llmtool.models.loading import load_model

    check_lm_eval_figures(load_model("smollm2"), smollm2_export.out, tmp_path)


def check_lm_eval_figures(loaded, onnx_dir, tmp_path) -> None:
    """lm-eval's figures on ``loaded`` (HFLM) equal llmtool's ``--protocol lm-eval
    --preprocess wikitext`` on ``onnx_dir``, within 1e-4."""
    import json

    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks.wikitext.preprocess_wikitext import process_results, wikitext_detokenizer

    pages = [p[:3000] for p in wikitext_pages(3)]
    data = tmp_path / "pages.jsonl"
    data.write_text("".join(json.dumps({"text": p}) + "\n" for p in pages), encoding="utf-8")
    lm = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=1, device="cpu")
    requests = [
        Instance("loglikelihood_rolling", {"page": p}, (wikitext_detokenizer({"page": p}),), i)
        for i, p in enumerate(pages)
    ]
    loglik = lm.loglikelihood_rolling(requests, disable_tqdm=True)
    results = [
        process_results({"page": p}, [(ll, False)]) for p, ll in zip(pages, loglik, strict=True)
    ]
    total = sum(loglik)
    words = sum(r["word_perplexity"][1] for r in results)
    n_bytes = sum(r["byte_perplexity"][1] for r in results)

    # Defaults: lm-eval's window is the model's context, as llmtool's now is.
    r = evaluate_perplexity(
        onnx_dir, data, protocol="lm-eval", preprocess="wikitext", provider="cpu"
    )
    assert r.max_length == lm.max_length
    assert (r.words, r.bytes) == (words, n_bytes)
    assert -r.nll * r.tokens == pytest.approx(total, rel=1e-4)
    assert r.word_perplexity == pytest.approx(math.exp(-total / words), rel=1e-4)
    assert r.byte_perplexity == pytest.approx(math.exp(-total / n_bytes), rel=1e-4)
    assert r.bits_per_byte == pytest.approx(-total / n_bytes / math.log(2), rel=1e-4)


def llama_perplexity(llm, text: str, n_ctx: int) -> tuple[np.ndarray, np.ndarray]:
    """llama-perplexity's procedure (``-c n_ctx``) through llama-cpp-python: (ids, per-token NLL).

    As ``perplexity.cpp``: tokenize with BOS only when the GGUF's ``add_bos_token`` says so,
    ``N // n_ctx`` chunks, a chunk's first token replaced by BOS when BOS is added, the logits
    at chunk positions ``n_ctx/2 .. n_ctx-2`` score the next tokens (log-softmax in float64
    here; the tool's own is float32 with a float64 sum, 1e-7 apart).
    """
    add_bos = llm.metadata.get("tokenizer.ggml.add_bos_token", "true") == "true"
    ids = llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=False)
    nll = []
    first = n_ctx // 2
    for i in range(len(ids) // n_ctx):
        chunk = list(ids[i * n_ctx : (i + 1) * n_ctx])
        if add_bos:
            chunk[0] = llm.token_bos()
        llm.reset()
        llm.eval(chunk)
        logits = np.asarray(llm.scores[:n_ctx], dtype=np.float64)
        logits -= logits.max(axis=-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
        nll += [-logp[j, chunk[j + 1]] for j in range(first, n_ctx - 1)]
    return np.asarray(ids), np.asarray(nll)


@pytest.mark.slow
def test_llama_cpp_perplexity_on_smollm2(tmp_path):
    """llama-perplexity's chunks on the SmolLM2 GGUF through llama-cpp-python, n_ctx 128.

    The export takes minutes on a small machine: ``LLMTOOL_CROSSCHECK_ONNX`` names an fp32
    export of ``smollm2`` to reuse.
    """
    if importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llama-cpp-python and gguf are needed")
    import os
    from pathlib import Path

    from llama_cpp import Llama

    from llmtool.export import export_model
    from llmtool.models.loading import smollm2_path
    from llmtool.runtime import OnnxCausalLM

    n_ctx = 128
    text = wikitext_detokenize("".join(wikitext_pages(2)))[:6000]
    data = tmp_path / "text.txt"
    data.write_text(text, encoding="utf-8")
    llm = Llama(str(smollm2_path()), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=2)
    ids, nll = llama_perplexity(llm, text, n_ctx)
    reuse = os.environ.get("LLMTOOL_CROSSCHECK_ONNX")
    onnx = Path(reuse) if reuse else export_model("smollm2", tmp_path / "onnx").out
    model = OnnxCausalLM(onnx, "cpu")
    # The same token ids: the tokenizer transformers builds from the GGUF is llama.cpp's.
    assert model.tokenizer(text)["input_ids"] == ids.tolist()
    r = evaluate_perplexity(model, data, protocol="llama-cpp", max_length=n_ctx)
    assert r.tokens == len(nll) == (len(ids) // n_ctx) * (n_ctx - 1 - n_ctx // 2)
    # llama.cpp's Q4_1 x Q8_1 arithmetic against fp32 here (-0.62% measured at n_ctx 1024).
    assert r.perplexity == pytest.approx(math.exp(nll.mean()), rel=1e-2)
    # The same weights in F32 for llama.cpp too: what is left is the protocol's (2e-5 measured).
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from eval_speed import f32_gguf

    f32 = Llama(
        str(f32_gguf(smollm2_path(), tmp_path / "f32.gguf")),
        n_ctx=n_ctx,
        logits_all=True,
        verbose=False,
        n_threads=2,
    )
    _, nll_f32 = llama_perplexity(f32, text, n_ctx)
    assert r.perplexity == pytest.approx(math.exp(nll_f32.mean()), rel=1e-4)
