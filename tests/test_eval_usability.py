"""`llmtool eval` as a new user meets it: defaults that fit the model, progress, bounded runs,
reports that name what was measured, and the protocols' own defaults and refusals."""

from __future__ import annotations

import json
import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import SAMPLE_TEXT
from llmtool.cli import app, eval_progress
from llmtool.evaluate.perplexity import default_max_length, evaluate_perplexity
from llmtool.evaluate.preprocess import wikitext_detokenize
from llmtool.evaluate.render import _ms, rich_tables, to_markdown
from llmtool.evaluate.run import EvalOptions, run_eval
from llmtool.evaluate.throughput import classify_bound, fit_default_shapes

runner = CliRunner()


# Defaults that fit the model.


def test_default_shapes_fit_a_small_context():
    # `--preset tiny` trains a context of 128: 512 + 128 tokens cannot run there.
    prompts, new, note = fit_default_shapes(128, None, None)
    assert (prompts, new) == ((96,), 32) and max(prompts) + new <= 128
    assert "fitted to the model's context of 128 tokens" in note
    assert fit_default_shapes(2048, None, None) == ((128, 512), 128, None)
    assert fit_default_shapes(256, None, None)[:2] == ((128,), 64)
    assert fit_default_shapes(128, (100,), 50)[:2] == ((100,), 50)  # given shapes are kept


def test_cli_throughput_defaults_adapt_to_the_context(tiny_llama_export, tmp_path):
    _, onnx_dir = tiny_llama_export  # context 256: the default 512-token prompt does not fit
    out = tmp_path / "t.json"
    args = ["eval", str(onnx_dir), "--throughput", "--batch-sizes", "1", "--warmup", "0"]
    args += ["--repeats", "1", "--provider", "cpu", "--json", str(out)]
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    shapes = {(s["prompt_length"], s["new_tokens"]) for s in record["throughput"]["scenarios"]}
    assert shapes == {(128, 64)}
    note = record["config"]["throughput"]["shapes_note"]
    assert "fitted to the model's context of 256 tokens" in note
    assert note in " ".join(result.stdout.split())  # the caption says so (however it wraps)


def test_lm_eval_window_defaults_to_the_models_context():
    big = SimpleNamespace(max_positions=2048)
    assert default_max_length(big, "lm-eval") == 2048  # lm-evaluation-harness: max_length = context
    assert default_max_length(big, "hf") == 1024 == default_max_length(big, "llama-cpp")


def test_llama_cpp_refuses_texts_shorter_than_two_contexts(tiny_llama_export, tokenizer, tmp_path):
    # A text of 300-400 tokens holds one chunk of 256 but not two: llama-perplexity refuses it.
    words = SAMPLE_TEXT.read_text(encoding="utf-8").split(" ")
    count = next(
        i for i in range(50, len(words)) if len(tokenizer(" ".join(words[:i]))["input_ids"]) >= 300
    )
    path = tmp_path / "short.txt"
    path.write_text(" ".join(words[:count]), encoding="utf-8")
    args = ["eval", str(tiny_llama_export[1]), "--data", str(path), "--protocol", "llama-cpp"]
    result = runner.invoke(app, [*args, "--max-length", "256"])
    assert result.exit_code == 2, result.output
    assert "needs at least 2 × --max-length = 512, as llama-perplexity does" in result.stderr
    assert runner.invoke(app, [*args, "--max-length", "128"]).exit_code == 0


# Progress and bounded runs.


def test_progress_eta_survives_slow_steps():
    """Steps of 100 s (a throughput scenario) used to leave Rich's 30 s estimate empty."""
    clock = [0.0]
    with eval_progress(None, get_time=lambda: clock[0]) as progress:
        task = progress.add_task("Timing", total=4)
        for step in range(1, 3):
            clock[0] += 100.0
            progress.update(task, completed=step)
        remaining = progress.tasks[0].time_remaining
    assert remaining == pytest.approx(200.0)


def test_max_tokens_bounds_the_run_and_is_said_up_front(tiny_llama_export):
    said = []
    options = EvalOptions(data=SAMPLE_TEXT, max_length=64, max_tokens=100, provider="cpu")
    report = run_eval(
        tiny_llama_export[1], options, on_progress=lambda text, done, total: said.append(text)
    )
    r = report.record
    # Windows of 64: the first scores 63 tokens, each later one 32: the third passes 100.
    assert r["windows"] == 3 and r["tokens"] == 63 + 32 + 32
    assert r["word_perplexity"] is None and r["bits_per_byte"] is None  # a partly scored text
    assert "Scoring 3 windows, 127 tokens (--max-tokens 100)" in said
    assert r["config"]["perplexity"]["max_tokens"] == 100


# Reports that name what was measured.


@pytest.fixture(scope="module")
def int4_record(tiny_llama_export, tmp_path_factory):
    from llmtool.export import export_model

    out = tmp_path_factory.mktemp("int4") / "int4"
    export_model(tiny_llama_export[0], out, quantize="int4")
    options = EvalOptions(data=SAMPLE_TEXT, max_length=64, provider="cpu")
    fp32 = run_eval(tiny_llama_export[1], options).record
    base = tmp_path_factory.mktemp("base") / "fp32.json"
    base.write_text(json.dumps(fp32))
    tolerance = __import__("llmtool.evaluate.gate", fromlist=["Tolerance"]).Tolerance(
        perplexity=10.0
    )
    return run_eval(out, options, baseline=base, tolerance=tolerance).record


def test_markdown_names_quantization_data_and_baseline_model(int4_record, tiny_llama_export):
    md = to_markdown(int4_record)
    header = md.splitlines()[4]
    assert "int4 weights (fp32 activations)" in header and "· fp32 ·" not in header
    assert md.splitlines()[2].startswith("**PASS**")  # the verdict leads
    assert "data sample.txt (sha256" in md
    assert f"baseline model {tiny_llama_export[1]}" in md
    assert "quantization differs: baseline fp32, this run int4" in md


def test_markdown_leads_with_a_failing_verdict(int4_record):
    record = json.loads(json.dumps(int4_record))
    row = next(r for r in record["gate"]["rows"] if r["metric"] == "perplexity")
    row.update(status="worse", change=0.0123)
    record["gate"]["passed"] = False
    verdict = to_markdown(record).splitlines()[2]
    assert verdict.startswith("**FAIL**") and "`perplexity` +1.23%" in verdict


def test_gate_table_keeps_metric_names_whole_at_80_columns(int4_record):
    from rich.console import Console

    console = Console(width=80, record=True)
    for table in rich_tables(int4_record):
        console.print(table)
    text = console.export_text()
    for row in int4_record["gate"]["rows"]:
        for part in row["metric"].split("."):
            assert re.search(rf"\b{re.escape(part)}\b", text), part
    assert "word_perplexity" in text


def test_ttft_is_shown_in_plain_milliseconds():
    assert _ms(2.13) == "2,130" and _ms(0.0412) == "41.2" and _ms(0.000523) == "0.523"


@pytest.mark.parametrize(
    ("step_bytes", "utilization", "bound"),
    [
        (540_000_000, 0.47, "bandwidth"),  # SmolLM2 fp32 on 2 cores: memory is what it waits for
        (5_500_000, 0.9, "cache"),  # fits in a 16 MiB last-level cache: DRAM is not the limit
        (540_000_000, 0.1, "launch"),
    ],
)
def test_bound_uses_the_cache_and_the_measured_figures(step_bytes, utilization, bound):
    assert classify_bound(step_bytes, utilization, 16 * 2**20) == bound


# --preprocess wikitext.


def test_wikitext_detokenizer_rules():
    raw = " = = Early life = = \n The road 's length is 1 @,@ 234 @.@ 5 km ( about N miles ) , in 1990 @-@ 91 . \n"
    assert wikitext_detokenize(raw) == (
        " == Early life ==\nThe road's length is 1,234.5 km (about 1 miles), in 1990-91.\n"
    )


def test_preprocess_scores_the_detokenized_text_and_counts_the_original(
    tiny_llama_export, tmp_path
):
    raw = (
        " = Valkyria = \n Senjō no Valkyria 3 is a game , released in 2011 @-@ 12 . "
        "It sold 1 @,@ 000 copies ( in Japan ) . \n" * 6
    )
    (tmp_path / "raw.txt").write_text(raw, encoding="utf-8")
    (tmp_path / "detok.txt").write_text(wikitext_detokenize(raw), encoding="utf-8")
    onnx = tiny_llama_export[1]
    pre = evaluate_perplexity(
        onnx, tmp_path / "raw.txt", protocol="lm-eval", preprocess="wikitext", provider="cpu"
    )
    plain = evaluate_perplexity(onnx, tmp_path / "detok.txt", protocol="lm-eval", provider="cpu")
    assert pre.tokens == plain.tokens and pre.nll == pytest.approx(plain.nll, rel=1e-9)
    words = len(re.split(r"\s+", raw))
    assert pre.words == words > plain.words and pre.bytes == len(raw.encode())
    total = pre.nll * pre.tokens
    assert pre.word_perplexity == pytest.approx(math.exp(total / words), rel=1e-9)
    assert pre.preprocess == "wikitext"
    assert np.sum(pre.window_tokens) == pre.tokens


def test_cli_preprocess_is_recorded_and_gated(tiny_llama_export, tmp_path):
    out = tmp_path / "p.json"
    args = ["eval", str(tiny_llama_export[1]), "--data", str(SAMPLE_TEXT), "--protocol", "lm-eval"]
    result = runner.invoke(app, [*args, "--preprocess", "wikitext", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["config"]["perplexity"]["preprocess"] == "wikitext"
    result = runner.invoke(app, [*args, "--baseline", str(out)])  # no preprocessing now
    assert result.exit_code == 2 and "preprocess wikitext → null" in result.stderr
    result = runner.invoke(app, [*args, "--preprocess", "moses"])
    assert result.exit_code == 2 and "Unknown --preprocess" in result.stderr


# The comparison plot.


def test_plot_shows_the_comparison(tiny_llama_export, tmp_path):
    from llmtool.evaluate.plot import panels, plot_png

    hf_dir, onnx_dir = tiny_llama_export
    options = EvalOptions(
        data=SAMPLE_TEXT,
        max_length=64,
        provider="cpu",
        reference=str(hf_dir),
        throughput=True,
        batch_sizes=(1,),
        prompt_lengths=(8,),
        new_tokens=3,
        warmup=0,
        repeats=2,
    )
    first = run_eval(onnx_dir, options).record
    path = tmp_path / "base.json"
    path.write_text(json.dumps(first))
    report = run_eval(onnx_dir, options, baseline=path)
    record = report.record
    assert panels(record, report.baseline) == ["delta", "kl", "throughput"]
    assert panels(first) == ["delta", "kl", "throughput"]  # the reference alone gives ΔNLL too
    hist = record["reference"]["kl_histogram"]
    assert sum(hist["counts"]) == record["reference"]["tokens"] and len(hist["edges"]) == 41
    # The reference's per-window sums add up to its perplexity.
    ref_nll = sum(record["reference"]["window_nll"]) / record["tokens"]
    assert math.exp(ref_nll) == pytest.approx(record["reference"]["perplexity"], rel=1e-6)
    png = plot_png(record, report.baseline)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width = int.from_bytes(png[16:20], "big")
    assert width >= 3 * 500  # three panels side by side
