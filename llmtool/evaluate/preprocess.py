"""Task preprocessing applied to each document before it is tokenized (``--preprocess``).

``wikitext``: lm-evaluation-harness' wikitext task scores each page after undoing WikiText's
tokenization (spaces around punctuation, ``@-@`` number separators, spaced heading marks), while
it counts words and bytes on the page as stored. The rules below follow that task's documented
detokenization step by step and in its order (the order matters: later rules see the output of
earlier ones); :class:`~llmtool.evaluate.data.Document` keeps the original text for the counts.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from llmtool.errors import UsageError

# (old, new) plain replacements and (pattern, template) regex substitutions, in order.
_Rule = tuple[str, str, bool]  # (old or pattern, new, is_regex)

_WIKITEXT_RULES: tuple[_Rule, ...] = (
    # Contractions: "years '" -> "years'".
    ("s '", "s'", False),
    (r"/' [0-9]/", r"/'[0-9]/", True),  # kept as the task has it (it matches literal slashes)
    # Number separators: "1 @,@ 000" -> "1,000", "2 @-@ 3" -> "2-3", "1 @.@ 5" -> "1.5".
    (" @-@ ", "-", False),
    (" @,@ ", ",", False),
    (" @.@ ", ".", False),
    # Punctuation followed by a space loses the space before it.
    *((f" {mark} ", f"{mark} ", False) for mark in ":;.!?,"),
    # Brackets and quotes hug their content: "( a b )" -> "(a b)".
    (r"\(\s*([^\)]*?)\s*\)", r"(\1)", True),
    (r"\[\s*([^\]]*?)\s*\]", r"[\1]", True),
    (r"{\s*([^}]*?)\s*}", r"{\1}", True),
    (r"\"\s*([^\"]*?)\s*\"", r'"\1"', True),
    (r"'\s*([^']*?)\s*'", r"'\1'", True),
    # Heading marks: "= = =" -> "===" (longest first).
    ("= = = =", "====", False),
    ("= = =", "===", False),
    ("= =", "==", False),
    (" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}", False),
    # Spaces at line ends and starts.
    (" \n", "\n", False),
    ("\n ", "\n", False),
    # WikiText's number placeholder, and the possessive.
    (" N ", " 1 ", False),
    (" 's", "'s", False),
)


def wikitext_detokenize(text: str) -> str:
    """WikiText text as lm-evaluation-harness' wikitext task scores it (see the module docstring)."""
    for old, new, is_regex in _WIKITEXT_RULES:
        text = re.sub(old, new, text) if is_regex else text.replace(old, new)
    return text


PREPROCESSORS: dict[str, Callable[[str], str]] = {"wikitext": wikitext_detokenize}


def get_preprocessor(name: str | None) -> Callable[[str], str] | None:
    """The function of ``--preprocess NAME`` (None for no preprocessing).

    Raises:
        UsageError: An unknown name.
    """
    if name is None or name == "none":
        return None
    if name not in PREPROCESSORS:
        raise UsageError(
            f"Unknown --preprocess {name!r}", f"use one of {', '.join(PREPROCESSORS)} or none."
        )
    return PREPROCESSORS[name]
