"""The sampler on synthetic logits."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from llmtool.sampling import Sampler, SamplingConfig


def test_greedy_is_argmax():
    logits = np.random.default_rng(0).normal(size=(4, 100)).astype(np.float32)
    assert (Sampler(SamplingConfig())(logits) == logits.argmax(-1)).all()


@settings(max_examples=60, deadline=None)
@given(
    k=st.integers(1, 20),
    p=st.floats(0.05, 1.0),
    temperature=st.floats(0.1, 3.0),
    seed=st.integers(0, 2**31),
)
def test_samples_stay_in_top_k_and_nucleus(k, p, temperature, seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=3.0, size=(3, 64)).astype(np.float32)
    sampler = Sampler(
        SamplingConfig(strategy="top-k", top_k=k, top_p=p, temperature=temperature, seed=seed)
    )
    for _ in range(5):
        tokens = sampler(logits)
        for row, tok in zip(logits, tokens, strict=True):
            order = np.argsort(-row, kind="stable")
            assert tok in order[:k]
            probs = np.exp((row[order[:k]] - row[order[0]]) / temperature)
            probs /= probs.sum()
            # The chosen token lies within the nucleus: the mass before it is below p.
            rank = int(np.flatnonzero(order[:k] == tok)[0])
            assert probs[:rank].sum() < p + 1e-6


def test_distribution_follows_softmax():
    logits = np.log(np.array([[0.5, 0.3, 0.2]], dtype=np.float32))
    sampler = Sampler(SamplingConfig(strategy="top-k", top_k=3, seed=0))
    counts = np.bincount([int(sampler(logits)[0]) for _ in range(6000)], minlength=3) / 6000
    np.testing.assert_allclose(counts, [0.5, 0.3, 0.2], atol=0.03)


def test_tiny_top_p_is_greedy():
    logits = np.random.default_rng(3).normal(size=(5, 50)).astype(np.float32)
    sampler = Sampler(SamplingConfig(strategy="top-k", top_k=50, top_p=1e-6, seed=0))
    assert (sampler(logits) == logits.argmax(-1)).all()
