"""Sliding-window perplexity: window planning, and ORT against transformers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import load_hf
from llmtool.errors import UsageError
from llmtool.evaluate import evaluate_perplexity
from llmtool.evaluate.protocols import plan_windows


@pytest.mark.parametrize(
    ("n", "max_length", "stride"), [(10, 4, 2), (101, 32, 7), (5, 8, 4), (64, 64, 1)]
)
def test_every_token_but_the_first_is_scored_once(n, max_length, stride):
    scored = []
    for w in plan_windows(n, max_length, stride):
        assert w.end - w.begin <= max_length
        assert w.score_from > w.begin  # every scored token has context in its window
        scored.extend(range(w.score_from, w.end))
    assert scored == list(range(1, n))


def test_disjoint_windows_skip_each_window_start():
    """With stride == max_length a window's first token has no context, so (as in the guide) it is not scored."""
    windows = plan_windows(100, 16, 16)
    scored = [t for w in windows for t in range(w.score_from, w.end)]
    assert sorted(set(range(100)) - set(scored)) == [w.begin for w in windows]


def transformers_sliding_window(hf_dir, text, max_length, stride):
    """The transformers perplexity guide's loop, with the NLL summed exactly per scored token."""
    import torch

    loaded = load_hf(hf_dir)
    ids = loaded.tokenizer(text, return_tensors="pt")["input_ids"]
    seq_len = ids.size(1)
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        trg_len = end - prev_end
        input_ids = ids[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = loaded.model(input_ids, labels=target_ids).loss
        scored = int((target_ids[:, 1:] != -100).sum())  # labels shift left by one inside the model
        nll_sum += float(loss) * scored
        n_tokens += scored
        prev_end = end
        if end == seq_len:
            break
    return math.exp(nll_sum / n_tokens), n_tokens


@pytest.mark.parametrize(("max_length", "stride"), [(64, 32), (128, 128), (48, 17)])
def test_onnx_perplexity_equals_transformers(tiny_export, sample_text_file, max_length, stride):
    hf, out, _ = tiny_export
    text = sample_text_file.read_text(encoding="utf-8")
    expected, tokens = transformers_sliding_window(hf, text, max_length, stride)
    result = evaluate_perplexity(
        out, sample_text_file, max_length=max_length, stride=stride, provider="cpu"
    )
    assert result.tokens == tokens
    assert result.perplexity == pytest.approx(expected, rel=1e-4)
    assert result.nll == pytest.approx(math.log(expected), rel=1e-4)
    n_bytes = len(text.encode("utf-8"))
    assert result.bits_per_byte == pytest.approx(result.nll * result.tokens / math.log(2) / n_bytes)


def test_defaults_follow_the_model_context(tiny_export, sample_text_file):
    _, out, result = tiny_export
    r = evaluate_perplexity(out, sample_text_file, provider="cpu")
    assert r.max_length == min(result.manifest["max_positions"], 1024)
    assert r.stride == r.max_length // 2


def test_random_model_is_near_uniform(tiny_export, sample_text_file):
    """A random model's perplexity is of the order of its vocabulary, a sanity bound on the scale."""
    _, out, result = tiny_export
    r = evaluate_perplexity(out, sample_text_file, provider="cpu")
    assert 0.1 * result.manifest["vocab_size"] < r.perplexity < 10 * result.manifest["vocab_size"]


@pytest.mark.parametrize(
    ("content", "kwargs", "match"),
    [
        (b"", {}, "empty"),
        (b"caf\xe9 au lait", {}, "offset 3"),
        (b"some text here", {"max_length": 100_000}, "exceeds the model's context"),
        (b"some text here to score", {"max_length": 8, "stride": 9}, "stride"),
    ],
)
def test_bad_data(tiny_export, tmp_path, content, kwargs, match):
    _, out, _ = tiny_export
    data = tmp_path / "data.txt"
    data.write_bytes(content)
    with pytest.raises(UsageError, match=match):
        evaluate_perplexity(out, data, provider="cpu", **kwargs)


def test_missing_data_file(tiny_export, tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        evaluate_perplexity(tiny_export[1], tmp_path / "nope.txt", provider="cpu")


def test_token_nll_matches_log_softmax():
    from llmtool.evaluate.metrics import token_nll

    rng = np.random.default_rng(0)
    logits = rng.normal(scale=5, size=(7, 50)).astype(np.float32)
    targets = rng.integers(0, 50, size=7)
    shifted = logits - logits.max(-1, keepdims=True)
    expected = -(shifted - np.log(np.exp(shifted).sum(-1, keepdims=True)))[np.arange(7), targets]
    np.testing.assert_allclose(token_nll(logits, targets), expected, rtol=1e-5)


def test_token_nll_in_place_and_nonfinite_count():
    """Scoring in place gives the same NLL; the fast non-finite count equals isfinite's."""
    from llmtool.evaluate.metrics import count_nonfinite, token_nll

    rng = np.random.default_rng(1)
    logits = rng.normal(scale=5, size=(9, 64)).astype(np.float32)
    targets = rng.integers(0, 64, size=9)
    expected = token_nll(logits, targets)
    scratch = logits.copy()
    np.testing.assert_array_equal(token_nll(scratch, targets, overwrite=True), expected)
    assert not np.array_equal(scratch, logits)  # the buffer was used
    assert count_nonfinite(logits) == 0
    for bad in (np.nan, np.inf, -np.inf):
        poisoned = logits.copy()
        poisoned[2, 3] = poisoned[5, 0] = bad
        assert count_nonfinite(poisoned) == 2
    assert count_nonfinite(np.zeros((0, 64), np.float32)) == 0


def test_window_logits_into_a_reused_buffer(tiny_export):
    """IO binding into the kept buffer gives the same logits as a plain run, in one buffer."""
    from llmtool.runtime import OnnxCausalLM

    model = OnnxCausalLM(tiny_export[1], "cpu")
    ids = np.arange(3, 15, dtype=np.int64)[None, :]  # [1, 12]
    plain = model.window_logits(ids)
    reused = model.window_logits(ids, reuse=True)
    np.testing.assert_array_equal(reused, plain)
    again = model.window_logits(ids[:, :5], reuse=True)  # a shorter last window: a new buffer
    np.testing.assert_allclose(again, plain[:, :5], rtol=1e-5, atol=1e-5)
    assert model.window_logits(ids[:, :5], reuse=True) is again
