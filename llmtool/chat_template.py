"""Chat templates: render a conversation to prompt token ids as transformers' ``apply_chat_template``.

A chat model's tokenizer carries a Jinja2 template (``tokenizer_config.json`` or
``chat_template.jinja``; transformers copies a GGUF's ``tokenizer.chat_template`` into it) that
turns ``[{"role": ..., "content": ...}, ...]`` into the text the model was trained on. This module
renders it the way transformers does: an immutable Jinja2 sandbox with ``trim_blocks`` and
``lstrip_blocks``, loop controls, ``raise_exception``, ``strftime_now``, a ``tojson`` that keeps
non-ASCII text, the tokenizer's special tokens as variables, then tokenization without added
special tokens (the template writes them itself). It never evaluates Python.

One deliberate difference: a template that *prints* a variable nobody passed is an error here
(transformers silently prints nothing), so a template written for other inputs fails loudly.
Testing such a variable (``{% if tools %}``, ``is defined``) works as in transformers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

from llmtool.errors import UsageError

Message = Mapping[str, Any]
Conversation = Sequence[Message]
ROLES = ("system", "user", "assistant", "tool")


def chat_template(tokenizer: Any) -> str | None:
    """The tokenizer's chat template (the ``default`` one when it holds several), or None."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()), None)
    return template or None


def require_template(tokenizer: Any) -> str:
    """The chat template, or a :class:`UsageError` saying the model has none."""
    template = chat_template(tokenizer)
    if template is None:
        raise UsageError(
            "This model's tokenizer has no chat template",
            "drop --chat and pass plain --prompt text, or export a chat (Instruct) model.",
        )
    return template


@lru_cache(maxsize=16)
def _compile(template: str) -> Any:
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class PrintedUndefined(jinja2.Undefined):
        """Undefined that may be tested (``if x``, ``x is defined``) but not printed."""

        def __str__(self) -> str:
            self._fail_with_undefined_error()
            return ""  # pragma: no cover (the line above raises)

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: Any,
        ensure_ascii: bool = False,
        indent: Any = None,
        separators: Any = None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[jinja2.ext.loopcontrols],
        undefined=PrintedUndefined,
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise UsageError(
            f"The chat template does not parse (line {e.lineno}: {e.message})",
            "fix chat_template.jinja (or tokenizer_config.json) in the export directory.",
        ) from e


def check_conversation(messages: Any, where: str = "a conversation") -> list[dict[str, Any]]:
    """``messages`` as a list of ``{"role", "content"}`` dicts, or a :class:`UsageError`."""
    if not isinstance(messages, list) or not messages:
        raise UsageError(
            f"{where} is not a non-empty list of messages",
            'write [{"role": "user", "content": "..."}].',
        )
    for m in messages:
        if (
            not isinstance(m, dict)
            or m.get("role") not in ROLES
            or not isinstance(m.get("content"), str)
        ):
            raise UsageError(
                f"{where} holds a message that is not {{'role': {'|'.join(ROLES)}, 'content': text}}: "
                f"{str(m)[:60]}"
            )
    return [dict(m) for m in messages]


def render_text(tokenizer: Any, messages: Conversation, add_generation_prompt: bool = True) -> str:
    """The template's text for ``messages`` (with the assistant's generation prompt by default)."""
    import jinja2

    compiled = _compile(require_template(tokenizer))
    special = {k: str(v) for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
    try:
        return str(
            compiled.render(
                messages=list(messages),
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **special,
            )
        )
    except jinja2.UndefinedError as e:
        raise UsageError(
            f"The chat template uses a variable that is not given ({e.message})",
            "pass only role/content messages or fix the export's chat template.",
        ) from e
    except jinja2.TemplateError as e:
        raise UsageError(f"The chat template rejected the conversation ({e})") from e


def render_ids(
    tokenizer: Any, messages: Conversation, add_generation_prompt: bool = True
) -> list[int]:
    """Prompt token ids of ``messages``: the rendered text, tokenized without added special tokens."""
    text = render_text(tokenizer, messages, add_generation_prompt)
    return [int(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"]]


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """The special token the template writes after an assistant's answer (``<|im_end|>``, ...).

    Found by rendering a one-exchange conversation: the first token after the answer's text, kept
    when it is a special (added) token. Empty when the template writes none.
    """
    marker = "llmtool-answer"
    convo = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}]
    try:
        text = render_text(tokenizer, convo, add_generation_prompt=False)
    except UsageError:
        return []
    after = text.split(marker, 1)[-1] if marker in text else ""
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    return [int(ids[0])] if ids and ids[0] in special else []


def as_conversation(prompt: str | Conversation, system: str | None) -> list[dict[str, Any]]:
    """A prompt as a conversation: text becomes a user turn; ``system`` leads unless one is there."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    messages = check_conversation(messages)
    if system is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    return messages


def read_messages_file(path: Any) -> list[list[dict[str, Any]]]:
    """Conversations from a JSONL file: one JSON list of messages (or ``{"messages": [...]}``) a line."""
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"Message file {path} does not exist")
    conversations = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path} line {number} is not JSON ({e.msg})") from e
        if isinstance(value, dict):
            value = value.get("messages")
        conversations.append(check_conversation(value, f"{path} line {number}"))
    if not conversations:
        raise UsageError(
            f"Message file {path} holds no conversations",
            'write one JSON list of {"role", "content"} messages a line.',
        )
    return conversations
