"""Reports of `llmtool eval`: the versioned JSON (schema-validated), Markdown, the plot, bad options."""

from __future__ import annotations

import json
import math
import struct
import sys

import pytest
from typer.testing import CliRunner

from conftest import SAMPLE_TEXT
from llmtool.cli import app
from llmtool.errors import UsageError
from llmtool.evaluate.record import json_safe
from llmtool.evaluate.render import check_plot_path
from llmtool.evaluate.schema import SCHEMA

runner = CliRunner()
SKELETON_KEYS = {"perplexity", "nll", "bits_per_byte", "tokens", "max_length", "stride", "provider"}


def validate(record: dict) -> None:
    import jsonschema

    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    jsonschema.Draft202012Validator(SCHEMA).validate(record)


@pytest.fixture(scope="module")
def full_run(tiny_llama_export, tmp_path_factory):
    """Perplexity, a PyTorch reference, ONNX and PyTorch throughput, and every report file."""
    hf_dir, onnx_dir = tiny_llama_export
    out = tmp_path_factory.mktemp("reports")
    summary = out / "step_summary.md"
    summary.write_text("# earlier step\n")
    args = [
        "eval", onnx_dir, "--data", SAMPLE_TEXT, "--max-length", "64", "--provider", "cpu",
        "--reference", hf_dir, "--throughput", "--batch-sizes", "1,2", "--prompt-lengths", "6",
        "--new-tokens", "3", "--warmup", "0", "--repeats", "1", "--backend", "pytorch",
        "--threads", "1", "--json", out / "r.json", "--markdown", out / "r.md", "--plot", out / "r.png",
    ]  # fmt: skip
    result = runner.invoke(
        app, [str(a) for a in args], env={"GITHUB_STEP_SUMMARY": str(summary), "COLUMNS": "100"}
    )
    assert result.exit_code == 0, result.output
    return result, out, json.loads((out / "r.json").read_text())


def test_json_is_valid_and_keeps_the_skeleton_keys(full_run):
    _, _, record = full_run
    validate(record)
    assert set(record) >= SKELETON_KEYS
    assert record["schema"] == "llmtool-eval" and record["schema_version"] == 1
    assert record["max_length"] == 64 and record["stride"] == 32 and record["provider"] == "cpu"
    assert set(record["reference"]) >= {
        "perplexity",
        "delta_perplexity",
        "log_ppl_ratio",
        "kl_divergence",
        "top1_agreement",
        "nonfinite_logits",
    }
    assert set(record["reference"]["kl_divergence"]) == {"mean", "median", "p99", "max"}
    assert record["reference"]["top1_agreement"] == 1.0


def test_json_metrics_environment_and_config(full_run):
    _, _, record = full_run
    m = record["metrics"]
    assert m["perplexity"] == {
        "value": record["perplexity"],
        "unit": "ppl/token",
        "higher_is_better": False,
        "gate": "perplexity",
        "standard_error": record["standard_error"],
    }
    decode = m["throughput.onnx.b2.p6.n3.decode_tokens_per_s"]
    assert decode["higher_is_better"] is True and decode["unit"] == "tokens/s"
    assert decode["gate"] == "throughput" and decode["value"] > 0
    assert "throughput.pytorch.b1.p6.n3.decode_tokens_per_s" in m
    assert m["reference.kl_divergence.p99"]["higher_is_better"] is False
    assert m["reference.top1_agreement"]["higher_is_better"] is True
    env = record["environment"]
    assert env["execution_provider"] == "cpu" and env["dtype"] == "fp32" and env["driver"] is None
    assert {"torch", "transformers", "onnx"} <= set(env["versions"])
    cfg = record["config"]
    assert cfg["perplexity"]["data_sha256"] == record["data"]["sha256"]
    assert cfg["perplexity"]["protocol"] == "hf" and cfg["throughput"]["backends"] == [
        "onnx",
        "pytorch",
    ]
    assert cfg["throughput"]["pytorch_model"] == cfg["perplexity"]["reference"]
    backends = [(s["backend"], s["key"]) for s in record["throughput"]["scenarios"]]
    assert sorted(backends) == [
        ("onnx", "b1.p6.n3"),
        ("onnx", "b2.p6.n3"),
        ("pytorch", "b1.p6.n3"),
        ("pytorch", "b2.p6.n3"),
    ]


def test_terminal_tables(full_run):
    result, _, _ = full_run
    for title in ("Perplexity", "Fidelity to", "Throughput", "Memory and bandwidth"):
        assert title in result.stdout
    assert "bits per byte" in result.stdout and "top-1 agreement" in result.stdout
    assert "pytorch cpu" in result.stdout and "onnx cpu" in result.stdout


def test_markdown_and_github_step_summary(full_run):
    _, out, record = full_run
    text = (out / "r.md").read_text()
    assert text.startswith("## llmtool eval: ")
    for heading in (
        "### Perplexity",
        "### Fidelity to",
        "### Throughput",
        "### Memory and bandwidth",
    ):
        assert heading in text
    assert f"| perplexity (token) | {record['perplexity']:.6g}" in text
    assert "| onnx cpu | 2×6 |" in text
    assert (out / "step_summary.md").read_text() == "# earlier step\n" + text + "\n"


def test_plot_is_a_real_png(full_run):
    _, out, _ = full_run
    data = (out / "r.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 600 and height > 300  # two panels side by side


def test_throughput_only_report(tiny_llama_export, tmp_path):
    path = tmp_path / "t.json"
    args = ["eval", str(tiny_llama_export[1]), "--throughput", "--batch-sizes", "1", "--prompt-lengths", "4",
            "--new-tokens", "2", "--warmup", "0", "--repeats", "1", "--provider", "cpu", "--json", str(path),
            "--plot", str(tmp_path / "t.png")]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    record = json.loads(path.read_text())
    validate(record)
    assert "perplexity" not in record and record["config"]["perplexity"] is None
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"


def test_json_safe_writes_no_nan():
    assert json_safe({"a": [math.nan, 1.0], "b": {"c": math.inf}, "d": "x"}) == {
        "a": [None, 1.0],
        "b": {"c": None},
        "d": "x",
    }


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "Nothing to evaluate"),
        (["--throughput", "--backend", "tensorrt"], "Unknown backend"),
        (
            ["--data", str(SAMPLE_TEXT), "--backend", "pytorch"],
            "--backend pytorch applies to --throughput",
        ),
        (["--data", str(SAMPLE_TEXT), "--plot", "out.jpg"], "PNG"),
        (["--throughput", "--batch-sizes", "1,a"], "--batch-sizes takes positive integers"),
        (
            ["--data", str(SAMPLE_TEXT), "--protocol", "lm-eval", "--stride", "8"],
            "--stride applies",
        ),
        (["--data", str(SAMPLE_TEXT), "--tolerance", "speed=1"], "--tolerance"),
    ],
)
def test_bad_options_exit_2(tiny_llama_export, args, message):
    result = runner.invoke(app, ["eval", str(tiny_llama_export[1]), "--provider", "cpu", *args])
    assert result.exit_code == 2, result.output
    assert message in result.stderr


def test_plot_without_matplotlib(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(UsageError, match=r"llmtool\[plot\]"):
        check_plot_path("p.png")
