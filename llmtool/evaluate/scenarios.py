"""Throughput scenarios: batch size × prompt length × new tokens, checked against the model's context."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from llmtool import defaults
from llmtool.errors import UsageError
from llmtool.runtime.model import OnnxCausalLM


@dataclass(frozen=True)
class Scenario:
    """One shape: ``batch_size`` rows of ``prompt_length`` tokens, ``new_tokens`` generated each."""

    batch_size: int
    prompt_length: int
    new_tokens: int

    @property
    def key(self) -> str:
        """``b{batch}.p{prompt}.n{new}``: names the scenario in metrics and the gate."""
        return f"b{self.batch_size}.p{self.prompt_length}.n{self.new_tokens}"


def parse_sizes(text: str, option: str) -> tuple[int, ...]:
    """Positive integers from ``"1,8"``.

    Raises:
        UsageError: Not a comma-separated list of positive integers.
    """
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise UsageError(f"{option} takes positive integers separated by commas, got {text!r}")
    return values


def fit_default_shapes(
    context: int | None,
    prompt_lengths: Sequence[int] | None,
    new_tokens: int | None,
) -> tuple[tuple[int, ...], int, str | None]:
    """The scenario shapes: those given, else the defaults fitted to the model's context.

    Shapes the user gave are kept as they are (:func:`plan_scenarios` refuses them if too long).
    Default shapes that do not fit are replaced: at most a quarter of the context of new tokens,
    the default prompt lengths that still fit, else one prompt filling the rest.

    Returns:
        ``(prompt_lengths, new_tokens, note)``; ``note`` says what was fitted (None: nothing).
    """
    prompts = tuple(prompt_lengths or defaults.THROUGHPUT_PROMPT_LENGTHS)
    new = new_tokens or defaults.THROUGHPUT_NEW_TOKENS
    if not context or max(prompts) + new <= context:
        return prompts, new, None
    if new_tokens is None:
        new = min(new, max(2, context // 4))
    if prompt_lengths is None:
        prompts = tuple(p for p in prompts if p + new <= context) or (max(1, context - new),)
    note = None
    if (prompts, new) != (
        tuple(prompt_lengths or defaults.THROUGHPUT_PROMPT_LENGTHS),
        new_tokens or defaults.THROUGHPUT_NEW_TOKENS,
    ):
        shown = ",".join(map(str, prompts))
        note = (
            f"default shapes fitted to the model's context of {context} tokens: "
            f"prompt lengths {shown}, {new} new tokens"
        )
    return prompts, new, note


def plan_scenarios(
    model: OnnxCausalLM,
    batch_sizes: Sequence[int],
    prompt_lengths: Sequence[int],
    new_tokens: int,
    warmup: int,
    repeats: int,
) -> list[Scenario]:
    """Every batch size × prompt length, checked against the model's context.

    Raises:
        UsageError: Bad counts, or a prompt plus new tokens longer than the context.
    """
    if new_tokens < 2:
        raise UsageError(
            f"--new-tokens must be at least 2 (one prefill token and one decode step), got {new_tokens}"
        )
    if warmup < 0 or repeats < 1:
        raise UsageError(
            f"--warmup must be 0 or more and --repeats 1 or more, got {warmup} and {repeats}"
        )
    if not batch_sizes or not prompt_lengths or min(*batch_sizes, *prompt_lengths) < 1:
        raise UsageError("--batch-sizes and --prompt-lengths take positive integers")
    longest = max(prompt_lengths) + new_tokens
    if model.max_positions and longest > model.max_positions:
        raise UsageError(
            f"A prompt of {max(prompt_lengths)} tokens plus {new_tokens} new tokens exceeds the "
            f"model's context of {model.max_positions} tokens",
            "lower --prompt-lengths or --new-tokens.",
        )
    return [
        Scenario(b, p, new_tokens)
        for b in dict.fromkeys(batch_sizes)
        for p in dict.fromkeys(prompt_lengths)
    ]
