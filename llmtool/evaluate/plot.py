"""The ``--plot`` PNG of ``llmtool eval``: what changed, where, and against which bound.

Panels, each only when the record has what it needs:

* **ΔNLL along the text** (``--baseline`` with per-window sums, or ``--reference``): per window,
  (ΣNLL_new − ΣNLL_old) / tokens in nats, at the window's position in the scored tokens, so a
  regression confined to some part of the text shows where it is;
* **KL divergence** (``--reference``): the distribution of per-token KL(P_ref ‖ P) with p50 and p99
  marked;
* **decode throughput against the roofline** (``--throughput``): tok/s per scenario, the
  baseline's beside this run's, and the bandwidth roofline batch × peak bytes/s ÷ bytes read per
  step that the memory table computes;
* **perplexity** with its interval (without a comparison).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np


def _windows_delta(record: dict[str, Any], old_nll: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """(window mid-positions in scored tokens, ΔNLL per token) of this run against ``old_nll``."""
    n = np.asarray(record["window_tokens"], dtype=np.float64)
    delta = (np.asarray(record["window_nll"]) - np.asarray(old_nll)) / np.maximum(n, 1)
    return np.cumsum(n) - n / 2, delta


def _delta_panel(ax: Any, record: dict[str, Any], baseline: dict[str, Any] | None) -> None:
    if baseline is not None and baseline.get("window_tokens") == record.get("window_tokens"):
        x, y = _windows_delta(record, baseline["window_nll"])
        ax.plot(x, y, marker=".", label="this run − baseline")
    ref = record.get("reference") or {}
    if ref.get("window_nll"):
        x, y = _windows_delta(record, ref["window_nll"])
        ax.plot(x, y, marker=".", label="model − reference")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("scored tokens (window centre)")
    ax.set_ylabel("ΔNLL per token (nats)")
    ax.set_title("Where the change is: ΔNLL per window")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)


def _kl_panel(ax: Any, ref: dict[str, Any]) -> None:
    hist = ref["kl_histogram"]
    edges, counts = np.asarray(hist["edges"]), np.asarray(hist["counts"])
    ax.stairs(counts, edges, fill=True, alpha=0.6)
    ax.set_xscale("log")
    kl = ref["kl_divergence"]
    for name, value, style in (("p50", kl["median"], "--"), ("p99", kl["p99"], ":")):
        if value > 0:
            ax.axvline(value, color="k", ls=style, label=f"{name} {value:.3g}")
    ax.set_xlabel("KL(P_ref ‖ P) per token (nats)")
    ax.set_ylabel("tokens")
    ax.set_title("KL divergence to the reference")
    ax.legend(fontsize="small")


def _rates(record: dict[str, Any]) -> dict[str, tuple[float, float | None]]:
    """Per ``backend key``: (best decode tok/s, roofline tok/s or None)."""
    out = {}
    for x in (record.get("throughput") or {}).get("scenarios", []):
        bw = x["bandwidth"]
        step = bw["weight_bytes"] + bw["kv_bytes_per_step"]
        peak = bw.get("peak_bytes_per_s")
        roof = x["batch_size"] * peak / step if peak and step else None
        out[f"{x['backend']} {x['key']}"] = (x["decode_tokens_per_s"]["best"], roof)
    return out


def _throughput_panel(ax: Any, record: dict[str, Any], baseline: dict[str, Any] | None) -> None:
    new = _rates(record)
    old = _rates(baseline) if baseline is not None else {}
    keys = list(new)
    x = np.arange(len(keys))
    width = 0.38 if old else 0.6
    ax.bar(x - (width / 2 if old else 0), [new[k][0] for k in keys], width, label="this run")
    if old:
        ax.bar(x + width / 2, [old.get(k, (0.0, None))[0] for k in keys], width, label="baseline")
    roofs = [new[k][1] for k in keys]
    if any(r is not None for r in roofs):
        ax.scatter(
            x,
            [np.nan if r is None else r for r in roofs],
            marker="_",
            s=600,
            c="k",
            label="roofline",
        )
        ax.set_yscale("log")
    ax.set_xticks(x, keys, rotation=30, ha="right", fontsize="small")
    ax.set_ylabel("decode tokens/s (best of repeats)")
    ax.set_title("Decode throughput against the bandwidth roofline")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3, axis="y")


def _perplexity_panel(ax: Any, record: dict[str, Any]) -> None:
    ci = record.get("perplexity_ci")
    err = [[record["perplexity"] - ci["low"]], [ci["high"] - record["perplexity"]]] if ci else None
    ax.errorbar([0], [record["perplexity"]], yerr=err, fmt="o", capsize=6)
    ax.set_xticks([0], [Path(record["model"]).name])
    level = f"{100 * ci['confidence']:g}% interval" if ci else "no interval"
    ax.set_ylabel(f"perplexity ({record['protocol']}, {level})")
    ax.set_title("Perplexity")
    ax.grid(alpha=0.3, axis="y")


def panels(record: dict[str, Any], baseline: dict[str, Any] | None = None) -> list[str]:
    """The panels the record (and the baseline) can fill, in display order."""
    ref = record.get("reference") or {}
    paired = baseline is not None and bool(baseline.get("window_nll")) and "window_nll" in record
    out = []
    if paired or ref.get("window_nll"):
        out.append("delta")
    if ref.get("kl_histogram"):
        out.append("kl")
    if record.get("throughput"):
        out.append("throughput")
    if "perplexity" in record and not out:
        out.append("perplexity")
    return out


def plot_png(record: dict[str, Any], baseline: dict[str, Any] | None = None) -> bytes:
    """The PNG of a record (see the module docstring); ``baseline`` puts the old run beside.

    Needs matplotlib (``render.check_plot_path`` says so before any work).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = panels(record, baseline)
    fig = Figure(figsize=(6 * max(1, len(names)), 4.5), layout="constrained")
    for i, name in enumerate(names):
        ax = fig.add_subplot(1, len(names), i + 1)
        if name == "delta":
            _delta_panel(ax, record, baseline)
        elif name == "kl":
            _kl_panel(ax, record["reference"])
        elif name == "throughput":
            _throughput_panel(ax, record, baseline)
        else:
            _perplexity_panel(ax, record)
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    return buf.getvalue()
