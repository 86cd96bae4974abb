"""What ``llmtool train`` reports: progress after each step, and the result at the end.

At the end :func:`finish_run` writes the model files and ``train_metrics.json`` (options,
curves, sizes, timing, machine) and returns the :class:`TrainResult` built from them.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmtool.fsutil import atomic_write_text
from llmtool.train.checkpoint import METRICS, TrainState, save_final
from llmtool.train.options import RunOptions
from llmtool.train.tokenizer import special_ids


@dataclass
class TrainProgress:
    """What the ``on_step`` callback receives after every optimizer step.

    Attributes:
        step: Steps done.
        steps: Steps in the run.
        loss: Training loss of this step.
        lr: Learning rate used by this step.
        val_perplexity: The latest validation perplexity.
        tokens_per_s: Training throughput so far, over all ranks (validation and checkpoints
            excluded).
        evaluated: A validation ran after this step.
        checkpointed: A checkpoint was written after this step.
        world_size: Ranks of the job (1 without torchrun).
    """

    step: int
    steps: int
    loss: float
    lr: float
    val_perplexity: float
    tokens_per_s: float
    evaluated: bool
    checkpointed: bool
    world_size: int = 1


@dataclass
class TrainResult:
    """What :func:`llmtool.train.train_model` returns (the content of ``train_metrics.json``).

    Attributes:
        out: The trained model directory.
        arch: The architecture.
        steps: Optimizer steps done.
        initial_val_perplexity: Validation perplexity of the untrained model.
        final_val_perplexity: Validation perplexity at the end.
        tokens_per_s: Training tokens per second over all ranks (validation and checkpoints
            excluded).
        world_size: Ranks that trained it (1 without torchrun).
        metrics: Everything in ``train_metrics.json``: options, curves, sizes, timing, machine.
    """

    out: Path
    arch: str
    steps: int
    initial_val_perplexity: float
    final_val_perplexity: float
    tokens_per_s: float
    world_size: int = 1
    metrics: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """The ``--json`` record."""
        return {
            "arch": self.arch,
            "steps": self.steps,
            "initial_val_perplexity": self.initial_val_perplexity,
            "final_val_perplexity": self.final_val_perplexity,
            "tokens_per_s": self.tokens_per_s,
            "world_size": self.world_size,
            "out": str(self.out),
        }


def finish_run(
    out: Path,
    model: Any,
    tokenizer: Any,
    options: RunOptions,
    state: TrainState,
    *,
    tokens: dict[str, int],
    device: torch.device,
    amp: torch.dtype | None,
    resumed: bool,
    wall_start: float,
    world_size: int = 1,
    write: bool = True,
) -> TrainResult:
    """Write the model files and ``train_metrics.json`` into ``out``; return the result.

    Args:
        out: The run's directory.
        model: The trained model (moved to the CPU to be saved).
        tokenizer: Its tokenizer (the vocabulary size and special ids).
        options: The run's options.
        state: The counters and curves (the curve has at least the step-0 point).
        tokens: Tokens in the ``train`` and ``val`` splits.
        device: Where it trained.
        amp: The autocast dtype, or None.
        resumed: The run was resumed from a checkpoint.
        wall_start: ``time.perf_counter()`` when :func:`train_model` started.
        world_size: Ranks of the job.
        write: Write the files (under torchrun, rank 0 only; the others just get the result).
    """
    n_params = sum(p.numel() for p in model.parameters())  # DTensors count their full size
    model.eval()
    if write:
        save_final(out, model.to("cpu"), special_ids(tokenizer))
    initial, final = state.curve[0], state.curve[-1]
    tokens_per_s = state.tokens / state.train_seconds if state.train_seconds > 0 else 0.0
    metrics: dict[str, Any] = {
        "arch": options.arch,
        "steps": state.step,
        "initial_val_perplexity": initial["val_perplexity"],
        "final_val_perplexity": final["val_perplexity"],
        "tokens_per_s": tokens_per_s,
        "world_size": world_size,
        "out": str(out.resolve()),
        "preset": options.preset,
        "parameters": n_params,
        "vocab_size": len(tokenizer),
        "tokens": tokens,
        "train_tokens_seen": state.tokens,
        "train_seconds": state.train_seconds,
        "wall_seconds": time.perf_counter() - wall_start,
        "resumed": resumed,
        "autocast": str(amp).replace("torch.", "") if amp is not None else None,
        "options": asdict(options),
        "machine": _machine(device),
        "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "curve": state.curve,
        "train_losses": state.train_losses,
    }
    if write:
        atomic_write_text(out / METRICS, json.dumps(metrics, indent=1) + "\n")
    return TrainResult(
        out=out.resolve(),
        arch=options.arch,
        steps=state.step,
        initial_val_perplexity=initial["val_perplexity"],
        final_val_perplexity=final["val_perplexity"],
        tokens_per_s=tokens_per_s,
        world_size=world_size,
        metrics=metrics,
    )


def _machine(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": device.type,
        "cpu": platform.processor() or platform.machine(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
