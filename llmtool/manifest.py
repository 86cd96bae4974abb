"""``llmtool.json``: what an export directory holds and how it was made and validated.

The file is the contract between export and runtime. :func:`read_manifest` returns it as the
raw dict (reports print it); :class:`Manifest` is the typed view the runtime reads: layout,
padding side and one :class:`CacheSpec` per fed-back cache tensor, with :data:`CACHE_DTYPES`
the one table from a cache dtype name to its numpy dtype.
"""

from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

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


# The dtypes a cache entry may have, by the name llmtool.json records.
CACHE_DTYPES: dict[str, np.dtype[Any]] = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
}
PADDING_SIDES = ("left", "right")


def _reexport(problem: str) -> UsageError:
    return UsageError(f"{MANIFEST_NAME} {problem}", "re-export the model with `llmtool export`.")


@dataclass(frozen=True)
class CacheSpec:
    """One fed-back cache tensor of an export: KV keys or values of a layer, or a recurrent state.

    Attributes:
        past: Graph input that takes the previous step's value.
        present: Graph output that returns the updated value.
        dims: Symbolic shape: ``"batch"``, ``"past_sequence"`` (tokens held) or a fixed size,
            e.g. ``["batch", kv_heads, "past_sequence", head_dim]`` or ``["batch", hidden]``.
        dtype: ``float32`` or ``float16`` (a key of :data:`CACHE_DTYPES`).
        sequence_axis: Axis that grows with the tokens held; None for a recurrent state.
    """

    past: str
    present: str
    dims: tuple[str | int, ...]
    dtype: str
    sequence_axis: int | None

    @classmethod
    def from_entry(cls, entry: Mapping[str, Any]) -> CacheSpec:
        """The spec of one ``cache`` entry of llmtool.json.

        Raises:
            UsageError: A dtype outside :data:`CACHE_DTYPES` or a malformed entry.
        """
        try:
            dims = tuple(d if d in ("batch", "past_sequence") else int(d) for d in entry["shape"])
            dtype = str(entry["dtype"])
        except (KeyError, TypeError, ValueError) as e:
            raise _reexport(f"has a malformed cache entry ({e})") from e
        if dtype not in CACHE_DTYPES:
            raise _reexport(f"gives a cache dtype llmtool cannot run ({dtype!r})")
        # Older exports lack sequence_axis: it is where the shape says past_sequence.
        axis = dims.index("past_sequence") if "past_sequence" in dims else None
        return cls(
            past=entry.get("input", ""),
            present=entry.get("output", ""),
            dims=dims,
            dtype=dtype,
            sequence_axis=entry.get("sequence_axis", axis),
        )

    @property
    def name(self) -> str:
        """The key of this tensor in a cache dict (its past input's name)."""
        return self.past

    @property
    def np_dtype(self) -> np.dtype[Any]:
        """The numpy dtype of the tensor."""
        return CACHE_DTYPES[self.dtype]

    def shape(self, batch: int, length: int) -> list[int]:
        """The concrete shape for ``batch`` rows holding ``length`` tokens."""
        sizes = {"batch": batch, "past_sequence": length}
        return [sizes[d] if isinstance(d, str) else d for d in self.dims]

    def nbytes(self, batch: int, length: int, itemsize: int | None = None) -> int:
        """Bytes of the tensor for ``batch`` rows holding ``length`` tokens.

        Args:
            batch: Rows.
            length: Tokens held (ignored by a recurrent state).
            itemsize: Bytes per element; default the entry's dtype.
        """
        return int(np.prod(self.shape(batch, length), dtype=np.int64)) * (
            itemsize or self.np_dtype.itemsize
        )


@dataclass(frozen=True)
class Manifest:
    """The typed view of an export's ``llmtool.json`` that the runtime reads.

    Attributes:
        raw: The file as read (reports print it; fields without a typed view live only here).
        layout: ``standard`` (growing cache) or ``fused`` (preallocated in-place cache).
        padding: The side a batch is padded on: ``left`` for standard, ``right`` for fused.
        model_file: The ONNX file, inside the export directory.
        cache: One spec per fed-back cache tensor, in graph order.
        vocab_size: Logits per position.
        max_positions: The model's context (None when unbounded, e.g. recurrent models).
    """

    raw: dict[str, Any] = field(repr=False)
    layout: str
    padding: str
    model_file: str
    cache: tuple[CacheSpec, ...]
    vocab_size: int
    max_positions: int | None

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Manifest:
        """The typed view of a manifest dict (as :func:`read_manifest` returns it).

        Raises:
            UsageError: A required field is missing or a cache entry is unusable.
        """
        layout = raw.get("layout", "standard")
        # Exports before the padding field pad as their layout implies.
        padding = raw.get("padding") or ("right" if layout == "fused" else "left")
        if padding not in PADDING_SIDES:
            raise _reexport(f"gives an unknown padding side ({padding!r})")
        try:
            return cls(
                raw=raw,
                layout=layout,
                padding=padding,
                model_file=raw["model_file"],
                cache=tuple(CacheSpec.from_entry(e) for e in raw["cache"]),
                vocab_size=int(raw["vocab_size"]),
                max_positions=raw.get("max_positions"),
            )
        except (KeyError, TypeError) as e:
            raise _reexport(f"lacks the field {e}") from e

    @classmethod
    def read(cls, directory: Path) -> Manifest:
        """Read and check ``llmtool.json`` of an export directory (see :func:`read_manifest`)."""
        return cls.from_dict(read_manifest(directory))


# How an external-data reference starts inside an ONNX file (StringStringEntryProto key
# "location"). A file without these bytes cannot point outside itself, so the full parse that
# checks the references runs only when they occur.
EXTERNAL_MARKER = b"\n\x08location"


def _plain_name(name: str, directory: Path) -> Path:
    # A plain name, or a relative path inside the directory (transformers.js keeps the graph in
    # onnx/): no absolute path, no "..", no backslash.
    parts = name.split("/")
    if not name or "\\" in name or any(p in ("", ".", "..") for p in parts):
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
