"""The baseline gate of ``llmtool eval --baseline`` on an encoder-decoder export.

The seq2seq record (:mod:`llmtool.seq2seq.evaluate`, schema ``llmtool-seq2seq-eval``) has its
own shape, so it gets its own comparison, built on the decoder gate's rules
(:mod:`llmtool.evaluate.gate`):

* Comparable only when both records have the seq2seq schema (a decoder-only report is refused)
  and the same pairs (``data_sha256``), beams and generation length. Otherwise: exit code 2.
* ``perplexity``: the decoder rule (relative tolerance *and* ``sigmas`` standard errors of the
  paired difference), with the **pair** as the pairing unit: both runs scored the same target
  tokens of the same pairs, so d_p = ΣNLL_new(p) − ΣNLL_old(p) per pair is the paired noise.
* ``bleu`` / ``chrf``: worse when they fell by more than a number of points (default 1):
  corpus BLEU over a few pairs moves by whole points, so no relative rule.
* ``throughput`` (``eval --throughput``): each scenario's median decoder tok/s by the decoder
  rule (worse beyond ``throughput=`` *and* the spread of the repeats), when both runs timed the
  same shapes on the same execution provider (else exit code 2). The per-pass ``timing`` of
  generation for BLEU is shown in the record, not gated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmtool import defaults
from llmtool.errors import UsageError
from llmtool.evaluate.gate import (
    GateRow,
    Tolerance,
    judge,
    paired_difference,
    parse_tolerance,
    read_json_file,
)

SCHEMA = "llmtool-seq2seq-eval"
SCHEMA_VERSION = 1
# Record keys that must agree for two runs to be comparable.
COMPARED = ("data_sha256", "pairs", "tokens", "num_beams", "max_new_tokens")


@dataclass(frozen=True)
class Seq2SeqTolerance:
    """What the seq2seq gate lets pass.

    Attributes:
        base: The decoder gate's perplexity tolerance and sigmas.
        bleu: BLEU points a run may lose.
        chrf: chrF points a run may lose.
    """

    base: Tolerance = field(default_factory=Tolerance)
    bleu: float = defaults.GATE_BLEU_POINTS
    chrf: float = defaults.GATE_CHRF_POINTS


def parse_seq2seq_tolerance(items: list[str] | tuple[str, ...]) -> Seq2SeqTolerance:
    """Read ``--tolerance`` for a seq2seq run: ``perplexity=``, ``sigmas=``, ``bleu=``, ``chrf=``.

    ``bleu`` and ``chrf`` are in points (``bleu=2`` lets BLEU fall by 2).

    Raises:
        UsageError: An unknown key or a bad value.
    """
    points: dict[str, float] = {}
    rest: list[str] = []
    for item in items:
        for pair in item.split(","):
            key, sep, amount = pair.partition("=")
            if key.strip() in ("bleu", "chrf") and sep:
                try:
                    value = float(amount)
                except ValueError:
                    value = -1.0
                if not value >= 0:
                    raise UsageError(
                        f"--tolerance {pair.strip()} is not a non-negative number of points",
                        "write it as bleu=1.5.",
                    )
                points[key.strip()] = value
            elif pair.strip():
                rest.append(pair)
    return Seq2SeqTolerance(parse_tolerance(rest), **points)


def read_seq2seq_baseline(path: str | Path) -> dict[str, Any]:
    """Read an earlier ``llmtool eval --json`` report of an encoder-decoder export.

    Raises:
        UsageError: Missing or unreadable, a decoder-only report, or a newer schema version.
    """
    hint = "pass a file written by `llmtool eval --json` on an encoder-decoder export."
    path = Path(path)
    record = read_json_file(path, hint)
    if not isinstance(record, dict) or record.get("schema") != SCHEMA:
        found = record.get("schema") if isinstance(record, dict) else None
        raise UsageError(
            f"Baseline {path} is not an encoder-decoder eval report (schema {found!r})",
            hint,
        )
    version = record.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise UsageError(
            f"Baseline {path} has schema version {version}, not one this llmtool reads "
            f"(up to {SCHEMA_VERSION})",
            "rerun the baseline with this llmtool, or upgrade llmtool.",
        )
    return record


def _show(value: Any) -> str:
    return value[:12] + "…" if isinstance(value, str) and len(value) == 64 else json.dumps(value)


def check_seq2seq_config(baseline: dict[str, Any], record: dict[str, Any], path: Any) -> None:
    """Refuse a baseline measured on other pairs or generation settings.

    Raises:
        UsageError: A compared key differs (exit code 2).
    """
    diffs = [
        f"{k} {_show(baseline.get(k))} → {_show(record.get(k))}"
        for k in COMPARED
        if k in record and baseline.get(k) != record.get(k)
    ]
    old_t, new_t = baseline.get("throughput"), record.get("throughput")
    if old_t and new_t:
        for k in ("batch_sizes", "source_lengths", "new_tokens", "execution_provider"):
            if old_t.get(k) != new_t.get(k):
                diffs.append(f"throughput {k} {_show(old_t.get(k))} → {_show(new_t.get(k))}")
    if diffs:
        raise UsageError(
            f"The baseline {path} was measured with another config ({'; '.join(diffs)})",
            "rerun the baseline on the same pairs with the same --num-beams, or drop --baseline.",
        )


def _points_row(key: str, old: Any, new: Any, points: float) -> GateRow:
    """BLEU / chrF: worse when it fell by more than ``points``."""
    row = GateRow(key, "points", old, new, None, f"-{points:g} points", "info")
    if not isinstance(old, (int, float)) or not isinstance(new, (int, float)):
        return row
    row.change = (new - old) / old if old else None
    if new == old:
        row.status = "same"
    elif new > old:
        row.status = "better"
    else:
        row.status = "worse" if old - new > points else "within tolerance"
        row.decided_by = "tolerance"
    return row


def compare_seq2seq(
    baseline: dict[str, Any], record: dict[str, Any], tolerance: Seq2SeqTolerance, path: Any = ""
) -> list[GateRow]:
    """Gate rows for perplexity, BLEU and chrF (configs checked first).

    Raises:
        UsageError: The configs differ, or the per-pair token counts do.
    """
    check_seq2seq_config(baseline, record, path)

    # The decoder gate pairs by window: hand it the pairs as windows ([P] sums and counts).
    def windows(r: dict[str, Any]) -> dict[str, Any]:
        return {"window_nll": r.get("pair_nll"), "window_tokens": r.get("pair_tokens")}

    paired = paired_difference(windows(baseline), windows(record))
    rows = [
        judge(
            "perplexity",
            {"value": baseline.get("perplexity")},
            {"value": record.get("perplexity"), "gate": "perplexity"},
            tolerance.base,
            paired,
        )
    ]
    for key in ("bleu", "chrf"):
        if key in baseline and key in record:
            rows.append(_points_row(key, baseline[key], record[key], getattr(tolerance, key)))
    old_t, new_t = baseline.get("throughput"), record.get("throughput")
    if old_t and new_t:
        for a, b in zip(old_t["scenarios"], new_t["scenarios"], strict=True):
            key = f"decoder tok/s b{b['batch_size']} s{b['source_length']}"
            rows.append(
                judge(
                    key,
                    {"value": a["decoder_tokens_per_s"], "spread": a["spread"]},
                    {
                        "value": b["decoder_tokens_per_s"],
                        "spread": b["spread"],
                        "gate": "throughput",
                        "higher_is_better": True,
                        "unit": "tok/s",
                    },
                    tolerance.base,
                )
            )
    return rows
