"""``llmtool.json``: what an export directory holds and how it was made and validated."""

from __future__ import annotations

import hashlib
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


# How an external-data reference starts inside an ONNX file (StringStringEntryProto key
# "location"). A file without these bytes cannot point outside itself, so the full parse that
# checks the references runs only when they occur.
EXTERNAL_MARKER = b"\n\x08location"


def _plain_name(name: str, directory: Path) -> Path:
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise UsageError(
            f"{MANIFEST_NAME} in {directory} names a file outside its directory ({name!r})",
            "re-export the model with `llmtool export`.",
        )
    return Path(directory) / name


def _scan(path: Path, chunk: int = 1 << 22) -> tuple[str, bool]:
    """sha256 of a file and whether it contains :data:`EXTERNAL_MARKER`."""
    h = hashlib.sha256()
    found = False
    tail = b""
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            found = found or EXTERNAL_MARKER in tail + block
            tail = block[-len(EXTERNAL_MARKER) :]
    return h.hexdigest(), found


def check_external_data(model_path: Path) -> None:
    """Reject external-data references that leave the model's directory or overrun their file.

    Raises:
        UsageError: An absolute or ``..`` location, a missing file, or an offset/length beyond it.
    """
    import onnx
    from onnx import TensorProto

    directory = model_path.parent.resolve()
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError and friends
        raise UsageError(
            f"{model_path} is not a readable ONNX file ({e})", "re-export the model."
        ) from e
    tensors = list(model.graph.initializer)
    for node in model.graph.node:
        tensors += [a.t for a in node.attribute if a.HasField("t")]
    for tensor in tensors:
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        target = (directory / location).resolve()
        if (
            Path(location).is_absolute()
            or ".." in Path(location).parts
            or directory not in target.parents
        ):
            raise UsageError(
                f"{model_path} points tensor {tensor.name!r} at {location!r}, outside its directory",
                "only load exports you trust; re-export the model with `llmtool export`.",
            )
        if not target.is_file():
            raise UsageError(
                f"{model_path} needs {target.name}, which is missing", "re-export the model."
            )
        end = int(info.get("offset", 0)) + int(info.get("length", 0))
        if end > target.stat().st_size:
            raise UsageError(
                f"Tensor {tensor.name!r} of {model_path} reads past the end of {target.name}",
                "the data file is truncated; re-export the model.",
            )


def verify_files(directory: Path, manifest: dict[str, Any], *, hashes: bool = True) -> None:
    """Check the ONNX files against llmtool.json and their external-data references.

    Sizes always, sha256 when ``hashes``; a file that could reference external data is parsed
    and its references checked (:func:`check_external_data`).

    Raises:
        UsageError: A file is missing, differs from what was exported, or points outside.
    """
    directory = Path(directory)
    model_file = _plain_name(manifest.get("model_file", ""), directory)
    for name, record in manifest.get("files", {}).items():
        path = _plain_name(name, directory)
        if not path.is_file():
            raise UsageError(f"{path} is missing", "re-export the model with `llmtool export`.")
        mismatch = path.stat().st_size != record["bytes"]
        marker = False
        if hashes and not mismatch:
            digest, marker = _scan(path)
            mismatch = digest != record["sha256"]
        if mismatch:
            raise UsageError(
                f"{path} does not match the sha256 recorded in {MANIFEST_NAME}; it was modified or "
                "corrupted",
                "re-export the model with `llmtool export --force`.",
            )
        if path == model_file and (marker or not hashes or len(manifest["files"]) > 1):
            check_external_data(path)
    if not model_file.is_file():
        raise UsageError(f"{model_file} is missing", "re-export the model with `llmtool export`.")
