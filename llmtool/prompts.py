"""Prompts for generation: text, token ids or conversations, to checked token ids.

:func:`check_request` runs before any session is opened (the manifest and tokenizer know the
vocabulary and the context), so a bad request is refused before the slow model load;
:func:`tokenize_prompts` applies the same rules to an open model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmtool.chat_template import Conversation, as_conversation, render_ids
from llmtool.errors import UsageError

if TYPE_CHECKING:
    from llmtool.runtime.model import OnnxCausalLM

Prompt = str | Sequence[int] | Conversation


def is_messages(prompt: Prompt) -> bool:
    """True for a conversation (a list of message dicts) rather than text or token ids."""
    return not isinstance(prompt, str) and bool(prompt) and isinstance(prompt[0], Mapping)


def check_request(
    directory: str | Path,
    prompts: Sequence[Prompt],
    max_new_tokens: int,
    chat: bool = False,
    system: str | None = None,
) -> list[list[int]]:
    """Check a generation request against an export's manifest and tokenizer, no session opened.

    Returns:
        The token ids of each prompt.

    Raises:
        UsageError: Not an export, ``max_new_tokens`` < 1, or a prompt that is empty, outside
            the vocabulary or too long for the context.
    """
    from llmtool.models.loading import ModelSpec, load_tokenizer
    from llmtool.runtime.foreign import read_contract

    check_max_new_tokens(max_new_tokens)
    directory = Path(directory)
    if not directory.is_dir():
        raise UsageError(
            f"Export directory {directory} does not exist",
            "create it with `llmtool export MODEL --out DIR`.",
        )
    contract = read_contract(directory)
    tokenizer = load_tokenizer(ModelSpec("hf_dir", directory, None, str(directory)))
    return tokenize_checked(
        tokenizer,
        prompts,
        max_new_tokens,
        (contract.vocab_size, contract.max_positions),
        chat,
        system,
    )


def check_max_new_tokens(max_new_tokens: int) -> None:
    """Raises: UsageError: ``max_new_tokens`` < 1."""
    if max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")


def tokenize_prompts(
    model: OnnxCausalLM,
    prompts: Sequence[Prompt],
    max_new_tokens: int,
    chat: bool = False,
    system: str | None = None,
) -> list[list[int]]:
    """Token ids of each prompt, checked against the model's vocabulary and context."""
    limits = (model.vocab_size, model.max_positions)
    return tokenize_checked(model.tokenizer, prompts, max_new_tokens, limits, chat, system)


def tokenize_checked(
    tokenizer: Any,
    prompts: Sequence[Prompt],
    max_new_tokens: int,
    limits: tuple[int, int | None],
    chat: bool = False,
    system: str | None = None,
) -> list[list[int]]:
    """Token ids of each prompt, checked against ``limits`` (vocabulary size, context).

    Text is tokenized, id lists pass through; with ``chat`` (or for a conversation, a list of
    messages) the prompt is rendered with the chat template and the generation prompt, text
    becoming a user turn after ``system``.
    """
    vocab_size, max_positions = limits
    if not prompts:
        raise UsageError("No prompt given", "pass --prompt TEXT or --prompt-file FILE.")
    rows = []
    for prompt in prompts:
        is_conversation = is_messages(prompt)
        if isinstance(prompt, str) and not prompt.strip():
            raise UsageError("A prompt is empty", "give every --prompt some text.")
        if chat or is_conversation:
            if not isinstance(prompt, str) and not is_conversation:
                raise UsageError("Chat prompts are text or messages, not token ids")
            ids = render_ids(tokenizer, as_conversation(prompt, system))  # type: ignore[arg-type]
        elif isinstance(prompt, str):
            if not prompt.strip():
                raise UsageError("A prompt is empty", "give every --prompt some text.")
            ids = list(tokenizer(prompt)["input_ids"])
        else:
            ids = [int(t) for t in prompt]  # type: ignore[arg-type]
        if not ids:
            raise UsageError(
                f"The prompt {str(prompt)[:40]!r} encodes to no tokens", "give it some text."
            )
        if max(ids) >= vocab_size or min(ids) < 0:
            raise UsageError(f"A prompt holds token ids outside the vocabulary of {vocab_size}")
        if max_positions and len(ids) + max_new_tokens > max_positions:
            raise UsageError(
                f"A prompt of {len(ids)} tokens plus {max_new_tokens} new tokens exceeds the model's "
                f"context of {max_positions} tokens",
                "shorten the prompt or lower --max-new-tokens.",
            )
        rows.append(ids)
    return rows
