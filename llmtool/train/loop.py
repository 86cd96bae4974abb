"""``llmtool train``: the training loop, its checkpoints and the final model directory.

The loop is the usual one for small LMs: AdamW (no weight decay on biases and norms), linear
warmup then cosine decay to a tenth of the peak rate, gradient clipping, gradient accumulation,
and on CUDA bf16 autocast (fp16 with a gradient scaler where bf16 is missing). The validation
loss is measured at step 0, every ``eval_every`` steps and at the end.

The output directory ``out`` holds, from the start, the tokenizer files; during training
``checkpoints/step-NNNNNN/`` (the weights, optimizer, scheduler, gradient scaler, RNG states,
data position and the curves so far, each checkpoint written to a temporary directory and
renamed into place, ``checkpoints/latest`` naming the newest); and at the end the model files
(``config.json``, ``model.safetensors``, ``generation_config.json``) and ``train_metrics.json``.
``resume=True`` restarts from the newest checkpoint and reproduces the losses of an
uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import os
import platform
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from llmtool import defaults
from llmtool.errors import UsageError
from llmtool.fsutil import atomic_directory, atomic_write_text, check_output_dir
from llmtool.train.data import (
    BatchSampler,
    Corpus,
    read_corpus,
    split_tokens,
    tokenize_corpus,
    val_windows,
)
from llmtool.train.presets import build_model, check_arch, get_preset

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
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class TrainOptions:
    """Everything that decides the result of a run (recorded in checkpoints and metrics).

    Attributes:
        arch: ``llama``, ``gpt2``, ``lstm`` or ``rnn``.
        preset: ``tiny``, ``small`` or ``base``: model sizes and the defaults below.
        tokenizer: ``bpe`` (train one) or a tokenizer directory.
        vocab_size: BPE vocabulary (``bpe`` only).
        steps: Optimizer steps.
        batch_size: Rows per micro-batch.
        grad_accum: Micro-batches per optimizer step.
        seq_len: Tokens per row.
        lr: Peak learning rate.
        warmup_steps: Linear warmup steps.
        val_fraction: Held-out tail of the tokens.
        seed: Seed of the initialization, the data order and dropout.
        eval_every: Steps between validations.
        checkpoint_every: Steps between checkpoints.
    """

    arch: str
    preset: str
    tokenizer: str
    vocab_size: int | None
    steps: int
    batch_size: int
    grad_accum: int
    seq_len: int
    lr: float
    warmup_steps: int
    val_fraction: float
    seed: int
    eval_every: int
    checkpoint_every: int

    def validate(self) -> None:
        """Raise :class:`UsageError` for an out-of-range option."""
        for name in ("steps", "batch_size", "grad_accum", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                flag = "--" + name.replace("_", "-")
                raise UsageError(f"{flag} must be at least 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise UsageError(f"--seq-len must be at least 2, got {self.seq_len}")
        if not self.lr > 0:
            raise UsageError(f"--lr must be greater than 0, got {self.lr}")
        if not 0.0 < self.val_fraction <= 0.5:
            raise UsageError(f"--val-fraction must be in (0, 0.5], got {self.val_fraction}")
        if self.vocab_size is not None and self.vocab_size < 258:
            raise UsageError(
                f"--vocab-size must be at least 258 (256 bytes and end-of-text), got {self.vocab_size}"
            )
        if self.warmup_steps < 0:
            raise UsageError(f"The warmup must be at least 0 steps, got {self.warmup_steps}")


@dataclass
class TrainProgress:
    """What the ``on_step`` callback receives after every optimizer step.

    Attributes:
        step: Steps done.
        steps: Steps in the run.
        loss: Training loss of this step.
        lr: Learning rate used by this step.
        val_perplexity: The latest validation perplexity.
        tokens_per_s: Training throughput so far (validation and checkpoints excluded).
        evaluated: A validation ran after this step.
        checkpointed: A checkpoint was written after this step.
    """

    step: int
    steps: int
    loss: float
    lr: float
    val_perplexity: float
    tokens_per_s: float
    evaluated: bool
    checkpointed: bool


@dataclass
class TrainResult:
    """What :func:`train_model` returns (the content of ``train_metrics.json``).

    Attributes:
        out: The trained model directory.
        arch: The architecture.
        steps: Optimizer steps done.
        initial_val_perplexity: Validation perplexity of the untrained model.
        final_val_perplexity: Validation perplexity at the end.
        tokens_per_s: Training tokens per second (validation and checkpoints excluded).
        metrics: Everything in ``train_metrics.json``: options, curves, sizes, timing, machine.
    """

    out: Path
    arch: str
    steps: int
    initial_val_perplexity: float
    final_val_perplexity: float
    tokens_per_s: float
    metrics: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """The ``--json`` record."""
        return {
            "arch": self.arch,
            "steps": self.steps,
            "initial_val_perplexity": self.initial_val_perplexity,
            "final_val_perplexity": self.final_val_perplexity,
            "tokens_per_s": self.tokens_per_s,
            "out": str(self.out),
        }


@dataclass
class _State:
    """The JSON part of a checkpoint: counters and curves."""

    step: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    curve: list[dict[str, Any]] = field(default_factory=list)
    train_losses: list[float] = field(default_factory=list)
    sampler: dict[str, int] = field(default_factory=dict)


# Options ---------------------------------------------------------------------------------------
def resolve_options(given: dict[str, Any], saved: dict[str, Any] | None) -> TrainOptions:
    """The run's options: ``given`` (None = not given) over the checkpoint's or the preset's.

    Raises:
        UsageError: On resume, a given option differs from the checkpoint's.
    """
    if saved is not None:
        for name, value in given.items():
            if value is not None and name in saved and value != saved[name]:
                flag = "--" + name.replace("_", "-")
                raise UsageError(
                    f"{flag} {value} differs from the checkpoint's {saved[name]}",
                    "drop the option (resume uses the checkpoint's) or start a new --out.",
                )
        known = {f.name for f in dataclasses.fields(TrainOptions)}
        return TrainOptions(**{k: v for k, v in saved.items() if k in known})
    arch = given.get("arch") or defaults.TRAIN_ARCH
    check_arch(arch)
    preset = get_preset(given.get("preset") or defaults.TRAIN_PRESET)
    tokenizer = given.get("tokenizer") or defaults.TRAIN_TOKENIZER
    if tokenizer != "bpe" and given.get("vocab_size") is not None:
        raise UsageError(
            "--vocab-size applies only to --tokenizer bpe",
            "drop it: an existing tokenizer has its own vocabulary.",
        )
    steps = given.get("steps") or preset.steps

    def pick(name: str, fallback: Any) -> Any:
        return given[name] if given.get(name) is not None else fallback

    options = TrainOptions(
        arch=arch,
        preset=preset.name,
        tokenizer=tokenizer,
        vocab_size=pick("vocab_size", preset.vocab_size) if tokenizer == "bpe" else None,
        steps=pick("steps", preset.steps),
        batch_size=pick("batch_size", preset.batch_size),
        grad_accum=pick("grad_accum", preset.grad_accum),
        seq_len=pick("seq_len", preset.seq_len),
        lr=pick("lr", preset.learning_rate(arch)),
        warmup_steps=pick("warmup_steps", min(preset.warmup_steps, steps // 10)),
        val_fraction=pick("val_fraction", defaults.VAL_FRACTION),
        seed=pick("seed", defaults.SEED),
        eval_every=pick("eval_every", preset.eval_every),
        checkpoint_every=pick("checkpoint_every", preset.checkpoint_every),
    )
    options.validate()
    return options


def resolve_device(device: str) -> torch.device:
    """``auto`` (CUDA when torch sees a GPU), ``cpu`` or ``cuda``.

    Raises:
        UsageError: Unknown device, or ``cuda`` without a GPU torch can use.
    """
    if device not in DEVICES:
        raise UsageError(f"Unknown device {device!r}", f"use one of {', '.join(DEVICES)}.")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            "--device cuda was asked for but torch sees no CUDA GPU",
            "install a CUDA build of torch on a machine with an NVIDIA GPU, or use --device cpu.",
        )
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 on GPUs that have it, fp16 on older ones, None (fp32) on CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def lr_factor(
    step: int, warmup: int, total: int, min_ratio: float = defaults.MIN_LR_RATIO
) -> float:
    """Multiplier of the peak learning rate for 0-based ``step``: linear warmup, cosine decay."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# Tokenizer -------------------------------------------------------------------------------------
def make_tokenizer(options: TrainOptions, corpus: Corpus) -> Any:
    """Train a byte-level BPE on the training split, or load the tokenizer directory given."""
    if options.tokenizer == "bpe":
        from llmtool.train.tokenizer import train_bpe_tokenizer

        assert options.vocab_size is not None
        return train_bpe_tokenizer(corpus.head(1.0 - options.val_fraction), options.vocab_size)
    return load_tokenizer_dir(Path(options.tokenizer))


def load_tokenizer_dir(path: Path) -> Any:
    """A tokenizer saved with ``save_pretrained`` (pad falls back to EOS)."""
    from llmtool.models.loading import ModelSpec, load_tokenizer

    if not path.is_dir():
        raise UsageError(
            f"Tokenizer directory {path} does not exist",
            "pass --tokenizer bpe or a directory holding tokenizer.json.",
        )
    return load_tokenizer(ModelSpec("hf_dir", path, None, str(path)))


def special_ids(tokenizer: Any) -> dict[str, int | None]:
    eos = tokenizer.eos_token_id
    return {
        "bos_token_id": tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos,
        "eos_token_id": eos,
        "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
    }


# Checkpoints -----------------------------------------------------------------------------------
def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint under ``out``, or None."""
    pointer = out / CHECKPOINTS / LATEST
    if not pointer.is_file():
        return None
    path = out / CHECKPOINTS / pointer.read_text(encoding="utf-8").strip()
    return path if (path / STATE_JSON).is_file() else None


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(
    out: Path,
    model: Any,
    trainer: dict[str, Any],
    state: _State,
    record: dict[str, Any],
) -> Path:
    """Write ``checkpoints/step-NNNNNN`` atomically, point ``latest`` at it, drop older ones."""
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


def _load_checkpoint_json(path: Path) -> dict[str, Any]:
    data = json.loads((path / STATE_JSON).read_text(encoding="utf-8"))
    if data.get("format") != CHECKPOINT_FORMAT:
        raise UsageError(
            f"Checkpoint {path} has format {data.get('format')}, not {CHECKPOINT_FORMAT}",
            "resume it with the llmtool version that wrote it, or start a new --out.",
        )
    return data


# Evaluation ------------------------------------------------------------------------------------
@torch.no_grad()
def validation_loss(
    model: Any,
    tokens: np.ndarray,
    seq_len: int,
    batch_size: int,
    device: torch.device,
    amp: torch.dtype | None,
) -> float:
    """Mean NLL (nats) per held-out token, over consecutive windows of ``seq_len`` tokens."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in val_windows(tokens, seq_len, batch_size, defaults.VAL_MAX_TOKENS):
        inputs = torch.from_numpy(x).to(device)
        targets = torch.from_numpy(y).to(device)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = model(input_ids=inputs, use_cache=False).logits  # [B, S, V]
        total += F.cross_entropy(
            logits.float().flatten(0, 1), targets.flatten(), reduction="sum"
        ).item()
        count += targets.numel()
    model.train(was_training)
    return total / count


def _perplexity(nll: float) -> float:
    return math.exp(min(nll, 700.0))


# Final directory -------------------------------------------------------------------------------
def _save_final(out: Path, model: Any, generation_ids: dict[str, int | None]) -> None:
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


# The run ---------------------------------------------------------------------------------------
def train_model(
    data: str | Path,
    out: str | Path,
    *,
    arch: str | None = None,
    preset: str | None = None,
    tokenizer: str | None = None,
    vocab_size: int | None = None,
    steps: int | None = None,
    batch_size: int | None = None,
    grad_accum: int | None = None,
    seq_len: int | None = None,
    lr: float | None = None,
    warmup_steps: int | None = None,
    val_fraction: float | None = None,
    seed: int | None = None,
    eval_every: int | None = None,
    checkpoint_every: int | None = None,
    device: str = defaults.TRAIN_DEVICE,
    resume: bool = False,
    force: bool = False,
    on_stage: Callable[[str], None] | None = None,
    on_step: Callable[[TrainProgress], None] | None = None,
) -> TrainResult:
    """Train a small causal LM on a text corpus and write a Hugging Face-style directory.

    Options left as None take the preset's value (``arch`` defaults to ``llama``, ``preset`` to
    ``tiny``), or on resume the checkpoint's; a given option that differs from the checkpoint's
    is an error.

    Args:
        data: A UTF-8 text file or a directory of ``.txt`` files.
        out: The directory to create (or, with ``resume``, to continue).
        arch: ``llama``, ``gpt2``, ``lstm`` or ``rnn``.
        preset: ``tiny``, ``small`` or ``base``.
        tokenizer: ``bpe`` (train a byte-level BPE on the training split) or a tokenizer dir.
        vocab_size: BPE vocabulary size.
        steps: Optimizer steps.
        batch_size: Rows per micro-batch.
        grad_accum: Micro-batches per optimizer step.
        seq_len: Tokens per row (and the Transformers' context length).
        lr: Peak learning rate.
        warmup_steps: Linear warmup steps (default: the preset's, at most a tenth of the run).
        val_fraction: Fraction of the tokens held out at the end of the corpus.
        seed: Seed of the initialization, data order and dropout.
        eval_every: Steps between validations.
        checkpoint_every: Steps between checkpoints.
        device: ``auto``, ``cpu`` or ``cuda``.
        resume: Continue from the newest checkpoint in ``out``.
        force: Delete an existing ``out`` (after the inputs are checked) and start over.
        on_stage: Called with a short description as each stage starts.
        on_step: Called after every optimizer step.

    Returns:
        The directory and the run's metrics.

    Raises:
        UsageError: Bad data or options, an existing ``out`` without ``resume`` / ``force``,
            or ``resume`` without a checkpoint.
    """
    from safetensors.torch import load_model

    from llmtool.models.loading import quiet_transformers

    quiet_transformers()

    def stage(text: str) -> None:
        if on_stage is not None:
            on_stage(text)

    wall_start = time.perf_counter()
    out = Path(out).expanduser()
    given = {
        "arch": arch,
        "preset": preset,
        "tokenizer": tokenizer,
        "vocab_size": vocab_size,
        "steps": steps,
        "batch_size": batch_size,
        "grad_accum": grad_accum,
        "seq_len": seq_len,
        "lr": lr,
        "warmup_steps": warmup_steps,
        "val_fraction": val_fraction,
        "seed": seed,
        "eval_every": eval_every,
        "checkpoint_every": checkpoint_every,
    }
    checkpoint = None
    saved: dict[str, Any] | None = None
    if resume:
        checkpoint = latest_checkpoint(out)
        if checkpoint is None:
            raise UsageError(
                f"No checkpoint to resume in {out}", "run without --resume to start training."
            )
        saved = _load_checkpoint_json(checkpoint)
        options = resolve_options(given, saved["options"])
    else:
        if latest_checkpoint(out) is not None and not force:
            raise UsageError(
                f"{out} holds a training run already",
                "pass --resume to continue it, --force to start over, or pick another --out.",
            )
        if not (out / STARTED).is_file() or latest_checkpoint(out) is not None:
            check_output_dir(out, force=force)
        options = resolve_options(given, None)
    dev = resolve_device(device)
    amp = autocast_dtype(dev)
    if dev.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 where autocast leaves float32

    stage(f"Reading {data}")
    corpus = read_corpus(data)
    if saved is not None:
        tok = load_tokenizer_dir(out)
    else:
        stage("Training the tokenizer" if options.tokenizer == "bpe" else "Loading the tokenizer")
        tok = make_tokenizer(options, corpus)
    stage("Tokenizing")
    splits = split_tokens(tokenize_corpus(corpus, tok), options.val_fraction, options.seq_len)
    if saved is not None and saved["data_fingerprint"] != splits.fingerprint:
        raise UsageError(
            f"The data in {data} is not what the checkpoint in {out} was trained on",
            "resume with the same --data, or start a new --out.",
        )
    if saved is None:
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        (out / STARTED).write_text("llmtool train output; no checkpoint yet\n")
        tok.save_pretrained(out)

    stage(f"Building the {options.arch} model")
    torch.manual_seed(options.seed)
    ids = special_ids(tok)
    preset_obj = get_preset(options.preset)
    model = build_model(options.arch, preset_obj, len(tok), options.seq_len, ids).to(dev)
    model.train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": defaults.WEIGHT_DECAY},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=options.lr,
        betas=defaults.ADAM_BETAS,
        fused=dev.type == "cuda",
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, options.warmup_steps, options.steps)
    )
    scaler = torch.amp.GradScaler(dev.type, enabled=amp == torch.float16)
    sampler = BatchSampler(splits.train, options.seq_len, options.batch_size, options.seed)
    state = _State()
    if checkpoint is not None and saved is not None:
        stage(f"Resuming from {checkpoint.name}")
        load_model(model, str(checkpoint / WEIGHTS), strict=True, device=str(dev))
        trainer = torch.load(checkpoint / STATE_PT, map_location=dev, weights_only=True)
        optimizer.load_state_dict(trainer["optimizer"])
        scheduler.load_state_dict(trainer["scheduler"])
        scaler.load_state_dict(trainer["scaler"])
        _set_rng_state(trainer["rng"], dev)
        known = {f.name for f in dataclasses.fields(_State)}
        state = _State(**{k: v for k, v in saved.items() if k in known})
        sampler.load_state_dict(state.sampler)
    n_params = sum(p.numel() for p in model.parameters())
    record = {
        "format": CHECKPOINT_FORMAT,
        "options": asdict(options),
        "data_fingerprint": splits.fingerprint,
    }

    def evaluate() -> float:
        return validation_loss(model, splits.val, options.seq_len, options.batch_size, dev, amp)

    def add_point(train_loss: float | None) -> None:
        nll = evaluate()
        state.curve.append(
            {
                "step": state.step,
                "tokens": state.tokens,
                "train_loss": train_loss,
                "val_loss": nll,
                "val_perplexity": _perplexity(nll),
                "lr": float(scheduler.get_last_lr()[0]),
                "train_seconds": state.train_seconds,
            }
        )

    if not state.curve:
        stage("Measuring the untrained model")
        add_point(None)
    stage(f"Training {options.arch} ({n_params:,} parameters) on {dev.type}")
    tokens_per_step = options.batch_size * options.seq_len * options.grad_accum
    since_eval: list[float] = []
    while state.step < options.steps:
        start = time.perf_counter()
        lr_now = float(scheduler.get_last_lr()[0])
        optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=dev)
        for _ in range(options.grad_accum):
            x, y = sampler.next_batch()
            inputs = torch.from_numpy(x).to(dev, non_blocking=True)
            targets = torch.from_numpy(y).to(dev, non_blocking=True)
            with torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
                logits = model(input_ids=inputs, use_cache=False).logits  # [B, S, V]
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
            scaler.scale(loss / options.grad_accum).backward()
            loss_sum += loss.detach()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), defaults.GRAD_CLIP)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        step_loss = loss_sum.item() / options.grad_accum  # syncs the device: timing is honest
        state.train_seconds += time.perf_counter() - start
        state.step += 1
        state.tokens += tokens_per_step
        state.train_losses.append(step_loss)
        since_eval.append(step_loss)
        evaluated = state.step % options.eval_every == 0 or state.step == options.steps
        if evaluated:
            add_point(float(np.mean(since_eval)))
            since_eval = []
        checkpointed = state.step % options.checkpoint_every == 0 or state.step == options.steps
        if checkpointed:
            state.sampler = sampler.state_dict()
            trainer = {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": _rng_state(dev),
            }
            save_checkpoint(out, model, trainer, state, record)
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

    stage("Writing the model")
    model.eval()
    _save_final(out, model.to("cpu"), ids)
    initial, final = state.curve[0], state.curve[-1]
    tokens_per_s = state.tokens / state.train_seconds if state.train_seconds > 0 else 0.0
    metrics: dict[str, Any] = {
        "arch": options.arch,
        "steps": state.step,
        "initial_val_perplexity": initial["val_perplexity"],
        "final_val_perplexity": final["val_perplexity"],
        "tokens_per_s": tokens_per_s,
        "out": str(out.resolve()),
        "preset": options.preset,
        "parameters": n_params,
        "vocab_size": len(tok),
        "tokens": {"train": len(splits.train), "val": len(splits.val)},
        "train_tokens_seen": state.tokens,
        "train_seconds": state.train_seconds,
        "wall_seconds": time.perf_counter() - wall_start,
        "resumed": resume,
        "autocast": str(amp).replace("torch.", "") if amp is not None else None,
        "options": asdict(options),
        "machine": _machine(dev),
        "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "curve": state.curve,
        "train_losses": state.train_losses,
    }
    atomic_write_text(out / METRICS, json.dumps(metrics, indent=1) + "\n")
    return TrainResult(
        out=out.resolve(),
        arch=options.arch,
        steps=state.step,
        initial_val_perplexity=initial["val_perplexity"],
        final_val_perplexity=final["val_perplexity"],
        tokens_per_s=tokens_per_s,
        metrics=metrics,
    )
