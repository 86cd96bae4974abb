"""Transformer vs LSTM vs RNN: ``llmtool train --preset tiny`` on one corpus, same step budget.

Trains each architecture with the tiny preset on CPU, exports it (``llmtool export``, with its
validation against PyTorch), generates a short sample from the export, and writes
``benchmarks/results/train_cpu.json`` (curves, perplexities, throughput, wall time, machine) and
``benchmarks/results/train_cpu.md`` (one table).

    python benchmarks/train_compare.py                       # llama, lstm, rnn, gpt2
    python benchmarks/train_compare.py --archs llama,lstm --steps 300

The acceptance check of issue 3: final validation perplexity at most 0.25 x the step-0 value,
within 10 minutes of wall time, for ``llama`` and ``lstm``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
RESULTS = ROOT / "benchmarks" / "results"
PROMPT = "ROMEO:\nBut soft, what light"
MAX_RATIO = 0.25
MAX_WALL_S = 600.0
GATED = ("llama", "lstm")


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def run_arch(arch: str, data: Path, work: Path, steps: int | None) -> dict[str, Any]:
    from llmtool.export import export_model
    from llmtool.generate import generate

    out = work / arch
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    last = [start]

    def on_step(p: Any) -> None:
        if p.evaluated:
            now = time.perf_counter()
            print(
                f"  {arch} step {p.step}/{p.steps} loss {p.loss:.3f} val ppl {p.val_perplexity:.1f} "
                f"{p.tokens_per_s:,.0f} tok/s ({now - last[0]:.0f} s)",
                flush=True,
            )
            last[0] = now

    from llmtool.train import TrainOptions, train_model

    options = TrainOptions(arch=arch, preset="tiny", steps=steps)
    result = train_model(data, out, options, device="cpu", force=True, on_step=on_step)
    wall = time.perf_counter() - start
    m = result.metrics
    exported = export_model(out, work / f"{arch}-onnx", force=True)
    v = exported.validation
    sample = generate(work / f"{arch}-onnx", [PROMPT], max_new_tokens=40, provider="cpu")
    ratio = result.final_val_perplexity / result.initial_val_perplexity
    return {
        "arch": arch,
        "parameters": m["parameters"],
        "steps": result.steps,
        "options": m["options"],
        "tokens": m["tokens"],
        "train_tokens_seen": m["train_tokens_seen"],
        "initial_val_perplexity": result.initial_val_perplexity,
        "final_val_perplexity": result.final_val_perplexity,
        "ratio": ratio,
        "tokens_per_s": result.tokens_per_s,
        "train_seconds": m["train_seconds"],
        "wall_seconds": wall,
        "passes": ratio <= MAX_RATIO and wall <= MAX_WALL_S,
        # 1-minute load average: above the core count, other processes shared the CPU.
        "load_average": {"before": load_before, "after": os.getloadavg()[0]},
        "curve": [
            {
                "step": p["step"],
                "train_loss": p["train_loss"],
                "val_loss": p["val_loss"],
                "val_perplexity": p["val_perplexity"],
                "elapsed_train_s": p["train_seconds"],
            }
            for p in m["curve"]
        ],
        "train_losses": m["train_losses"],
        "export": {
            "passed": v["passed"],
            "prefill_max_abs_diff": v["prefill_max_abs_diff"],
            "decode_max_abs_diff": v["decode_max_abs_diff"],
            "greedy_match": v["greedy_match"],
        },
        "sample": {"prompt": PROMPT, "greedy": sample.outputs[0].text},
    }


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    rows = [
        "| arch | parameters | steps | tokens seen | val ppl @0 | val ppl final | final / initial "
        "| train tok/s | wall | export validated |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for r in report["results"]:
        rows.append(
            f"| {r['arch']} | {r['parameters']:,} | {r['steps']} | {r['train_tokens_seen']:,} "
            f"| {r['initial_val_perplexity']:,.0f} | {r['final_val_perplexity']:.1f} "
            f"| {r['ratio']:.3f} | {r['tokens_per_s']:,.0f} | {r['wall_seconds'] / 60:.1f} min "
            f"| {'yes' if r['export']['passed'] else 'NO'} |"
        )
    first = report["results"][0]["options"]
    lines = [
        "# `llmtool train --preset tiny` on CPU: Transformer vs LSTM vs RNN",
        "",
        f"Data: `{report['data']['path']}` ({report['data']['bytes']:,} bytes), byte-level BPE "
        f"of {first['vocab_size']:,} tokens trained on the first {1 - first['val_fraction']:.0%} "
        f"of the text; validation = the last "
        f"{first['val_fraction']:.0%} of the tokens ({report['results'][0]['tokens']['val']:,}). "
        f"Same step budget for every arch: {first['steps']} steps of {first['batch_size']} x "
        f"{first['seq_len']} tokens, AdamW, warmup + cosine, seed {first['seed']}.",
        "",
        *rows,
        "",
        f"Wall time includes tokenizer training, every validation and checkpoint. Gate: final / "
        f"initial <= {MAX_RATIO} within {MAX_WALL_S / 60:.0f} min for {' and '.join(GATED)}: "
        f"**{'passed' if report['passed'] else 'FAILED'}**. Curves (step, train loss, val "
        f"perplexity) are in `train_cpu.json`.",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} "
        f"({m['torch_threads']} threads), Python {m['python']}; run {report['date']}.",
        "",
    ]
    busy = [
        f"{r['arch']} (1-minute load average up to {max(r['load_average'].values()):.1f})"
        for r in report["results"]
        if max(r["load_average"].values()) > m["cores"] + 0.5
    ]
    if busy:
        lines += [
            "Other processes shared the CPU while training "
            + ", ".join(busy)
            + ": their throughput and wall time are understated.",
            "",
        ]
    steps = f" --steps {first['steps']}"
    lines += [
        "Produced by:",
        "",
        "```bash",
        report["command"],
        "```",
        "",
        "Each row is the same as (then `llmtool export`, whose validation is the last column):",
        "",
        "```bash",
        f"llmtool train --data {report['data']['path']} --out DIR --arch ARCH --preset tiny"
        f"{steps} --device cpu",
        "```",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--archs", default="llama,lstm,rnn,gpt2")
    parser.add_argument("--steps", type=int, default=None, help="default: the tiny preset's")
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "bench-train")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not args.data.is_file():
        print(f"{args.data} does not exist", file=sys.stderr)
        return 2
    report: dict[str, Any] = {
        "command": shlex.join(["python", "benchmarks/train_compare.py", *sys.argv[1:]]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "data": {"path": os.path.relpath(args.data, ROOT), "bytes": args.data.stat().st_size},
        "gate": {"max_ratio": MAX_RATIO, "max_wall_seconds": MAX_WALL_S, "archs": list(GATED)},
        "results": [],
    }
    for arch in args.archs.split(","):
        print(f"Training {arch}", flush=True)
        r = run_arch(arch, args.data, args.work, args.steps)
        print(
            f"{arch}: val ppl {r['initial_val_perplexity']:.0f} -> {r['final_val_perplexity']:.1f} "
            f"(x{r['ratio']:.3f}) in {r['wall_seconds']:.0f} s, {r['tokens_per_s']:,.0f} tok/s",
            flush=True,
        )
        report["results"].append(r)
    report["passed"] = all(r["passes"] for r in report["results"] if r["arch"] in GATED)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "train_cpu.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.results / "train_cpu.md").write_text(markdown(report))
    shutil.rmtree(args.work, ignore_errors=True)
    print(markdown(report))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
