"""The ``llmtool eval --json`` record: built here, described by :data:`llmtool.evaluate.schema.SCHEMA`.

The record (schema :data:`~llmtool.evaluate.schema.SCHEMA_NAME`, version
:data:`~llmtool.evaluate.schema.SCHEMA_VERSION`) keeps the walking skeleton's top-level
perplexity keys and adds ``reference``, ``throughput``, a flat ``metrics`` map (each metric with
its unit, whether higher is better and its gate rule), ``environment`` and the full ``config``.
:mod:`llmtool.evaluate.render` turns it into tables, Markdown and a plot;
:mod:`llmtool.evaluate.gate` compares two of them.
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

from llmtool.evaluate.schema import SCHEMA_NAME, SCHEMA_VERSION


def metric(
    value: Any,
    unit: str,
    higher_is_better: bool,
    gate: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One entry of the ``metrics`` map."""
    return {
        "value": value,
        "unit": unit,
        "higher_is_better": higher_is_better,
        "gate": gate,
        **extra,
    }


def collect_metrics(record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The flat ``metrics`` map of a record: what the baseline gate compares."""
    m: dict[str, dict[str, Any]] = {}
    if "perplexity" in record:
        m["perplexity"] = metric(
            record["perplexity"],
            "ppl/token",
            False,
            "perplexity",
            standard_error=record.get("standard_error"),
        )
        m["nll"] = metric(
            record["nll"], "nats/token", False, standard_error=record.get("standard_error")
        )
        for key, unit in (
            ("bits_per_byte", "bits/byte"),
            ("word_perplexity", "ppl/word"),
            ("byte_perplexity", "ppl/byte"),
        ):
            if record.get(key) is not None:
                m[key] = metric(record[key], unit, False)
        m["nonfinite_logits"] = metric(record.get("nonfinite_logits", 0), "count", False, "count")
    ref = record.get("reference")
    if ref:
        m["reference.perplexity"] = metric(ref["perplexity"], "ppl/token", False)
        m["reference.delta_perplexity"] = metric(ref["delta_perplexity"], "ppl/token", False)
        m["reference.log_ppl_ratio"] = metric(ref["log_ppl_ratio"], "nats/token", False)
        for stat in ("mean", "median", "p99", "max"):
            m[f"reference.kl_divergence.{stat}"] = metric(ref["kl_divergence"][stat], "nats", False)
        m["reference.top1_agreement"] = metric(ref["top1_agreement"], "fraction", True)
        m["reference.nonfinite_logits"] = metric(ref["nonfinite_logits"], "count", False, "count")
    for s in (record.get("throughput") or {}).get("scenarios", []):
        k = f"throughput.{s['backend']}.{s['key']}"
        for rate in ("decode_tokens_per_s", "prefill_tokens_per_s"):
            # The spread of the repeats: the gate lets a drop within it pass as noise.
            m[f"{k}.{rate}"] = metric(
                s[rate]["best"], "tokens/s", True, "throughput", spread=s[rate].get("spread")
            )
        m[f"{k}.ttft_s"] = metric(s["ttft_s"]["best"], "s", False)
        for q in ("p50", "p90", "p99"):
            m[f"{k}.inter_token_latency_{q}_s"] = metric(s["inter_token_latency_s"][q], "s", False)
        m[f"{k}.e2e_latency_s"] = metric(s["e2e_latency_s"]["best"], "s", False)
        m[f"{k}.peak_rss_bytes"] = metric(s["peak_rss_bytes"], "bytes", False)
        if s["device_memory_bytes"] is not None:
            m[f"{k}.device_memory_bytes"] = metric(s["device_memory_bytes"], "bytes", False)
        if s["bandwidth"]["utilization"] is not None:
            m[f"{k}.bandwidth_utilization"] = metric(
                s["bandwidth"]["utilization"], "fraction", True
            )
    return m


def build_record(
    *,
    model: str,
    provider: str,
    config: dict[str, Any],
    environment: dict[str, Any],
    perplexity: dict[str, Any] | None = None,
    throughput: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble the ``--json`` record (see the module docstring)."""
    record: dict[str, Any] = {
        "schema": SCHEMA_NAME,
        "schema_version": SCHEMA_VERSION,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": model,
        "provider": provider,
    }
    if perplexity is not None:
        record.update(perplexity)
    if throughput is not None:
        record["throughput"] = throughput
    record["metrics"] = collect_metrics(record)
    record["environment"] = environment
    record["config"] = config
    return record


def json_safe(value: Any) -> Any:
    """``value`` with NaN and ±Inf floats replaced by None (JSON has no such numbers)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
