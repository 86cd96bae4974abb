"""The output directory of ``llmtool train``: its layout, checkpoints, resume and the final model.

``out`` holds, from the start, the tokenizer files and the :data:`STARTED` marker; during
training ``checkpoints/step-NNNNNN/`` (the weights, optimizer, scheduler, gradient scaler, RNG
states, data position and the curves so far, each checkpoint written to a temporary directory
and renamed into place, ``checkpoints/latest`` naming the newest, older ones deleted); and at
the end the model files (``config.json``, ``model.safetensors``, ``generation_config.json``) and
``train_metrics.json``. Only the newest checkpoint is kept, so resuming from it restores
everything an uninterrupted run would have in memory at that step.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from llmtool.errors import UsageError
from llmtool.fsutil import atomic_directory, atomic_write_text, check_output_dir
from llmtool.train.options import RunOptions, TrainOptions

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE_JSON = "trainer_state.json"
STATE_PT = "trainer_state.pt"
WEIGHTS = "model.safetensors"
METRICS = "train_metrics.json"
# Written first into a new --out: a run stopped before its first checkpoint leaves only this and
# the tokenizer, and the next run may start that directory over without --force.
STARTED = ".llmtool-train"
CHECKPOINT_FORMAT = 1


@dataclass
class TrainState:
    """The counters and curves of a run: the JSON part of a checkpoint, beside its record.

    Attributes:
        step: Optimizer steps done.
        tokens: Training tokens consumed.
        train_seconds: Time in optimizer steps (validation and checkpoints excluded).
        curve: One point per validation: step, tokens, losses, perplexity, lr, seconds.
        train_losses: The loss of every step.
        sampler: The batch sampler's position (:meth:`BatchSampler.state_dict`).
    """

    step: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    curve: list[dict[str, Any]] = field(default_factory=list)
    train_losses: list[float] = field(default_factory=list)
    sampler: dict[str, int] = field(default_factory=dict)


@dataclass
class Checkpoint:
    """A checkpoint found on disk.

    Attributes:
        path: Its ``checkpoints/step-NNNNNN`` directory.
        data: Its ``trainer_state.json``: format, options, data fingerprint and the state.
    """

    path: Path
    data: dict[str, Any]

    def state(self) -> TrainState:
        """The counters and curves it recorded."""
        known = {f.name for f in fields(TrainState)}
        return TrainState(**{k: v for k, v in self.data.items() if k in known})


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint under ``out``, or None."""
    pointer = out / CHECKPOINTS / LATEST
    if not pointer.is_file():
        return None
    path = out / CHECKPOINTS / pointer.read_text(encoding="utf-8").strip()
    return path if (path / STATE_JSON).is_file() else None


def load_checkpoint(path: Path) -> Checkpoint:
    """Read the JSON part of the checkpoint at ``path``.

    Raises:
        UsageError: It was written in another checkpoint format.
    """
    data = json.loads((path / STATE_JSON).read_text(encoding="utf-8"))
    if data.get("format") != CHECKPOINT_FORMAT:
        raise UsageError(
            f"Checkpoint {path} has format {data.get('format')}, not {CHECKPOINT_FORMAT}",
            "resume it with the llmtool version that wrote it, or start a new --out.",
        )
    return Checkpoint(path, data)


def open_run(
    out: Path, options: TrainOptions, *, resume: bool, force: bool
) -> tuple[RunOptions, Checkpoint | None]:
    """Check ``out`` for a new run or a resume, and resolve the run's options.

    Returns:
        The options, and the checkpoint to continue (None for a new run).

    Raises:
        UsageError: ``resume`` without a checkpoint; a new run into a directory that holds a
            run or anything else, without ``force``; bad options.
    """
    if resume:
        path = latest_checkpoint(out)
        if path is None:
            raise UsageError(
                f"No checkpoint to resume in {out}", "run without --resume to start training."
            )
        checkpoint = load_checkpoint(path)
        return options.resolve(checkpoint.data["options"]), checkpoint
    if latest_checkpoint(out) is not None and not force:
        raise UsageError(
            f"{out} holds a training run already",
            "pass --resume to continue it, --force to start over, or pick another --out.",
        )
    # A directory holding only the STARTED marker and a tokenizer is a run stopped before its
    # first checkpoint: it is started over without --force.
    if not (out / STARTED).is_file() or latest_checkpoint(out) is not None:
        check_output_dir(out, force=force)
    return options.resolve(None), None


def start_output(out: Path, tokenizer: Any) -> None:
    """Create ``out`` afresh (the inputs are checked by now) with the marker and the tokenizer."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / STARTED).write_text("llmtool train output; no checkpoint yet\n")
    tokenizer.save_pretrained(out)


def rng_state(device: torch.device) -> dict[str, Any]:
    """torch's RNG state (and the GPU's): what dropout draws next."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(
    out: Path,
    model: Any,
    trainer: dict[str, Any],
    state: TrainState,
    record: dict[str, Any],
) -> Path:
    """Write ``checkpoints/step-NNNNNN`` atomically, point ``latest`` at it, drop older ones.

    Args:
        out: The run's directory.
        model: The model (its weights go to ``model.safetensors``).
        trainer: Optimizer, scheduler and scaler state dicts and :func:`rng_state`.
        state: The counters and curves.
        record: Format, options and data fingerprint, written beside the state.

    Returns:
        The checkpoint's directory.
    """
    from llmtool.models.recurrent import save_weights

    root = out / CHECKPOINTS
    name = f"step-{state.step:06d}"
    with atomic_directory(root / name, force=True) as tmp:
        save_weights(model, tmp / WEIGHTS)
        torch.save(trainer, tmp / STATE_PT)
        data = {**record, **asdict(state)}
        atomic_write_text(tmp / STATE_JSON, json.dumps(data, indent=1) + "\n")
    atomic_write_text(root / LATEST, name + "\n")
    for old in root.glob("step-*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return root / name


def load_weights(checkpoint: Checkpoint, model: Any, device: torch.device) -> None:
    """Load a checkpoint's weights into the (unwrapped) model in place."""
    from safetensors.torch import load_model

    load_model(model, str(checkpoint.path / WEIGHTS), strict=True, device=str(device))


def restore(
    checkpoint: Checkpoint,
    load_optimizer: Callable[[dict[str, Any]], None],
    scheduler: Any,
    scaler: Any,
    device: torch.device,
) -> TrainState:
    """Load a checkpoint's trainer and RNG state in place (weights: :func:`load_weights`).

    Args:
        checkpoint: The checkpoint.
        load_optimizer: Loads the optimizer's saved state dict (under FSDP, sharding it).
        scheduler: The learning-rate schedule.
        scaler: The gradient scaler.
        device: Where the run trains.

    Returns:
        Its counters and curves.
    """
    trainer = torch.load(checkpoint.path / STATE_PT, map_location=device, weights_only=True)
    load_optimizer(trainer["optimizer"])
    scheduler.load_state_dict(trainer["scheduler"])
    scaler.load_state_dict(trainer["scaler"])
    set_rng_state(trainer["rng"], device)
    return checkpoint.state()


def save_final(out: Path, model: Any, generation_ids: dict[str, int | None]) -> None:
    """Write the model files into ``out`` through a staging directory (each file renamed in)."""
    from transformers import GenerationConfig

    stage = out / f".final.tmp-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(stage)
        if not (stage / "generation_config.json").exists():
            GenerationConfig(**generation_ids).save_pretrained(stage)
        for f in stage.iterdir():
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
