"""``llmtool train --arch t5|bart --data PAIRS.tsv``: a small encoder-decoder on source/target pairs.

The model is transformers' own ``T5ForConditionalGeneration`` (v1.1 layout: gated-GELU,
untied head) or ``BartForConditionalGeneration`` built from a preset; the tokenizer is the
byte-level BPE of ``llmtool train`` trained on both sides (its one special token is pad, EOS
and decoder start). The optimizer and schedule are the decoder loop's
(:mod:`llmtool.train.loop`): AdamW without decay on biases and norms, linear warmup then cosine
decay (:func:`~llmtool.train.loop.lr_factor`), gradient clipping, bf16 / fp16 autocast on CUDA.
Batches are pairs padded to their longest side, labels padded with -100 (transformers' loss
ignores them). The held-out pairs give the validation loss every ``eval_every`` steps and, at
the end, the exact-match rate of greedy outputs. The output directory is written atomically and
is what ``llmtool export`` takes unchanged; ``train_metrics.json`` holds the curve.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmtool import defaults
from llmtool.errors import UsageError
from llmtool.seq2seq.batches import encode_pairs, exact_match, make_batch, val_loss
from llmtool.seq2seq.pairs import Pair, read_pairs
from llmtool.seq2seq.presets import PRESETS, SEQ2SEQ_ARCHS, Seq2SeqPreset, build_seq2seq

__all__ = ["PRESETS", "SEQ2SEQ_ARCHS", "Seq2SeqPreset", "Seq2SeqTrainOptions", "build_seq2seq"]


@dataclass(frozen=True)
class Seq2SeqTrainOptions:
    """What ``llmtool train`` passes for an encoder-decoder (None: the preset's value)."""

    arch: str = "t5"
    preset: str = "tiny"
    steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    eval_every: int | None = None
    val_fraction: float = defaults.VAL_FRACTION
    seed: int = defaults.SEED
    max_eval_pairs: int = 200
    threads: int | None = None
    checkpoint_every: int | None = None


def check_options(options: Seq2SeqTrainOptions) -> Seq2SeqPreset:
    """The preset, after refusing an unknown arch or preset.

    Raises:
        UsageError: Unknown arch or preset, or a bad size.
    """
    if options.arch not in SEQ2SEQ_ARCHS:
        raise UsageError(
            f"Unknown encoder-decoder arch {options.arch!r}", f"use {' or '.join(SEQ2SEQ_ARCHS)}."
        )
    if options.preset not in PRESETS:
        raise UsageError(f"Unknown preset {options.preset!r} for {options.arch}", "use tiny.")
    if not 0.0 < options.val_fraction < 1.0:
        raise UsageError(f"--val-fraction must be in (0, 1), got {options.val_fraction}")
    for name in ("steps", "batch_size", "eval_every", "checkpoint_every"):
        value = getattr(options, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    return PRESETS[options.preset]


def train_seq2seq(
    data: str | Path,
    out: str | Path,
    options: Seq2SeqTrainOptions | None = None,
    *,
    device: str = defaults.TRAIN_DEVICE,
    force: bool = False,
    resume: bool = False,
    on_stage: Callable[[str], None] | None = None,
    on_step: Callable[[Any], None] | None = None,
) -> dict[str, Any]:
    """Train a T5 or BART on a pairs file; write a Hugging Face directory ``out``.

    With ``options.checkpoint_every`` the run saves checkpoints under ``out/checkpoints``
    (:mod:`llmtool.seq2seq.checkpoint`); ``resume`` continues the newest one with its own
    options (those passed are ignored) and ends with the losses an uninterrupted run has.

    Returns:
        The metrics written to ``out/train_metrics.json`` (curve, exact match, timing).

    Raises:
        UsageError: Bad data or options, an existing ``out`` without ``force``, or
            ``resume`` without a seq2seq checkpoint on these pairs.
    """
    import torch

    from llmtool.fsutil import check_output_dir
    from llmtool.models.loading import quiet_transformers
    from llmtool.train.checkpoint import latest_checkpoint, load_checkpoint
    from llmtool.train.options import resolve_device

    options = options or Seq2SeqTrainOptions()
    out = Path(out).expanduser()
    path = latest_checkpoint(out) if resume else None
    if resume and path is not None:
        saved = load_checkpoint(path).data.get("options") or {}
        options = Seq2SeqTrainOptions(**{k: v for k, v in saved.items() if k != "threads"})
    preset = check_options(options)
    stage = on_stage or (lambda text: None)
    quiet_transformers()
    if not resume:
        check_output_dir(out, force=force)
    dev = resolve_device(device)
    threads = torch.get_num_threads()
    # A tiny model's ops are too small to split: on a shared 2-core CPU, 2 intra-op threads made
    # a step 38x slower than 1 (threads spinning for each other), so CPU runs default to one.
    torch.set_num_threads(options.threads or (1 if dev.type == "cpu" else threads))
    try:
        return _train(data, out, options, preset, dev, (force, resume), stage, on_step)
    finally:
        torch.set_num_threads(threads)


def _train(
    data: str | Path,
    out: Path,
    options: Seq2SeqTrainOptions,
    preset: Seq2SeqPreset,
    dev: Any,
    flags: tuple[bool, bool],
    stage: Callable[[str], None],
    on_step: Callable[[Any], None] | None,
) -> dict[str, Any]:
    """:func:`train_seq2seq` once the options, output and device are checked."""
    import torch

    from llmtool.fsutil import atomic_directory
    from llmtool.seq2seq import checkpoint as ckpt
    from llmtool.seq2seq.pairs import pairs_sha256
    from llmtool.train.options import autocast_dtype

    force, resume = flags
    amp = autocast_dtype(dev)
    wall = time.perf_counter()
    pairs = read_pairs(data)
    sha = pairs_sha256(pairs)
    resumed = ckpt.find_resume(out, sha) if resume else None
    rng, train_pairs, val_pairs, tokenizer = _prepare(
        data, pairs, out, options, preset, resumed is not None, stage
    )
    special = int(tokenizer.eos_token_id)
    train_rows = encode_pairs(tokenizer, train_pairs, special, preset.max_positions)
    val_rows = encode_pairs(tokenizer, val_pairs, special, preset.max_positions)
    torch.manual_seed(options.seed)
    model = build_seq2seq(options.arch, preset, len(tokenizer), special).to(dev)
    model.train()
    steps = options.steps or preset.steps
    batch_size = options.batch_size or preset.batch_size
    eval_every = options.eval_every or preset.eval_every
    lr = options.lr or preset.lr
    optimizer, scheduler = _optimizer(model, lr, preset.warmup_steps, steps, dev)
    n_params = sum(p.numel() for p in model.parameters())
    state = ckpt.LoopState()
    if resumed is not None:
        state = ckpt.restore(resumed, model, optimizer, scheduler, rng)
        stage(f"Resuming {options.arch} at step {state.step} of {steps}")
    else:
        stage(f"Training {options.arch} ({n_params:,} parameters) on {dev.type}")

    def save(s: ckpt.LoopState) -> None:
        record = {"format": 1, "options": asdict(options), "data_sha256": sha}
        ckpt.save(out, model, optimizer, scheduler, rng, s, record)

    curve, train_seconds, tokens = _loop(
        model,
        optimizer,
        scheduler,
        (state, options.checkpoint_every, save),
        train_rows,
        val_rows,
        special,
        dev,
        amp,
        rng,
        (steps, batch_size, eval_every),
        (tokenizer, val_pairs[:50]),
        on_step,
    )
    stage("Measuring exact match on the held-out pairs")
    em = exact_match(model, tokenizer, val_pairs[: options.max_eval_pairs], dev)
    metrics = {
        "arch": options.arch,
        "preset": options.preset,
        "out": str(out),
        "parameters": n_params,
        "steps": steps,
        "pairs": {"train": len(train_pairs), "val": len(val_pairs)},
        "tokens": {"train": tokens, "val": sum(len(t) for _, t in val_rows)},
        "initial_val_perplexity": math.exp(min(curve[0]["val_loss"], 700.0)),
        "final_val_perplexity": math.exp(min(curve[-1]["val_loss"], 700.0)),
        "exact_match": em,
        "exact_match_pairs": min(len(val_pairs), options.max_eval_pairs),
        "tokens_per_s": tokens / max(train_seconds, 1e-9),
        "train_seconds": train_seconds,
        "wall_seconds": time.perf_counter() - wall,
        "machine": {"device": dev.type, "torch_threads": torch.get_num_threads()},
        "options": asdict(options),
        "curve": curve,
    }
    stage("Writing the model")
    # A checkpointed run's out (tokenizer, checkpoints) is replaced whole by the final model.
    with atomic_directory(out, force=force or bool(options.checkpoint_every)) as tmp:
        model.to("cpu").save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "train_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def _prepare(
    data: str | Path,
    pairs: list[Pair],
    out: Path,
    options: Seq2SeqTrainOptions,
    preset: Seq2SeqPreset,
    resumed: bool,
    stage: Callable[[str], None],
) -> tuple[np.random.Generator, list[Pair], list[Pair], Any]:
    """The seeded generator, the train / held-out split and the tokenizer (read back on resume)."""
    from llmtool.seq2seq import checkpoint as ckpt
    from llmtool.train.tokenizer import load_tokenizer_dir, train_bpe_tokenizer

    rng = np.random.default_rng(options.seed)
    order = rng.permutation(len(pairs))
    n_val = max(1, round(len(pairs) * options.val_fraction))
    if len(pairs) - n_val < 1:
        raise UsageError(f"{data} has too few pairs to hold some out", "give at least two pairs.")
    val_pairs = [pairs[i] for i in order[:n_val]]
    train_pairs = [pairs[i] for i in order[n_val:]]
    if resumed:
        tokenizer = load_tokenizer_dir(out)
    else:
        stage("Training the tokenizer")
        texts = [p.source for p in pairs] + [p.target for p in pairs]
        tokenizer = train_bpe_tokenizer(texts, vocab_size=preset.vocab_size)
        if options.checkpoint_every:
            ckpt.start_run(out, tokenizer)
    return rng, train_pairs, val_pairs, tokenizer


def _optimizer(model: Any, lr: float, warmup: int, steps: int, device: Any) -> tuple[Any, Any]:
    """AdamW (no decay on biases and norms) and the warmup-cosine schedule of the decoder loop."""
    import torch

    from llmtool.train.loop import lr_factor

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": defaults.WEIGHT_DECAY},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=lr,
        betas=defaults.ADAM_BETAS,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, steps))
    return optimizer, scheduler


def _loop(
    model: Any,
    optimizer: Any,
    scheduler: Any,
    resume: tuple[Any, int | None, Callable[[Any], None]],
    train_rows: list[tuple[list[int], list[int]]],
    val_rows: list[tuple[list[int], list[int]]],
    special: int,
    dev: Any,
    amp: Any,
    rng: np.random.Generator,
    sizes: tuple[int, int, int],
    probe: tuple[Any, list[Pair]],
    on_step: Callable[[Any], None] | None,
) -> tuple[list[dict[str, Any]], float, int]:
    """The optimizer steps; returns the curve (val loss and exact match on ``probe``), time, tokens.

    ``resume`` is the :class:`~llmtool.seq2seq.checkpoint.LoopState` to start from, the steps
    between checkpoints (None: none) and the function that saves one.
    """
    import torch

    from llmtool.train.metrics import TrainProgress

    steps, batch_size, eval_every = sizes
    state, checkpoint_every, save = resume
    if state.step == 0:
        state.curve = [
            {
                "step": 0,
                "train_loss": None,
                "val_loss": val_loss(model, val_rows, special, dev),
                "exact_match": 0.0,
                "train_seconds": 0.0,
            }
        ]
    curve: list[dict[str, Any]] = state.curve
    train_seconds, tokens, since = state.train_seconds, state.tokens, state.since
    for step in range(state.step + 1, steps + 1):
        start = time.perf_counter()
        picked = rng.integers(0, len(train_rows), batch_size)
        batch = {
            k: v.to(dev) for k, v in make_batch([train_rows[i] for i in picked], special).items()
        }
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), defaults.GRAD_CLIP)
        optimizer.step()
        scheduler.step()
        since.append(loss.item())
        train_seconds += time.perf_counter() - start
        tokens += int((batch["labels"] != -100).sum()) + int(batch["attention_mask"].sum())
        evaluated = step % eval_every == 0 or step == steps
        if evaluated:
            curve.append(
                {
                    "step": step,
                    "train_loss": float(np.mean(since)),
                    "val_loss": val_loss(model, val_rows, special, dev),
                    "exact_match": exact_match(model, probe[0], probe[1], dev),
                    "train_seconds": train_seconds,
                }
            )
            since = []
        checkpointed = (
            checkpoint_every is not None and step % checkpoint_every == 0 and step < steps
        )
        if checkpointed:
            save(type(state)(step, curve, train_seconds, tokens, since))
        if on_step is not None:
            on_step(
                TrainProgress(
                    step=step,
                    steps=steps,
                    loss=since[-1] if since else float(curve[-1]["train_loss"]),
                    lr=float(scheduler.get_last_lr()[0]),
                    val_perplexity=math.exp(min(curve[-1]["val_loss"], 700.0)),
                    tokens_per_s=tokens / max(train_seconds, 1e-9),
                    evaluated=evaluated,
                    checkpointed=checkpointed,
                )
            )
    return curve, train_seconds, tokens
