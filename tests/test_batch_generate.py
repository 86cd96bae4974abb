"""``llmtool generate --prompt-file P --out R``: resumable batch generation.

Real ONNX Runtime sessions on the tiny Llama export; top-k sampling, so per-row seeds matter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmtool.batch.generate import BatchJob, generate_file
from llmtool.batch.rows import read_prompt_rows, row_seed
from llmtool.errors import UsageError
from llmtool.runtime.session import SessionOptions
from llmtool.sampling import SamplingConfig

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["The", "Once upon a time", "In the", "A", "It was", "She said", "Then", "We"]


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = [{"id": f"p{i}", "prompt": w} for i, w in enumerate(WORDS)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def job(export, **kwargs):
    sampling = SamplingConfig(strategy="top-k", top_k=20, seed=5)
    options = SessionOptions(intra_op_threads=1, huge_pages=False)
    args = {"max_new_tokens": 6, "sampling": sampling, "session_options": options}
    return BatchJob(str(export), provider="cpu", **{**args, "batch_size": 3, **kwargs})


def test_an_interrupted_job_resumed_writes_the_same_file(tiny_llama_export, prompts, tmp_path):
    export = tiny_llama_export[1]
    straight = tmp_path / "straight.jsonl"
    summary = generate_file(job(export), prompts, straight)
    assert (summary.rows, summary.generated, summary.skipped) == (8, 8, 0)
    assert summary.new_tokens == sum(json.loads(x)["new_tokens"] for x in straight.open())

    resumed = tmp_path / "resumed.jsonl"
    written = []

    def crash_after_4(row):
        written.append(row["id"])
        if len(written) == 4:  # in the middle of the second batch
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate_file(job(export), prompts, resumed, on_row=crash_after_4)
    with resumed.open("a") as f:
        f.write('{"id": "p4", "text": "torn')  # a write cut short by the crash
    again = generate_file(job(export), prompts, resumed)
    assert (again.skipped, again.generated) == (4, 4)
    assert resumed.read_bytes() == straight.read_bytes()
    rows = [json.loads(x) for x in straight.open()]
    assert [r["id"] for r in rows] == [f"p{i}" for i in range(8)]
    assert len({r["text"] for r in rows}) > 1  # sampled, not empty
    # Nothing left to do: a third run writes nothing.
    assert generate_file(job(export), prompts, resumed).generated == 0


def test_rows_do_not_depend_on_the_batching(tiny_llama_export, prompts, tmp_path):
    export = tiny_llama_export[1]
    one = tmp_path / "one.jsonl"
    eight = tmp_path / "eight.jsonl"
    generate_file(job(export, batch_size=1), prompts, one)
    generate_file(job(export, batch_size=8), prompts, eight)
    tokens = [[json.loads(x)["token_ids"] for x in f.open()] for f in (one, eight)]
    assert tokens[0] == tokens[1]


def test_a_bare_ray_flag_means_a_local_cluster():
    from llmtool.cli import optional_values

    assert optional_values(["eval", "d", "--ray"]) == ["eval", "d", "--ray", "local"]
    assert optional_values(["eval", "--ray", "--json", "x"]) == [
        "eval",
        "--ray",
        "local",
        "--json",
        "x",
    ]
    assert optional_values(["eval", "--ray", "ray://h:10001"]) == ["eval", "--ray", "ray://h:10001"]


def test_ids_line_order_and_seeds(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("first\n\nsecond\n")
    assert [(r.id, r.prompt) for r in read_prompt_rows(text)] == [(0, "first"), (1, "second")]
    assert row_seed(0, "a") == row_seed(0, "a") != row_seed(0, "b") != row_seed(1, "a")
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"id": 1, "prompt": "a"}\n{"prompt": "b"}\n')
    with pytest.raises(UsageError, match="give every row an id"):
        read_prompt_rows(mixed)
    twice = tmp_path / "twice.jsonl"
    twice.write_text('{"key": 1, "prompt": "a"}\n{"key": 1, "prompt": "b"}\n')
    with pytest.raises(UsageError, match="appears twice"):
        read_prompt_rows(twice, id_field="key")


def test_other_settings_are_refused_and_force_starts_over(tiny_llama_export, prompts, tmp_path):
    export = tiny_llama_export[1]
    out = tmp_path / "r.jsonl"
    generate_file(job(export, max_new_tokens=2), prompts, out)
    with pytest.raises(UsageError, match="other settings"):
        generate_file(job(export, max_new_tokens=3), prompts, out)
    summary = generate_file(job(export, max_new_tokens=3), prompts, out, force=True)
    assert summary.generated == 8 and len(out.read_text().splitlines()) == 8


def test_cli_batch_job_in_a_subprocess(tiny_llama_export, prompts, tmp_path):
    out = tmp_path / "cli.jsonl"
    command = [sys.executable, "-m", "llmtool", "generate", str(tiny_llama_export[1])]
    command += ["--prompt-file", str(prompts), "--out", str(out), "--max-new-tokens", "6"]
    command += ["--strategy", "top-k", "--top-k", "20", "--seed", "5", "--batch-size", "3"]
    command += ["--provider", "cpu", "--threads", "1", "--no-huge-pages", "--json"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert (summary["rows"], summary["generated"], summary["workers"]) == (8, 8, 1)
    library = tmp_path / "lib.jsonl"
    generate_file(job(tiny_llama_export[1]), prompts, library)
    assert out.read_bytes() == library.read_bytes()


def test_cli_ray_without_ray_says_how_to_install(tiny_llama_export, prompts, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from llmtool.cli import app

    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    args = ["generate", str(tiny_llama_export[1]), "--prompt-file", str(prompts)]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "r.jsonl"), "--ray", "local"])
    assert result.exit_code == 2, result.output
    assert "pip install 'llmtool[ray]'" in result.stderr
    assert not (tmp_path / "r.jsonl").exists()
