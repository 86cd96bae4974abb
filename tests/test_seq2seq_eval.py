"""Encoder-decoder pairs, eval (perplexity, BLEU, chrF) and training, against independent references.

Perplexity is checked against transformers' own loss on the same pairs, BLEU / chrF against
sacrebleu run on transformers' ``generate`` output, and a short training run must lower the loss
and produce a directory ``llmtool export`` validates unchanged.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from _seq2seq import SOURCES, tiny_seq2seq_export

torch = pytest.importorskip("torch")

TARGETS = ("Der schnelle braune Fuchs.", "Es war einmal", "Es war die beste Zeit")


@pytest.fixture
def bart_export(tokenizer, tmp_path_factory):
    hf, out, _ = tiny_seq2seq_export("bart", tokenizer, tmp_path_factory)
    return hf, out


def _write_pairs(path, header=True):
    lines = ["source\ttarget"] if header else []
    lines += [f"{s}\t{t}" for s, t in zip(SOURCES, TARGETS, strict=True)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_pairs_formats_and_errors(tmp_path):
    from llmtool.errors import UsageError
    from llmtool.seq2seq.pairs import read_pairs

    assert [p.target for p in read_pairs(_write_pairs(tmp_path / "a.tsv"))] == list(TARGETS)
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text(
        "\n".join(json.dumps({"en": s, "de": t}) for s, t in zip(SOURCES, TARGETS, strict=False))
    )
    assert read_pairs(jsonl, "en", "de")[1].source == SOURCES[1]
    with pytest.raises(UsageError, match=r"a.jsonl:1 has no 'source' field"):
        read_pairs(jsonl)
    (tmp_path / "b.tsv").write_text("one\ttwo\nthree\t \n")
    with pytest.raises(UsageError, match=r"b.tsv:2 has an empty 'target'"):
        read_pairs(tmp_path / "b.tsv")
    (tmp_path / "c.tsv").write_text("no tab here\n")
    with pytest.raises(UsageError, match="no tab"):
        read_pairs(tmp_path / "c.tsv")


def test_perplexity_bleu_chrf_equal_references(bart_export, tmp_path):
    import sacrebleu
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from llmtool.seq2seq.evaluate import evaluate_seq2seq
    from llmtool.seq2seq.pairs import target_ids

    hf, out = bart_export
    record = evaluate_seq2seq(
        out, _write_pairs(tmp_path / "p.tsv"), max_new_tokens=8, provider="cpu", reference=hf
    )

    model = AutoModelForSeq2SeqLM.from_pretrained(hf).eval()
    tok = AutoTokenizer.from_pretrained(hf)
    eos = model.generation_config.eos_token_id
    nll = []
    hyps = []
    for s, t in zip(SOURCES, TARGETS, strict=True):
        labels = torch.tensor([target_ids(tok, t, eos)])
        src = tok(s, return_tensors="pt")
        with torch.no_grad():
            logits = model(**src, labels=labels).logits[0]
            gen = model.generate(**src, max_new_tokens=8, do_sample=False)
        nll.append(torch.nn.functional.cross_entropy(logits, labels[0], reduction="none").numpy())
        hyps.append(tok.decode(gen[0, 1:].tolist()).replace(tok.decode([eos]), "").strip())
    nll = np.concatenate(nll)
    assert record["tokens"] == len(nll)
    assert record["perplexity"] == pytest.approx(math.exp(nll.mean()), rel=1e-4)
    assert record["standard_error"] == pytest.approx(
        nll.std(ddof=1) / math.sqrt(len(nll)), rel=1e-3
    )
    assert record["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [list(TARGETS)]).score)
    assert record["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [list(TARGETS)]).score)
    assert record["timing"]["decoder_tokens_per_s"] > 0
    fidelity = record["fidelity"]  # the export against the PyTorch model it came from
    assert fidelity["reference_perplexity"] == pytest.approx(math.exp(nll.mean()), rel=1e-4)
    assert fidelity["top1_agreement"] == 1.0 and fidelity["kl_divergence"]["max"] < 1e-6
    assert fidelity["tokens"] == len(nll)


def test_cli_eval_subprocess_and_bad_pairs(bart_export, tmp_path):
    from typer.testing import CliRunner

    from llmtool.cli import app

    hf, out = bart_export
    report = tmp_path / "r.json"
    cmd = [
        sys.executable,
        "-m",
        "llmtool",
        "eval",
        str(out),
        "--data",
        str(_write_pairs(tmp_path / "p.tsv")),
        "--reference",
        str(hf),
        "--source-field",
        "source",
        "--target-field",
        "target",
        "--provider",
        "cpu",
        "--json",
        str(report),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "BLEU" in proc.stdout and "top-1 agreement" in proc.stdout
    assert json.loads(report.read_text())["fidelity"]["top1_agreement"] == 1.0
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"source": "x"}) + "\n")
    res = CliRunner().invoke(app, ["eval", str(out), "--data", str(bad), "--provider", "cpu"])
    assert res.exit_code == 2 and "no 'target' field" in res.output
    res = CliRunner().invoke(app, ["eval", str(out), "--data", str(bad), "--ray", "auto"])
    assert res.exit_code == 2 and "--ray" in res.output


def test_train_t5_loss_falls_and_exports(tmp_path):
    import random

    from typer.testing import CliRunner

    from llmtool.cli import app
    from llmtool.export import export_model

    rnd = random.Random(0)
    words = ["red", "blue", "green", "cat", "dog", "sun"]
    lines = []
    for _ in range(120):
        w = [rnd.choice(words) for _ in range(rnd.randint(3, 5))]
        lines.append(" ".join(w) + "\t" + " ".join(reversed(w)))
    data = tmp_path / "rev.tsv"
    data.write_text("\n".join(lines) + "\n")
    res = CliRunner().invoke(
        app,
        [
            "train",
            "--arch",
            "t5",
            "--data",
            str(data),
            "--out",
            str(tmp_path / "m"),
            "--steps",
            "30",
            "--batch-size",
            "16",
            "--device",
            "cpu",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    metrics = json.loads((tmp_path / "m" / "train_metrics.json").read_text())
    curve = metrics["curve"]
    assert curve[-1]["val_loss"] < 0.6 * curve[0]["val_loss"]
    assert export_model(tmp_path / "m", tmp_path / "onnx").validation["passed"]
    res = CliRunner().invoke(
        app, ["train", "--arch", "t5", "--data", str(data), "--out", str(tmp_path / "m")]
    )
    assert res.exit_code == 2 and "already exists" in res.output
    res = CliRunner().invoke(
        app,
        [
            "train",
            "--arch",
            "t5",
            "--data",
            str(tmp_path / "none.tsv"),
            "--out",
            str(tmp_path / "m2"),
        ],
    )
    assert res.exit_code == 2 and "does not exist" in res.output
    res = CliRunner().invoke(
        app,
        ["train", "--arch", "bart", "--data", str(data), "--out", str(tmp_path / "m3"), "--resume"],
    )
    assert res.exit_code == 2 and "No checkpoint to resume" in res.output
    res = CliRunner().invoke(
        app,
        [
            "train",
            "--arch",
            "t5",
            "--data",
            str(data),
            "--out",
            str(tmp_path / "m4"),
            "--seq-len",
            "64",
        ],
    )
    assert res.exit_code == 2 and "--seq-len not available" in res.output


@pytest.mark.seq2seq_full
def test_train_t5_subprocess_then_export(tmp_path):
    """`llmtool train --arch t5` and `llmtool export` of its output as real processes.

    Behind seq2seq_full: two interpreter starts with torch and an export validation take ~23 s
    on 2 cores; the default suite trains and exports in-process (test above)."""
    data = _reverse_pairs(tmp_path / "rev.tsv")
    run = [sys.executable, "-m", "llmtool"]
    train = [*run, "train", "--arch", "t5", "--data", str(data), "--out", str(tmp_path / "m")]
    proc = subprocess.run(
        [*train, "--steps", "3", "--batch-size", "8", "--device", "cpu", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["steps"] == 3
    proc = subprocess.run(
        [*run, "export", str(tmp_path / "m"), "--out", str(tmp_path / "onnx")],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((tmp_path / "onnx" / "llmtool.json").read_text())
    assert manifest["kind"] == "seq2seq" and manifest["model_type"] == "t5"
    assert (tmp_path / "onnx" / "encoder_model.onnx").is_file()


def test_cli_eval_baseline_gate_passes_fails_refuses(bart_export, tmp_path):
    """The seq2seq baseline gate: same export passes; a baseline that scored lower fails (1);
    other pairs, other beams and a decoder-only report are refused (2)."""
    from typer.testing import CliRunner

    from llmtool.cli import app

    _, out = bart_export
    pairs = _write_pairs(tmp_path / "p.tsv")
    base = tmp_path / "r.json"
    common = ["eval", str(out), "--data", str(pairs), "--provider", "cpu"]
    res = CliRunner().invoke(app, [*common, "--json", str(base)])
    assert res.exit_code == 0, res.output
    record = json.loads(base.read_text())
    assert record["schema"] == "llmtool-seq2seq-eval" and record["schema_version"] == 1
    # The per-pair sums are the token NLLs regrouped: they give back the mean NLL.
    assert sum(record["pair_tokens"]) == record["tokens"]
    assert math.isclose(sum(record["pair_nll"]) / record["tokens"], record["nll"], rel_tol=1e-9)

    res = CliRunner().invoke(app, [*common, "--baseline", str(base)])
    assert res.exit_code == 0, res.output
    assert "Against baseline" in res.output and "same" in res.output

    # A baseline 1% better on every pair: this run is worse beyond +0.5%, and the paired
    # difference is exactly uniform per token, so no noise excuses it -> exit 1.
    better = dict(record)
    better["pair_nll"] = [
        x - 0.01 * n for x, n in zip(record["pair_nll"], record["pair_tokens"], strict=True)
    ]
    better["perplexity"] = record["perplexity"] * math.exp(-0.01)
    (tmp_path / "better.json").write_text(json.dumps(better))
    res = CliRunner().invoke(app, [*common, "--baseline", str(tmp_path / "better.json")])
    assert res.exit_code == 1 and "perplexity" in res.output, res.output
    # The same rise inside a 2% tolerance passes.
    res = CliRunner().invoke(
        app,
        [*common, "--baseline", str(tmp_path / "better.json"), "--tolerance", "perplexity=2%"],
    )
    assert res.exit_code == 0, res.output
    # BLEU 5 points higher in the baseline fails beyond the default 1 point; bleu=10 lets it pass.
    (tmp_path / "bleu.json").write_text(json.dumps({**record, "bleu": record["bleu"] + 5}))
    res = CliRunner().invoke(app, [*common, "--baseline", str(tmp_path / "bleu.json")])
    assert res.exit_code == 1 and "bleu" in res.output, res.output
    res = CliRunner().invoke(
        app, [*common, "--baseline", str(tmp_path / "bleu.json"), "--tolerance", "bleu=10"]
    )
    assert res.exit_code == 0, res.output

    refusals = {
        "other.json": ({**record, "data_sha256": "0" * 64}, "another config"),
        "beams.json": ({**record, "num_beams": 4}, "num_beams"),
        "decoder.json": ({"schema": "llmtool-eval", "schema_version": 1}, "not an encoder-decoder"),
        "newer.json": ({**record, "schema_version": 99}, "schema version 99"),
    }
    for name, (content, message) in refusals.items():
        (tmp_path / name).write_text(json.dumps(content))
        res = CliRunner().invoke(app, [*common, "--baseline", str(tmp_path / name)])
        assert res.exit_code == 2 and message in res.output, (name, res.output)
    res = CliRunner().invoke(app, [*common, "--baseline", str(base), "--tolerance", "bleu=x"])
    assert res.exit_code == 2 and "bleu=x" in res.output


def _reverse_pairs(path, n=40):
    import random

    rnd = random.Random(0)
    words = ["red", "blue", "green", "cat", "dog", "sun"]
    lines = []
    for _ in range(n):
        w = [rnd.choice(words) for _ in range(rnd.randint(3, 5))]
        lines.append(" ".join(w) + "\t" + " ".join(reversed(w)))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_train_seq2seq_resume_equals_uninterrupted(tmp_path):
    """6 steps straight vs 3, an interruption, and --resume for the other 3: same curve, same
    weights (CPU, fixed seed); a resume on other pairs is refused."""
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from llmtool.cli import app
    from llmtool.errors import UsageError
    from llmtool.seq2seq.train import Seq2SeqTrainOptions, train_seq2seq

    data = _reverse_pairs(tmp_path / "rev.tsv")
    opts = Seq2SeqTrainOptions(
        arch="bart", steps=6, batch_size=8, eval_every=2, checkpoint_every=3, max_eval_pairs=4
    )
    straight = train_seq2seq(data, tmp_path / "a", opts, device="cpu")

    def stop(p):
        if p.checkpointed:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_seq2seq(data, tmp_path / "b", opts, device="cpu", on_step=stop)
    assert (tmp_path / "b" / "checkpoints" / "step-000003" / "model.safetensors").is_file()
    other = _reverse_pairs(tmp_path / "other.tsv", n=30)
    with pytest.raises(UsageError, match="other pairs"):
        train_seq2seq(other, tmp_path / "b", device="cpu", resume=True)
    res = CliRunner().invoke(
        app,
        [
            "train",
            "--arch",
            "bart",
            "--data",
            str(data),
            "--out",
            str(tmp_path / "b"),
            "--resume",
            "--device",
            "cpu",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    resumed = json.loads((tmp_path / "b" / "train_metrics.json").read_text())
    for x, y in zip(straight["curve"], resumed["curve"], strict=True):
        assert x["step"] == y["step"]
        for key in ("train_loss", "val_loss"):
            if x[key] is not None:
                assert math.isclose(x[key], y[key], rel_tol=1e-6, abs_tol=1e-7), (key, x, y)
    wa = load_file(tmp_path / "a" / "model.safetensors")
    wb = load_file(tmp_path / "b" / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-6
    assert not (tmp_path / "b" / "checkpoints").exists()


def test_cli_eval_throughput_record_and_gate(bart_export, tmp_path):
    """--throughput: one scenario per batch size, medians of the timed repeats (positive), the
    repeat count; gated by the spread rule; other shapes refused."""
    from typer.testing import CliRunner

    from llmtool.cli import app

    _, out = bart_export
    common = ["eval", str(out), "--data", str(_write_pairs(tmp_path / "p.tsv")), "--throughput"]
    common += ["--batch-sizes", "1,2", "--prompt-lengths", "8", "--new-tokens", "4"]
    common += ["--warmup", "1", "--repeats", "3", "--provider", "cpu"]
    base = tmp_path / "r.json"
    res = CliRunner().invoke(app, [*common, "--json", str(base)])
    assert res.exit_code == 0, res.output
    assert "Throughput" in res.output and "TTFT ms" in res.output
    record = json.loads(base.read_text())
    t = record["throughput"]
    assert t["batch_sizes"] == [1, 2] and t["new_tokens"] == 4
    assert [s["batch_size"] for s in t["scenarios"]] == [1, 2]
    for s in t["scenarios"]:
        assert s["repeats"] == 3 and len(s["decoder_tokens_per_s_all"]) == 3
        assert s["encoder_ms"] > 0 and s["ttft_ms"] >= s["encoder_ms"]
        assert s["decoder_tokens_per_s"] == float(np.median(s["decoder_tokens_per_s_all"])) > 0
        assert 0 <= s["spread"] < 1 and s["source_tokens"] >= 2
    # A baseline 10x faster with no spread: this run's tok/s is a regression -> exit 1.
    fast = json.loads(base.read_text())
    for s in fast["throughput"]["scenarios"]:
        s["decoder_tokens_per_s"] *= 10
        s["spread"] = 0.0
    (tmp_path / "fast.json").write_text(json.dumps(fast))
    res = CliRunner().invoke(app, [*common, "--baseline", str(tmp_path / "fast.json")])
    assert res.exit_code == 1 and "decoder tok/s b1" in res.output, res.output
    shapes = json.loads(base.read_text())
    shapes["throughput"]["batch_sizes"] = [1, 4]
    (tmp_path / "shapes.json").write_text(json.dumps(shapes))
    res = CliRunner().invoke(app, [*common, "--baseline", str(tmp_path / "shapes.json")])
    assert res.exit_code == 2 and "batch_sizes" in res.output, res.output
