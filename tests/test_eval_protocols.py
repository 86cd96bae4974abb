"""Perplexity protocols: each against a direct computation, and the data formats they read."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from conftest import load_hf
from llmtool.errors import UsageError
from llmtool.evaluate import evaluate_perplexity
from llmtool.evaluate.data import Document, load_corpus
from llmtool.evaluate.protocols import hf_passes, llama_cpp_passes, lm_eval_passes, make_protocol

# Multi-byte UTF-8 (2, 3 and 4 bytes a character), leading whitespace and several whitespace runs.
UNICODE_DOC = "  Naïve café — 東京の灯台守。\tEmoji 🙂🌊 end.\n\nSecond  paragraph, ünïcödé."
DOCS = [
    "The keeper climbed the hundred and twelve steps to the lantern room every morning.",
    UNICODE_DOC,
    "A short one.",
]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """PyTorch on one thread: on a small shared CPU its thread pool only adds waiting."""
    from llmtool.evaluate.run import torch_threads

    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def hf_model(tiny_llama_export):
    return load_hf(tiny_llama_export[0])


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "docs.jsonl"
    lines = [json.dumps({"id": i, "body": doc}) for i, doc in enumerate(DOCS)]
    path.write_text("\n".join(lines[:2]) + "\n\n" + lines[2] + "\n", encoding="utf-8")
    return path


def torch_log_probs(hf_model, ids: list[int]) -> np.ndarray:
    """log softmax of the PyTorch model's logits for one row: [L, V] float64."""
    import torch

    with torch.no_grad():
        logits = hf_model.model(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, dim=-1).numpy()


def test_lm_eval_windows_match_the_harness_gold():
    """lm-evaluation-harness' own test of get_rolling_token_windows (34 tokens, 10 a window)."""
    gold = [
        ([-100, *range(0, 9)], list(range(0, 10))),
        (list(range(9, 19)), list(range(10, 20))),
        (list(range(19, 29)), list(range(20, 30))),
        (list(range(23, 33)), list(range(30, 34))),
    ]
    passes = list(lm_eval_passes(np.arange(34), 10, -100))
    assert [(p.input_ids.tolist(), p.targets.tolist()) for p in passes] == gold
    # The scored logits are the last len(targets) positions of each window.
    assert [p.first for p in passes] == [0, 0, 0, 6]


def test_llama_cpp_chunks_score_the_second_half_after_bos():
    ids = np.arange(100, 123)  # 23 tokens: two chunks of 10, three left over
    passes = list(llama_cpp_passes(ids, 10, bos_id=1))
    assert len(passes) == 2
    for i, p in enumerate(passes):
        assert (
            p.input_ids[0] == 1
            and p.input_ids[1:].tolist() == ids[10 * i + 1 : 10 * i + 10].tolist()
        )
        assert p.first == 5
        # Logits at positions 5..8 score the tokens at 6..9: n_ctx - 1 - n_ctx/2 of them.
        assert p.targets.tolist() == ids[10 * i + 6 : 10 * i + 10].tolist()
    assert ids[0] == 100  # the data itself is not modified
    assert [p.input_ids[0] for p in llama_cpp_passes(ids, 10, None)] == [100, 110]


def test_hf_passes_score_every_token_but_the_first_once():
    ids = np.arange(57)
    scored = []
    for p in hf_passes(ids, 16, 5):
        assert len(p.input_ids) <= 16
        # Target t is predicted at window position t - 1.
        positions = p.first + np.arange(len(p.targets))
        assert (p.input_ids[positions + 1] == p.targets).all()
        scored += p.targets.tolist()
    assert scored == list(range(1, 57))


def test_hf_protocol_equals_the_transformers_guide(tiny_llama_export, hf_model, jsonl):
    """Per document, the guide's loop (loss over labels, weighted by the tokens it scores)."""
    import torch

    _, onnx_dir = tiny_llama_export
    max_length, stride = 16, 6
    nll_sum, count = 0.0, 0
    for doc in DOCS:
        ids = hf_model.tokenizer(doc, return_tensors="pt")["input_ids"]
        prev_end = 0
        for begin in range(0, ids.size(1), stride):
            end = min(begin + max_length, ids.size(1))
            target = ids[:, begin:end].clone()
            target[:, : -(end - prev_end)] = -100
            with torch.no_grad():
                loss = hf_model.model(ids[:, begin:end], labels=target).loss
            scored = int((target[:, 1:] != -100).sum())
            nll_sum += float(loss) * scored
            count += scored
            prev_end = end
            if end == ids.size(1):
                break
    r = evaluate_perplexity(
        onnx_dir, jsonl, text_field="body", max_length=max_length, stride=stride, provider="cpu"
    )
    assert r.protocol == "hf" and r.tokens == count and r.documents == 3
    assert r.perplexity == pytest.approx(math.exp(nll_sum / count), rel=1e-4)
    assert sum(d["tokens"] for d in r.per_document) == count


def test_lm_eval_protocol_equals_a_direct_computation(tiny_llama_export, hf_model, jsonl):
    """Rolling disjoint windows per document; word / byte perplexity on the original text."""
    _, onnx_dir = tiny_llama_export
    tok = hf_model.tokenizer
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    max_length = 8
    total_ll, total_tokens, words, n_bytes = 0.0, 0, 0, 0
    for doc in DOCS:
        ids = tok(doc, add_special_tokens=False)["input_ids"]
        # Written out independently: window k scores ids[k*L : (k+1)*L] from the L tokens before
        # its last target (the prefix token standing in before ids[0]).
        seq = [prefix, *ids]
        for start in range(0, len(ids), max_length):
            stop = min(start + max_length, len(ids))
            window = seq[max(0, stop - max_length) : stop]  # seq index i+1 holds ids[i]
            logp = torch_log_probs(hf_model, window)
            offset = max(0, stop - max_length)
            for t in range(start, stop):
                total_ll += logp[t - offset, ids[t]]
        total_tokens += len(ids)
        words += len(re.split(r"\s+", doc))
        n_bytes += len(doc.encode("utf-8"))
    r = evaluate_perplexity(
        onnx_dir,
        jsonl,
        text_field="body",
        protocol="lm-eval",
        max_length=max_length,
        provider="cpu",
    )
    assert (r.tokens, r.words, r.bytes, r.stride) == (total_tokens, words, n_bytes, max_length)
    assert r.word_perplexity == pytest.approx(math.exp(-total_ll / words), rel=1e-4)
    assert r.byte_perplexity == pytest.approx(math.exp(-total_ll / n_bytes), rel=1e-4)
    assert r.bits_per_byte == pytest.approx(-total_ll / n_bytes / math.log(2), rel=1e-4)
    assert r.perplexity == pytest.approx(math.exp(-total_ll / total_tokens), rel=1e-4)


def test_llama_cpp_protocol_equals_a_direct_loop(tiny_llama_export, hf_model, sample_text_file):
    _, onnx_dir = tiny_llama_export
    text = sample_text_file.read_text(encoding="utf-8")
    ids = hf_model.tokenizer(text)["input_ids"]
    n_ctx, nll = 64, []
    for i in range(len(ids) // n_ctx):
        chunk = ids[i * n_ctx : (i + 1) * n_ctx]
        logp = torch_log_probs(hf_model, chunk)  # this tokenizer adds no BOS: nothing replaced
        for j in range(n_ctx // 2, n_ctx - 1):
            nll.append(-logp[j, chunk[j + 1]])
    nll = np.array(nll)
    r = evaluate_perplexity(
        onnx_dir, sample_text_file, protocol="llama-cpp", max_length=n_ctx, provider="cpu"
    )
    assert r.tokens == len(nll) == (len(ids) // n_ctx) * (n_ctx - 1 - n_ctx // 2)
    assert r.windows == len(ids) // n_ctx
    assert r.perplexity == pytest.approx(math.exp(nll.mean()), rel=1e-4)
    # llama.cpp's uncertainty: sqrt((E[x²] - E[x]²) / (n - 1)) of the per-token NLL.
    se = math.sqrt((np.mean(nll**2) - nll.mean() ** 2) / (len(nll) - 1))
    assert r.standard_error == pytest.approx(se, rel=1e-3)
    z = 1.959963984540054
    assert r.perplexity_ci["low"] == pytest.approx(math.exp(nll.mean() - z * se), rel=1e-3)
    assert r.perplexity_ci["high"] == pytest.approx(math.exp(nll.mean() + z * se), rel=1e-3)
    assert r.bits_per_byte is None and r.word_perplexity is None  # half of each chunk is scored


def test_words_and_bytes_are_counted_on_the_original_text(tmp_path, tiny_llama_export):
    doc = Document("d", UNICODE_DOC)
    # 65 characters: "ï", "é", "ü", "ö" 2 bytes, "—" and each of "東京の灯台守。" 3, each emoji 4.
    assert len(UNICODE_DOC) == 65 and doc.bytes == 93
    # re.split on leading whitespace gives an empty first word, which lm-eval counts too.
    assert doc.words == 11 == len(re.split(r"\s+", UNICODE_DOC))
    path = tmp_path / "u.txt"
    path.write_text(UNICODE_DOC, encoding="utf-8")
    r = evaluate_perplexity(
        tiny_llama_export[1], path, protocol="lm-eval", max_length=16, provider="cpu"
    )
    assert (r.words, r.bytes) == (11, 93)
    assert r.per_document == [
        {
            "name": "u.txt",
            "tokens": r.tokens,
            "nll": pytest.approx(r.nll),
            "perplexity": pytest.approx(r.perplexity),
            "words": 11,
            "bytes": 93,
        }
    ]


def test_directory_and_jsonl_give_the_same_documents(tmp_path, jsonl):
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    for i, doc in enumerate(DOCS):
        (folder / ("sub" if i == 2 else "") / f"{i}.txt").write_text(doc, encoding="utf-8")
    (folder / "empty.txt").write_text("  \n", encoding="utf-8")
    (folder / "notes.md").write_text("not read", encoding="utf-8")
    from_dir = load_corpus(folder)
    from_jsonl = load_corpus(jsonl, "body")
    assert [d.text for d in from_dir.documents] == [d.text for d in from_jsonl.documents] == DOCS
    assert [d.name for d in from_dir.documents] == ["0.txt", "1.txt", "sub/2.txt"]
    assert from_dir.skipped == 1 and from_dir.format == "directory" and from_jsonl.format == "jsonl"
    assert from_dir.sha256 != from_jsonl.sha256 and len(from_dir.sha256) == 64
    (folder / "0.txt").write_text(DOCS[0] + "!", encoding="utf-8")
    assert load_corpus(folder).sha256 != from_dir.sha256


@pytest.mark.parametrize(
    ("content", "field", "match"),
    [
        ('{"text": "a"}\n{"body": "b"}\n', "text", r"line 2 has no 'text' field \(it has: body\)"),
        ('{"text": "a"}\nnot json\n', "text", "line 2 is not valid JSON"),
        ('{"text": 3}\n', "text", "is a int, not a string"),
        ('{"text": "  "}\n', "text", "empty"),
    ],
)
def test_bad_jsonl(tmp_path, content, field, match):
    path = tmp_path / "d.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UsageError, match=match):
        load_corpus(path, field)


def test_non_utf8_file_in_a_directory_names_file_and_offset(tmp_path):
    (tmp_path / "ok.txt").write_text("fine", encoding="utf-8")
    (tmp_path / "bad.txt").write_bytes(b"abc\xff")
    with pytest.raises(UsageError, match=r"bad\.txt is not valid UTF-8 \(bad byte at offset 3\)"):
        load_corpus(tmp_path)


def test_protocol_options(hf_model):
    tok = hf_model.tokenizer
    assert make_protocol("hf", tok, 64).stride == 32
    assert make_protocol("lm-eval", tok, 64).stride == 64
    assert make_protocol("lm-eval", tok, 64).prefix_id == tok.bos_token_id
    assert make_protocol("llama-cpp", tok, 64).bos_id is None  # this tokenizer adds no BOS
    with pytest.raises(UsageError, match="--stride applies to --protocol hf only"):
        make_protocol("lm-eval", tok, 64, stride=16)
    with pytest.raises(UsageError, match="Unknown protocol"):
        make_protocol("wikitext", tok, 64)
    with pytest.raises(UsageError, match="at least 3"):
        make_protocol("llama-cpp", tok, 2)


def test_too_short_for_llama_cpp(tiny_llama_export, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("Only a few words here.", encoding="utf-8")
    with pytest.raises(UsageError, match="lower --max-length"):
        evaluate_perplexity(
            tiny_llama_export[1], path, protocol="llama-cpp", max_length=64, provider="cpu"
        )
