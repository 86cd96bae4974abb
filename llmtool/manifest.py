"""``llmtool.json``: what an export directory holds and how it was made and validated."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

from llmtool.errors import UsageError
from llmtool.fsutil import sha256_file

MANIFEST_NAME = "llmtool.json"
FORMAT = "llmtool-onnx"
FORMAT_VERSION = 1


def tool_versions() -> dict[str, str]:
    """Versions of the packages that produce or run an export."""
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    for dist in (
        "llmtool",
        "torch",
        "transformers",
        "onnx",
        "onnxruntime",
        "onnxruntime-gpu",
        "tokenizers",
    ):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            continue
    return versions


def file_record(path: Path) -> dict[str, Any]:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def write_manifest(directory: Path, manifest: dict[str, Any]) -> Path:
    path = directory / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return path


def read_manifest(directory: Path) -> dict[str, Any]:
    """Read and sanity-check ``llmtool.json`` of an export directory.

    Raises:
        UsageError: Missing, unreadable, or of another format.
    """
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise UsageError(
            f"{directory} is not an llmtool export (no {MANIFEST_NAME})",
            "create one with `llmtool export MODEL --out DIR`.",
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(
            f"{path} is unreadable ({e})", "re-export the model with `llmtool export`."
        ) from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UsageError(
            f"{path} is not an llmtool manifest", "re-export the model with `llmtool export`."
        )
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise UsageError(
            f"{path} was written by a newer llmtool (format {manifest.get('format_version')})",
            "upgrade llmtool.",
        )
    return manifest


def verify_files(directory: Path, manifest: dict[str, Any], *, hashes: bool = True) -> None:
    """Check that the ONNX files exist and match the sizes (and hashes) recorded at export.

    Raises:
        UsageError: A file is missing or differs from what was exported.
    """
    for name, record in manifest.get("files", {}).items():
        path = Path(directory) / name
        if not path.is_file():
            raise UsageError(f"{path} is missing", "re-export the model with `llmtool export`.")
        if path.stat().st_size != record["bytes"] or (
            hashes and sha256_file(path) != record["sha256"]
        ):
            raise UsageError(
                f"{path} does not match the sha256 recorded in {MANIFEST_NAME}; it was modified or corrupted",
                "re-export the model with `llmtool export --force`.",
            )
