"""The rows of a batch-generation job: the prompt file in, the results file out.

A prompt file is text (one prompt a line) or JSONL (``.jsonl``: one object a line with
``prompt`` text or ``messages``, a conversation, and optionally an id field). A row's id is that
field's value, or without it the row's 0-based position among the prompts. The results file is
JSONL, one object per finished row, appended and flushed as rows finish; after a crash the rows
it holds are skipped and a torn last line (a write cut short) is dropped. Every row records a
fingerprint of the job's settings, so a resume with other settings is refused instead of mixing
two runs in one file.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmtool.errors import UsageError
from llmtool.fsutil import decode_text

RowId = int | str


@dataclass(frozen=True)
class PromptRow:
    """One prompt of the job.

    Attributes:
        id: The id field's value, or the 0-based position of the prompt.
        prompt: Text, or a conversation (a list of ``{"role", "content"}`` messages).
        position: 0-based position in the prompt file (batches are cut by position).
    """

    id: RowId
    prompt: Any
    position: int


def row_seed(seed: int, row_id: RowId) -> int:
    """The sampling seed of one row: a hash of the job's seed and the row's id.

    A row draws from its own generator, so its text does not depend on which rows share its
    batch, how many workers there are, or whether the job was resumed.
    """
    key = json.dumps([seed, row_id]).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1


def read_prompt_rows(path: str | Path, id_field: str = "id") -> list[PromptRow]:
    """The prompts of a text or JSONL prompt file.

    Raises:
        UsageError: A missing or empty file, a line that is not a JSON object with ``prompt`` or
            ``messages``, ids on some rows only, or an id seen twice.
    """
    from llmtool.chat_template import check_conversation

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"Prompt file {path} does not exist", "pass an existing --prompt-file.")
    lines = decode_text(path.read_bytes(), path).splitlines()
    rows: list[PromptRow] = []
    with_id = 0
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if path.suffix != ".jsonl":
            rows.append(PromptRow(len(rows), line, len(rows)))
            continue
        where = f"{path} line {number}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{where} is not JSON ({e.msg})", "write one object a line.") from e
        if not isinstance(value, dict) or not ("prompt" in value or "messages" in value):
            raise UsageError(
                f"{where} has neither a prompt nor messages",
                'write {"prompt": "..."} or {"messages": [...]} (and an optional id) a line.',
            )
        if "messages" in value:
            prompt: Any = check_conversation(value["messages"], where)
        elif isinstance(value["prompt"], str) and value["prompt"]:
            prompt = value["prompt"]
        else:
            raise UsageError(f"{where}: the prompt must be non-empty text")
        row_id = value.get(id_field, len(rows))
        if id_field in value:
            with_id += 1
            if not isinstance(row_id, int | str) or isinstance(row_id, bool):
                raise UsageError(f"{where}: the {id_field!r} field must be a string or an integer")
        rows.append(PromptRow(row_id, prompt, len(rows)))
    if not rows:
        raise UsageError(f"Prompt file {path} has no prompts", "write one prompt a line.")
    if 0 < with_id < len(rows):
        raise UsageError(
            f"{with_id} of the {len(rows)} rows of {path} have an {id_field!r} field",
            "give every row an id, or none (the line order is then the id).",
        )
    seen: set[RowId] = set()
    for row in rows:
        if row.id in seen:
            raise UsageError(f"Row id {row.id!r} appears twice in {path}", "make the ids unique.")
        seen.add(row.id)
    return rows


def settings_fingerprint(settings: dict[str, Any]) -> str:
    """A short hash of what decides the results (model, sampling, lengths, stops, prompts)."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class ResultsFile:
    """The results JSONL: rows already done, and an appender that flushes each row.

    Args:
        path: The file (created if missing).
        fingerprint: The job's :func:`settings_fingerprint`; existing rows must carry it.
        force: Start the file over instead of resuming it.

    Raises:
        UsageError: A directory at ``path``, a corrupt line before the last, or rows written
            with other settings (without ``force``).
    """

    def __init__(self, path: str | Path, fingerprint: str, *, force: bool = False) -> None:
        self.path = Path(path)
        self.fingerprint = fingerprint
        if self.path.is_dir():
            raise UsageError(f"--out {self.path} is a directory", "give a .jsonl file path.")
        self.done: set[RowId] = set()
        if self.path.exists() and not force:
            self._read_existing()
        elif self.path.exists():
            self.path.unlink()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def _read_existing(self) -> None:
        raw = self.path.read_bytes()
        good = 0  # bytes up to the end of the last complete row
        for line in raw.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break  # a torn last write: dropped below
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise UsageError(
                    f"{self.path} holds a line that is not JSON at byte {good}",
                    "fix or delete the file, or pass --force to start it over.",
                ) from e
            if row.get("settings") != self.fingerprint:
                raise UsageError(
                    f"{self.path} holds results made with other settings (model, sampling, "
                    "lengths or prompts)",
                    "resume with the same options, pass --force to start over, or pick "
                    "another --out.",
                )
            self.done.add(row["id"])
            good += len(line)
        if good < len(raw):
            with open(self.path, "r+b") as f:
                f.truncate(good)

    def write(self, row: dict[str, Any]) -> None:
        """Append one row and flush it to the OS (a crash after this keeps it)."""
        self._file.write(json.dumps({**row, "settings": self.fingerprint}) + "\n")
        self._file.flush()

    def sync(self) -> None:
        """fsync: the rows written so far survive a power loss too."""
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self.sync()
        self._file.close()


def pending_batches(
    rows: Iterable[PromptRow], done: set[RowId], size: int
) -> list[list[PromptRow]]:
    """The rows still to do, in batches cut by position (``size`` rows a batch, minus done ones).

    Cutting by position, not among the pending rows, keeps a resumed job's batches those of an
    uninterrupted one wherever whole batches were written.
    """
    batches: dict[int, list[PromptRow]] = {}
    for row in rows:
        if row.id not in done:
            batches.setdefault(row.position // size, []).append(row)
    return [batches[k] for k in sorted(batches)]
