"""A tiny T5 learns to reverse word sequences on CPU: issue 21's training acceptance run.

Generates the synthetic task (3-6 words drawn from a 20-word vocabulary, target = the words in
reverse order), trains ``llmtool train --arch t5 --preset tiny`` on it through the library
(:func:`llmtool.seq2seq.train.train_seq2seq`), exports the result (validated against PyTorch),
and measures exact-match greedy outputs of the *export* (ONNX Runtime) on held-out pairs.
Writes ``benchmarks/results/seq2seq_train_cpu.{json,md}`` with the curve (validation loss and
exact match every 100 steps), wall time, load average and machine.

    python benchmarks/seq2seq_train.py [--arch t5] [--steps 1500]

Acceptance: >= 95% exact match within 10 minutes of training wall time on CPU.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "green",
    "fast",
    "seven",
    "night",
    "table",
    "music",
    "paper",
    "light",
    "water",
    "horse",
    "bread",
    "chair",
    "dream",
    "glass",
    "ocean",
    "tiger",
]
BAR, MAX_WALL_S = 0.95, 600.0


def reversal_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` pairs of 3-6 random words and the same words reversed."""
    rnd = random.Random(seed)
    pairs = []
    for _ in range(n):
        words = [rnd.choice(WORDS) for _ in range(rnd.randint(3, 6))]
        pairs.append((" ".join(words), " ".join(reversed(words))))
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="t5")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--pairs", type=int, default=4000)
    args = parser.parse_args()
    import torch

    from llmtool.export import export_model
    from llmtool.seq2seq.generate import generate_seq2seq
    from llmtool.seq2seq.train import Seq2SeqTrainOptions, train_seq2seq

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "reverse.tsv"
        data.write_text("".join(f"{s}\t{t}\n" for s, t in reversal_pairs(args.pairs, 0)))
        start = time.perf_counter()
        metrics = train_seq2seq(
            data,
            Path(tmp) / "model",
            Seq2SeqTrainOptions(arch=args.arch, steps=args.steps),
            device="cpu",
            on_stage=lambda s: print(s, flush=True),
        )
        train_wall = time.perf_counter() - start
        export_model(Path(tmp) / "model", Path(tmp) / "onnx")
        test = reversal_pairs(200, 1)
        outputs = generate_seq2seq(
            Path(tmp) / "onnx", [s for s, _ in test], max_new_tokens=24, provider="cpu"
        ).outputs
        onnx_em = sum(o.text.strip() == t for o, (_, t) in zip(outputs, test, strict=False)) / len(
            test
        )
    record = {
        "benchmark": "seq2seq_train",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "arch": args.arch,
        "task": "reverse 3-6 words from a 20-word vocabulary",
        "train_pairs": metrics["pairs"],
        "parameters": metrics["parameters"],
        "steps": metrics["steps"],
        "train_wall_s": train_wall,
        "train_seconds": metrics["train_seconds"],
        "exact_match_pytorch_val": metrics["exact_match"],
        "exact_match_onnx_fresh_200": onnx_em,
        "passed": onnx_em >= BAR and train_wall <= MAX_WALL_S,
        "curve": metrics["curve"],
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        },
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "seq2seq_train_cpu.json").write_text(json.dumps(record, indent=2) + "\n")
    rows = "\n".join(
        f"| {c['step']} | {c['val_loss']:.4f} | {100 * c['exact_match']:.0f}% | "
        f"{c['train_seconds']:.0f} |"
        for c in metrics["curve"]
    )
    (RESULTS / "seq2seq_train_cpu.md").write_text(
        f"# Tiny {args.arch} learns word reversal on CPU\n\n"
        f"{metrics['parameters']:,} parameters, {metrics['steps']} steps, training wall "
        f"{train_wall:.0f} s (bar: {MAX_WALL_S:.0f} s); exact match of the ONNX export's greedy "
        f"outputs on 200 fresh pairs: **{100 * onnx_em:.1f}%** (bar: {100 * BAR:.0f}%); load "
        f"average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after, on "
        f"{os.cpu_count()} CPUs shared with other work.\n\n"
        "| step | val loss (nats/token) | exact match (50 val pairs) | train s |\n"
        "|---:|---:|---:|---:|\n" + rows + "\n"
    )
    print(
        json.dumps({k: record[k] for k in ("passed", "train_wall_s", "exact_match_onnx_fresh_200")})
    )


if __name__ == "__main__":
    main()
