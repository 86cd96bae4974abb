"""JSON Schema (draft 2020-12) of the ``llmtool eval --json`` report, schema version 1.

Version 1 keeps the walking skeleton's top-level perplexity keys (``perplexity``, ``nll``,
``bits_per_byte``, ``tokens``, ``max_length``, ``stride``, ``provider``) and adds the rest. A
report without ``--data`` has no perplexity keys; one without ``--throughput`` no
``throughput``. Numbers that are not finite (a diverged model) are written as null.

This is the one description of the record: :mod:`llmtool.evaluate.record` builds it,
:mod:`llmtool.evaluate.gate` reads it back.
"""

from __future__ import annotations

from typing import Any

# The record's identity: a report names it, and the gate reads no report of a newer version.
SCHEMA_NAME = "llmtool-eval"
SCHEMA_VERSION = 1

_NUMBER = {"type": "number"}
_NULLABLE_NUMBER = {"type": ["number", "null"]}
_COUNT = {"type": "integer", "minimum": 0}
_INTERVAL = {
    "type": ["object", "null"],
    "required": ["low", "high", "confidence"],
    "properties": {"low": _NUMBER, "high": _NUMBER, "confidence": _NUMBER},
}
_BEST_MEDIAN = {
    "type": "object",
    "required": ["best", "median"],
    "properties": {"best": _NUMBER, "median": _NUMBER},
}

METRIC: dict[str, Any] = {
    "type": "object",
    "required": ["value", "unit", "higher_is_better", "gate"],
    "properties": {
        "value": _NULLABLE_NUMBER,
        "unit": {"type": "string"},
        "higher_is_better": {"type": "boolean"},
        "gate": {"enum": ["perplexity", "throughput", "count", None]},
        "standard_error": _NULLABLE_NUMBER,
        "spread": _NULLABLE_NUMBER,
    },
}

REFERENCE: dict[str, Any] = {
    "type": "object",
    "required": [
        "model",
        "kind",
        "perplexity",
        "delta_perplexity",
        "log_ppl_ratio",
        "kl_divergence",
        "top1_agreement",
        "nonfinite_logits",
        "tokens",
    ],
    "properties": {
        "model": {"type": "string"},
        "kind": {"enum": ["pytorch", "onnx"]},
        "device": {"type": "string"},
        "perplexity": _NULLABLE_NUMBER,
        "standard_error": _NULLABLE_NUMBER,
        "perplexity_ci": _INTERVAL,
        "delta_perplexity": _NULLABLE_NUMBER,
        "log_ppl_ratio": _NULLABLE_NUMBER,
        "kl_divergence": {
            "type": "object",
            "required": ["mean", "median", "p99", "max"],
            "properties": {k: _NULLABLE_NUMBER for k in ("mean", "median", "p99", "max")},
        },
        "top1_agreement": {"type": "number", "minimum": 0, "maximum": 1},
        "nonfinite_logits": _COUNT,
        "tokens": _COUNT,
    },
}

SCENARIO: dict[str, Any] = {
    "type": "object",
    "required": [
        "key",
        "backend",
        "device",
        "batch_size",
        "prompt_length",
        "new_tokens",
        "ttft_s",
        "prefill_tokens_per_s",
        "decode_tokens_per_s",
        "inter_token_latency_s",
        "e2e_latency_s",
        "peak_rss_bytes",
        "device_memory_bytes",
        "bandwidth",
        "runs",
    ],
    "properties": {
        "key": {"type": "string"},
        "backend": {"enum": ["onnx", "pytorch"]},
        "device": {"type": "string"},
        "batch_size": {"type": "integer", "minimum": 1},
        "prompt_length": {"type": "integer", "minimum": 1},
        "new_tokens": {"type": "integer", "minimum": 2},
        "ttft_s": _BEST_MEDIAN,
        "prefill_tokens_per_s": _BEST_MEDIAN,
        "decode_tokens_per_s": _BEST_MEDIAN,
        "inter_token_latency_s": {
            "type": "object",
            "required": ["p50", "p90", "p99"],
            "properties": {"p50": _NUMBER, "p90": _NUMBER, "p99": _NUMBER},
        },
        "e2e_latency_s": _BEST_MEDIAN,
        "peak_rss_bytes": _COUNT,
        "device_memory_bytes": {"type": ["integer", "null"]},
        "bandwidth": {
            "type": "object",
            "required": [
                "weight_bytes",
                "kv_bytes_per_step",
                "bytes_per_s",
                "utilization",
                "bound",
            ],
            "properties": {
                "weight_bytes": _COUNT,
                "kv_bytes_per_step": _COUNT,
                "bytes_per_s": _NUMBER,
                "peak_bytes_per_s": _NULLABLE_NUMBER,
                "peak_source": {"type": ["string", "null"]},
                "utilization": _NULLABLE_NUMBER,
                "bound": {"enum": ["bandwidth", "launch", "cache", None]},
            },
        },
        "runs": {
            "type": "object",
            "required": ["ttft_s", "decode_s", "e2e_s"],
            "additionalProperties": {"type": "array", "items": _NUMBER, "minItems": 1},
        },
    },
}

GATE: dict[str, Any] = {
    "type": "object",
    "required": ["baseline", "tolerance", "passed", "rows"],
    "properties": {
        "baseline": {"type": "string"},
        "passed": {"type": "boolean"},
        "tolerance": {
            "type": "object",
            "required": ["perplexity", "sigmas", "throughput"],
            "properties": {"perplexity": _NUMBER, "sigmas": _NUMBER, "throughput": _NUMBER},
        },
        "rows": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["metric", "unit", "old", "new", "change", "limit", "status"],
                "properties": {
                    "metric": {"type": "string"},
                    "old": _NULLABLE_NUMBER,
                    "new": _NULLABLE_NUMBER,
                    "change": _NULLABLE_NUMBER,
                    "limit": {"type": "string"},
                    "status": {"enum": ["better", "same", "within tolerance", "worse", "info"]},
                    "decided_by": {"enum": ["", "tolerance", "paired noise", "spread of repeats"]},
                },
            },
        },
    },
}

PERPLEXITY_KEYS = [
    "perplexity",
    "nll",
    "bits_per_byte",
    "tokens",
    "max_length",
    "stride",
    "bytes",
    "windows",
    "seconds",
    "protocol",
    "standard_error",
    "perplexity_ci",
    "word_perplexity",
    "byte_perplexity",
    "words",
    "nonfinite_logits",
    "documents",
    "skipped_documents",
    "data",
    "per_document",
]

SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": f"https://llmtool.dev/schemas/{SCHEMA_NAME}-{SCHEMA_VERSION}.json",
    "title": "llmtool eval report",
    "type": "object",
    "required": [
        "schema",
        "schema_version",
        "created",
        "model",
        "provider",
        "metrics",
        "environment",
        "config",
    ],
    "dependentRequired": {"perplexity": PERPLEXITY_KEYS},
    "properties": {
        "schema": {"const": SCHEMA_NAME},
        "schema_version": {"const": SCHEMA_VERSION},
        "created": {"type": "string"},
        "model": {"type": "string"},
        "provider": {"enum": ["cpu", "cuda"]},
        "perplexity": _NULLABLE_NUMBER,
        "nll": _NULLABLE_NUMBER,
        "bits_per_byte": _NULLABLE_NUMBER,
        "tokens": _COUNT,
        "max_length": {"type": "integer", "minimum": 1},
        "stride": {"type": "integer", "minimum": 1},
        "bytes": _COUNT,
        "windows": _COUNT,
        "seconds": _NUMBER,
        "protocol": {"enum": ["hf", "lm-eval", "llama-cpp"]},
        "standard_error": _NULLABLE_NUMBER,
        "perplexity_ci": _INTERVAL,
        "word_perplexity": _NULLABLE_NUMBER,
        "byte_perplexity": _NULLABLE_NUMBER,
        "words": _COUNT,
        "nonfinite_logits": _COUNT,
        "documents": _COUNT,
        "skipped_documents": _COUNT,
        "data": {
            "type": "object",
            "required": ["path", "format", "sha256"],
            "properties": {
                "path": {"type": "string"},
                "format": {"enum": ["text", "directory", "jsonl"]},
                "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                "text_field": {"type": ["string", "null"]},
            },
        },
        "per_document": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "tokens", "nll", "perplexity", "words", "bytes"],
                "properties": {
                    "name": {"type": "string"},
                    "tokens": _COUNT,
                    "nll": _NULLABLE_NUMBER,
                    "perplexity": _NULLABLE_NUMBER,
                    "words": _COUNT,
                    "bytes": _COUNT,
                },
            },
        },
        # Optional within version 1 (added later): the per-window sums the gate pairs.
        "window_nll": {"type": "array", "items": _NUMBER},
        "window_tokens": {"type": "array", "items": _COUNT},
        "preprocess": {"enum": ["wikitext", None]},
        "reference": REFERENCE,
        "throughput": {
            "type": "object",
            "required": ["scenarios", "warmup", "repeats", "peak_bandwidth"],
            "properties": {
                "scenarios": {"type": "array", "items": SCENARIO, "minItems": 1},
                "warmup": _COUNT,
                "repeats": {"type": "integer", "minimum": 1},
                "peak_bandwidth": {
                    "type": "object",
                    "additionalProperties": {
                        "type": "object",
                        "required": ["bytes_per_s", "source"],
                        "properties": {
                            "bytes_per_s": _NULLABLE_NUMBER,
                            "source": {"type": "string"},
                        },
                    },
                },
            },
        },
        "metrics": {"type": "object", "additionalProperties": METRIC},
        "environment": {
            "type": "object",
            "required": ["device", "driver", "execution_provider", "dtype", "versions"],
            "properties": {
                "device": {"type": "string"},
                "driver": {"type": ["string", "null"]},
                "execution_provider": {"enum": ["cpu", "cuda"]},
                "dtype": {"type": ["string", "null"]},
                "onnxruntime": {"type": ["string", "null"]},
                "versions": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
        "config": {
            "type": "object",
            "required": [
                "model",
                "dtype",
                "provider",
                "execution_provider",
                "perplexity",
                "throughput",
            ],
            "properties": {
                "perplexity": {
                    "type": ["object", "null"],
                    "required": [
                        "data",
                        "data_sha256",
                        "format",
                        "text_field",
                        "protocol",
                        "max_length",
                        "stride",
                    ],
                },
                "throughput": {
                    "type": ["object", "null"],
                    "required": [
                        "batch_sizes",
                        "prompt_lengths",
                        "new_tokens",
                        "warmup",
                        "repeats",
                        "backends",
                    ],
                },
            },
        },
        "gate": GATE,
    },
}
