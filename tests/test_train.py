"""``llmtool train``: data errors, tokenizer, resume equivalence, and every arch through export."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import SAMPLE_TEXT
from llmtool.errors import UsageError
from llmtool.train import ARCHS, TrainOptions, train_model
from llmtool.train.data import BatchSampler, read_corpus, split_tokens, val_windows
from llmtool.train.loop import lr_factor

# Small enough for two cores: the tiny preset's models on a 1.7K-token text, a few steps.
FAST = {"seq_len": 64, "batch_size": 4, "vocab_size": 384, "eval_every": 3}


def train(out, arch="llama", steps=6, on_step=None, **kwargs):
    options = TrainOptions(**{**FAST, "checkpoint_every": steps, **kwargs}, arch=arch, steps=steps)
    return train_model(SAMPLE_TEXT, out, options, device="cpu", on_step=on_step)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """arch -> (TrainResult, ExportResult) for every arch, trained and exported once."""
    from llmtool.export import export_model

    root = tmp_path_factory.mktemp("trained")
    runs = {}
    for arch in ARCHS:
        result = train(root / arch, arch)
        runs[arch] = (result, export_model(result.out, root / f"{arch}-onnx"))
    return runs


# Data --------------------------------------------------------------------------------------------
def test_missing_data(tmp_path):
    with pytest.raises(UsageError, match=r"nope\.txt does not exist"):
        train_model(tmp_path / "nope.txt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_empty_file(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    with pytest.raises(UsageError, match="empty"):
        train_model(empty, tmp_path / "out")


def test_non_utf8_names_file_and_offset(tmp_path):
    bad = tmp_path / "corpus" / "b.txt"
    bad.parent.mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("fine text\n")
    bad.write_bytes("héllo ".encode() + b"\xff\xfe rest")
    with pytest.raises(UsageError, match=r"b\.txt is not valid UTF-8 \(bad byte at offset 7\)"):
        train_model(tmp_path / "corpus", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_directory_without_txt(tmp_path):
    (tmp_path / "notes.md").write_text("# not text\n")
    with pytest.raises(UsageError, match=r"holds no \.txt files"):
        train_model(tmp_path, tmp_path / "out")


def test_too_little_text_for_seq_len(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("just a few words of text\n")
    with pytest.raises(UsageError, match="fewer than one window"):
        train_model(short, tmp_path / "out", TrainOptions(seq_len=64, vocab_size=300))


def test_directory_corpus_is_sorted_and_separated(tmp_path):
    from llmtool.train.data import tokenize_corpus
    from llmtool.train.tokenizer import train_bpe_tokenizer

    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("second file\n")
    (tmp_path / "sub" / "c.txt").write_text("third file\n")
    (tmp_path / "a.txt").write_text("first file\n")
    corpus = read_corpus(tmp_path)
    assert [p.name for p in corpus.files] == ["a.txt", "b.txt", "c.txt"]
    tok = train_bpe_tokenizer(corpus.texts, 300)
    ids = tokenize_corpus(corpus, tok).tolist()
    assert ids.count(tok.eos_token_id) == 2
    assert tok.decode(ids) == "first file\n<|endoftext|>second file\n<|endoftext|>third file\n"


def test_split_holds_out_the_tail():
    ids = np.arange(1000, dtype=np.int64)
    splits = split_tokens(ids, 0.05, 16)
    assert len(splits.val) == 50 and splits.val[0] == 950
    assert np.array_equal(np.concatenate([splits.train, splits.val]), ids)
    scored = np.concatenate([y.ravel() for _, y in val_windows(splits.val, 16, 2, 10_000)])
    assert np.array_equal(scored, splits.val[1:])  # every held-out token but the first, once


def test_batch_sampler_resumes_exactly():
    tokens = np.arange(500, dtype=np.int64)
    a = BatchSampler(tokens, 16, 4, seed=3)
    for _ in range(9):  # crosses an epoch boundary (30 windows per epoch)
        a.next_batch()
    b = BatchSampler(tokens, 16, 4, seed=3)
    b.load_state_dict(a.state_dict())
    for _ in range(5):
        xa, ya = a.next_batch()
        xb, yb = b.next_batch()
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
        assert np.array_equal(xa[:, 1:], ya[:, :-1])  # targets are the inputs shifted by one


def test_lr_schedule():
    assert lr_factor(0, 10, 100) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100) == pytest.approx(1.0)
    assert lr_factor(10, 10, 100) == pytest.approx(1.0)
    assert lr_factor(100, 10, 100) == pytest.approx(0.1)
    assert lr_factor(55, 10, 100) == pytest.approx(0.55)


# Tokenizer ---------------------------------------------------------------------------------------
TRICKY = "Naïve café — 東京 🙂 déjà vu,\n\ttabs  and   spaces; ΑΒΓ ∑ x² ‘quotes’ <|endoftext|>"


def test_tokenizer_round_trip(tmp_path):
    from transformers import AutoTokenizer

    from llmtool.train.tokenizer import train_bpe_tokenizer

    tok = train_bpe_tokenizer([SAMPLE_TEXT.read_text(encoding="utf-8")], 400)
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in (TRICKY, SAMPLE_TEXT.read_text(encoding="utf-8")):
        ids = loaded(text)["input_ids"]
        assert ids == tok(text)["input_ids"]
        assert loaded.decode(ids) == text
    assert len(loaded) == len(tok) <= 400
    assert loaded.eos_token == loaded.pad_token == "<|endoftext|>"


def test_trained_dir_tokenizer_loads_with_auto_tokenizer(trained):
    from transformers import AutoTokenizer

    for arch in ("llama", "lstm"):
        result, _ = trained[arch]
        tok = AutoTokenizer.from_pretrained(result.out)
        assert tok.decode(tok(TRICKY)["input_ids"]) == TRICKY
        assert len(tok) == result.metrics["vocab_size"]


# Training ----------------------------------------------------------------------------------------
def test_training_lowers_validation_loss_and_writes_metrics(trained):
    for arch, (result, _) in trained.items():
        assert result.steps == 6
        assert result.final_val_perplexity < 0.8 * result.initial_val_perplexity, arch
        # An untrained model is close to uniform over the vocabulary.
        assert 0.5 * 384 < result.initial_val_perplexity < 2 * 384, arch
        metrics = json.loads((result.out / "train_metrics.json").read_text())
        assert {"arch", "steps", "initial_val_perplexity", "final_val_perplexity"} <= set(metrics)
        assert [p["step"] for p in metrics["curve"]] == [0, 3, 6]
        assert len(metrics["train_losses"]) == 6
        assert all(math.isfinite(x) for x in metrics["train_losses"])


def test_transformer_dirs_load_with_auto_model(trained):
    from transformers import AutoModelForCausalLM

    for arch in ("llama", "gpt2"):
        result, _ = trained[arch]
        model = AutoModelForCausalLM.from_pretrained(result.out)
        assert model.config.model_type == arch and model.config.max_position_embeddings == 64


def test_recurrent_dir_loads(trained):
    from llmtool.models.loading import load_model

    loaded = load_model(str(trained["lstm"][0].out))
    assert loaded.config.model_type == "llmtool_lstm"
    assert loaded.config.vocab_size == len(loaded.tokenizer)
    assert loaded.generation_config.eos_token_id == loaded.tokenizer.eos_token_id
    assert not loaded.model.training


@pytest.mark.parametrize("arch", ["llama", "lstm"])
def test_resume_reaches_the_same_losses(tmp_path, monkeypatch, arch):
    from llmtool.train import presets

    # Dropout on, so that resuming must restore the RNG state too.
    tiny = dataclasses.replace(presets.PRESETS["tiny"], dropout=0.1)
    monkeypatch.setitem(presets.PRESETS, "tiny", tiny)
    straight = train(tmp_path / "straight", arch, steps=8, checkpoint_every=4, seed=7)

    def stop_at_4(progress):
        if progress.step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "resumed", arch, steps=8, checkpoint_every=4, seed=7, on_step=stop_at_4)
    assert (tmp_path / "resumed" / "checkpoints" / "step-000004").is_dir()
    assert not (tmp_path / "resumed" / "config.json").exists()  # no final model yet
    resumed = train_model(SAMPLE_TEXT, tmp_path / "resumed", resume=True, device="cpu")

    a, b = straight.metrics["train_losses"], resumed.metrics["train_losses"]
    assert len(a) == len(b) == 8
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)
    assert resumed.final_val_perplexity == pytest.approx(straight.final_val_perplexity, abs=1e-5)
    assert [p["step"] for p in resumed.metrics["curve"]] == [0, 3, 6, 8]
    # Only the newest checkpoint is kept.
    assert [p.name for p in (tmp_path / "resumed" / "checkpoints").glob("step-*")] == [
        "step-000008"
    ]


def test_run_stopped_before_first_checkpoint_can_start_over(tmp_path):
    """Ctrl-C before any checkpoint leaves the tokenizer only: no --force needed to start again,
    while a directory that is not a training run is still refused."""

    def stop(progress):
        raise KeyboardInterrupt

    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(out, steps=4, on_step=stop)
    assert (out / "tokenizer.json").is_file() and not (out / "checkpoints").exists()
    assert train(out, steps=2).metrics["steps"] == 2
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="already exists"):
        train(other, steps=2)
    assert (other / "keep.txt").read_text() == "mine"


def test_resume_refusals(tmp_path, trained):
    with pytest.raises(UsageError, match="No checkpoint"):
        train_model(SAMPLE_TEXT, tmp_path / "fresh", resume=True)
    out = trained["rnn"][0].out
    with pytest.raises(UsageError, match=r"holds a training run already.*--resume"):
        train_model(SAMPLE_TEXT, out)
    with pytest.raises(UsageError, match="--arch gpt2 differs from the checkpoint's rnn"):
        train_model(SAMPLE_TEXT, out, TrainOptions(arch="gpt2"), resume=True)
    other = tmp_path / "other.txt"
    other.write_text(SAMPLE_TEXT.read_text(encoding="utf-8") + "\nMore text.\n")
    with pytest.raises(UsageError, match="not what the checkpoint"):
        train_model(other, out, resume=True)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"arch": "mamba"}, "Unknown architecture"),
        ({"preset": "huge"}, "Unknown preset"),
        ({"steps": 0}, "--steps must be at least 1"),
        ({"val_fraction": 0.9}, "--val-fraction"),
        ({"tokenizer": "some/dir", "vocab_size": 500}, "--vocab-size applies only"),
        ({"tokenizer": "no/such/dir"}, "Tokenizer directory"),
        ({"device": "tpu"}, "Unknown device"),
    ],
)
def test_bad_options(tmp_path, kwargs, match):
    options = TrainOptions(**{k: v for k, v in kwargs.items() if k != "device"})
    device = {"device": kwargs["device"]} if "device" in kwargs else {}
    with pytest.raises(UsageError, match=match):
        train_model(SAMPLE_TEXT, tmp_path / "out", options, **device)
    assert not (tmp_path / "out").exists()


def test_cuda_without_gpu_is_refused(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(UsageError, match="--device cuda"):
        train_model(SAMPLE_TEXT, tmp_path / "out", device="cuda")


@pytest.mark.parametrize(("arch", "dtype"), [("llama", "bfloat16"), ("lstm", "float16")])
def test_mixed_precision_path(tmp_path, monkeypatch, arch, dtype):
    """The CUDA code path (autocast; a gradient scaler for fp16), exercised on the CPU."""
    import torch

    from llmtool.train import loop

    monkeypatch.setattr(loop, "autocast_dtype", lambda device: getattr(torch, dtype))
    result = train(tmp_path / "amp", arch, steps=3)
    assert result.metrics["autocast"] == dtype
    assert all(math.isfinite(x) for x in result.metrics["train_losses"])
    assert result.final_val_perplexity < result.initial_val_perplexity


def test_existing_tokenizer_dir(tmp_path, trained):
    result = train(
        tmp_path / "out", "rnn", steps=2, tokenizer=str(trained["llama"][0].out), vocab_size=None
    )
    assert result.metrics["vocab_size"] == trained["llama"][0].metrics["vocab_size"]
    assert result.metrics["options"]["tokenizer"] == str(trained["llama"][0].out)


# Export, generation and evaluation ------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_export_parity(trained, arch):
    _, exported = trained[arch]
    v = exported.validation
    assert v["passed"] and v["greedy_match"]
    assert v["prefill_max_abs_diff"] < 1e-4 and v["decode_max_abs_diff"] < 1e-4
    assert v["prompt_tokens"][0] != v["prompt_tokens"][1]  # one row left-padded


@pytest.mark.parametrize("arch", ["lstm", "rnn"])
def test_recurrent_export_io(trained, arch):
    import onnx

    _, exported = trained[arch]
    m = exported.manifest
    names = ("h", "c") if arch == "lstm" else ("h",)
    assert m["architecture"] == arch and m["max_positions"] is None
    assert m["inputs"] == ["input_ids", "attention_mask"] + [
        f"past_state.{i}.{n}" for i in range(m["num_layers"]) for n in names
    ]
    assert m["outputs"][0] == "logits"
    assert all(e["shape"] == ["batch", m["hidden_size"]] for e in m["cache"])
    graph = onnx.load(str(exported.out / "model.onnx"))
    onnx.checker.check_model(graph)
    assert [n.op_type for n in graph.graph.node].count("Scan") == m["num_layers"]

    def used(g):  # value names read by the nodes of a graph and of its subgraphs
        names = set()
        for node in g.node:
            names.update(node.input)
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    names |= used(attr.g)
        return names

    assert {i.name for i in graph.graph.initializer} <= used(graph.graph)


@pytest.mark.parametrize("arch", ["lstm", "rnn"])
def test_left_padding_and_chunking_match_one_pass(trained, arch):
    """Pads leave the state untouched; a sequence split across calls equals one call."""
    import torch

    from llmtool.models.loading import load_model
    from llmtool.runtime import OnnxCausalLM

    result, exported = trained[arch]
    torch_model = load_model(str(result.out)).model
    onnx_model = OnnxCausalLM(exported.out, "cpu")
    rng = np.random.default_rng(0)
    row = rng.integers(1, onnx_model.vocab_size, size=9)
    pos = np.zeros((1, 1), np.int64)  # not an input of recurrent graphs (the runtime drops it)
    alone, _ = onnx_model.forward(
        row[None], np.ones((1, 9), np.int64), pos, onnx_model.empty_cache(1)
    )
    ids = np.stack([np.r_[np.zeros(4, np.int64), row], rng.integers(1, 300, size=13)])
    mask = np.ones_like(ids)
    mask[0, :4] = 0
    padded, _ = onnx_model.forward(ids, mask, pos, onnx_model.empty_cache(2))
    np.testing.assert_allclose(padded[0, 4:], alone[0], atol=1e-5)
    with torch.no_grad():
        ref = torch_model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    np.testing.assert_allclose(ref.logits.numpy()[0, 4:], alone[0], atol=1e-4)
    np.testing.assert_allclose(ref.logits.numpy()[1], padded[1], atol=1e-4)
    first, cache = onnx_model.forward(ids[:, :6], mask[:, :6], pos, onnx_model.empty_cache(2))
    rest, _ = onnx_model.forward(ids[:, 6:], mask, pos, cache)
    np.testing.assert_allclose(
        np.concatenate([first, rest], axis=1)[mask.astype(bool)],
        padded[mask.astype(bool)],
        atol=1e-5,
    )


def test_fp16_recurrent_export(trained, tmp_path):
    from llmtool.export import export_model

    result = export_model(trained["lstm"][0].out, tmp_path / "fp16", dtype="fp16")
    assert result.validation["passed"] and result.manifest["dtype"] == "fp16"
    assert all(e["dtype"] == "float32" for e in result.manifest["cache"])


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_and_eval(trained, arch):
    from llmtool.evaluate import evaluate_perplexity
    from llmtool.generate import generate

    result, exported = trained[arch]
    out = generate(exported.out, ["The keeper", "A"], max_new_tokens=8, provider="cpu")
    assert all(1 <= o.new_tokens <= 8 and o.token_ids for o in out.outputs)
    ppl = evaluate_perplexity(exported.out, SAMPLE_TEXT, max_length=64, provider="cpu")
    # Trained on most of this text for a few steps: finite and better than uniform.
    assert 1.0 < ppl.perplexity < result.metrics["vocab_size"] and ppl.tokens > 1000


def test_recurrent_long_sequence_matches_pytorch(trained):
    """The whole text in one pass (1.7K Scan steps): ORT's logits equal PyTorch's."""
    import torch

    from llmtool.models.loading import load_model
    from llmtool.runtime import OnnxCausalLM

    result, exported = trained["lstm"]
    loaded = load_model(str(result.out))
    ids = np.asarray([loaded.tokenizer(SAMPLE_TEXT.read_text(encoding="utf-8"))["input_ids"]])
    with torch.no_grad():
        ref = loaded.model(input_ids=torch.from_numpy(ids)).logits.numpy()
    model = OnnxCausalLM(exported.out, "cpu")
    mask = np.ones_like(ids)
    got, _ = model.forward(ids, mask, mask, model.empty_cache(1))
    assert ids.shape[1] > 1000
    np.testing.assert_allclose(got, ref, atol=1e-4)


# CLI ------------------------------------------------------------------------------------------------
def test_cli_train_json(tmp_path):
    from llmtool.cli import app

    args = [
        "train",
        "--data",
        SAMPLE_TEXT,
        "--out",
        tmp_path / "m",
        "--arch",
        "rnn",
        "--steps",
        "3",
        "--seq-len",
        "32",
        "--batch-size",
        "2",
        "--vocab-size",
        "300",
        "--device",
        "cpu",
        "--json",
    ]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data) == {
        "arch",
        "steps",
        "initial_val_perplexity",
        "final_val_perplexity",
        "tokens_per_s",
        "world_size",
        "out",
    }
    assert (
        data["arch"] == "rnn"
        and data["steps"] == 3
        and data["out"] == str((tmp_path / "m").resolve())
    )


def test_cli_train_bad_data_exit_code(tmp_path):
    from llmtool.cli import app

    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok\x80")
    result = CliRunner().invoke(app, ["train", "--data", str(bad), "--out", str(tmp_path / "m")])
    assert result.exit_code == 2
    assert "bad.txt is not valid UTF-8 (bad byte at offset 2)" in result.stderr
    assert "Traceback" not in result.output
