"""CLI start-up: loading an export's tokenizer directly against through AutoTokenizer, and the
wall time of a whole ``llmtool generate``.

Each measurement is a fresh interpreter (start-up is what is measured), in turn, ``--rounds``
times; the median. AutoTokenizer is how llmtool loaded an export's tokenizer before: it reads
the model config through transformers' configuration module, which imports torch.

Usage: python benchmarks/cli_startup.py --export DIR --out benchmarks/results/cli_startup.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LOADERS = {
    "AutoTokenizer": "from transformers import AutoTokenizer\n"
    "tok = AutoTokenizer.from_pretrained({path!r})\n",
    "llmtool.models.loading.load_tokenizer": "from llmtool.models.loading import load_tokenizer, resolve_spec\n"
    "tok = load_tokenizer(resolve_spec({path!r}))\n",
}


def tokenizer_load(code: str) -> dict[str, Any]:
    """Seconds for a fresh interpreter to import and load the tokenizer, and whether torch came."""
    script = (
        "import sys, time\nt = time.perf_counter()\n"
        + code
        + "print(time.perf_counter() - t, 'torch' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout.split()
    return {"seconds": float(out[-2]), "imports_torch": out[-1] == "True"}


def generate_wall(export: Path, new: int, threads: int) -> float:
    """Wall seconds of one ``llmtool generate`` (process start to exit), greedy, EOS ignored."""
    cmd = [sys.executable, "-m", "llmtool", "generate", str(export), "-p", "The capital of"]
    cmd += ["--max-new-tokens", str(new), "--ignore-eos", "--provider", "cpu", "--json"]
    cmd += ["--threads", str(threads)]
    t = time.perf_counter()
    subprocess.run(cmd, capture_output=True, text=True, check=True)
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--export", type=Path, required=True, help="an llmtool export directory")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from cpu_generate import environment

    runs: dict[str, list[Any]] = {name: [] for name in LOADERS}
    runs["llmtool generate"] = []
    for _ in range(args.rounds):
        for name, code in LOADERS.items():
            runs[name].append(tokenizer_load(code.format(path=str(args.export))))
        runs["llmtool generate"].append(generate_wall(args.export, args.new_tokens, args.threads))
    results: dict[str, Any] = {
        name: {
            "seconds": statistics.median(r["seconds"] for r in runs[name]),
            "imports_torch": runs[name][0]["imports_torch"],
            "runs": runs[name],
        }
        for name in LOADERS
    }
    results["llmtool generate"] = {
        "seconds": statistics.median(runs["llmtool generate"]),
        "new_tokens": args.new_tokens,
        "runs": runs["llmtool generate"],
    }
    report: dict[str, Any] = {
        "benchmark": "CLI start-up: tokenizer loading and a whole llmtool generate",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "export": str(args.export),
        "protocol": f"fresh interpreter per measurement, in turn, {args.rounds} rounds; median",
        "environment": environment(args.threads),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    env = report["environment"]
    lines = [
        f"# {report['benchmark']}",
        "",
        f"Export `{args.export.name}`; {report['protocol']}. {env['cpu']}, Python {env['python']}, "
        f"torch {env.get('torch')}, transformers {env.get('transformers')}; {env['date']}.",
        "",
        "| what | seconds | imports torch |",
        "|---|---:|:---:|",
    ]
    for name in LOADERS:
        r = results[name]
        lines.append(f"| tokenizer via {name} | {r['seconds']:.2f} | {r['imports_torch']} |")
    lines.append(
        f"| `llmtool generate`, {args.new_tokens} tokens, whole process "
        f"| {results['llmtool generate']['seconds']:.2f} | |"
    )
    lines += ["", "Produced by:", "", "```bash", report["command"], "```", ""]
    args.out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
