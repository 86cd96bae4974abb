"""Checkpoints and ``--resume`` of ``llmtool train --arch t5|bart``.

The layout and atomic writes are the decoder loop's (:mod:`llmtool.train.checkpoint`):
``out/checkpoints/step-NNNNNN/`` holds ``model.safetensors``, ``trainer_state.pt`` (optimizer,
schedule, torch RNG) and ``trainer_state.json`` (format, options, the pairs' sha256, counters,
the curve so far and numpy's batch-picking generator), ``checkpoints/latest`` names the newest.
The tokenizer is written into ``out`` when the run starts, so a resume reads it back instead of
training it again. Restoring all of that gives the same batches, learning rates and losses as
an uninterrupted run; the final model replaces ``out`` whole (checkpoints included) at the end.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmtool.errors import UsageError
from llmtool.train.checkpoint import (
    STARTED,
    Checkpoint,
    TrainState,
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)

SEQ2SEQ_CHECKPOINT = "llmtool-seq2seq-train"


@dataclass
class LoopState:
    """Where the loop is: what a checkpoint saves and a resume restores.

    Attributes:
        step: Optimizer steps done.
        curve: Validation points so far.
        train_seconds: Time in optimizer steps.
        tokens: Source and target tokens consumed.
        since: Step losses since the last validation point.
    """

    step: int = 0
    curve: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float = 0.0
    tokens: int = 0
    since: list[float] = field(default_factory=list)


def find_resume(out: Path, data_sha256: str) -> Checkpoint:
    """The checkpoint ``--resume`` continues, after checking it is a seq2seq run on these pairs.

    Raises:
        UsageError: No checkpoint, a decoder-only run's, or one trained on other pairs.
    """
    path = latest_checkpoint(out)
    if path is None:
        raise UsageError(f"No checkpoint to resume in {out}", "run without --resume to start.")
    checkpoint = load_checkpoint(path)
    if checkpoint.data.get("kind") != SEQ2SEQ_CHECKPOINT:
        raise UsageError(
            f"{path} is not an encoder-decoder checkpoint",
            "resume it without --arch t5|bart, or start a new --out.",
        )
    if checkpoint.data.get("data_sha256") != data_sha256:
        raise UsageError(
            f"{path} was trained on other pairs (their sha256 differs)",
            "pass the --data it was trained on, or start a new --out.",
        )
    return checkpoint


def start_run(out: Path, tokenizer: Any) -> None:
    """Create ``out`` for a checkpointed run: the STARTED marker and the tokenizer."""
    out.mkdir(parents=True, exist_ok=True)
    (out / STARTED).write_text("llmtool train output; no checkpoint yet\n")
    tokenizer.save_pretrained(out)


def save(
    out: Path,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    rng: np.random.Generator,
    state: LoopState,
    record: dict[str, Any],
) -> None:
    """Write a checkpoint of ``state`` (``record``: options and the pairs' sha256)."""
    import torch

    device = next(model.parameters()).device
    trainer = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(torch.device(device)),
    }
    counters = TrainState(
        step=state.step,
        tokens=state.tokens,
        train_seconds=state.train_seconds,
        curve=state.curve,
        train_losses=state.since,
    )
    # numpy's PCG64 state is a dict of ints: JSON keeps it exactly.
    extra = {"kind": SEQ2SEQ_CHECKPOINT, "numpy_rng": rng.bit_generator.state, **record}
    save_checkpoint(out, model, trainer, counters, extra)


def restore(
    checkpoint: Checkpoint, model: Any, optimizer: Any, scheduler: Any, rng: np.random.Generator
) -> LoopState:
    """Load a checkpoint into the model, optimizer, schedule and generators; its loop state."""
    import torch
    from safetensors.torch import load_model

    device = next(model.parameters()).device
    load_model(model, str(checkpoint.path / "model.safetensors"), strict=True, device=str(device))
    trainer = torch.load(
        checkpoint.path / "trainer_state.pt", map_location=device, weights_only=True
    )
    optimizer.load_state_dict(trainer["optimizer"])
    scheduler.load_state_dict(trainer["scheduler"])
    set_rng_state(trainer["rng"], torch.device(device))
    rng.bit_generator.state = checkpoint.data["numpy_rng"]
    s = checkpoint.state()
    return LoopState(s.step, s.curve, s.train_seconds, s.tokens, list(s.train_losses))
