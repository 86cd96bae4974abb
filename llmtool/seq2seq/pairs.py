"""Source/target pairs for seq2seq eval and training: TSV or JSONL.

* ``.tsv`` (or any other suffix): one pair a line, ``source<TAB>target``; a first line that
  names the fields (``source<TAB>target``, or the ``--source-field`` / ``--target-field``
  names) is a header and skipped;
* ``.jsonl``: one object a line with the two fields.

Every bad line is one :class:`~llmtool.errors.UsageError` naming the file and line: a missing
field, an empty side, a line without a tab. Targets are tokenized as transformers' seq2seq
training does (``text_target``), with EOS appended when the tokenizer does not add it, so
training, perplexity and generation agree on where a target ends.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmtool.errors import UsageError
from llmtool.fsutil import decode_text

SOURCE_FIELD = "source"
TARGET_FIELD = "target"


@dataclass(frozen=True)
class Pair:
    """One example: where it came from, its source and target text."""

    where: str
    source: str
    target: str


def _check_sides(where: str, source: Any, target: Any, fields: tuple[str, str]) -> Pair:
    for name, value in zip(fields, (source, target), strict=True):
        if value is None:
            raise UsageError(f"{where} has no {name!r} field", "give every pair both fields.")
        if not isinstance(value, str):
            raise UsageError(f"{where}: field {name!r} is not a string")
        if not value.strip():
            raise UsageError(f"{where} has an empty {name!r}", "give both sides some text.")
    return Pair(where, source, target)


def read_pairs(
    path: str | Path, source_field: str = SOURCE_FIELD, target_field: str = TARGET_FIELD
) -> list[Pair]:
    """Every pair of a TSV or JSONL file, in order.

    Raises:
        UsageError: A missing or unreadable file, a bad line, or no pairs at all.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"Pairs file {path} does not exist", "pass a .tsv or .jsonl file.")
    lines = decode_text(path.read_bytes(), path).splitlines()
    fields = (source_field, target_field)
    pairs: list[Pair] = []
    jsonl = path.suffix.lower() == ".jsonl"
    for number, line in enumerate(lines, 1):
        where = f"{path.name}:{number}"
        if not line.strip():
            continue
        if jsonl:
            try:
                record = json.loads(line)
            except ValueError as e:
                raise UsageError(f"{where} is not valid JSON ({e})") from e
            if not isinstance(record, dict):
                raise UsageError(f"{where} is not a JSON object")
            pairs.append(
                _check_sides(where, record.get(source_field), record.get(target_field), fields)
            )
            continue
        columns = line.split("\t")
        if number == 1 and tuple(c.strip() for c in columns[:2]) in (
            fields,
            (SOURCE_FIELD, TARGET_FIELD),
        ):
            continue  # a header
        if len(columns) < 2:
            raise UsageError(
                f"{where} has no tab between source and target", "write source<TAB>target."
            )
        pairs.append(_check_sides(where, columns[0], columns[1], fields))
    if not pairs:
        raise UsageError(f"{path} holds no pairs", "write one source<TAB>target a line.")
    return pairs


def pairs_sha256(pairs: list[Pair]) -> str:
    """A hash of the pairs' text (identifies the data in reports)."""
    h = hashlib.sha256()
    for p in pairs:
        h.update(f"{p.source}\t{p.target}\n".encode())
    return h.hexdigest()


def target_ids(tokenizer: Any, text: str, eos: int | None) -> list[int]:
    """Target token ids as transformers' seq2seq training builds labels, ending in EOS."""
    ids = list(tokenizer(text_target=text)["input_ids"])
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    return ids
