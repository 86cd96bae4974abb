"""Ray Data: ``eval --ray`` and ``generate --prompt-file ... --ray`` equal the single process.

One local cluster for the module (``ray.init(num_cpus=2)``): two actors of one ONNX Runtime
thread each. The records are compared field by field with the single-process run; only the
wall-clock fields may differ.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SAMPLE_TEXT, save_tiny_model

ray = pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parents[1]
# What may differ between two runs of the same evaluation: when, how long, on what machine load.
CLOCK = {"created", "seconds", "environment"}


@pytest.fixture(scope="module")
def cluster():
    """A local 2-CPU cluster; its address, for the drivers that join it (--ray ADDRESS)."""
    saved = os.environ.get("PYTHONPATH")
    # The actors import llmtool from this checkout (an installed llmtool needs nothing).
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), saved or ""])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
    if saved is None:
        del os.environ["PYTHONPATH"]
    else:
        os.environ["PYTHONPATH"] = saved


@pytest.fixture(scope="module")
def other_export(tokenizer, tmp_path_factory):
    """A second tiny Llama (another seed): the --reference."""
    from llmtool.export import export_model

    hf = save_tiny_model("llama", tokenizer, tmp_path_factory.mktemp("hf-ref"), seed=1)
    out = tmp_path_factory.mktemp("onnx-ref") / "model"
    export_model(hf, out)
    return out


def perplexity_record(export, **options):
    from llmtool.evaluate.run import EvalOptions, run_eval

    base = {"data": SAMPLE_TEXT, "max_length": 48, "stride": 32, "threads": 1}
    report = run_eval(export, EvalOptions(**{**base, **options}, huge_pages=False))
    return {k: v for k, v in report.record.items() if k not in CLOCK}


def test_ray_eval_with_reference_equals_one_process(cluster, tiny_llama_export, other_export):
    export = tiny_llama_export[1]
    single = perplexity_record(export, reference=str(other_export))
    sharded = perplexity_record(export, reference=str(other_export), ray=cluster)
    assert single["windows"] > 4 and single["reference"]["tokens"] == single["tokens"]
    assert sharded == single  # every field: perplexity, its error, KL, top-1, per window


def test_a_failing_actor_gives_its_own_error(cluster, tiny_llama_export, prompts, tmp_path):
    from dataclasses import replace

    from llmtool.batch.generate import generate_file
    from llmtool.batch.ray import ray_generate_runner
    from llmtool.errors import UsageError
    from llmtool.runtime.session import SessionOptions

    runner, workers = ray_generate_runner(cluster, threads=1)
    # Checked only where a session opens: in the actors.
    bad = SessionOptions(graph_optimization="bogus", huge_pages=False)
    job = replace(_job(tiny_llama_export[1]), session_options=bad)
    with pytest.raises(UsageError, match="Unknown graph optimization level 'bogus'"):
        generate_file(job, prompts, tmp_path / "r.jsonl", runner=runner, workers=workers)


def _job(export):
    from llmtool.batch.generate import BatchJob
    from llmtool.runtime.session import SessionOptions
    from llmtool.sampling import SamplingConfig

    return BatchJob(
        str(export),
        max_new_tokens=5,
        sampling=SamplingConfig(strategy="top-k", top_k=20, seed=9),
        provider="cpu",
        session_options=SessionOptions(intra_op_threads=1, huge_pages=False),
        batch_size=2,
    )


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    words = ["The", "Once", "In the", "A", "It was", "She said", "Then"]
    path.write_text(
        "".join(json.dumps({"id": 10 + i, "prompt": w}) + "\n" for i, w in enumerate(words))
    )
    return path


def test_ray_generate_writes_the_single_process_file(cluster, tiny_llama_export, prompts, tmp_path):
    from llmtool.batch.generate import generate_file
    from llmtool.batch.ray import ray_generate_runner

    export = tiny_llama_export[1]
    local = tmp_path / "local.jsonl"
    generate_file(_job(export), prompts, local)
    runner, workers = ray_generate_runner(cluster, threads=1)
    sharded = tmp_path / "ray.jsonl"
    summary = generate_file(_job(export), prompts, sharded, runner=runner, workers=workers)
    assert (summary.generated, summary.workers) == (7, 2)
    assert sharded.read_bytes() == local.read_bytes()


def test_cli_generate_ray_in_a_subprocess(cluster, tiny_llama_export, prompts, tmp_path):
    """The real command, as a second driver on the module's cluster (--ray ADDRESS)."""
    from llmtool.batch.generate import generate_file

    export = tiny_llama_export[1]
    out = tmp_path / "cli.jsonl"
    command = [
        sys.executable,
        "-m",
        "llmtool",
        "generate",
        str(export),
        "--prompt-file",
        str(prompts),
    ]
    command += ["--out", str(out), "--max-new-tokens", "5", "--strategy", "top-k", "--top-k", "20"]
    command += ["--seed", "9", "--batch-size", "2", "--provider", "cpu", "--threads", "1"]
    command += ["--no-huge-pages", "--json", "--ray", cluster]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, env=os.environ)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["workers"] == 2
    local = tmp_path / "local.jsonl"
    generate_file(_job(export), prompts, local)
    assert out.read_bytes() == local.read_bytes()


def test_cli_eval_ray(cluster, tiny_llama_export, tmp_path):
    from typer.testing import CliRunner

    from llmtool.cli import app

    export = tiny_llama_export[1]
    args = ["eval", str(export), "--data", str(SAMPLE_TEXT), "--max-length", "48", "--stride", "32"]
    args += ["--threads", "1", "--no-huge-pages", "--json", str(tmp_path / "r.json")]
    result = CliRunner().invoke(app, [*args, "--ray", cluster])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "r.json").read_text())
    single = perplexity_record(export)
    assert {k: v for k, v in record.items() if k not in CLOCK} == single
