"""``llmtool train`` on 2 ranks (gloo, CPU): DDP and FSDP2 equal 1 rank x 2b, resume across world
sizes, and a killed rank.

The reference is one process with batch 2b; the 2-rank runs use batch b per rank, so a global batch
holds the same windows and the two are the same optimization: every step's loss and every
validation loss must agree to float tolerance (only the order of the sums differs). Two ranks run
either as forked processes calling :func:`train_model` (fast: nothing is imported again) or as
real ``torchrun ... llmtool train`` jobs.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import SAMPLE_TEXT
from llmtool.train import TrainOptions, train_model

STEPS = 20
B = 2  # per-rank rows; the 1-rank reference uses 2 * B
OPTIONS = {"seq_len": 32, "vocab_size": 320, "eval_every": 5, "steps": STEPS, "seed": 3}
TORCHRUN = Path(sys.executable).with_name("torchrun")
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_at(step: int | None):
    def on_step(progress):
        if step is not None and progress.step == step:
            raise KeyboardInterrupt

    return on_step


def _rank(rank, world, port, out, options, resume, stop, results, fsdp=False):
    import torch

    from llmtool.errors import LlmtoolError

    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    try:
        result = train_model(
            None if resume else SAMPLE_TEXT,
            out,
            TrainOptions(**options) if not resume else None,
            device="cpu",
            resume=resume,
            fsdp=fsdp,
            on_step=_stop_at(stop),
        )
        results.put((rank, result.metrics["train_losses"], result.world_size))
    except KeyboardInterrupt:
        results.put((rank, None, world))
    except LlmtoolError as e:
        results.put((rank, str(e), type(e).__name__))


def run_ranks(out, *, world=2, resume=False, stop=None, fsdp=False, join=True, **options):
    """``world`` forked ranks calling train_model; returns each rank's (losses, world_size)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("fork")
    results = ctx.Queue()
    args = (world, _free_port(), out, {**OPTIONS, **options}, resume, stop, results, fsdp)
    context = mp.start_processes(_rank, args=args, nprocs=world, start_method="fork", join=join)
    if not join:
        return context, results
    got = [results.get(timeout=5) for _ in range(world)]
    return {rank: (losses, world_size) for rank, losses, world_size in got}


def torchrun(*args, timeout=120, **popen):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [str(TORCHRUN), "--nproc-per-node", "2", "--master-port", str(_free_port())]
    command += ["-m", "llmtool", "train", *map(str, args), "--device", "cpu"]
    if popen:
        return subprocess.Popen(command, env=env, text=True, **popen)
    return subprocess.run(command, env=env, text=True, capture_output=True, timeout=timeout)


def cli_options(**options):
    flags = []
    for name, value in {**OPTIONS, **options}.items():
        flags += ["--" + name.replace("_", "-"), value]
    return flags


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """1 rank x 2B, 20 steps: the losses and validation curve every 2-rank run must match."""
    out = tmp_path_factory.mktemp("dist") / "one"
    result = train_model(SAMPLE_TEXT, out, TrainOptions(**OPTIONS, batch_size=2 * B), device="cpu")
    return result.metrics


def assert_same_run(metrics, reference):
    np.testing.assert_allclose(
        metrics["train_losses"], reference["train_losses"], rtol=0, atol=2e-5
    )
    got = [(p["step"], p["tokens"], p["val_loss"]) for p in metrics["curve"]]
    want = [(p["step"], p["tokens"], p["val_loss"]) for p in reference["curve"]]
    assert [g[:2] for g in got] == [w[:2] for w in want]  # global tokens, same schedule
    np.testing.assert_allclose([g[2] for g in got], [w[2] for w in want], rtol=0, atol=2e-5)


def test_ddp_two_ranks_equal_one_rank_with_twice_the_batch(tmp_path, reference):
    out = tmp_path / "two"
    got = run_ranks(out, batch_size=B, checkpoint_every=STEPS)
    # Both ranks report the same global losses; rank 0 alone wrote the directory.
    assert got[0][1] == 2 and got[0][0] == got[1][0]
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["options"]["batch_size"] == B
    assert_same_run(metrics, reference)
    assert metrics["train_tokens_seen"] == reference["train_tokens_seen"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-000020"]


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_resume_two_ranks_checkpoint_on_one(tmp_path, reference, fsdp):
    """An FSDP checkpoint holds the full state too (optimizer renumbered): one process resumes it."""
    out = tmp_path / "two-then-one"
    run_ranks(out, batch_size=B, checkpoint_every=10, stop=10, fsdp=fsdp)
    assert (out / "checkpoints" / "step-000010").is_dir() and not (out / "config.json").exists()
    # One rank takes the global batch (2 x B) and continues from the global data position.
    result = train_model(None, out, resume=True, device="cpu")
    assert result.metrics["options"]["batch_size"] == 2 * B
    assert_same_run(result.metrics, reference)


ACCUM = {"steps": 6, "grad_accum": 2, "checkpoint_every": 6}


@pytest.fixture(scope="module")
def accum_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("accum") / "one"
    options = TrainOptions(**{**OPTIONS, **ACCUM}, batch_size=2 * B)
    return train_model(SAMPLE_TEXT, out, options, device="cpu").metrics


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_gradient_accumulation_on_two_ranks(tmp_path, accum_reference, fsdp):
    """Micro-batches before the last skip the reduction; the step is still 1 rank x 2b's."""
    out = tmp_path / "two"
    run_ranks(out, batch_size=B, fsdp=fsdp, **ACCUM)
    assert_same_run(json.loads((out / "train_metrics.json").read_text()), accum_reference)


def test_resume_one_rank_checkpoint_on_two(tmp_path, reference):
    out = tmp_path / "one-then-two"
    with pytest.raises(KeyboardInterrupt):
        train_model(
            SAMPLE_TEXT,
            out,
            TrainOptions(**OPTIONS, batch_size=2 * B, checkpoint_every=10),
            device="cpu",
            on_step=_stop_at(10),
        )
    got = run_ranks(out, resume=True)
    assert got[0][1] == 2
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["options"]["batch_size"] == B and metrics["resumed"]
    assert_same_run(metrics, reference)


def test_fsdp_two_ranks_equal_one_rank(tmp_path, reference):
    out = tmp_path / "fsdp"
    got = run_ranks(out, batch_size=B, checkpoint_every=STEPS, fsdp=True)
    assert got[0] == got[1]
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert_same_run(metrics, reference)
    # The final model is the full, unsharded one: the 1-rank run's weights.
    from safetensors.numpy import load_file

    mine = load_file(out / "model.safetensors")
    theirs = load_file(Path(reference["out"]) / "model.safetensors")
    assert mine.keys() == theirs.keys()
    for name in mine:
        np.testing.assert_allclose(mine[name], theirs[name], rtol=0, atol=1e-4)


def test_resume_one_rank_checkpoint_on_two_under_torchrun_with_fsdp(tmp_path, reference):
    """The real command line: `torchrun --nproc-per-node 2 -m llmtool train --resume --fsdp`."""
    out = tmp_path / "one-then-two"
    with pytest.raises(KeyboardInterrupt):
        train_model(
            SAMPLE_TEXT,
            out,
            TrainOptions(**OPTIONS, batch_size=2 * B, checkpoint_every=10),
            device="cpu",
            on_step=_stop_at(10),
        )
    done = torchrun("--out", out, "--resume", "--fsdp", "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)  # rank 0 alone prints
    assert summary["world_size"] == 2 and summary["steps"] == STEPS
    assert summary["tokens_per_s"] > 0
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["options"]["batch_size"] == B  # the global batch kept: 2 ranks x B
    assert_same_run(metrics, reference)


def test_a_killed_rank_stops_the_job_with_one_message(tmp_path):
    out = tmp_path / "killed"
    context, results = run_ranks(out, batch_size=B, steps=100_000, checkpoint_every=5, join=False)
    try:
        deadline = time.monotonic() + 60
        while not (out / "checkpoints" / "latest").is_file():
            assert time.monotonic() < deadline
            time.sleep(0.1)
        os.kill(context.pids()[1], signal.SIGKILL)
        rank, message, kind = results.get(timeout=60)
    finally:
        for process in context.processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
    assert (rank, kind) == (0, "RankFailure")
    assert message.startswith("Rank 0 lost contact with the other ranks of the job")
    assert message.endswith("rerun the same command with --resume.")
    assert_nothing_half_written(out)


def assert_nothing_half_written(out):
    """The newest checkpoint is complete, no temporary directory is left, no final model."""
    checkpoints = out / "checkpoints"
    latest = checkpoints / (checkpoints / "latest").read_text().strip()
    assert (latest / "trainer_state.json").is_file() and (latest / "model.safetensors").is_file()
    assert not [p for p in checkpoints.iterdir() if ".tmp-" in p.name]
    assert not (out / "config.json").exists() and not (out / "train_metrics.json").exists()


@pytest.mark.distributed
def test_torchrun_ddp_two_ranks_equal_one_rank(tmp_path, reference):
    out = tmp_path / "ddp"
    done = torchrun("--data", SAMPLE_TEXT, "--out", out, *cli_options(batch_size=B), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["world_size"] == 2
    assert_same_run(json.loads((out / "train_metrics.json").read_text()), reference)


@pytest.mark.distributed
def test_torchrun_killed_rank_fails_the_job_with_one_message(tmp_path):
    out = tmp_path / "killed"
    options = cli_options(batch_size=B, steps=100_000, checkpoint_every=5)
    job = torchrun(
        "--data",
        SAMPLE_TEXT,
        "--out",
        out,
        *options,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 90
        while not (out / "checkpoints" / "latest").is_file():
            assert job.poll() is None and time.monotonic() < deadline, job.communicate()
            time.sleep(0.2)
        os.kill(_worker_pid(job.pid, rank=1), signal.SIGKILL)
        _, stderr = job.communicate(timeout=60)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode != 0
    # llmtool's one sentence (torchrun adds its own summary of the failed ranks below it).
    assert (
        stderr.count("Error: Rank 0 lost contact") + stderr.count("Error: Rank 0 was stopped") == 1
    )
    assert_nothing_half_written(out)


def _worker_pid(agent: int, rank: int) -> int:
    """The pid of torchrun's worker process with ``RANK=rank`` (a child of the agent)."""
    for _ in range(50):
        for pid in Path("/proc").glob("[0-9]*"):
            try:
                stat = (pid / "stat").read_text().rsplit(")", 1)[1].split()
                env = (pid / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if int(stat[1]) == agent and f"RANK={rank}".encode() in env:
                return int(pid.name)
        time.sleep(0.1)
    raise AssertionError(f"no worker with RANK={rank} under torchrun pid {agent}")


def test_fsdp_without_torchrun_is_refused(tmp_path):
    from llmtool.cli import app

    result = CliRunner().invoke(
        app, ["train", "--data", str(SAMPLE_TEXT), "--out", str(tmp_path / "m"), "--fsdp"]
    )
    assert result.exit_code == 2
    assert "torchrun --nproc-per-node N" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "m").exists()
