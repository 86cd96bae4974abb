"""The one Rich console pair: results to stdout, messages and progress to stderr.

Rich parses ``[...]`` in plain strings as markup, so text that is not our own styling (prompts,
paths, messages, generated text) must never reach it as a markup string: it goes in as
:class:`rich.text.Text` (:func:`plain`, :func:`dim`) or through :func:`rich.markup.escape`.
"""

from __future__ import annotations

from rich.console import Console
from rich.text import Text

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def plain(text: object, style: str = "") -> Text:
    """``text`` as it is (never parsed as markup), optionally styled."""
    return Text(str(text), style=style)


def dim(text: object) -> Text:
    """A dim note, printed verbatim."""
    return plain(text, "dim")
