"""One optimizer step and one validation of ``llmtool train``, on one rank or many.

:class:`Run` is what the loop works on. Under torchrun (:mod:`llmtool.train.distributed`) the
step's loss and the validation's NLL sum and token count are summed over the ranks, so every
rank reports the global figures: the mean loss of the global batch, and the mean NLL of every
held-out token (each scored once, on one rank).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from llmtool import defaults
from llmtool.train.checkpoint import TrainState
from llmtool.train.data import BatchSampler, Splits, val_windows
from llmtool.train.distributed import Dist, all_sum, gradient_sync, unwrap
from llmtool.train.options import RunOptions


@dataclass
class Run:
    """What the step loop works on: the options, the model and its trainer, the data."""

    options: RunOptions
    device: torch.device
    amp: torch.dtype | None  # autocast dtype; None = float32
    model: Any  # under torchrun, wrapped in DDP or sharded by FSDP2
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    sampler: BatchSampler
    splits: Splits
    state: TrainState
    record: dict[str, Any]  # format, options, data fingerprint: written into every checkpoint
    dist: Dist
    build: Callable[[], Any]  # a fresh unwrapped model (FSDP gathers its weights into one)


def autocast(device: torch.device, amp: torch.dtype | None) -> contextlib.AbstractContextManager:
    """bf16 / fp16 autocast, or nothing for float32."""
    return torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None)


def optimizer_step(run: Run) -> float:
    """One optimizer step over ``grad_accum`` micro-batches; returns its mean loss (all ranks)."""
    options, dev, state = run.options, run.device, run.state
    start = time.perf_counter()
    run.optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=dev)
    for i in range(options.grad_accum):
        x, y = run.sampler.next_batch()  # [B, S] inputs, [B, S] targets (shifted by one)
        inputs = torch.from_numpy(x).to(dev, non_blocking=True)
        targets = torch.from_numpy(y).to(dev, non_blocking=True)
        with gradient_sync(run.model, run.dist, i == options.grad_accum - 1):
            with autocast(dev, run.amp):
                logits = run.model(input_ids=inputs, use_cache=False).logits  # [B, S, V]
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
            # DDP and FSDP average the gradients over the ranks: with equal rows per rank
            # that is the gradient of the global batch's mean loss.
            run.scaler.scale(loss / options.grad_accum).backward()
        loss_sum += loss.detach()
    run.scaler.unscale_(run.optimizer)  # clip the true gradients, not the scaled ones
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), defaults.GRAD_CLIP)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    # .item() syncs the device, so the timing is honest; the sum over ranks is the global loss.
    (total,) = all_sum(run.dist, [loss_sum.item()], dev)
    step_loss = total / options.grad_accum / run.dist.world_size
    state.train_seconds += time.perf_counter() - start
    state.step += 1
    state.tokens += options.tokens_per_step() * run.dist.world_size  # global tokens
    state.train_losses.append(step_loss)
    return step_loss


def add_point(run: Run, train_loss: float | None) -> None:
    """Validate and append a point to the curve (``train_loss`` None at step 0)."""
    o = run.options
    nll = validation_loss(
        run.model, run.splits.val, o.seq_len, o.batch_size, run.device, run.amp, run.dist
    )
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


@torch.no_grad()
def validation_loss(
    model: Any,
    tokens: np.ndarray,
    seq_len: int,
    batch_size: int,
    device: torch.device,
    amp: torch.dtype | None,
    dist: Dist | None = None,
) -> float:
    """Mean NLL (nats) per held-out token, over consecutive windows of ``seq_len`` tokens.

    Under torchrun rank ``r`` scores batches ``r, r + W, ...`` and the NLL sums and token counts
    are summed over the ranks: the same mean as one process, up to the order of the sums.

    Args:
        model: A causal LM taking ``input_ids`` and returning ``.logits``.
        tokens: The held-out token ids [N].
        seq_len: Tokens per window.
        batch_size: Windows per forward pass.
        device: Where ``model`` is.
        amp: The autocast dtype, or None for float32.
        dist: The job's ranks (None: one process).
    """
    d = dist or Dist()
    model = unwrap(model)  # DDP's own forward would sync buffers, a collective per call
    was_training = model.training
    model.eval()
    batches = list(val_windows(tokens, seq_len, batch_size, defaults.VAL_MAX_TOKENS))
    # Under FSDP every rank must run as many forward passes as the others (each all-gathers
    # the weights): a rank short of batches repeats its first one and discards the result.
    rounds = math.ceil(len(batches) / d.world_size)
    total, count = 0.0, 0
    for i in range(rounds):
        index = i * d.world_size + d.rank
        if index >= len(batches) and not d.fsdp:
            break
        x, y = batches[index] if index < len(batches) else batches[0]
        inputs = torch.from_numpy(x).to(device)
        targets = torch.from_numpy(y).to(device)
        with autocast(device, amp):
            logits = model(input_ids=inputs, use_cache=False).logits  # [B, S, V]
        if index >= len(batches):
            continue
        total += F.cross_entropy(
            logits.float().flatten(0, 1), targets.flatten(), reduction="sum"
        ).item()
        count += targets.numel()
    model.train(was_training)
    total, count_all = all_sum(d, [total, float(count)], device)
    return total / count_all
