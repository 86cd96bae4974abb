"""``llmtool train``: :func:`train_model` and the training loop it runs.

The loop is the usual one for small LMs: AdamW (no weight decay on biases and norms), linear
warmup then cosine decay to a tenth of the peak rate, gradient clipping, gradient accumulation,
and on CUDA bf16 autocast (fp16 with a gradient scaler where bf16 is missing). The validation
loss is measured at step 0, every ``eval_every`` steps and at the end.

:func:`train_model` runs named steps: open the run (:func:`llmtool.train.checkpoint.open_run`
resolves the options and checks ``out``), prepare the data and tokenizer, build the model and
optimizer (or restore them from the newest checkpoint), run the steps, and write the model and
``train_metrics.json`` (:mod:`llmtool.train.metrics`). The directory layout and checkpoints are
:mod:`llmtool.train.checkpoint`; ``resume=True`` reproduces the losses of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from llmtool import defaults
from llmtool.errors import UsageError
from llmtool.models.loading import quiet_transformers
from llmtool.train.checkpoint import (
    CHECKPOINT_FORMAT,
    Checkpoint,
    TrainState,
    open_run,
    restore,
    rng_state,
    save_checkpoint,
    start_output,
)
from llmtool.train.data import (
    BatchSampler,
    Splits,
    read_corpus,
    split_tokens,
    tokenize_corpus,
    val_windows,
)
from llmtool.train.metrics import TrainProgress, TrainResult, finish_run
from llmtool.train.options import RunOptions, TrainOptions, autocast_dtype, resolve_device
from llmtool.train.presets import build_model, get_preset
from llmtool.train.tokenizer import load_tokenizer_dir, make_tokenizer, special_ids


@dataclass
class _Run:
    """What the step loop works on: the options, the model and its trainer, the data."""

    options: RunOptions
    device: torch.device
    amp: torch.dtype | None  # autocast dtype; None = float32
    model: Any
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    sampler: BatchSampler
    splits: Splits
    state: TrainState
    record: dict[str, Any]  # format, options, data fingerprint: written into every checkpoint


def train_model(
    data: str | Path | None,
    out: str | Path,
    options: TrainOptions | None = None,
    *,
    device: str = defaults.TRAIN_DEVICE,
    resume: bool = False,
    force: bool = False,
    on_stage: Callable[[str], None] | None = None,
    on_step: Callable[[TrainProgress], None] | None = None,
) -> TrainResult:
    """Train a small causal LM on a text corpus and write a Hugging Face-style directory.

    Args:
        data: A UTF-8 text file or a directory of ``.txt`` files; None on resume: the data the
            checkpoint was trained on (refused if it changed since).
        out: The directory to create (or, with ``resume``, to continue).
        options: Arch, preset, schedule and sizes; fields left None take the preset's value
            (``arch`` defaults to ``llama``, ``preset`` to ``tiny``), or on resume the
            checkpoint's. None = all defaults.
        device: ``auto``, ``cpu`` or ``cuda``.
        resume: Continue from the newest checkpoint in ``out``.
        force: Delete an existing ``out`` (after the inputs are checked) and start over.
        on_stage: Called with a short description as each stage starts.
        on_step: Called after every optimizer step.

    Returns:
        The directory and the run's metrics.

    Raises:
        UsageError: Bad data or options, an existing ``out`` without ``resume`` / ``force``,
            ``resume`` without a checkpoint, or a given option that differs from the
            checkpoint's.
    """
    quiet_transformers()
    stage = on_stage or (lambda text: None)
    wall_start = time.perf_counter()
    out = Path(out).expanduser()
    run_options, checkpoint = open_run(out, options or TrainOptions(), resume=resume, force=force)
    data = _data_path(data, checkpoint)
    dev = resolve_device(device)
    amp = autocast_dtype(dev)
    if dev.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 where autocast leaves float32

    tokenizer, splits = _prepare_data(data, out, run_options, checkpoint, stage)
    stage(f"Building the {run_options.arch} model")
    run = _build_run(run_options, tokenizer, splits, dev, amp, checkpoint, stage)
    run.record["data"] = str(data.resolve())  # resume reads it again, checked by fingerprint
    if not run.state.curve:
        stage("Measuring the untrained model")
        _add_point(run, None)
    n_params = sum(p.numel() for p in run.model.parameters())
    stage(f"Training {run_options.arch} ({n_params:,} parameters) on {dev.type}")
    _run_steps(run, out, on_step)

    stage("Writing the model")
    return finish_run(
        out,
        run.model,
        tokenizer,
        run_options,
        run.state,
        tokens={"train": len(splits.train), "val": len(splits.val)},
        device=dev,
        amp=amp,
        resumed=resume,
        wall_start=wall_start,
    )


def _data_path(data: str | Path | None, checkpoint: Checkpoint | None) -> Path:
    """The corpus to read: ``data``, or on resume the one the checkpoint recorded.

    Raises:
        UsageError: No ``data`` for a new run, or a resume of a checkpoint that names none.
    """
    if data is not None:
        return Path(data).expanduser()
    recorded = checkpoint.data.get("data") if checkpoint is not None else None
    if recorded is None:
        raise UsageError("No --data given", "pass --data FILE (the text to train on).")
    return Path(recorded)


def _prepare_data(
    data: Path,
    out: Path,
    options: RunOptions,
    checkpoint: Checkpoint | None,
    stage: Callable[[str], None],
) -> tuple[Any, Splits]:
    """Read and tokenize the corpus; a new run trains (or loads) its tokenizer and starts ``out``.

    Raises:
        UsageError: Bad data, or on resume data other than the checkpoint's.
    """
    stage(f"Reading {data}")
    corpus = read_corpus(data)
    if checkpoint is not None:
        tokenizer = load_tokenizer_dir(out)
    else:
        stage("Training the tokenizer" if options.tokenizer == "bpe" else "Loading the tokenizer")
        tokenizer = make_tokenizer(options, corpus)
    stage("Tokenizing")
    ids = tokenize_corpus(corpus, tokenizer)
    splits = split_tokens(ids, options.val_fraction, options.seq_len)
    if checkpoint is None:
        start_output(out, tokenizer)  # every input is checked by now
    elif checkpoint.data["data_fingerprint"] != splits.fingerprint:
        raise UsageError(
            f"The data in {data} is not what the checkpoint in {out} was trained on",
            "resume with the same --data, or start a new --out.",
        )
    return tokenizer, splits


def _build_run(
    options: RunOptions,
    tokenizer: Any,
    splits: Splits,
    device: torch.device,
    amp: torch.dtype | None,
    checkpoint: Checkpoint | None,
    stage: Callable[[str], None],
) -> _Run:
    """A seeded model with its optimizer, schedule and sampler, or those of ``checkpoint``."""
    torch.manual_seed(options.seed)  # the initialization; on resume the RNG state is restored
    preset = get_preset(options.preset)
    ids = special_ids(tokenizer)
    model = build_model(options.arch, preset, len(tokenizer), options.seq_len, ids).to(device)
    model.train()
    decay = [p for p in model.parameters() if p.dim() >= 2]  # matrices, not biases and norms
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": defaults.WEIGHT_DECAY},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=options.lr,
        betas=defaults.ADAM_BETAS,
        fused=device.type == "cuda",
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, options.warmup_steps, options.steps)
    )
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    sampler = BatchSampler(splits.train, options.seq_len, options.batch_size, options.seed)
    state = TrainState()
    if checkpoint is not None:
        stage(f"Resuming from {checkpoint.path.name}")
        state = restore(checkpoint, model, optimizer, scheduler, scaler, device)
        sampler.load_state_dict(state.sampler)
    record = {
        "format": CHECKPOINT_FORMAT,
        "options": asdict(options),
        "data_fingerprint": splits.fingerprint,
    }
    return _Run(
        options, device, amp, model, optimizer, scheduler, scaler, sampler, splits, state, record
    )


def _run_steps(run: _Run, out: Path, on_step: Callable[[TrainProgress], None] | None) -> None:
    """Optimizer steps up to ``options.steps``, validating and checkpointing on schedule."""
    options, state = run.options, run.state
    since_eval: list[float] = []  # step losses since the last validation point
    while state.step < options.steps:
        lr_now = float(run.scheduler.get_last_lr()[0])
        step_loss = _optimizer_step(run)
        since_eval.append(step_loss)
        last = state.step == options.steps
        evaluated = state.step % options.eval_every == 0 or last
        if evaluated:
            _add_point(run, float(np.mean(since_eval)))
            since_eval = []
        checkpointed = state.step % options.checkpoint_every == 0 or last
        if checkpointed:
            _save(run, out)
        if on_step is not None:
            on_step(
                TrainProgress(
                    step=state.step,
                    steps=options.steps,
                    loss=step_loss,
                    lr=lr_now,
                    val_perplexity=state.curve[-1]["val_perplexity"],
                    tokens_per_s=state.tokens / max(state.train_seconds, 1e-9),
                    evaluated=evaluated,
                    checkpointed=checkpointed,
                )
            )


def _autocast(device: torch.device, amp: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None)


def _optimizer_step(run: _Run) -> float:
    """One optimizer step over ``grad_accum`` micro-batches; returns its mean loss."""
    options, dev, state = run.options, run.device, run.state
    start = time.perf_counter()
    run.optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=dev)
    for _ in range(options.grad_accum):
        x, y = run.sampler.next_batch()  # [B, S] inputs, [B, S] targets (shifted by one)
        inputs = torch.from_numpy(x).to(dev, non_blocking=True)
        targets = torch.from_numpy(y).to(dev, non_blocking=True)
        with _autocast(dev, run.amp):
            logits = run.model(input_ids=inputs, use_cache=False).logits  # [B, S, V]
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        run.scaler.scale(loss / options.grad_accum).backward()
        loss_sum += loss.detach()
    run.scaler.unscale_(run.optimizer)  # clip the true gradients, not the scaled ones
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), defaults.GRAD_CLIP)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    step_loss = loss_sum.item() / options.grad_accum  # syncs the device: timing is honest
    state.train_seconds += time.perf_counter() - start
    state.step += 1
    state.tokens += options.tokens_per_step()
    state.train_losses.append(step_loss)
    return step_loss


def _add_point(run: _Run, train_loss: float | None) -> None:
    """Validate and append a point to the curve (``train_loss`` None at step 0)."""
    o = run.options
    nll = validation_loss(run.model, run.splits.val, o.seq_len, o.batch_size, run.device, run.amp)
    run.state.curve.append(
        {
            "step": run.state.step,
            "tokens": run.state.tokens,
            "train_loss": train_loss,
            "val_loss": nll,
            "val_perplexity": math.exp(min(nll, 700.0)),  # capped below float64's overflow
            "lr": float(run.scheduler.get_last_lr()[0]),
            "train_seconds": run.state.train_seconds,
        }
    )


def _save(run: _Run, out: Path) -> None:
    run.state.sampler = run.sampler.state_dict()
    trainer = {
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "rng": rng_state(run.device),
    }
    save_checkpoint(out, run.model, trainer, run.state, run.record)


@torch.no_grad()
def validation_loss(
    model: Any,
    tokens: np.ndarray,
    seq_len: int,
    batch_size: int,
    device: torch.device,
    amp: torch.dtype | None,
) -> float:
    """Mean NLL (nats) per held-out token, over consecutive windows of ``seq_len`` tokens.

    Args:
        model: A causal LM taking ``input_ids`` and returning ``.logits``.
        tokens: The held-out token ids [N].
        seq_len: Tokens per window.
        batch_size: Windows per forward pass.
        device: Where ``model`` is.
        amp: The autocast dtype, or None for float32.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in val_windows(tokens, seq_len, batch_size, defaults.VAL_MAX_TOKENS):
        inputs = torch.from_numpy(x).to(device)
        targets = torch.from_numpy(y).to(device)
        with _autocast(device, amp):
            logits = model(input_ids=inputs, use_cache=False).logits  # [B, S, V]
        total += F.cross_entropy(
            logits.float().flatten(0, 1), targets.flatten(), reduction="sum"
        ).item()
        count += targets.numel()
    model.train(was_training)
    return total / count


def lr_factor(
    step: int, warmup: int, total: int, min_ratio: float = defaults.MIN_LR_RATIO
) -> float:
    """Multiplier of the peak learning rate for 0-based ``step``: linear warmup, cosine decay."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
