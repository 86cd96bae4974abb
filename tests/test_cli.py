"""The CLI through CliRunner, and one real subprocess run per command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from llmtool.cli import app
from llmtool.hugepages import malloc_env, malloc_uses_huge_pages
from llmtool.runtime.session import cuda_available

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_help_lists_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    for cmd in ("export", "generate", "eval"):
        assert cmd in result.output


def test_export_json(tiny_export, tmp_path):
    hf, _, _ = tiny_export
    result = invoke("export", hf, "--out", tmp_path / "o", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["validation"]["passed"] and data["out"] == str((tmp_path / "o").resolve())


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_export_quantized_prints_fidelity(tiny_llama_export, tmp_path, mode):
    result = invoke("export", tiny_llama_export[0], "--out", tmp_path / "q", "--quantize", mode)
    assert result.exit_code == 0, result.output
    assert f"{mode} ΔPPL vs fp32" in result.stdout and "top-1 agreement" in result.stdout
    manifest = json.loads((tmp_path / "q" / "llmtool.json").read_text())
    assert manifest["fidelity"]["passed"] and manifest["quantization"]["mode"] == mode


def test_export_refuses_existing_dir(tiny_export):
    hf, out, _ = tiny_export
    result = invoke("export", hf, "--out", out)
    assert result.exit_code == 2
    assert "already exists" in result.stderr and "--force" in result.stderr
    assert "Traceback" not in result.output


def test_export_missing_model(tmp_path):
    result = invoke("export", tmp_path / "missing", "--out", tmp_path / "o")
    assert result.exit_code == 2
    assert "does not exist" in result.stderr
    assert not (tmp_path / "o").exists()


def test_generate_json(tiny_export):
    _, out, _ = tiny_export
    result = invoke(
        "generate",
        out,
        "--prompt",
        "The keeper",
        "--prompt",
        "A",
        "--max-new-tokens",
        "5",
        "--provider",
        "cpu",
        "--json",
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["provider"] == "cpu"
    assert [o["prompt"] for o in data["outputs"]] == ["The keeper", "A"]
    assert all(1 <= o["new_tokens"] <= 5 for o in data["outputs"])
    assert data["timing"]["prefill_s"] > 0


def test_generate_prompt_file_and_table(tiny_export, tmp_path):
    _, out, _ = tiny_export
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("first prompt\n\nsecond prompt\n")
    result = invoke(
        "generate", out, "--prompt-file", prompts, "--max-new-tokens", "3", "--provider", "cpu"
    )
    assert result.exit_code == 0, result.output
    assert "first prompt" in result.stdout and "second prompt" in result.stdout


def test_generate_streams_single_prompt(tiny_export):
    _, out, _ = tiny_export
    result = invoke(
        "generate", out, "-p", "The keeper", "--max-new-tokens", "4", "--provider", "cpu"
    )
    assert result.exit_code == 0
    assert result.stdout.startswith("The keeper")
    assert "Running on CPU" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--top-p", "0", "--strategy", "top-k"], "top-p"),
        (["--temperature", "0", "--strategy", "top-k"], "temperature"),
        (["--max-new-tokens", "-1"], "max-new-tokens"),
        (["--provider", "tpu"], "provider"),
        (["--graph-optimization", "max"], "graph optimization level"),
        (["--threads", "-2"], "--threads"),
    ],
)
def test_generate_bad_options_exit_2(tiny_export, args, message):
    _, out, _ = tiny_export
    result = invoke("generate", out, "-p", "hi", *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr


def test_generate_session_options_keep_the_output(tiny_export):
    """Session settings change speed, never tokens."""
    _, out, _ = tiny_export
    base = ["generate", out, "-p", "The keeper", "--max-new-tokens", "6", "--json"]
    texts = set()
    changed = [
        "--graph-optimization",
        "disable",
        "--no-cpu-arena",
        "--threads",
        "1",
        "--no-huge-pages",
    ]
    for extra in ([], changed):
        result = invoke(*base, *extra)
        assert result.exit_code == 0, result.output
        texts.add(json.loads(result.stdout)["outputs"][0]["text"])
    assert len(texts) == 1


def test_generate_without_prompt(tiny_export):
    result = invoke("generate", tiny_export[1])
    assert result.exit_code == 2 and "No prompt" in result.stderr


@pytest.mark.skipif(cuda_available(), reason="a CUDA GPU is present")
def test_provider_cuda_without_gpu_is_an_error(tiny_export):
    result = invoke("generate", tiny_export[1], "-p", "hi", "--provider", "cuda")
    assert result.exit_code == 2
    assert "CUDA" in result.stderr and "--provider cpu" in result.stderr


def test_eval_writes_json(tiny_export, sample_text_file, tmp_path):
    _, out, _ = tiny_export
    path = tmp_path / "ppl.json"
    result = invoke(
        "eval",
        out,
        "--data",
        sample_text_file,
        "--max-length",
        "64",
        "--provider",
        "cpu",
        "--no-huge-pages",
        "--json",
        path,
    )
    assert result.exit_code == 0, result.output
    data = json.loads(path.read_text())
    assert data["config"]["huge_pages"]["reason"] == "turned off"
    assert set(data) >= {
        "perplexity",
        "nll",
        "bits_per_byte",
        "tokens",
        "max_length",
        "stride",
        "provider",
    }
    assert data["max_length"] == 64 and data["stride"] == 32
    assert "perplexity" in result.stdout


def test_eval_not_an_export(tmp_path, sample_text_file):
    result = invoke("eval", tmp_path, "--data", sample_text_file)
    assert result.exit_code == 2 and "not an llmtool export" in result.stderr


def test_debug_shows_traceback(tmp_path):
    result = runner.invoke(app, ["--debug", "eval", str(tmp_path), "--data", str(tmp_path / "x")])
    assert result.exit_code != 0 and result.exception is not None


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "llmtool", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def test_subprocess_export_generate_eval(tiny_export, sample_text_file, tmp_path):
    hf, _, _ = tiny_export
    out = tmp_path / "export"
    proc = _run("export", hf, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "greedy tokens equal" in proc.stdout
    proc = _run(
        "generate", out, "-p", "The keeper", "--max-new-tokens", "6", "--provider", "cpu", "--json"
    )
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert record["outputs"][0]["new_tokens"] >= 1
    # generate restarted itself with glibc's malloc asking for huge pages, where that works.
    expected = malloc_env() is not None or malloc_uses_huge_pages()
    assert record["huge_pages"]["malloc"] is expected
    proc = _run("eval", out, "--data", sample_text_file, "--max-length", "64", "--provider", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert "bits per byte" in proc.stdout
    proc = _run("export", hf, "--out", out)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_subprocess_no_huge_pages_does_not_restart(tiny_export):
    proc = _run(
        "generate", tiny_export[1], "-p", "A", "--max-new-tokens", "2", "--no-huge-pages", "--json"
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["huge_pages"] == {
        "malloc": False,
        "candidate_mb": 0.0,
        "collapsed_mb": 0.0,
        "seconds": 0.0,
        "reason": "turned off",
    }


def test_help_is_fast():
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "llmtool", "--help"], capture_output=True, text=True
    )
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0
    # The interpreter itself takes ~0.1 s; the budget is 1 s for the whole --help.
    assert elapsed < 1.0, f"llmtool --help took {elapsed:.2f} s"
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, llmtool.cli; print(sorted(m for m in ('torch', 'transformers', "
            "'onnxruntime', 'onnx') if m in sys.modules))",
        ],
        capture_output=True,
        text=True,
    )
    assert out.stdout.strip() == "[]"
