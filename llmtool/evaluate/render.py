"""The report of ``llmtool eval`` for people: terminal tables, Markdown and a plot.

Tables and Markdown are rendered from the same :class:`Section` list, so the terminal and the CI
summary agree; :func:`write_reports` writes the JSON record (:mod:`llmtool.evaluate.record`),
Markdown and the plot.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmtool import defaults
from llmtool.errors import UsageError
from llmtool.evaluate.record import json_safe
from llmtool.fsutil import atomic_write_bytes, atomic_write_text, write_json


@dataclass
class Section:
    """A table: rendered by Rich on the terminal and as Markdown for CI summaries."""

    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    caption: str = ""


def _g(value: Any, digits: int = 5) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}g}"


def _ms(seconds: float) -> str:
    """Milliseconds with sensible digits: 2,130 / 41.2 / 0.523, never 2.13e+03."""
    ms = 1000 * seconds
    return f"{ms:,.0f}" if ms >= 100 else f"{ms:.3g}"


def _mib(value: Any) -> str:
    return "–" if value is None else f"{value / 2**20:,.0f}"


def perplexity_section(record: dict[str, Any]) -> Section:
    """Perplexity with its interval, NLL, per-word and per-byte figures, and the settings."""
    s = Section("Perplexity", ["metric", "value"])
    ci = record.get("perplexity_ci")
    interval = f"  [{_g(ci['low'])}, {_g(ci['high'])}] at {100 * ci['confidence']:g}%" if ci else ""
    se = record.get("standard_error")
    s.rows += [
        [
            "protocol",
            f"{record['protocol']} (window {record['max_length']}, stride {record['stride']})",
        ],
        ["perplexity (token)", f"{_g(record['perplexity'], 6)}{interval}"],
        [
            "mean NLL (nats/token)",
            _g(record["nll"], 6) + (f" ± {_g(se, 3)}" if se is not None else ""),
        ],
    ]
    if record.get("bits_per_byte") is not None:
        s.rows.append(["bits per byte", _g(record["bits_per_byte"])])
    if record.get("word_perplexity") is not None:
        s.rows.append(["word perplexity", _g(record["word_perplexity"], 6)])
        s.rows.append(["byte perplexity", _g(record["byte_perplexity"], 6)])
    docs = f"{record['documents']:,}"
    if record.get("skipped_documents"):
        docs += f" ({record['skipped_documents']:,} skipped)"
    s.rows += [
        ["tokens scored", f"{record['tokens']:,}"],
        ["documents", docs],
        ["words / bytes", f"{record['words']:,} / {record['bytes']:,}"],
        ["non-finite logits", f"{record.get('nonfinite_logits', 0):,}"],
    ]
    data = record.get("data", {})
    sha = data.get("sha256", "")
    name = Path(data["path"]).name if data.get("path") else ""
    s.caption = (
        f"{record['windows']} forward passes on {record['provider']} in {record['seconds']:.1f} s"
        + (f" · data {name}" if name else "")
        + (f" (sha256 {sha[:12]})" if sha else "")
        + (f" · preprocess {record['preprocess']}" if record.get("preprocess") else "")
    )
    return s


def reference_section(record: dict[str, Any]) -> Section:
    """The fidelity report against ``--reference``."""
    ref = record["reference"]
    kl = ref["kl_divergence"]
    s = Section(
        f"Fidelity to {Path(ref['model']).name or ref['model']} ({ref['kind']})",
        ["metric", "value"],
    )
    s.rows = [
        [
            "perplexity: model / reference",
            f"{_g(record['perplexity'], 6)} / {_g(ref['perplexity'], 6)}",
        ],
        ["ΔPPL", f"{ref['delta_perplexity']:+.5g}"],
        ["ln(PPL / PPL_ref)", f"{ref['log_ppl_ratio']:+.5g}"],
        ["KL divergence mean / median (nats)", f"{_g(kl['mean'], 4)} / {_g(kl['median'], 4)}"],
        ["KL divergence p99 / max (nats)", f"{_g(kl['p99'], 4)} / {_g(kl['max'], 4)}"],
        ["top-1 agreement", f"{100 * ref['top1_agreement']:.2f}%"],
        ["non-finite logits", f"{ref['nonfinite_logits']:,}"],
    ]
    s.caption = (
        f"KL(P_ref ‖ P_model) over {ref['tokens']:,} scored tokens · reference on {ref['device']}"
    )
    return s


def _scenarios(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Scenarios by batch and prompt length, the backends of each side by side (ONNX first)."""
    return sorted(
        record["throughput"]["scenarios"],
        key=lambda x: (x["batch_size"], x["prompt_length"], x["backend"] != "onnx"),
    )


def _shape(x: dict[str, Any]) -> str:
    return f"{x['batch_size']}×{x['prompt_length']}"


def throughput_section(record: dict[str, Any]) -> Section:
    """Latency and tok/s: one row per scenario and backend."""
    t = record["throughput"]
    s = Section(
        "Throughput",
        ["backend", "shape", "TTFT\nms", "prefill\ntok/s", "decode\ntok/s", "ITL ms\np50/p90/p99"],
    )
    for x in _scenarios(record):
        itl = x["inter_token_latency_s"]
        s.rows.append(
            [
                f"{x['backend']} {x['device']}",
                _shape(x),
                _ms(x["ttft_s"]["best"]),
                f"{x['prefill_tokens_per_s']['best']:,.0f}",
                f"{x['decode_tokens_per_s']['best']:,.1f}",
                "/".join(_ms(itl[q]) for q in ("p50", "p90", "p99")),
            ]
        )
    new = t["scenarios"][0]["new_tokens"]
    note = ((record.get("config") or {}).get("throughput") or {}).get("shapes_note")
    s.caption = (
        f"shape: batch × prompt tokens, {new} new tokens a row · best of {t['repeats']} runs "
        f"after {t['warmup']} warm-up · ITL: inter-token latency over every decode step"
        + (f" · {note}" if note else "")
    )
    return s


def memory_section(record: dict[str, Any]) -> Section:
    """End-to-end latency, memory, and how much of the peak bandwidth decoding uses."""
    t = record["throughput"]
    scenarios = _scenarios(record)
    device = any(x["device_memory_bytes"] is not None for x in scenarios)
    columns = ["backend", "shape", "e2e\ns", "peak RSS\nMiB"]
    columns += ["device\nMiB"] if device else []
    s = Section("Memory and bandwidth", [*columns, "read\nGB/s", "BW\nutil", "bound"])
    for x in scenarios:
        bw = x["bandwidth"]
        row = [
            f"{x['backend']} {x['device']}",
            _shape(x),
            f"{x['e2e_latency_s']['best']:.3g}",
            _mib(x["peak_rss_bytes"]),
        ]
        row += [_mib(x["device_memory_bytes"])] if device else []
        row += [
            f"{bw['bytes_per_s'] / 1e9:.3g}",
            "–" if bw["utilization"] is None else f"{100 * bw['utilization']:.2g}%",
            bw["bound"] or "–",
        ]
        s.rows.append(row)
    peaks = "; ".join(f"{d} {_peak(p)}" for d, p in t.get("peak_bandwidth", {}).items())
    s.caption = (
        f"read: weights + KV cache per decode step × steps/s · peak: {peaks} · bound: cache when "
        f"a step's bytes fit in the last-level cache, else bandwidth at ≥ "
        f"{100 * defaults.BANDWIDTH_BOUND_UTILIZATION:g}% of peak, else launch"
    )
    return s


def _peak(peak: dict[str, Any]) -> str:
    bandwidth = peak.get("bytes_per_s")
    source = peak.get("source", "")
    return f"{bandwidth / 1e9:,.1f} GB/s, {source}" if bandwidth else source


def gate_section(gate: dict[str, Any]) -> Section:
    """Old, new and change per metric, with the verdict."""
    s = Section(
        f"Baseline {gate['baseline']}", ["metric", "old", "new", "change", "limit", "status"]
    )
    for r in gate["rows"]:
        change = "–" if r["change"] is None else f"{100 * r['change']:+.2f}%"
        status = r["status"] + (f" ({r['decided_by']})" if r.get("decided_by") else "")
        s.rows.append([r["metric"], _g(r["old"]), _g(r["new"]), change, r["limit"], status])
    failed = sum(r["status"] == "worse" for r in gate["rows"])
    verdict = "passed" if gate["passed"] else f"FAILED: {failed} metric(s) worse beyond tolerance"
    s.caption = " · ".join([verdict, *gate.get("notes", [])])
    return s


def verdict(gate: dict[str, Any]) -> str:
    """One line: pass or fail, which metrics and by how much (what the Markdown leads with)."""
    worse = [r for r in gate["rows"] if r["status"] == "worse"]
    if not worse:
        return f"**PASS** against baseline {gate['baseline']}: no metric worse beyond tolerance."

    def change(r: dict[str, Any]) -> str:
        return "non-finite" if r["change"] is None else f"{100 * r['change']:+.2f}%"

    items = ", ".join(f"`{r['metric']}` {change(r)} (limit {r['limit']})" for r in worse)
    return f"**FAIL** against baseline {gate['baseline']}: {items}."


def precision(record: dict[str, Any]) -> str:
    """What the weights are: ``int4 weights (fp32 activations)`` for a quantized export, else the dtype."""
    config = record.get("config") or {}
    dtype = config.get("dtype") or record["environment"].get("dtype") or ""
    quantization = config.get("quantization")
    return f"{quantization} weights ({dtype} activations)" if quantization else dtype


def sections(record: dict[str, Any]) -> list[Section]:
    """Every table of a record, in display order."""
    out = []
    if "perplexity" in record:
        out.append(perplexity_section(record))
    if record.get("reference"):
        out.append(reference_section(record))
    if record.get("throughput"):
        out += [throughput_section(record), memory_section(record)]
    if record.get("gate"):
        out.append(gate_section(record["gate"]))
    return out


STATUS_STYLE = {"worse": "red", "better": "green", "within tolerance": "yellow"}


def rich_tables(record: dict[str, Any]) -> list[Any]:
    """The sections as Rich tables."""
    from rich.table import Table
    from rich.text import Text

    tables = []
    for s in sections(record):  # all plain text: passed as Text, never parsed as markup
        table = Table(title=Text(s.title), caption=Text(s.caption) if s.caption else None)
        for i, name in enumerate(s.columns):
            # The first column (metric names) never folds mid-word; the numbers do first.
            table.add_column(
                Text(name), justify="left" if i == 0 else "right", overflow="fold", no_wrap=i == 0
            )
        for row in s.rows:
            style = STATUS_STYLE.get(row[-1].split(" (")[0]) if s.columns[-1] == "status" else None
            table.add_row(
                Text(_break_at_dots(row[0])), *(Text(cell) for cell in row[1:]), style=style
            )
        tables.append(table)
    return tables


def _break_at_dots(name: str, width: int = 28) -> str:
    """A long dotted metric name on several lines, broken only after a dot."""
    lines = [""]
    for part in name.split("."):
        piece = part if not lines[-1] else "." + part
        if lines[-1] and len(lines[-1]) + len(piece) > width:
            lines.append(piece)
        else:
            lines[-1] += piece
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(record: dict[str, Any]) -> str:
    """The report as GitHub-flavoured Markdown."""
    env = record["environment"]
    lines = [
        f"## llmtool eval: {Path(record['model']).name}",
        "",
        f"{env['device']} · {record['provider']} · {precision(record)} · "
        f"onnxruntime {env.get('onnxruntime') or '?'} · "
        f"torch {env['versions'].get('torch', '?')}",
        "",
    ]
    if record.get("gate"):
        lines[2:2] = [verdict(record["gate"]), ""]  # the verdict first, before any table
    for s in sections(record):
        lines += [f"### {s.title}", ""]
        lines.append("| " + " | ".join(_cell(c) for c in s.columns) + " |")
        lines.append("|" + "|".join(["---"] + ["---:"] * (len(s.columns) - 1)) + "|")
        lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in s.rows]
        if s.caption:
            lines += ["", f"_{_cell(s.caption)}_"]
        lines.append("")
    return "\n".join(lines)


def check_plot_path(path: str | Path | None) -> None:
    """Fail before any work when ``--plot`` cannot be written.

    Raises:
        UsageError: Not a .png path, or matplotlib is missing.
    """
    if path is None:
        return
    if Path(path).suffix.lower() != ".png":
        raise UsageError(f"--plot writes a PNG image, got {path}", "give the file a .png suffix.")
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise UsageError(
            "--plot needs matplotlib, which is not installed", "run `pip install 'llmtool[plot]'`."
        ) from e


def write_reports(
    record: dict[str, Any],
    *,
    json_path: str | Path | None = None,
    markdown_path: str | Path | None = None,
    plot_path: str | Path | None = None,
    baseline: dict[str, Any] | None = None,
) -> list[Path]:
    """Write the requested files atomically; Markdown also goes to ``$GITHUB_STEP_SUMMARY``.

    ``baseline`` (the ``--baseline`` record) puts the old run beside the new one in the plot.

    Returns:
        The paths written.
    """
    written = []
    if json_path is not None:
        written.append(write_json(json_path, json_safe(record)))
    if markdown_path is not None:
        text = to_markdown(record)
        atomic_write_text(Path(markdown_path), text)
        written.append(Path(markdown_path))
        summary = os.environ.get("GITHUB_STEP_SUMMARY")
        if summary:
            with open(summary, "a", encoding="utf-8") as f:
                f.write(text + "\n")
    if plot_path is not None:
        from llmtool.evaluate.plot import plot_png

        atomic_write_bytes(Path(plot_path), plot_png(record, baseline))
        written.append(Path(plot_path))
    return written
