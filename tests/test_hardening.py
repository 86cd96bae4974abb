"""Issue 7: every bad input is one clear sentence with exit code 2, nothing is half-written,
nothing unsafe is loaded, and long runs do not leak."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from llmtool.cli import app
from llmtool.errors import UsageError, classify
from llmtool.runtime.session import cuda_available

runner = CliRunner()


def run_cli(*args) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.stderr


def assert_clear_error(code: int, stderr: str, *fragments: str, exit_code: int = 2) -> None:
    """Exit code, one sentence naming the problem, no traceback."""
    assert code == exit_code, stderr
    assert "Traceback" not in stderr
    text = " ".join(stderr.split())
    assert text.count("Error:") == 1, text
    message = text[text.index("Error:") :]
    for fragment in fragments:
        assert fragment in message, message


@pytest.fixture
def export_copy(tiny_llama_export, tmp_path) -> Path:
    """A private copy of an export, free to damage."""
    copy = tmp_path / "export"
    shutil.copytree(tiny_llama_export[1], copy)
    return copy


# The bad-input matrix ---------------------------------------------------------------------------
def test_missing_path(tmp_path):
    assert_clear_error(
        *run_cli("export", tmp_path / "missing", "--out", tmp_path / "o"), "does not exist"
    )
    assert_clear_error(*run_cli("generate", tmp_path / "missing", "-p", "x"), "does not exist")
    assert not (tmp_path / "o").exists()


def test_directory_without_config(tmp_path):
    (tmp_path / "model").mkdir()
    assert_clear_error(
        *run_cli("export", tmp_path / "model", "--out", tmp_path / "o"), "no config.json"
    )


def test_truncated_onnx(export_copy):
    path = export_copy / "model.onnx"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert_clear_error(
        *run_cli("generate", export_copy, "-p", "hi"), "does not match the sha256", "re-export"
    )


def test_modified_onnx_with_matching_size(export_copy):
    path = export_copy / "model.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert_clear_error(*run_cli("generate", export_copy, "-p", "hi"), "does not match the sha256")


def test_corrupt_onnx_with_a_rewritten_manifest(export_copy):
    """Someone rewrote llmtool.json to match garbage: ONNX Runtime's refusal is still one sentence."""
    from llmtool.manifest import file_record

    path = export_copy / "model.onnx"
    path.write_bytes(b"\x08\x07garbage" * 100)
    manifest = json.loads((export_copy / "llmtool.json").read_text())
    manifest["files"] = {"model.onnx": file_record(path)}
    (export_copy / "llmtool.json").write_text(json.dumps(manifest))
    code, err = run_cli("generate", export_copy, "-p", "hi", "--provider", "cpu")
    assert_clear_error(code, err, "model.onnx")


def test_tokenizer_that_does_not_fit(tmp_path, tokenizer):
    from conftest import build_tiny_model

    build_tiny_model("llama", vocab_size=len(tokenizer) - 50).save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    assert_clear_error(*run_cli("export", tmp_path / "hf", "--out", tmp_path / "o"), "vocabulary")


def test_unsupported_architecture(tmp_path):
    from transformers import BertConfig

    BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    ).save_pretrained(tmp_path / "bert")
    (tmp_path / "bert" / "model.safetensors").write_bytes(b"")
    code, err = run_cli("export", tmp_path / "bert", "--out", tmp_path / "o")
    assert_clear_error(code, err, "'bert' is not supported", "gpt2", "llama")


def test_prompt_longer_than_context(tiny_llama_export):
    long_prompt = "the light came on " * 200
    assert_clear_error(
        *run_cli("generate", tiny_llama_export[1], "-p", long_prompt), "exceeds the model's context"
    )


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["-p", "   "], "empty"),
        (["-p", "hi", "--max-new-tokens", "0"], "max-new-tokens"),
        (["-p", "hi", "--max-new-tokens", "-3"], "max-new-tokens"),
        (["-p", "hi", "--strategy", "top-k", "--top-k", "0"], "top-k"),
        (["-p", "hi", "--strategy", "top-k", "--top-p", "0"], "top-p"),
        (["-p", "hi", "--strategy", "top-k", "--top-p", "1.01"], "top-p"),
        (["-p", "hi", "--strategy", "top-k", "--temperature", "0"], "temperature"),
        (["-p", "hi", "--strategy", "top-k", "--temperature", "-1"], "temperature"),
    ],
)
def test_bad_generation_options(tiny_llama_export, args, fragment):
    assert_clear_error(*run_cli("generate", tiny_llama_export[1], *args), fragment)


@pytest.mark.parametrize(
    ("name", "content", "fragments"),
    [
        ("empty.txt", b"", ("empty",)),
        ("latin1.txt", b"na\xefve caf\xe9", ("latin1.txt", "offset 2")),
        ("docs.jsonl", b'{"body": "some text"}\n', ("text",)),
    ],
)
def test_bad_data(tiny_llama_export, tmp_path, name, content, fragments):
    data = tmp_path / name
    data.write_bytes(content)
    assert_clear_error(
        *run_cli("eval", tiny_llama_export[1], "--data", data, "--provider", "cpu"), *fragments
    )


@pytest.mark.skipif(cuda_available(), reason="a CUDA GPU is present")
def test_provider_cuda_without_cuda(tiny_llama_export):
    assert_clear_error(
        *run_cli("generate", tiny_llama_export[1], "-p", "hi", "--provider", "cuda"), "CUDA"
    )


def test_baseline_of_another_schema(tiny_llama_export, tmp_path, sample_text_file):
    baseline = tmp_path / "old.json"
    baseline.write_text(json.dumps({"schema": "something-else", "perplexity": 3.0}))
    code, err = run_cli(
        "eval",
        tiny_llama_export[1],
        "--data",
        sample_text_file,
        "--baseline",
        baseline,
        "--provider",
        "cpu",
    )
    assert_clear_error(code, err, "old.json")


def test_out_inside_the_model_dir(tiny_llama_export):
    hf = tiny_llama_export[0]
    assert_clear_error(*run_cli("export", hf, "--out", hf / "onnx"), "inside the model directory")
    assert not (hf / "onnx").exists()


def test_unwritable_out(tiny_llama_export, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    assert_clear_error(
        *run_cli("export", tiny_llama_export[0], "--out", blocker / "sub"), "is a file"
    )


@pytest.mark.parametrize(
    "message",
    [
        "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Failed to allocate memory for requested buffer of size 123456",
        "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total capacity)",
        "std::bad_alloc",
    ],
)
def test_out_of_memory_is_explained(message):
    error = classify(RuntimeError(message))
    assert isinstance(error, UsageError) and error.exit_code == 2
    assert "Out of memory" in str(error) and "smaller batch" in str(error)


def test_truncated_safetensors(tmp_path, tiny_llama_export):
    hf = tmp_path / "hf"
    shutil.copytree(tiny_llama_export[0], hf)
    weights = hf / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert_clear_error(*run_cli("export", hf, "--out", tmp_path / "o"), "Cannot load model weights")


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(200))
    code, err = run_cli("export", bad, "--out", tmp_path / "o")
    assert_clear_error(code, err, "model.gguf")


def test_empty_prompt_file(tiny_llama_export, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n\n")
    assert_clear_error(
        *run_cli("generate", tiny_llama_export[1], "--prompt-file", prompts), "no prompts"
    )


# Safe loading -----------------------------------------------------------------------------------
def _external_copy(source: Path, target: Path, location: str, *, length_extra: int = 0) -> None:
    """Rewrite an export so one weight lives in an external file at ``location``."""
    from llmtool.manifest import file_record

    shutil.copytree(source, target)
    model = onnx.load(str(target / "model.onnx"))
    tensor = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    raw = tensor.raw_data
    (target / "weights.bin").write_bytes(raw)
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (
        ("location", location),
        ("offset", "0"),
        ("length", str(len(raw) + length_extra)),
    ):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    onnx.save_model(model, str(target / "model.onnx"))
    manifest = json.loads((target / "llmtool.json").read_text())
    manifest["files"] = {"model.onnx": file_record(target / "model.onnx")}
    (target / "llmtool.json").write_text(json.dumps(manifest))


def test_external_data_inside_the_directory_loads(tiny_llama_export, tmp_path):
    from llmtool.generate import generate

    _external_copy(tiny_llama_export[1], tmp_path / "ok", "weights.bin")
    out = generate(str(tmp_path / "ok"), ["The keeper"], max_new_tokens=3, provider="cpu")
    assert out.outputs[0].new_tokens >= 1


@pytest.mark.parametrize("location", ["../weights.bin", "/etc/passwd", "sub/../../weights.bin"])
def test_external_data_outside_the_directory_is_refused(tiny_llama_export, tmp_path, location):
    _external_copy(tiny_llama_export[1], tmp_path / "bad", location)
    assert_clear_error(*run_cli("generate", tmp_path / "bad", "-p", "hi"), "outside its directory")


def test_external_data_past_the_end_is_refused(tiny_llama_export, tmp_path):
    _external_copy(tiny_llama_export[1], tmp_path / "bad", "weights.bin", length_extra=4096)
    assert_clear_error(*run_cli("generate", tmp_path / "bad", "-p", "hi"), "past the end")


def test_manifest_file_names_cannot_escape(export_copy):
    manifest = json.loads((export_copy / "llmtool.json").read_text())
    manifest["files"]["../../etc/passwd"] = {"sha256": "0", "bytes": 1}
    (export_copy / "llmtool.json").write_text(json.dumps(manifest))
    assert_clear_error(*run_cli("generate", export_copy, "-p", "hi"), "outside its directory")


def test_remote_code_is_never_trusted(tmp_path, tiny_llama_export):
    hf = tmp_path / "hf"
    shutil.copytree(tiny_llama_export[0], hf)
    config = json.loads((hf / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil.EvilModel"}
    config["model_type"] = "evil"
    (hf / "config.json").write_text(json.dumps(config))
    (hf / "evil.py").write_text("raise SystemExit('remote code ran')\n")
    code, err = run_cli("export", hf, "--out", tmp_path / "o")
    assert code == 2 and "remote code ran" not in err


# Nothing half-written ---------------------------------------------------------------------------
def _llmtool(*args, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "llmtool", *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def test_sigint_during_export_keeps_the_previous_output(tiny_llama_export, tmp_path):
    hf, previous = tiny_llama_export
    out = tmp_path / "out"
    shutil.copytree(previous, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    proc = _llmtool("export", hf, "--out", out, "--force")
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob(".out.tmp-*/model.onnx")):
        time.sleep(0.02)
    assert list(tmp_path.glob(".out.tmp-*")), "the export never started writing"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Interrupted" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_sigint_during_train_keeps_the_checkpoint_and_resumes(tmp_path):
    from conftest import SAMPLE_TEXT

    out = tmp_path / "run"
    options = "--preset tiny --device cpu --seq-len 32 --batch-size 2 --vocab-size 300"
    args = ["train", "--data", SAMPLE_TEXT, "--out", out, *options.split(), "--eval-every", "50"]
    proc = _llmtool(*args, "--steps", "100000", "--checkpoint-every", "2")
    latest = out / "checkpoints" / "latest"
    deadline = time.time() + 120
    while time.time() < deadline and not latest.is_file():
        time.sleep(0.05)
    assert latest.is_file(), "no checkpoint was written"
    time.sleep(0.5)  # mid-run, most likely between or inside checkpoint writes
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "--resume" in err and "Traceback" not in err
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]  # no temp files left
    checkpoint = out / "checkpoints" / latest.read_text().strip()
    assert (checkpoint / "model.safetensors").is_file()
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] >= 2
    assert not (out / "config.json").exists()  # no final model from an interrupted run
    # (resuming reproduces an uninterrupted run: tests/test_train.py)


def test_disk_full_gives_a_clear_error(tiny_llama_export, tmp_path):
    """A file-size limit makes writes fail as a full disk would (EFBIG instead of ENOSPC)."""
    import resource

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    out = tmp_path / "out"
    proc = _llmtool("export", tiny_llama_export[0], "--out", out, preexec_fn=limit)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err
    assert "No space left" in " ".join(err.split()) and "Traceback" not in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


# Endurance and properties -----------------------------------------------------------------------
@pytest.mark.parametrize("fused", [False, True], ids=["standard", "fused"])
def test_memory_is_flat_over_1000_generations(tiny_llama_export, tmp_path, fused):
    import psutil

    from llmtool.export import export_model
    from llmtool.generate import generate
    from llmtool.runtime import OnnxCausalLM

    path = tiny_llama_export[1]
    if fused:
        path = export_model(tiny_llama_export[0], tmp_path / "fused", fused=True).out
    model = OnnxCausalLM(path, "cpu")
    rng = np.random.default_rng(0)
    process = psutil.Process()

    def one(i: int) -> None:
        batch = int(rng.integers(1, 5))
        prompts = [
            list(rng.integers(1, model.vocab_size, int(rng.integers(1, 24)))) for _ in range(batch)
        ]
        generate(model, prompts, max_new_tokens=int(rng.integers(1, 9)), stop_at_eos=False)

    for i in range(100):  # warm-up: every decoder shape and arena size gets created
        one(i)
    base = process.memory_info().rss
    for i in range(1000):
        one(i)
    growth = (process.memory_info().rss - base) / base
    assert growth < 0.05, f"host memory grew {100 * growth:.1f}% over 1,000 generations"


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    data=st.data(),
    batch=st.integers(1, 4),
    new=st.integers(1, 6),
    strategy=st.sampled_from(["greedy", "top-k"]),
    top_k=st.integers(1, 400),
    top_p=st.floats(0.01, 1.0),
    temperature=st.floats(0.05, 5.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_generation_properties(
    tiny_llama_export, data, batch, new, strategy, top_k, top_p, temperature, seed
):
    from llmtool.generate import generate
    from llmtool.runtime import OnnxCausalLM
    from llmtool.sampling import SamplingConfig

    model = _cached_model(tiny_llama_export[1])
    prompts = [
        data.draw(st.lists(st.integers(0, model.vocab_size - 1), min_size=1, max_size=30))
        for _ in range(batch)
    ]
    cfg = SamplingConfig(
        strategy=strategy, top_k=top_k, top_p=top_p, temperature=temperature, seed=seed
    )
    result = generate(model, prompts, max_new_tokens=new, sampling=cfg, stop_at_eos=False)
    assert len(result.outputs) == batch
    for out in result.outputs:
        assert out.new_tokens == new == len(out.token_ids)
        assert all(0 <= t < model.vocab_size for t in out.token_ids)
    del OnnxCausalLM


_MODELS: dict[Path, object] = {}


def _cached_model(path: Path):
    from llmtool.runtime import OnnxCausalLM

    if path not in _MODELS:
        _MODELS[path] = OnnxCausalLM(path, "cpu")
    return _MODELS[path]
