"""Evaluation data: a text file, a directory of .txt files, or JSONL with one document a line.

Every document is scored on its own (no window crosses a document boundary) and the results are
summed over documents. The data's sha256 identifies it in reports, so a baseline gate can tell
whether two runs scored the same text.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from llmtool import defaults
from llmtool.errors import UsageError
from llmtool.fsutil import decode_text

JSONL_SUFFIXES = (".jsonl",)
WORD_SPLIT = re.compile(r"\s+")


@dataclass(frozen=True)
class Document:
    """One document: where it came from and its text.

    Attributes:
        name: File name, or ``file:line`` for JSONL.
        text: The text that is tokenized and scored (after ``--preprocess``).
        original: The text as stored, when a preprocessing changed it; words and bytes are
            counted on it, as lm-evaluation-harness' wikitext task does.
    """

    name: str
    text: str
    original: str | None = None

    @property
    def source(self) -> str:
        """The text as stored in the data file."""
        return self.text if self.original is None else self.original

    @property
    def bytes(self) -> int:
        """UTF-8 bytes of the original text."""
        return len(self.source.encode("utf-8"))

    @property
    def words(self) -> int:
        """Words as lm-evaluation-harness counts them: ``len(re.split(r"\\s+", text))``."""
        return len(WORD_SPLIT.split(self.source))


@dataclass
class Corpus:
    """The documents of one data path.

    Attributes:
        path: The file or directory given.
        format: ``text``, ``directory`` or ``jsonl``.
        documents: The non-empty documents, in file (or line) order.
        sha256: Hex sha256 of the data bytes (for a directory: of each file's relative path and
            bytes, in sorted order).
        skipped: Documents left out because their text is empty or only whitespace.
        text_field: The JSONL field read (``None`` for text data).
        preprocess: The ``--preprocess`` applied to every document (None: the text as stored).
    """

    path: Path
    format: str
    documents: list[Document]
    sha256: str
    skipped: int = 0
    text_field: str | None = None
    preprocess: str | None = None


def data_format(path: Path) -> str:
    """``directory``, ``jsonl`` (by suffix) or ``text``."""
    if path.is_dir():
        return "directory"
    return "jsonl" if path.suffix.lower() in JSONL_SUFFIXES else "text"


def _directory_files(path: Path) -> list[Path]:
    files = sorted(p for p in path.rglob("*.txt") if p.is_file())
    if not files:
        raise UsageError(
            f"Directory {path} holds no .txt files",
            "pass a text file, a JSONL file or a directory of .txt files.",
        )
    return files


def data_sha256(path: str | Path) -> str:
    """Hex sha256 identifying the data at ``path`` (see :class:`Corpus`), without parsing it."""
    path = Path(path)
    h = hashlib.sha256()
    if path.is_dir():
        for file in _directory_files(path):
            h.update(file.relative_to(path).as_posix().encode("utf-8") + b"\0")
            h.update(file.read_bytes())
            h.update(b"\0")
    else:
        h.update(path.read_bytes())
    return h.hexdigest()


def _jsonl_documents(path: Path, text: str, field: str) -> tuple[list[Document], int]:
    documents, skipped = [], 0
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(
                f"{path} line {number} is not valid JSON ({e.msg})", "write one JSON object a line."
            ) from e
        if not isinstance(record, dict) or field not in record:
            keys = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
            raise UsageError(
                f"{path} line {number} has no {field!r} field (it has: {keys})",
                "name the text field with --text-field.",
            )
        value = record[field]
        if not isinstance(value, str):
            raise UsageError(
                f"{path} line {number}: field {field!r} is a {type(value).__name__}, not a string",
                "name the text field with --text-field.",
            )
        if value.strip():
            documents.append(Document(f"{path.name}:{number}", value))
        else:
            skipped += 1
    return documents, skipped


def load_corpus(
    path: str | Path,
    text_field: str = defaults.EVAL_TEXT_FIELD,
    preprocess: str | None = None,
) -> Corpus:
    """Read the documents of a text file, a directory of .txt files or a JSONL file.

    Args:
        path: The data.
        text_field: The field holding each document's text in JSONL.
        preprocess: A task preprocessing of :mod:`llmtool.evaluate.preprocess` applied to each
            document (``wikitext``); words and bytes stay counted on the stored text.

    Raises:
        UsageError: The path is missing, is not UTF-8, is not valid JSONL, or holds no text,
            or an unknown preprocessing.
    """
    from llmtool.evaluate.preprocess import get_preprocessor

    transform = get_preprocessor(preprocess)
    path = Path(path)
    if not path.exists():
        raise UsageError(
            f"Data file {path} does not exist",
            "pass a UTF-8 text file, a directory of .txt files or a JSONL file with --data.",
        )
    kind = data_format(path)
    documents: list[Document] = []
    skipped = 0
    if kind == "directory":
        for file in _directory_files(path):
            text = decode_text(file.read_bytes(), file)
            if text.strip():
                documents.append(Document(file.relative_to(path).as_posix(), text))
            else:
                skipped += 1
    else:
        text = decode_text(path.read_bytes(), path)
        if kind == "jsonl":
            documents, skipped = _jsonl_documents(path, text, text_field)
        elif text.strip():
            documents.append(Document(path.name, text))
    if not documents:
        raise UsageError(f"Data file {path} is empty", "pass a file with text in it.")
    if transform is not None:
        documents = [Document(d.name, transform(d.text), d.text) for d in documents]
    return Corpus(
        path=path,
        format=kind,
        documents=documents,
        sha256=data_sha256(path),
        skipped=skipped,
        text_field=text_field if kind == "jsonl" else None,
        preprocess=None if transform is None else preprocess,
    )


def read_text(path: str | Path) -> str:
    """Read one UTF-8 text file (the calibration text of a quantized export).

    Raises:
        UsageError: The file is missing, empty or not UTF-8.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"Data file {path} does not exist", "pass a UTF-8 text file with --data.")
    text = decode_text(path.read_bytes(), path)
    if not text.strip():
        raise UsageError(f"Data file {path} is empty", "pass a file with text in it.")
    return text
