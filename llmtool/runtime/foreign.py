"""ONNX exports made by other tools: their cache contract inferred from the graph and config.

``llmtool generate`` / ``eval`` read an export's contract from ``llmtool.json``
(:class:`~llmtool.manifest.Manifest`). A directory without one is accepted when its layout is
recognised and the contract can be inferred without guessing:

* **onnxruntime-genai** (``genai_config.json``): the ONNX file, the cache names (``%d`` = layer),
  the layer count, the context and the vocabulary come from the file.
* **Optimum** (``model.onnx`` + ``config.json``): cache pairs are the graph inputs
  ``past_key_values.{i}.key|value`` with the outputs ``present.{i}.key|value``; sizes come from
  the graph's static dims, else from config.json (``num_key_value_heads``, ``head_dim``; for
  genai, its decoder's ``num_key_value_heads`` and ``head_size``).

How the cache is fed follows the graph: a graph with GroupQueryAttention reads each row's length
from the attention mask and needs right padding (unless it is llmtool's fused graph, recognised
by its ``next_token`` output, which takes both); any other graph is padded on the left like
llmtool's standard graph. Anything else (no KV cache, a cache input without its output, a cache
dtype llmtool cannot run) is refused with a :class:`~llmtool.errors.UsageError` saying why.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from llmtool.errors import UsageError
from llmtool.manifest import MANIFEST_NAME, Manifest, check_external_data

GENAI_CONFIG = "genai_config.json"
OPTIMUM_MODEL = "model.onnx"
LEGACY_OPTIMUM_MODEL = "decoder_model_merged.onnx"
PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
# ONNX TensorProto element types of a cache tensor llmtool can feed.
CACHE_ELEM_TYPES = {1: "float32", 10: "float16"}


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UsageError(f"{path} is unreadable ({e})", "fix or re-create the file.") from e
    if not isinstance(data, dict):
        raise UsageError(f"{path} is not a JSON object", "fix or re-create the file.")
    return data


def recognise(directory: Path) -> str | None:
    """The layout of a foreign export directory: ``onnxruntime-genai``, ``optimum`` or None."""
    if (directory / MANIFEST_NAME).is_file():
        return None
    if (directory / GENAI_CONFIG).is_file():
        return "onnxruntime-genai"
    if (directory / OPTIMUM_MODEL).is_file() and (directory / "config.json").is_file():
        return "optimum"
    if (directory / LEGACY_OPTIMUM_MODEL).is_file():
        raise UsageError(
            f"{directory} is an older Optimum export (decoder_model_merged.onnx, with a "
            "use_cache_branch input), which llmtool does not run",
            "re-export it with a current optimum-cli (one model.onnx) or with `llmtool export`.",
        )
    return None


def _refuse(directory: Path, layout: str, why: str) -> UsageError:
    return UsageError(
        f"{directory} looks like an {layout} export, but llmtool cannot infer its cache: {why}",
        "export the model with `llmtool export` (or Optimum with --task text-generation-with-past).",
    )


def _dims(value: Any) -> list[int | str]:
    return [
        d.dim_value if d.HasField("dim_value") else d.dim_param
        for d in value.type.tensor_type.shape.dim
    ]


def _cache_names(
    layout: str, genai: dict[str, Any], inputs: dict[str, Any]
) -> list[tuple[str, str]]:
    """(past, present) names per cache tensor, layer by layer, keys before values."""
    if layout == "onnxruntime-genai":
        decoder = genai.get("model", {}).get("decoder", {})
        names_in, names_out = decoder.get("inputs", {}), decoder.get("outputs", {})
        layers = int(decoder.get("num_hidden_layers", 0))
        return [
            (names_in[f"past_{kind}_names"] % i, names_out[f"present_{kind}_names"] % i)
            for i in range(layers)
            for kind in ("key", "value")
            if f"past_{kind}_names" in names_in and f"present_{kind}_names" in names_out
        ]
    found = sorted(
        (int(m.group(1)), m.group(2) != "key", name) for name in inputs if (m := PAST.match(name))
    )
    return [(name, name.replace("past_key_values.", "present.", 1)) for _, _, name in found]


def _cache_entry(
    past: Any, present: str, outputs: set[str], config: dict[str, Any]
) -> dict[str, Any] | str:
    """One llmtool.json cache entry, or why it cannot be one."""
    if present not in outputs:
        return f"the graph takes {past.name} but returns no {present}"
    dtype = CACHE_ELEM_TYPES.get(past.type.tensor_type.elem_type)
    if dtype is None:
        return f"{past.name} has ONNX element type {past.type.tensor_type.elem_type}"
    dims = _dims(past)
    if len(dims) != 4:
        return f"{past.name} has {len(dims)} dims, not [batch, kv_heads, past, head_dim]"
    heads = config.get("num_key_value_heads") or config.get("num_attention_heads")
    head_dim = config.get("head_dim") or (
        config["hidden_size"] // config["num_attention_heads"]
        if config.get("hidden_size") and config.get("num_attention_heads")
        else None
    )
    kv = dims[1] if isinstance(dims[1], int) and dims[1] else heads
    size = dims[3] if isinstance(dims[3], int) and dims[3] else head_dim
    if not kv or not size:
        return f"{past.name}'s head count or size is neither in the graph nor in config.json"
    return {
        "input": past.name,
        "output": present,
        "shape": ["batch", int(kv), "past_sequence", int(size)],
        "dtype": dtype,
        "sequence_axis": 2,
    }


def infer_manifest(directory: Path) -> dict[str, Any]:
    """An llmtool.json-shaped dict for a foreign export (see the module docstring).

    Raises:
        UsageError: The directory is not a recognised layout, or its cache cannot be inferred.
    """
    import onnx

    directory = Path(directory)
    layout = recognise(directory)
    if layout is None:
        Manifest.read(directory)  # raises the usual "not an llmtool export"
        raise AssertionError("unreachable")
    genai = _json(directory / GENAI_CONFIG) if layout == "onnxruntime-genai" else {}
    config = _json(directory / "config.json") if (directory / "config.json").is_file() else {}
    model_file = str(genai.get("model", {}).get("decoder", {}).get("filename", OPTIMUM_MODEL))
    if "/" in model_file or not (directory / model_file).is_file():
        raise _refuse(directory, layout, f"its model file {model_file!r} is missing")
    check_external_data(directory / model_file)
    graph = onnx.load(str(directory / model_file), load_external_data=False).graph
    inputs = {i.name: i for i in graph.input}
    outputs = {o.name for o in graph.output}
    if "input_ids" not in inputs or "logits" not in outputs:
        raise _refuse(directory, layout, "the graph lacks input_ids or logits")
    names = _cache_names(layout, genai, inputs)
    if not names:
        raise _refuse(directory, layout, "the graph has no past_key_values.* inputs (no KV cache)")
    decoder = genai.get("model", {}).get("decoder", {})
    if "num_key_value_heads" in decoder and "head_size" in decoder:
        # genai folders carry no config.json: its decoder section gives the sizes.
        config = {**config, "num_key_value_heads": decoder["num_key_value_heads"]}
        config["head_dim"] = decoder["head_size"]
    cache = []
    for past, present in names:
        if past not in inputs:
            raise _refuse(directory, layout, f"the graph has no input {past}")
        entry = _cache_entry(inputs[past], present, outputs, config)
        if isinstance(entry, str):
            raise _refuse(directory, layout, entry)
        cache.append(entry)
    gqa = any(n.op_type == "GroupQueryAttention" for n in graph.node)
    ours = gqa and {"next_token", "last_logits"} <= outputs
    logits_dims = next(_dims(o) for o in graph.output if o.name == "logits")
    genai_model = genai.get("model", {})
    vocab = genai_model.get("vocab_size") or config.get("vocab_size") or logits_dims[-1]
    if not isinstance(vocab, int) or not vocab:
        raise _refuse(
            directory, layout, "its vocabulary size is neither in config.json nor in the graph"
        )
    context = genai_model.get("context_length") or config.get("max_position_embeddings")
    return {
        "format": "foreign",
        "recognised": layout,
        "model_type": config.get("model_type") or genai_model.get("type", "unknown"),
        "layout": "fused" if ours else "standard",
        "padding": "right" if gqa else "left",
        "dtype": "fp16" if cache[0]["dtype"] == "float16" else "fp32",
        "model_file": model_file,
        "files": {},
        "inputs": list(inputs),
        "outputs": [o.name for o in graph.output],
        "cache": cache,
        "vocab_size": int(vocab),
        "max_positions": int(context or config.get("n_positions") or 0) or None,
        "num_layers": len(cache) // 2,
    }


def read_contract(directory: Path) -> Manifest:
    """The typed contract of any export llmtool runs: its llmtool.json, else inferred."""
    directory = Path(directory)
    if recognise(directory) is None:
        return Manifest.read(directory)
    return Manifest.from_dict(infer_manifest(directory))
