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

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmtool import defaults
from llmtool.errors import UsageError
from llmtool.models.loading import quiet_transformers
from llmtool.train.checkpoint import (
    CHECKPOINT_FORMAT,
    Checkpoint,
    TrainState,
    load_weights,
    open_run,
    restore,
    rng_state,
    save_checkpoint,
    start_output,
)
from llmtool.train.data import BatchSampler, Splits, read_corpus, split_tokens, tokenize_corpus
from llmtool.train.distributed import (
    Dist,
    barrier,
    full_model,
    load_optimizer_state,
    lost_contact,
    optimizer_state,
    peer_failure,
    setup,
    shutdown,
    unwrap,
    wrap,
)
from llmtool.train.metrics import TrainProgress, TrainResult, finish_run
from llmtool.train.options import RunOptions, TrainOptions, autocast_dtype
from llmtool.train.presets import build_model, get_preset
from llmtool.train.step import Run, add_point, optimizer_step
from llmtool.train.tokenizer import load_tokenizer_dir, make_tokenizer, special_ids


def train_model(
    data: str | Path | None,
    out: str | Path,
    options: TrainOptions | None = None,
    *,
    device: str = defaults.TRAIN_DEVICE,
    resume: bool = False,
    force: bool = False,
    fsdp: bool = False,
    on_stage: Callable[[str], None] | None = None,
    on_step: Callable[[TrainProgress], None] | None = None,
) -> TrainResult:
    """Train a small causal LM on a text corpus and write a Hugging Face-style directory.

    Under ``torchrun`` (``RANK`` / ``WORLD_SIZE`` in the environment) every rank calls this;
    ``batch_size`` is then the per-rank micro-batch, and rank 0 alone writes ``out``
    (:mod:`llmtool.train.distributed`).

    Args:
        data: A UTF-8 text file or a directory of ``.txt`` files; None on resume: the data the
            checkpoint was trained on (refused if it changed since).
        out: The directory to create (or, with ``resume``, to continue).
        options: Arch, preset, schedule and sizes; fields left None take the preset's value
            (``arch`` defaults to ``llama``, ``preset`` to ``tiny``), or on resume the
            checkpoint's. None = all defaults.
        device: ``auto``, ``cpu`` or ``cuda``.
        resume: Continue from the newest checkpoint in ``out`` (at any world size that divides
            its global batch).
        force: Delete an existing ``out`` (after the inputs are checked) and start over.
        fsdp: Shard the model over the ranks with FSDP2 (torchrun only) instead of DDP.
        on_stage: Called with a short description as each stage starts.
        on_step: Called after every optimizer step.

    Returns:
        The directory and the run's metrics.

    Raises:
        UsageError: Bad data or options, an existing ``out`` without ``resume`` / ``force``,
            ``resume`` without a checkpoint, or a given option that differs from the
            checkpoint's.
        RankFailure: Under torchrun, another rank failed or was killed.
    """
    quiet_transformers()
    wall_start = time.perf_counter()
    out = Path(out).expanduser()
    d, dev = setup(device, fsdp)
    stage = (on_stage or (lambda text: None)) if d.main else (lambda text: None)
    try:
        run_options, checkpoint = open_run(
            out, options or TrainOptions(), resume=resume, force=force
        )
        run_options = _per_rank_batch(run_options, checkpoint, d)
        data = _data_path(data, checkpoint)
        amp = autocast_dtype(dev)
        if dev.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 where autocast leaves float32
        barrier(d)  # every rank has checked `out` before rank 0 starts it
        tokenizer, splits = _prepare_data(data, out, run_options, checkpoint, stage, d)
        stage(f"Building the {run_options.arch} model")
        run = _build_run(run_options, tokenizer, splits, dev, amp, checkpoint, stage, d)
        run.record["data"] = str(data.resolve())  # resume reads it again, checked by fingerprint
        if not run.state.curve:
            stage("Measuring the untrained model")
            add_point(run, None)
        n_params = sum(p.numel() for p in unwrap(run.model).parameters())
        where = dev.type + (f" x {d.world_size} ranks" if d.active else "")
        stage(f"Training {run_options.arch} ({n_params:,} parameters) on {where}")
        _run_steps(run, out, on_step)
        stage("Writing the model")
        model = full_model(run.model, d, run.build)  # None on ranks > 0 under FSDP
        result = finish_run(
            out,
            model if model is not None else unwrap(run.model),
            tokenizer,
            run_options,
            run.state,
            tokens={"train": len(splits.train), "val": len(splits.val)},
            device=dev,
            amp=amp,
            resumed=resume,
            wall_start=wall_start,
            world_size=d.world_size,
            write=d.main,
        )
        shutdown(d)
    except RuntimeError as e:
        if d.active and peer_failure(e):
            raise lost_contact(d.rank, e) from e
        raise
    return result


def _per_rank_batch(options: RunOptions, checkpoint: Checkpoint | None, d: Dist) -> RunOptions:
    """On resume at another world size, the per-rank batch that keeps the global batch.

    Raises:
        UsageError: The world size does not divide the checkpoint's global batch.
    """
    if checkpoint is None:
        return options
    saved_world = int(checkpoint.data.get("world_size", 1))
    if saved_world == d.world_size:
        return options
    global_batch = options.batch_size * saved_world
    if global_batch % d.world_size:
        raise UsageError(
            f"The checkpoint's global batch of {global_batch} rows ({saved_world} rank(s) x "
            f"{options.batch_size}) does not split over {d.world_size} ranks",
            "resume with a number of ranks that divides it.",
        )
    return dataclasses.replace(options, batch_size=global_batch // d.world_size)


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
    d: Dist,
) -> tuple[Any, Splits]:
    """Read and tokenize the corpus; a new run trains (or loads) its tokenizer and starts ``out``.

    Every rank reads the corpus (the same errors everywhere); on a new run rank 0 trains the
    tokenizer and starts ``out``, and the other ranks load that tokenizer from it.

    Raises:
        UsageError: Bad data, or on resume data other than the checkpoint's.
    """
    stage(f"Reading {data}")
    corpus = read_corpus(data)
    if checkpoint is not None:
        tokenizer = load_tokenizer_dir(out)
    elif d.main:
        stage("Training the tokenizer" if options.tokenizer == "bpe" else "Loading the tokenizer")
        tokenizer = make_tokenizer(options, corpus)
    stage("Tokenizing")
    if checkpoint is None and d.main:
        ids = tokenize_corpus(corpus, tokenizer)
        splits = split_tokens(ids, options.val_fraction, options.seq_len)
        start_output(out, tokenizer)  # every input is checked by now
    barrier(d)
    if checkpoint is None and not d.main:
        tokenizer = load_tokenizer_dir(out)
    if checkpoint is not None or not d.main:
        ids = tokenize_corpus(corpus, tokenizer)
        splits = split_tokens(ids, options.val_fraction, options.seq_len)
    if checkpoint is not None and checkpoint.data["data_fingerprint"] != splits.fingerprint:
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
    d: Dist,
) -> Run:
    """A seeded model with its optimizer, schedule and sampler, or those of ``checkpoint``.

    Every rank builds the same model from the seed (or loads the checkpoint's weights) before
    it is wrapped, so DDP replicas and FSDP shards start from the same weights.
    """
    torch.manual_seed(options.seed)  # the initialization; on resume the RNG state is restored
    preset = get_preset(options.preset)
    ids = special_ids(tokenizer)

    def build() -> Any:
        return build_model(options.arch, preset, len(tokenizer), options.seq_len, ids)

    model = build().to(device)
    if checkpoint is not None:
        stage(f"Resuming from {checkpoint.path.name}")
        load_weights(checkpoint, model, device)
    model = wrap(model, d, device)
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
    sampler = BatchSampler(
        splits.train, options.seq_len, options.batch_size, options.seed, d.rank, d.world_size
    )
    state = TrainState()
    if checkpoint is not None:

        def load_optimizer(saved: dict[str, Any]) -> None:
            load_optimizer_state(model, optimizer, saved, d)

        state = restore(checkpoint, load_optimizer, scheduler, scaler, device)
        sampler.load_state_dict(state.sampler)
    record = {
        "format": CHECKPOINT_FORMAT,
        "options": asdict(options),
        "data_fingerprint": splits.fingerprint,
        "world_size": d.world_size,
    }
    return Run(
        options,
        device,
        amp,
        model,
        optimizer,
        scheduler,
        scaler,
        sampler,
        splits,
        state,
        record,
        d,
        build,
    )


def _run_steps(run: Run, out: Path, on_step: Callable[[TrainProgress], None] | None) -> None:
    """Optimizer steps up to ``options.steps``, validating and checkpointing on schedule."""
    options, state = run.options, run.state
    since_eval: list[float] = []  # step losses since the last validation point
    while state.step < options.steps:
        lr_now = float(run.scheduler.get_last_lr()[0])
        step_loss = optimizer_step(run)
        since_eval.append(step_loss)
        last = state.step == options.steps
        evaluated = state.step % options.eval_every == 0 or last
        if evaluated:
            add_point(run, float(np.mean(since_eval)))
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
                    world_size=run.dist.world_size,
                )
            )


def _save(run: Run, out: Path) -> None:
    """Rank 0 writes the checkpoint (under FSDP every rank first helps gather the state)."""
    d = run.dist
    model = full_model(run.model, d, run.build)
    optimizer = optimizer_state(run.model, run.optimizer, d)
    if d.main:
        run.state.sampler = run.sampler.state_dict()
        trainer = {
            "optimizer": optimizer,
            "scheduler": run.scheduler.state_dict(),
            "scaler": run.scaler.state_dict(),
            "rng": rng_state(run.device),
        }
        save_checkpoint(out, model, trainer, run.state, run.record)
    barrier(d)  # no rank runs ahead of a checkpoint that is not complete


def lr_factor(
    step: int, warmup: int, total: int, min_ratio: float = defaults.MIN_LR_RATIO
) -> float:
    """Multiplier of the peak learning rate for 0-based ``step``: linear warmup, cosine decay."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
