"""Metadata other tools read right: config.json and tokenizer files for transformers 4.x and 5.x.

An export's ``config.json`` and tokenizer files are written by the transformers that loaded the
model, in that version's dialect. transformers 5 moved ``rope_theta`` (and the rope scaling) under
``rope_parameters``, renamed ``torch_dtype`` to ``dtype`` and saves fast tokenizers as the class
``TokenizersBackend``; transformers 4.x, Optimum, onnxruntime-genai and transformers.js then misread
them (a 4.x ``AutoConfig`` silently takes the default rope base 10000; ``AutoTokenizer`` fails on
the unknown class). :func:`portable_metadata` rewrites the saved files so that both dialects read
the same values: the 5.x keys stay, the 4.x keys are added beside them, and the tokenizer class
becomes ``PreTrainedTokenizerFast``, which every version knows (5.x aliases it to its backend).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Tokenizer classes that mean "tokenizer.json and nothing else"; the first name every
# transformers (and transformers.js) knows.
PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"
BACKEND_ONLY_CLASSES = ("TokenizersBackend",)
# transformers 5's per-attention-type rope tables (Gemma 3 style) and the 4.x key of the local one.
LAYER_TYPE_KEYS = ("full_attention", "sliding_attention")


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _legacy_rope(rope: dict[str, Any]) -> dict[str, Any]:
    """transformers 4.x keys for one rope table: ``rope_theta`` and ``rope_scaling`` (or None)."""
    theta = rope.get("rope_theta")
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    if scaling.get("rope_type", "default") == "default":
        out: dict[str, Any] = {"rope_scaling": None}
    else:
        # 4.x (4.42 on) reads "rope_type"; the legacy "type" would leak into 5.x's parameters.
        out = {"rope_scaling": scaling}
    if theta is not None:
        out["rope_theta"] = theta
    return out


def portable_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with the transformers 4.x keys added beside the 5.x ones it holds.

    Args:
        config: config.json as a transformers 5 ``save_pretrained`` wrote it.

    Returns:
        A new dict: ``rope_theta`` / ``rope_scaling`` (and Gemma 3's ``rope_local_base_freq``)
        at the top level from ``rope_parameters``, ``torch_dtype`` beside ``dtype``. Keys already
        present are kept.
    """
    out = dict(config)
    rope = config.get("rope_parameters")
    legacy: dict[str, Any] = {}
    if isinstance(rope, dict) and any(k in rope for k in LAYER_TYPE_KEYS):
        full = rope.get("full_attention") or {}
        local = rope.get("sliding_attention") or {}
        legacy = _legacy_rope(full) if isinstance(full, dict) else {}
        if isinstance(local, dict) and "rope_theta" in local:
            legacy["rope_local_base_freq"] = local["rope_theta"]
    elif isinstance(rope, dict):
        legacy = _legacy_rope(rope)
    for key, value in legacy.items():
        out.setdefault(key, value)
    if "dtype" in config and "torch_dtype" not in config:
        out["torch_dtype"] = config["dtype"]
    return out


def portable_tokenizer_config(config: dict[str, Any]) -> dict[str, Any]:
    """``tokenizer_config.json`` with a tokenizer class transformers 4.x and 5.x both load."""
    # is_local / local_files_only are the saving process's load state, not the tokenizer's.
    out = {k: v for k, v in config.items() if k not in ("is_local", "local_files_only")}
    if out.get("tokenizer_class") in (None, *BACKEND_ONLY_CLASSES):
        out["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS
    return out


def portable_metadata(directory: Path) -> list[str]:
    """Rewrite the config and tokenizer files in ``directory`` for every transformers version.

    Only a Hugging Face style directory is touched (config.json, tokenizer_config.json beside a
    tokenizer.json); files that are absent or not JSON objects are left alone.

    Returns:
        The names of the files rewritten.
    """
    changed = []
    config_path = directory / "config.json"
    config = _read(config_path)
    if config is not None and (new := portable_config(config)) != config:
        _write(config_path, new)
        changed.append(config_path.name)
    tok_path = directory / "tokenizer_config.json"
    tok = _read(tok_path)
    has_json = (directory / "tokenizer.json").is_file()
    if tok is not None and has_json and (new := portable_tokenizer_config(tok)) != tok:
        _write(tok_path, new)
        changed.append(tok_path.name)
    return changed


# transformers.js (and the onnx-community repositories) keep the graph under onnx/, one file per
# weight format, named by the suffix its ``dtype`` option picks (fp32 "", fp16 "_fp16", q4 "_q4",
# q8 "_quantized"); ``transformers.js_config.dtype`` in config.json makes it the default.
TRANSFORMERS_JS = "transformers.js"
LAYOUTS = ("llmtool", TRANSFORMERS_JS)
TRANSFORMERS_JS_DTYPES = {"fp32": ("", "fp32"), "fp16": ("_fp16", "fp16")}
TRANSFORMERS_JS_QUANTIZED = {"int4": ("_q4", "q4"), "int8": ("_quantized", "q8")}


def transformers_js_file(dtype: str, quantize: str | None) -> tuple[str, str]:
    """(path inside the export, transformers.js dtype name) of the graph in that layout."""
    suffix, name = (
        TRANSFORMERS_JS_QUANTIZED[quantize] if quantize else TRANSFORMERS_JS_DTYPES[dtype]
    )
    return f"onnx/model{suffix}.onnx", name


def rename_batch_axis(values: list[Any], name: str = "batch_size") -> None:
    """Call the graph I/O's batch axis ``name`` (in place).

    transformers.js sizes the empty cache it feeds first from the cache inputs' symbolic dims,
    knowing only ``batch_size`` (Optimum's name) and taking any other symbol as 0: a
    GroupQueryAttention graph then refuses a past of batch 0.
    """
    for value in values:
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param") and dim.dim_param == "batch":
                dim.dim_param = name


def add_transformers_js_config(directory: Path, dtype_name: str, external: bool) -> None:
    """Name the graph's format in config.json, where transformers.js looks for its defaults."""
    path = directory / "config.json"
    config = _read(path)
    if config is None:
        return
    config["transformers.js_config"] = {
        "dtype": dtype_name,
        "use_external_data_format": external,
    }
    _write(path, config)
