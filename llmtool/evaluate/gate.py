"""The baseline gate of ``llmtool eval --baseline``: is this run worse than an earlier one?

Two reports are comparable when they measured the same thing: the same export dtype and, for
each section both have, the same data (sha256), protocol, window and stride, or the same
throughput shapes and execution provider. Otherwise the gate refuses (exit code 2).

Then each metric both reports carry is compared by its ``gate`` rule (exit code 1 if one fails):

* ``perplexity``: worse when it rose by more than the relative tolerance (default +0.5%) *and*
  ln(PPL_new / PPL_old) exceeds ``sigmas`` (default 2) standard errors of the **paired**
  difference. Both runs scored the same tokens in the same windows (the config check makes
  sure), so the difference is measured window by window: with d_w = ΣNLL_new(w) − ΣNLL_old(w)
  and n_w tokens, D = Σd_w / Σn_w = ln(PPL_new / PPL_old) and its standard error is that of a
  ratio estimator, sqrt(W / (W − 1) · Σ(d_w − D·n_w)²) / Σn_w over the W windows. The same
  model gives d_w = 0 everywhere (no noise at all), so any rise beyond the tolerance fails. A
  baseline without per-window sums (written before they were recorded) or with a single window
  is judged by the tolerance alone. Treating the runs as independent samples
  (sqrt(SE_old² + SE_new²)) would hide rises of 10% and more on a few thousand tokens.
* ``throughput``: tok/s (best of repeats) worse when it fell by more than the relative tolerance
  (default -10%) *and* by more than the spread of the repeats ((best − worst) / best of either
  run): a drop inside the machine's own run-to-run noise is not a regression.
* ``count``: worse when it grew at all (non-finite logits).

Metrics without a rule are shown with their change and never fail the gate.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmtool import defaults
from llmtool.errors import UsageError
from llmtool.evaluate.schema import SCHEMA_NAME, SCHEMA_VERSION

# Config keys that must agree, per report section.
COMPARED = {
    "perplexity": (
        "data_sha256",
        "protocol",
        "max_length",
        "stride",
        "text_field",
        "preprocess",
        "max_tokens",
    ),
    "throughput": ("batch_sizes", "prompt_lengths", "new_tokens"),
}


@dataclass(frozen=True)
class Tolerance:
    """How much worse a metric may get before the gate fails.

    Attributes:
        perplexity: Relative perplexity increase allowed (0.005 = +0.5%).
        sigmas: Standard errors of the difference a perplexity increase must also exceed.
        throughput: Relative tok/s decrease allowed (0.10 = -10%).
    """

    perplexity: float = defaults.GATE_PERPLEXITY_TOLERANCE
    sigmas: float = defaults.GATE_SIGMAS
    throughput: float = defaults.GATE_THROUGHPUT_TOLERANCE


def _parse_amount(text: str, key: str) -> float:
    text = text.strip()
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or value < 0:
        raise UsageError(
            f"--tolerance {key}={text} is not a non-negative number",
            "write it as 0.5% or 0.005.",
        )
    return value


def parse_tolerance(items: list[str] | tuple[str, ...]) -> Tolerance:
    """Read ``--tolerance`` values: ``perplexity=0.5%``, ``sigmas=2``, ``throughput=10%``.

    Each item may hold several ``key=value`` pairs separated by commas; unnamed keys keep their
    defaults.

    Raises:
        UsageError: An unknown key or a bad value.
    """
    values: dict[str, float] = {}
    names = ("perplexity", "sigmas", "throughput")
    for item in items:
        for pair in item.split(","):
            if not pair.strip():
                continue
            key, sep, amount = pair.partition("=")
            key = key.strip()
            if not sep or key not in names:
                raise UsageError(
                    f"--tolerance {pair.strip()!r} is not one of {', '.join(n + '=VALUE' for n in names)}",
                    "for example --tolerance perplexity=1%,throughput=15%.",
                )
            values[key] = _parse_amount(amount, key)
    return Tolerance(**values)


def read_json_file(path: Path, hint: str) -> Any:
    """A baseline file's JSON (decoder or encoder-decoder record).

    Raises:
        UsageError: Missing, or not readable JSON (with ``hint``).
    """
    if not path.is_file():
        raise UsageError(f"Baseline {path} does not exist", hint)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"Baseline {path} is not readable JSON ({e})", hint) from e


def read_baseline(path: str | Path) -> dict[str, Any]:
    """Read an earlier ``llmtool eval --json`` report.

    Raises:
        UsageError: Missing, unreadable, not an eval report, or of a newer schema.
    """
    path = Path(path)
    hint = "pass a file written by `llmtool eval --json`."
    record = read_json_file(path, hint)
    if not isinstance(record, dict) or record.get("schema") != SCHEMA_NAME:
        raise UsageError(f"Baseline {path} is not an llmtool eval report", hint)
    if (
        not isinstance(record.get("schema_version"), int)
        or record["schema_version"] > SCHEMA_VERSION
    ):
        raise UsageError(
            f"Baseline {path} has schema version {record.get('schema_version')}, newer than this "
            f"llmtool's {SCHEMA_VERSION}",
            "upgrade llmtool.",
        )
    return record


def _show(value: Any) -> str:
    if isinstance(value, str) and len(value) == 64:
        return value[:12] + "…"  # a sha256
    return json.dumps(value) if not isinstance(value, str) else value


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What makes two reports' configs incomparable, as ``"key old → new"`` lines (none: comparable)."""
    diffs = []
    if old.get("dtype") != new.get("dtype"):
        diffs.append(f"dtype {_show(old.get('dtype'))} → {_show(new.get('dtype'))}")
    common = [s for s in COMPARED if old.get(s) and new.get(s)]
    if not common:
        diffs.append("no perplexity or throughput section in common")
    for section in common:
        for key in COMPARED[section]:
            a, b = old[section].get(key), new[section].get(key)
            if a != b:
                diffs.append(f"{key} {_show(a)} → {_show(b)}")
        if section == "throughput" and old.get("execution_provider") != new.get(
            "execution_provider"
        ):
            diffs.append(
                f"execution provider {_show(old.get('execution_provider'))} → "
                f"{_show(new.get('execution_provider'))}"
            )
    return diffs


def check_config(baseline: dict[str, Any], config: dict[str, Any], path: str | Path) -> None:
    """Refuse a baseline measured on other data or shapes.

    Raises:
        UsageError: The configs differ (exit code 2).
    """
    diffs = config_differences(baseline.get("config") or {}, config)
    if diffs:
        raise UsageError(
            f"The baseline {path} was measured with another config ({'; '.join(diffs)})",
            "rerun the baseline with the same data, protocol, dtype and shapes, or drop --baseline.",
        )


@dataclass
class GateRow:
    """One metric of both reports.

    Attributes:
        metric: The metric's key.
        unit: Its unit.
        old: Baseline value.
        new: This run's value.
        change: (new - old) / old, None when old is 0 or either is missing.
        limit: The rule, in words ("" for informational metrics).
        status: ``better``, ``same``, ``within tolerance``, ``worse`` or ``info``.
        decided_by: Which bound decided a rise or drop: ``tolerance``, ``paired noise`` or
            ``spread of repeats`` ("" when none was needed).
    """

    metric: str
    unit: str
    old: float | None
    new: float | None
    change: float | None
    limit: str
    status: str
    decided_by: str = ""


@dataclass
class GateResult:
    """The comparison with a baseline: one row per common metric.

    Attributes:
        baseline: The baseline's path.
        tolerance: The allowed changes.
        rows: One per metric both reports have.
        baseline_model: The model the baseline measured (its ``config.model``).
        notes: What the reader should know: which model produced the baseline, a quantization
            that differs (allowed: comparing int4 with fp32 is what a quantization check does).
    """

    baseline: str
    tolerance: Tolerance
    rows: list[GateRow] = field(default_factory=list)
    baseline_model: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[GateRow]:
        return [r for r in self.rows if r.status == "worse"]

    @property
    def passed(self) -> bool:
        return not self.failed

    def to_dict(self) -> dict[str, Any]:
        return {
            "baseline": self.baseline,
            "tolerance": asdict(self.tolerance),
            "passed": self.passed,
            "rows": [asdict(r) for r in self.rows],
            "baseline_model": self.baseline_model,
            "notes": self.notes,
        }


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def paired_difference(
    baseline: dict[str, Any], record: dict[str, Any]
) -> tuple[float, float] | None:
    """ln(PPL_new / PPL_old) and its paired standard error, from the per-window NLL sums.

    Returns:
        ``(D, SE)`` (see the module docstring); None when the baseline has no per-window sums
        (judge by the tolerance alone) or fewer than two windows.

    Raises:
        UsageError: Both have per-window sums but over other windows (other tokens).
    """
    old, new = baseline.get("window_nll"), record.get("window_nll")
    if not old or not new:
        return None
    if baseline.get("window_tokens") != record.get("window_tokens"):
        raise UsageError(
            "The baseline scored other windows than this run (its per-window token counts differ)",
            "rerun the baseline with this llmtool on the same data and settings.",
        )
    n = np.asarray(record["window_tokens"], dtype=np.float64)
    d = np.asarray(new, dtype=np.float64) - np.asarray(old, dtype=np.float64)
    if len(d) < 2:
        return None
    mean = float(d.sum() / n.sum())
    residual = d - mean * n
    se = math.sqrt(len(d) / (len(d) - 1) * float((residual**2).sum())) / float(n.sum())
    return mean, se


def _spread(metric: dict[str, Any]) -> float:
    value: Any = metric.get("spread")
    return float(value) if _finite(value) else 0.0


def _limit(
    rule: Any, tolerance: Tolerance, paired: tuple[float, float] | None, spread: float
) -> str:
    if rule == "perplexity":
        if paired is None:
            return f"+{100 * tolerance.perplexity:g}% (tolerance only: no per-window NLL)"
        noise = 100 * math.expm1(tolerance.sigmas * paired[1])
        return f"+{100 * tolerance.perplexity:g}% and {tolerance.sigmas:g}σ paired (±{noise:.2g}%)"
    if rule == "throughput":
        return f"-{100 * tolerance.throughput:g}% and spread {100 * spread:.2g}%"
    return "no increase" if rule == "count" else ""


def judge(
    key: str,
    old: dict[str, Any],
    new: dict[str, Any],
    tolerance: Tolerance,
    paired: tuple[float, float] | None = None,
) -> GateRow:
    """Compare one metric with its baseline under its ``gate`` rule.

    Args:
        key: The metric's name.
        old: The baseline's entry of the ``metrics`` map.
        new: This run's entry.
        tolerance: The allowed changes.
        paired: ``(D, SE)`` of :func:`paired_difference` for ``perplexity`` (None: the
            relative tolerance alone decides).
    """
    a: Any = old.get("value")
    b: Any = new.get("value")
    rule = new.get("gate")
    higher = bool(new.get("higher_is_better"))
    change = (b - a) / abs(a) if _finite(a) and _finite(b) and a != 0 else None
    spread = max(_spread(old), _spread(new))
    row = GateRow(
        key, new.get("unit", ""), a, b, change, _limit(rule, tolerance, paired, spread), "info"
    )
    if not _finite(a):
        return row
    if not _finite(b):
        row.status = "worse" if rule else "info"
        return row
    if b == a:
        row.status = "same"
        return row
    worse = b < a if higher else b > a
    if rule is None:
        row.status = "info"
    elif not worse:
        row.status = "better"
    elif rule == "perplexity":
        beyond_tolerance = b > a * (1 + tolerance.perplexity)
        beyond_noise = paired is None or paired[0] > tolerance.sigmas * paired[1]
        row.status = "worse" if beyond_tolerance and beyond_noise else "within tolerance"
        row.decided_by = "paired noise" if beyond_tolerance and paired is not None else "tolerance"
    elif rule == "throughput":
        drop = (a - b) / a
        row.status = (
            "worse" if drop > tolerance.throughput and drop > spread else "within tolerance"
        )
        # The larger bound is the one that decides (both must be exceeded to fail).
        row.decided_by = "spread of repeats" if spread > tolerance.throughput else "tolerance"
    else:  # count
        row.status = "worse"
    return row


def compare(
    baseline: dict[str, Any], record: dict[str, Any], tolerance: Tolerance, path: str | Path = ""
) -> GateResult:
    """Compare every metric the two reports share (configs already checked)."""
    old_config, new_config = baseline.get("config") or {}, record.get("config") or {}
    result = GateResult(str(path), tolerance, baseline_model=str(old_config.get("model") or ""))
    if result.baseline_model:
        result.notes.append(f"baseline model {result.baseline_model}")
    old_q, new_q = old_config.get("quantization"), new_config.get("quantization")
    if old_q != new_q:
        result.notes.append(
            f"quantization differs: baseline {old_q or old_config.get('dtype') or 'none'}, "
            f"this run {new_q or new_config.get('dtype') or 'none'}"
        )
    old_metrics = baseline.get("metrics") or {}
    paired = paired_difference(baseline, record) if "perplexity" in old_metrics else None
    for key, new in record["metrics"].items():
        if key in old_metrics:
            pairs = paired if new.get("gate") == "perplexity" else None
            result.rows.append(judge(key, old_metrics[key], new, tolerance, pairs))
    return result
