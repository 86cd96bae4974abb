"""Rich tables for the results of export, generate and train.

``llmtool eval`` renders its own report (:mod:`llmtool.evaluate.render`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text

# Every string from outside (paths, prompts, generated text) goes in as Text, never as markup.


def _fmt(value: float, digits: int = 4) -> str:
    return f"{value:.{digits}g}"


def export_table(manifest: dict[str, Any], out: Path) -> Table:
    """Summary of an export and its validation."""
    v = manifest["validation"]
    table = Table(title=Text(f"Exported {manifest['model_type']} → {out}"), show_header=True)
    table.add_column("check")
    table.add_column("value", justify="right")
    table.add_column("limit", justify="right")
    table.add_column("", justify="center")
    ok, bad = Text("✓", style="green"), Text("✗", style="red")
    # Quantized exports are gated on their fidelity below, not on fp32 parity.
    gated = v.get("gate", True)
    limit = f"{v['tolerance']:g}" if gated else "(fidelity)"

    def mark(passed: bool) -> Text:
        return (ok if passed else bad) if gated else Text("")

    for label, diff in (
        ("prefill max |Δlogits|", v["prefill_max_abs_diff"]),
        (f"decode max |Δlogits| ({v['decode_steps']} steps)", v["decode_max_abs_diff"]),
    ):
        table.add_row(label, f"{diff:.3g}", limit, mark(diff <= v["tolerance"]))
    table.add_row(
        "greedy tokens equal",
        f"{v['greedy_tokens_compared'] - len(v['mismatches'])}/{v['greedy_tokens_compared']}",
        "all" if gated else "",
        mark(v["greedy_match"]),
    )
    if "fidelity" in manifest:
        f = manifest["fidelity"]
        table.add_row(
            f"{manifest['quantization']['mode']} ΔPPL vs fp32",
            f"{100 * f['relative_delta_perplexity']:+.2f}%",
            f"{100 * f['max_relative_delta_perplexity']:g}%",
            ok if f["passed"] else bad,
        )
        table.add_row(
            "KL divergence mean / p99 (nats)",
            f"{f['kl_divergence']['mean']:.4f} / {f['kl_divergence']['p99']:.4f}",
            "",
            "",
        )
        table.add_row("top-1 agreement with fp32", f"{100 * f['top1_agreement']:.2f}%", "", "")
    weights = manifest["dtype"]
    if "quantization" in manifest:
        weights += f" → {manifest['quantization']['mode']} weights"
    # Which path built the graph: an extractor's hand-built graph, or torch.onnx's trace.
    builder = manifest.get("builder", "hand-built")
    table.caption = Text(
        f"{manifest['parameters'] / 1e6:.1f}M parameters · {weights} · {builder} graph · "
        f"opset {manifest.get('graph_opset', manifest['opset'])} · "
        f"validated on ORT {v['provider']} vs PyTorch, batch {v['batch']} {v.get('padding', 'left')}-padded"
        # A variant the hand-built graph cannot express: why the trace built it.
        + (f" · {manifest['builder_reason']}" if manifest.get("builder_reason") else "")
    )
    return table


def generation_table(result: dict[str, Any]) -> Table:
    """One row per prompt with its continuation, then the timing."""
    timing = result["timing"]
    table = Table(title="Generation", show_lines=True)
    table.add_column("prompt", overflow="fold")
    table.add_column("continuation", overflow="fold")
    table.add_column("tokens", justify="right")
    for out in result["outputs"]:
        text = out["text"]
        if out["finish_reason"] == "eos" and out["new_tokens"] == 1:
            text = "(ended at once: EOS as the first token)"
        table.add_row(
            Text(out["prompt"]),
            Text(text),
            f"{_tokens(out['new_tokens'])} ({out['finish_reason']})",
        )
    table.caption = Text(
        f"{result['provider']} · time to first token {timing['prefill_s'] * 1000:.0f} ms · "
        + _decode_rate(timing)
    )
    return table


def _tokens(n: int) -> str:
    return f"{n} token" if n == 1 else f"{n} tokens"


def _decode_rate(timing: dict[str, Any]) -> str:
    # No decode step ran when every row stopped at its first token: there is no rate to show.
    if not timing.get("decode_tokens"):
        return "every row ended at its first token (no decode step)"
    return f"decode {timing['decode_tokens_per_s']:.1f} tok/s"


def timing_line(result: dict[str, Any], output: dict[str, Any]) -> Text:
    """The dim line under a streamed generation: tokens, provider, first token, decode rate."""
    timing = result["timing"]
    rate = "ended at its first token" if output["new_tokens"] <= 1 else _decode_rate(timing)
    return Text(
        f"{_tokens(output['new_tokens'])} · {result['provider']} · first token "
        f"{timing['prefill_s'] * 1000:.0f} ms · {rate}",
        style="dim",
    )


def train_table(metrics: dict[str, Any]) -> Table:
    """The result of ``llmtool train``: sizes, perplexity before and after, throughput."""
    table = Table(title=Text(f"Trained {metrics['arch']} ({metrics['preset']}) → {metrics['out']}"))
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("parameters", f"{metrics['parameters']:,}")
    table.add_row("steps", f"{metrics['steps']:,}")
    table.add_row(
        "tokens (train / val)", f"{metrics['tokens']['train']:,} / {metrics['tokens']['val']:,}"
    )
    table.add_row("val perplexity at step 0", _fmt(metrics["initial_val_perplexity"], 5))
    table.add_row("val perplexity at the end", _fmt(metrics["final_val_perplexity"], 5))
    table.add_row("training tokens/s", f"{metrics['tokens_per_s']:,.0f}")
    table.caption = Text(
        f"{metrics['machine']['device']} · {metrics['wall_seconds']:.0f} s wall · "
        f"export it with `llmtool export {metrics['out']} --out DIR`"
    )
    return table
