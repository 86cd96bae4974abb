"""Huge pages for CPU weights, A/B: llmtool's fp32 fused SmolLM2 and transformers, with and without.

Three ways to place the weights (see llmtool/hugepages.py): ``malloc`` (started with
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``, as ``llmtool generate`` and ``eval`` start
themselves), ``collapse`` (``MADV_COLLAPSE`` after loading, the library's way inside someone
else's process) and ``off`` (4 KB pages). Each measurement is a fresh process (in one long-lived
process, memory freed by one engine and reused by the next may already sit on huge pages, which
blurs an A/B), and the configurations alternate round by round. A child loads its engine,
generates ``--new-tokens`` greedy tokens after one warm-up, and prints its decode tok/s and its
load time (collapsing included).

Usage: python benchmarks/cpu_huge_pages.py --out benchmarks/results/cpu_huge_pages.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = "The three most important things to know about photosynthesis are"
CONFIGS = [
    ("llmtool-fp32-fused", "malloc"),
    ("llmtool-fp32-fused", "collapse"),
    ("llmtool-fp32-fused", "off"),
    ("transformers", "malloc"),
    ("transformers", "collapse"),
    ("transformers", "off"),
]
MODES = {
    "malloc": "huge pages, glibc malloc",
    "collapse": "huge pages, MADV_COLLAPSE",
    "off": "4 KB pages",
}


def child(engine: str, huge_pages: bool, export: Path, new: int, threads: int) -> dict[str, Any]:
    """One measurement in this process (run by the parent as a subprocess)."""
    start = time.perf_counter()
    if engine == "transformers":
        from cpu_generate import transformers_runner

        from llmtool.hugepages import huge_pages_for

        with huge_pages_for(huge_pages) as moved:
            run = transformers_runner(new, threads)  # loads the model
        load_s = time.perf_counter() - start
        run(PROMPT)  # warm-up
        timed = run(PROMPT)
        tok_s = timed["tokens"] / timed["decode_s"]
        return {"decode_tokens_per_s": tok_s, "load_s": load_s, "huge_pages": moved.to_dict()}
    from llmtool.generate import generate
    from llmtool.runtime import OnnxCausalLM, SessionOptions

    options = SessionOptions(intra_op_threads=threads, huge_pages=huge_pages)
    onnx = OnnxCausalLM(export, "cpu", options=options)
    load_s = time.perf_counter() - start
    generate(onnx, [PROMPT], max_new_tokens=new, stop_at_eos=False)  # warm-up
    result = generate(onnx, [PROMPT], max_new_tokens=new, stop_at_eos=False)
    return {
        "decode_tokens_per_s": result.timing.decode_tokens_per_s,
        "load_s": load_s,
        "huge_pages": onnx.huge_pages.to_dict(),
    }


def markdown(report: dict[str, Any]) -> str:
    """The results as a Markdown page (written next to the JSON)."""
    env = report["environment"]
    versions = ", ".join(
        f"{k} {env[k]}"
        for k in ("torch", "transformers", "onnxruntime-gpu", "onnxruntime")
        if k in env
    )
    lines = [
        f"# {report['benchmark']}",
        "",
        f"{report['protocol']}. {env['cpu']}, {env['threads']} threads, kernel {env['kernel']}, "
        f"THP mode `{env['thp_mode']}`; Python {env['python']}, {versions}; {env['date']}.",
        "",
        "| engine | weights | decode tok/s | vs 4 KB pages | load s | collapsed MB |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, r in report["results"].items():
        engine, mode = name.rsplit(" ", 1)
        lines.append(
            f"| {engine} | {MODES[mode]} | {r['decode_tokens_per_s']:.1f} | {r['vs_off']:.3f}x "
            f"| {r['load_s']:.2f} | {r['collapsed_mb']:.0f} |"
        )
    lines += ["", "Produced by:", "", "```bash", report["command"], "```", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--export", type=Path, help="a fused fp32 export of smollm2 (else made)")
    parser.add_argument(
        "--child", nargs=2, metavar=("ENGINE", "HUGE_PAGES"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.child:
        engine, huge = args.child[0], args.child[1] == "1"
        print(json.dumps(child(engine, huge, args.export, args.new_tokens, args.threads)))
        return
    if args.out is None:
        parser.error("--out is required")

    from cpu_generate import environment

    from llmtool.hugepages import malloc_env

    plain_env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    envs = {"malloc": malloc_env(plain_env), "collapse": plain_env, "off": plain_env}
    if envs["malloc"] is None:
        parser.error("glibc's malloc cannot ask for huge pages here (see llmtool/hugepages.py)")

    export = args.export
    if export is None:
        from llmtool.export import export_model

        export = Path(tempfile.mkdtemp(prefix="llmtool-hp-")) / "fp32-fused"
        export_model("smollm2", export, fused=True)
    runs: dict[str, list[dict[str, Any]]] = {}
    for round_ in range(args.rounds):
        for engine, mode in CONFIGS:
            name = f"{engine} {mode}"
            cmd = [sys.executable, __file__, "--export", str(export), "--child", engine]
            cmd += ["0" if mode == "off" else "1", "--new-tokens", str(args.new_tokens)]
            cmd += ["--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True, env=envs[mode])
            runs.setdefault(name, []).append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"round {round_ + 1}: {name}: {runs[name][-1]}", flush=True)
    results = {
        name: {
            "decode_tokens_per_s": statistics.median(r["decode_tokens_per_s"] for r in rs),
            "load_s": statistics.median(r["load_s"] for r in rs),
            "collapsed_mb": statistics.median(r["huge_pages"]["collapsed_mb"] for r in rs),
            "collapse_s": statistics.median(r["huge_pages"]["seconds"] for r in rs),
            "runs": rs,
        }
        for name, rs in runs.items()
    }
    for engine, mode in CONFIGS:
        off = results[f"{engine} off"]["decode_tokens_per_s"]
        results[f"{engine} {mode}"]["vs_off"] = (
            results[f"{engine} {mode}"]["decode_tokens_per_s"] / off
        )
    report: dict[str, Any] = {
        "benchmark": "huge pages for CPU weights, SmolLM2-135M-Instruct fp32, batch 1, greedy",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "protocol": f"{args.rounds} rounds; each configuration a fresh process per round, in "
        f"turn; {args.new_tokens} new tokens after one warm-up generation; median",
        "environment": {
            **environment(args.threads),
            "glibc_tunables": "per configuration (see protocol)",
            "kernel": platform.release(),
            "thp_mode": Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip(),
        },
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report))
    for name, r in results.items():
        print(
            f"{name}: {r['decode_tokens_per_s']:.1f} tok/s ({r['vs_off']:.3f}x off), load "
            f"{r['load_s']:.2f} s ({r['collapsed_mb']:.0f} MB collapsed in {r['collapse_s']:.2f} s)"
        )


if __name__ == "__main__":
    main()
