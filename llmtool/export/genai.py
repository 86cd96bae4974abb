"""``genai_config.json``: what onnxruntime-genai's ``Model(dir)`` needs to run an llmtool export.

onnxruntime-genai learns a decoder's graph from this file alone: the ONNX file, the input and
output names (``%d`` standing for the layer), the head counts and sizes, the special tokens and
the search defaults. llmtool's graphs already use the names its model builder uses
(``past_key_values.%d.key`` in, ``present.%d.key`` out); the layout decides the cache:

* ``fused``: GroupQueryAttention reads each row's length from ``attention_mask``, so genai may
  share the past and present buffers (``past_present_share_buffer``), as for its own builds. The
  graph takes left- or right-padded rows (see :mod:`llmtool.export.fused`).
* ``standard``: the cache grows by concatenation each step, so the buffers are not shared and
  ``position_ids`` is fed.

Recurrent exports have no KV cache genai knows; :func:`genai_config` returns None for them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

GENAI_CONFIG = "genai_config.json"
# onnxruntime-genai's decoder-only model types (its own names); others run as the generic one.
GENAI_TYPES = frozenset(
    {"gemma", "gpt2", "granite", "llama", "mistral", "olmo", "phi3", "qwen2", "qwen3", "smollm3"}
)
GENERIC_TYPE = "decoder"


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, list) and value else value


def genai_config(
    manifest: dict[str, Any], config: dict[str, Any], generation: dict[str, Any]
) -> dict[str, Any] | None:
    """The genai_config.json of an export, or None when onnxruntime-genai cannot run it.

    Args:
        manifest: The export's llmtool.json (layout, inputs, cache entries, context).
        config: Its config.json.
        generation: Its generation_config.json (may be empty).

    Returns:
        The file's contents as a dict.
    """
    cache = manifest.get("cache") or []
    if not cache or "past_sequence" not in cache[0].get("shape", []):
        return None  # a recurrent state, not a KV cache
    _, kv_heads, _, head_size = cache[0]["shape"]
    layers = len(cache) // 2
    inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask"}
    if "position_ids" in manifest.get("inputs", []):
        inputs["position_ids"] = "position_ids"
    inputs |= {
        "past_key_names": "past_key_values.%d.key",
        "past_value_names": "past_key_values.%d.value",
    }
    outputs = {
        "logits": "logits",
        "present_key_names": "present.%d.key",
        "present_value_names": "present.%d.value",
    }
    context = int(manifest.get("max_positions") or config.get("max_position_embeddings") or 2048)
    eos = generation.get("eos_token_id", config.get("eos_token_id"))
    pad = generation.get("pad_token_id", config.get("pad_token_id"))
    model_type = str(config.get("model_type", ""))
    heads = int(manifest.get("num_heads") or config.get("num_attention_heads") or kv_heads)
    hidden = int(manifest.get("hidden_size") or config.get("hidden_size") or heads * head_size)
    return {
        "model": {
            "bos_token_id": _first(generation.get("bos_token_id", config.get("bos_token_id"))),
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": manifest.get("model_file", "model.onnx"),
                "head_size": int(head_size),
                "hidden_size": hidden,
                "inputs": inputs,
                "outputs": outputs,
                "num_attention_heads": heads,
                "num_hidden_layers": layers,
                "num_key_value_heads": int(kv_heads),
            },
            "eos_token_id": eos,
            "pad_token_id": _first(pad if pad is not None else eos),
            "type": model_type if model_type in GENAI_TYPES else GENERIC_TYPE,
            "vocab_size": int(manifest["vocab_size"]),
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,  # llmtool's default is greedy; genai callers set their own
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": context,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": manifest.get("layout") == "fused",
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_genai_config(directory: Path, manifest: dict[str, Any]) -> Path | None:
    """Write ``genai_config.json`` beside an export's files; None where genai cannot run it."""
    config = _read_json(directory / "config.json")
    generation = _read_json(directory / "generation_config.json")
    data = genai_config(manifest, config, generation)
    if data is None:
        return None
    path = directory / GENAI_CONFIG
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return path
