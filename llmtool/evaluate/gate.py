"""The baseline gate of ``llmtool eval --baseline``: is this run worse than an earlier one?

Two reports are comparable when they measured the same thing: the same export dtype and, for
each section both have, the same data (sha256), protocol, window and stride, or the same
throughput shapes and execution provider. Otherwise the gate refuses (exit code 2).

Then each metric both reports carry is compared by its ``gate`` rule (exit code 1 if one fails):

* ``perplexity``: worse when it rose by more than the relative tolerance (default +0.5%) *and*
  ln(PPL_new / PPL_old) exceeds ``sigmas`` (default 2) standard errors of the difference,
  sqrt(SE_old² + SE_new²) of the mean NLLs; a rise within either bound is noise.
* ``throughput``: tok/s (best of repeats) worse when it fell by more than the relative tolerance
  (default -10%).
* ``count``: worse when it grew at all (non-finite logits).

Metrics without a rule are shown with their change and never fail the gate.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llmtool import defaults
from llmtool.errors import UsageError
from llmtool.evaluate.schema import SCHEMA_NAME, SCHEMA_VERSION

# Config keys that must agree, per report section.
COMPARED = {
    "perplexity": ("data_sha256", "protocol", "max_length", "stride", "text_field"),
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


def read_baseline(path: str | Path) -> dict[str, Any]:
    """Read an earlier ``llmtool eval --json`` report.

    Raises:
        UsageError: Missing, unreadable, not an eval report, or of a newer schema.
    """
    path = Path(path)
    hint = "pass a file written by `llmtool eval --json`."
    if not path.is_file():
        raise UsageError(f"Baseline {path} does not exist", hint)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"Baseline {path} is not readable JSON ({e})", hint) from e
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
    """

    metric: str
    unit: str
    old: float | None
    new: float | None
    change: float | None
    limit: str
    status: str


@dataclass
class GateResult:
    """The comparison with a baseline: one row per common metric."""

    baseline: str
    tolerance: Tolerance
    rows: list[GateRow] = field(default_factory=list)

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
        }


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def judge(key: str, old: dict[str, Any], new: dict[str, Any], tolerance: Tolerance) -> GateRow:
    """Compare one metric with its baseline under its ``gate`` rule."""
    a: Any = old.get("value")
    b: Any = new.get("value")
    rule = new.get("gate")
    higher = bool(new.get("higher_is_better"))
    change = (b - a) / abs(a) if _finite(a) and _finite(b) and a != 0 else None
    limit = ""
    if rule == "perplexity":
        se = math.hypot(old.get("standard_error") or 0.0, new.get("standard_error") or 0.0)
        limit = f"+{100 * tolerance.perplexity:g}% and {tolerance.sigmas:g}σ (±{100 * math.expm1(tolerance.sigmas * se):.2g}%)"
    elif rule == "throughput":
        limit = f"-{100 * tolerance.throughput:g}%"
    elif rule == "count":
        limit = "no increase"
    row = GateRow(key, new.get("unit", ""), a, b, change, limit, "info")
    if not _finite(a):
        row.status = "info"
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
        beyond_noise = a > 0 and b > 0 and math.log(b / a) > tolerance.sigmas * se
        row.status = (
            "worse" if b > a * (1 + tolerance.perplexity) and beyond_noise else "within tolerance"
        )
    elif rule == "throughput":
        row.status = "worse" if b < a * (1 - tolerance.throughput) else "within tolerance"
    else:  # count
        row.status = "worse"
    return row


def compare(
    baseline: dict[str, Any], record: dict[str, Any], tolerance: Tolerance, path: str | Path = ""
) -> GateResult:
    """Compare every metric the two reports share (configs already checked)."""
    result = GateResult(str(path), tolerance)
    old_metrics = baseline.get("metrics") or {}
    for key, new in record["metrics"].items():
        if key in old_metrics:
            result.rows.append(judge(key, old_metrics[key], new, tolerance))
    return result
