"""Files: atomic outputs (written under a temporary name and renamed into place), text input.

Text input is decoded in one place (:func:`decode_text`) so that every command reports a file that
is not UTF-8 with the same sentence: the file and the bad byte's offset.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmtool.errors import UsageError, interrupted


def check_output_dir(out: Path, *, force: bool, source: Path | None = None) -> None:
    """Refuse outputs that would overwrite something or cannot be written.

    Args:
        out: The directory that will be created.
        force: Whether an existing ``out`` may be replaced.
        source: The input model directory, if any; ``out`` may not be inside it.

    Raises:
        UsageError: ``out`` exists without ``force``, is a file, lies inside ``source``, or
            its parent is not writable.
    """
    out = out.expanduser()
    if out.exists() and not out.is_dir():
        raise UsageError(f"Output path {out} is a file", "choose a directory path for --out.")
    if out.exists() and not force:
        raise UsageError(
            f"Output directory {out} already exists",
            "pass --force to replace it or pick another --out.",
        )
    if source is not None and source.is_dir():
        src = source.resolve()
        dst = out.resolve()
        if dst == src or src in dst.parents:
            raise UsageError(
                f"Output directory {out} is inside the model directory {source}",
                "write the export somewhere else.",
            )
    parent = out.resolve().parent
    existing = parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(
            f"Cannot create {out}: {existing} is a file", "pick an --out in a directory."
        )
    if not os.access(existing, os.W_OK):
        raise UsageError(f"Cannot write to {existing}", "pick an --out in a writable directory.")


@contextlib.contextmanager
def atomic_directory(out: Path, *, force: bool) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``out`` only if the block succeeds.

    The temporary directory sits beside ``out`` (same filesystem, so the final rename is atomic)
    and is removed on any failure, including KeyboardInterrupt.
    """
    out = out.expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if interrupted():  # a Ctrl-C that some library swallowed: still nothing replaced
            raise KeyboardInterrupt
        if out.exists():
            if not force:
                raise UsageError(
                    f"Output directory {out} already exists", "pass --force to replace it."
                )
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file and an atomic rename."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON, atomically.

    Returns:
        The path written.
    """
    path = Path(path)
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")
    return path


def decode_text(raw: bytes, path: str | Path) -> str:
    """UTF-8 text of a file's bytes.

    Raises:
        UsageError: Not UTF-8; the message names the file and the bad byte's offset.
    """
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(
            f"{path} is not valid UTF-8 (bad byte at offset {e.start})",
            "convert the file to UTF-8.",
        ) from e
