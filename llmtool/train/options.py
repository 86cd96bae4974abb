"""The options of ``llmtool train``: what is asked for, what a run uses, and where it runs.

A caller (the CLI, a script, a test) builds one :class:`TrainOptions`; a field left None takes
the preset's value, or on resume the checkpoint's. :meth:`TrainOptions.resolve` is the one place
that fills and checks them, giving the :class:`RunOptions` that a run uses and that checkpoints
and ``train_metrics.json`` record. The device is not among them: it changes speed, not results.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llmtool import defaults
from llmtool.errors import UsageError
from llmtool.train.presets import check_arch, get_preset

if TYPE_CHECKING:
    import torch

DEVICES = ("auto", "cpu", "cuda")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class RunOptions:
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

    @classmethod
    def from_record(cls, saved: dict[str, Any]) -> RunOptions:
        """The options a checkpoint recorded (keys it has that are not options are ignored)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in known})

    def tokens_per_step(self) -> int:
        """Training tokens one optimizer step consumes."""
        return self.batch_size * self.seq_len * self.grad_accum


@dataclass(frozen=True)
class TrainOptions:
    """What a run is asked for; each field left None takes the preset's value.

    On resume a field left None takes the checkpoint's value, and a given one must equal it.
    The fields are those of :class:`RunOptions` (see there); ``arch`` defaults to
    :data:`llmtool.defaults.TRAIN_ARCH`, ``preset`` to :data:`llmtool.defaults.TRAIN_PRESET`,
    ``tokenizer`` to ``bpe``, ``warmup_steps`` to the preset's but at most a tenth of the run.
    """

    arch: str | None = None
    preset: str | None = None
    tokenizer: str | None = None
    vocab_size: int | None = None
    steps: int | None = None
    batch_size: int | None = None
    grad_accum: int | None = None
    seq_len: int | None = None
    lr: float | None = None
    warmup_steps: int | None = None
    val_fraction: float | None = None
    seed: int | None = None
    eval_every: int | None = None
    checkpoint_every: int | None = None

    def resolve(self, saved: dict[str, Any] | None = None) -> RunOptions:
        """The run's options: the given ones over the checkpoint's (``saved``) or the preset's.

        Args:
            saved: The ``options`` a checkpoint recorded, when resuming.

        Raises:
            UsageError: An unknown arch or preset, an out-of-range value, ``vocab_size`` with
                a tokenizer directory, or on resume a given option that differs from the
                checkpoint's.
        """
        if saved is not None:
            for name, value in dataclasses.asdict(self).items():
                if value is not None and name in saved and value != saved[name]:
                    raise UsageError(
                        f"{_flag(name)} {value} differs from the checkpoint's {saved[name]}",
                        "drop the option (resume uses the checkpoint's) or start a new --out.",
                    )
            return RunOptions.from_record(saved)
        run = self._over_preset()
        _check_ranges(run)
        return run

    def _over_preset(self) -> RunOptions:
        arch = self.arch or defaults.TRAIN_ARCH
        check_arch(arch)
        preset = get_preset(self.preset or defaults.TRAIN_PRESET)
        tokenizer = self.tokenizer or defaults.TRAIN_TOKENIZER
        if tokenizer != "bpe" and self.vocab_size is not None:
            raise UsageError(
                "--vocab-size applies only to --tokenizer bpe",
                "drop it: an existing tokenizer has its own vocabulary.",
            )
        steps = self.steps or preset.steps

        def pick(value: Any, fallback: Any) -> Any:
            return value if value is not None else fallback

        return RunOptions(
            arch=arch,
            preset=preset.name,
            tokenizer=tokenizer,
            vocab_size=pick(self.vocab_size, preset.vocab_size) if tokenizer == "bpe" else None,
            steps=pick(self.steps, preset.steps),
            batch_size=pick(self.batch_size, preset.batch_size),
            grad_accum=pick(self.grad_accum, preset.grad_accum),
            seq_len=pick(self.seq_len, preset.seq_len),
            lr=pick(self.lr, preset.learning_rate(arch)),
            warmup_steps=pick(self.warmup_steps, min(preset.warmup_steps, steps // 10)),
            val_fraction=pick(self.val_fraction, defaults.VAL_FRACTION),
            seed=pick(self.seed, defaults.SEED),
            eval_every=pick(self.eval_every, preset.eval_every),
            checkpoint_every=pick(self.checkpoint_every, preset.checkpoint_every),
        )


def _check_ranges(run: RunOptions) -> None:
    for name in ("steps", "batch_size", "grad_accum", "eval_every", "checkpoint_every"):
        if getattr(run, name) < 1:
            raise UsageError(f"{_flag(name)} must be at least 1, got {getattr(run, name)}")
    if run.seq_len < 2:
        raise UsageError(f"--seq-len must be at least 2, got {run.seq_len}")
    if not run.lr > 0:
        raise UsageError(f"--lr must be greater than 0, got {run.lr}")
    if not 0.0 < run.val_fraction <= 0.5:
        raise UsageError(f"--val-fraction must be in (0, 0.5], got {run.val_fraction}")
    if run.vocab_size is not None and run.vocab_size < 258:
        raise UsageError(
            f"--vocab-size must be at least 258 (256 bytes and end-of-text), got {run.vocab_size}"
        )
    if run.warmup_steps < 0:
        raise UsageError(f"The warmup must be at least 0 steps, got {run.warmup_steps}")


def resolve_device(device: str) -> torch.device:
    """``auto`` (CUDA when torch sees a GPU), ``cpu`` or ``cuda``.

    Raises:
        UsageError: Unknown device, or ``cuda`` without a GPU torch can use.
    """
    import torch

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
    import torch

    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
