"""Beam search over an encoder-decoder export, step for step as transformers' ``num_beams``.

The algorithm is transformers' vectorized beam search (``GenerationMixin._beam_search``), so the
same model gives the same output: per step, log-softmax the logits of every running beam, add
its score, keep the top ``max(2, 1 + n_eos) * num_beams`` continuations of each source;
continuations that end (EOS, or the length limit) among the top ``num_beams`` become finished
hypotheses scored ``sum log p / (generated length ** length_penalty)``; the best ``num_beams``
that did not end run on, and the cache rows are gathered to follow them. The search of a source
stops when ``early_stopping`` says so (``True``: ``num_beams`` finished hypotheses; ``False``:
transformers' heuristic that the best running beam, scored at its current length, cannot beat
the worst finished one; ``"never"``: scored at the longest possible length when the penalty is
positive). Scores are float32 with transformers' ``-1e9`` for "impossible".

Arrays are [batch, beams] (or [batch, keep]); the decoder's cache rows are ``b * beams + k``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from llmtool.runtime.seq2seq import Seq2SeqDecoder
from llmtool.seq2seq.constraints import Constraints

NEG = np.float32(-1.0e9)


@dataclass
class BeamResult:
    """The best hypothesis of each source: its tokens (EOS included) and score."""

    token_ids: list[list[int]]
    scores: list[float]
    steps: int


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float32 log-softmax over the last axis."""
    logits = logits.astype(np.float32)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _topk(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest of each row, largest first (ties: lower index first)."""
    return np.argsort(-scores, axis=-1, kind="stable")[:, :k]


def _take(array: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``array[b, index[b, j]]`` for every b, j (extra trailing axes kept)."""
    return np.take_along_axis(array, index.reshape(*index.shape, *[1] * (array.ndim - 2)), axis=1)


@dataclass(frozen=True)
class BeamSettings:
    """transformers' generation-config fields that shape the search.

    Attributes:
        num_beams: Beams per source (>= 2).
        length_penalty: Exponent on the generated length dividing a finished score.
        early_stopping: ``True``, ``False`` or ``"never"``.
        max_new_tokens: Tokens generated at most (EOS included).
    """

    num_beams: int
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    max_new_tokens: int = 64


def beam_search(
    decoder: Seq2SeqDecoder,
    sources: Sequence[Sequence[int]],
    settings: BeamSettings,
    start: int,
    eos: Sequence[int],
    pad: int,
    constraints: Constraints | None = None,
) -> BeamResult:
    """Run a beam search for every source at once.

    ``constraints`` (the generation config's forced / banned tokens and minimum length) apply
    to the log-probabilities, as transformers' logits processors do in its beam search.

    Returns:
        The best finished hypothesis per source (tokens after the start token).
    """
    batch, beams = len(sources), settings.num_beams
    keep = max(2, 1 + len(eos)) * beams
    max_len = 1 + settings.max_new_tokens  # the start token counts, as decoder_prompt_len
    eos_ids = np.array(list(eos), dtype=np.int64)
    fill = pad if pad else (int(eos_ids[0]) if len(eos_ids) else -1)
    running = np.full((batch, beams, max_len), fill, dtype=np.int64)
    running[:, :, 0] = start
    finished_seqs = running.copy()
    finished_lens = np.zeros((batch, beams), dtype=np.int64)
    running_scores = np.zeros((batch, beams), dtype=np.float32)
    running_scores[:, 1:] = NEG  # only the first beam's tokens count at the first step
    finished_scores = np.full((batch, beams), NEG, dtype=np.float32)
    is_finished = np.zeros((batch, beams), dtype=bool)
    improvable = np.ones((batch, 1), dtype=bool)
    top_mask = np.arange(keep) < beams
    penalty, early = settings.length_penalty, settings.early_stopping

    logits = decoder.prefill(sources).logits()  # [batch, vocab]
    decoder.expand(beams)
    logits = np.repeat(logits, beams, axis=0)  # [batch * beams, vocab]
    cur_len, steps = 1, 0
    while True:
        steps += 1
        vocab = logits.shape[-1]
        logp = log_softmax(logits)
        if constraints is not None:
            history = running[:, :, :cur_len].reshape(batch * beams, cur_len)
            logp = constraints.apply(logp, cur_len, max_len, history)
        scores = logp.reshape(batch, beams, vocab) + running_scores[:, :, None]
        scores = scores.reshape(batch, beams * vocab)
        top = _topk(scores, keep)  # [batch, keep]
        top_scores = np.take_along_axis(scores, top, axis=1)
        parent, token = top // vocab, top % vocab
        cand = _take(running, parent).copy()  # [batch, keep, max_len]
        cand[:, :, cur_len] = token
        ends = np.isin(token, eos_ids) | (cur_len + 1 >= max_len)

        # The best beams that did not end run on.
        run_scores = top_scores + ends.astype(np.float32) * NEG
        nxt = _topk(run_scores, beams)
        running = _take(cand, nxt)
        running_scores = np.take_along_axis(run_scores, nxt, axis=1)
        parents = np.take_along_axis(parent, nxt, axis=1)

        # Ended continuations among the top `beams` join the finished hypotheses if better.
        just = ends & top_mask[None, :]
        final = top_scores / np.float32((cur_len + 1 - 1) ** penalty)
        full = is_finished.all(axis=1, keepdims=True) & (early is True)
        final = final + full.astype(np.float32) * NEG + (~improvable).astype(np.float32) * NEG
        final = final + (~just).astype(np.float32) * NEG
        merged_scores = np.concatenate([finished_scores, final], axis=1)
        best = _topk(merged_scores, beams)
        finished_scores = np.take_along_axis(merged_scores, best, axis=1)
        finished_seqs = _take(np.concatenate([finished_seqs, cand], axis=1), best)
        lens = np.concatenate([finished_lens, np.full((batch, keep), cur_len + 1)], axis=1)
        finished_lens = np.take_along_axis(lens, best, axis=1)
        is_finished = np.take_along_axis(np.concatenate([is_finished, just], axis=1), best, axis=1)

        cur_len += 1
        length = (max_len - 1) if (early == "never" and penalty > 0.0) else (cur_len - 1)
        best_running = running_scores[:, :1] / np.float32(length**penalty)
        worst = np.where(is_finished, finished_scores.min(axis=1, keepdims=True), NEG)
        improvable = improvable & (best_running > worst).any(axis=1, keepdims=True)
        go_on = improvable.any() and not (is_finished.all() and early is True) and not ends.all()
        if not go_on:
            break
        decoder.reorder((parents + np.arange(batch)[:, None] * beams).reshape(-1))
        logits = decoder.step(running[:, :, cur_len - 1].reshape(-1)).logits()
    ids = [finished_seqs[b, 0, 1 : finished_lens[b, 0]].tolist() for b in range(batch)]
    return BeamResult(ids, [float(s) for s in finished_scores[:, 0]], steps)
