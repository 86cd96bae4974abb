"""Scaling past one process: eval tok/s and generate tok/s with 1 and 2 workers, Ray vs in-process.

Per configuration, one warm-up then ``--repeats`` timed runs in turn (round-robin), the median:

* ``process xT``: one process, one ONNX Runtime session with T intra-op threads (the plain
  ``llmtool eval`` / ``llmtool generate --prompt-file --out`` path);
* ``ray N x1``: Ray Data, N actors of one session with 1 thread each, on a local cluster started
  once (``ray.init(num_cpus=N_max)``) before the timings.

Every run is end to end: sessions loaded (the driver's one and the actors' for Ray), the
passes or batches run, the results reduced. The eval runs also check that each Ray record's
perplexity equals the single process's (the reduction is exact). The load average before and
after is recorded: on a shared machine it bounds what the ratios mean.

Usage: python benchmarks/scaling.py --export DIR --out benchmarks/results/scaling.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

PROMPTS = [
    "The history of the city begins",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The main reasons for the French Revolution were",
    "To make bread, you first",
    "In physics, energy is",
    "The best way to learn a language is",
    "Dear hiring manager,",
]


def eval_run(export: Path, data: Path, max_length: int, config: tuple[str, int]) -> dict[str, Any]:
    from llmtool.batch.ray import ray_scorer
    from llmtool.evaluate.perplexity import evaluate_perplexity
    from llmtool.runtime.session import SessionOptions

    kind, n = config
    threads = n if kind == "process" else 1
    options = SessionOptions(intra_op_threads=threads, huge_pages=False)
    score_fn = (
        ray_scorer("local", threads=1, session_options=options, workers=n)
        if kind == "ray"
        else None
    )
    start = time.perf_counter()
    result = evaluate_perplexity(
        export,
        data,
        max_length=max_length,
        stride=max_length,
        provider="cpu",
        session_options=options,
        score_fn=score_fn,
    )
    wall = time.perf_counter() - start
    # result.seconds: the scoring alone (one process: its passes; Ray: actors started as well).
    return {
        "wall_s": wall,
        "scoring_s": result.seconds,
        "tokens": result.tokens,
        "perplexity": result.perplexity,
    }


def generate_run(export: Path, prompts: Path, new: int, config: tuple[str, int]) -> dict[str, Any]:
    from llmtool.batch.generate import BatchJob, generate_file
    from llmtool.batch.ray import ray_generate_runner
    from llmtool.runtime.session import SessionOptions
    from llmtool.runtime.stopping import StopConditions

    kind, n = config
    threads = n if kind == "process" else 1
    job = BatchJob(
        str(export),
        max_new_tokens=new,
        stop=StopConditions(eos=False),
        provider="cpu",
        session_options=SessionOptions(intra_op_threads=threads, huge_pages=False),
        batch_size=2,
    )
    runner = ray_generate_runner("local", threads=1, workers=n)[0] if kind == "ray" else None
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        summary = generate_file(job, prompts, Path(tmp) / "r.jsonl", runner=runner)
        wall = time.perf_counter() - start
    return {"wall_s": wall, "tokens": summary.new_tokens}


def label(config: tuple[str, int]) -> str:
    kind, n = config
    return f"process x{n}" if kind == "process" else f"ray {n} x1"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--export", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=ROOT / "llmtool" / "data" / "sample.txt")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--data-copies", type=int, default=4, help="--data repeated this often")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    import ray
    from cpu_generate import environment

    load_before = os.getloadavg()
    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
    configs = [("process", 1), ("process", args.workers), ("ray", 1), ("ray", args.workers)]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data.txt"
        data.write_text("\n\n".join([args.data.read_text(encoding="utf-8")] * args.data_copies))
        prompts = Path(tmp) / "prompts.jsonl"
        rows = [{"id": i, "prompt": PROMPTS[i % len(PROMPTS)]} for i in range(16)]
        prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tasks = {
            "eval": lambda c: eval_run(args.export, data, args.max_length, c),
            "generate": lambda c: generate_run(args.export, prompts, args.new_tokens, c),
        }
        runs: dict[str, dict[str, list[dict[str, Any]]]] = {t: {} for t in tasks}
        for task, fn in tasks.items():
            for config in configs:  # warm-up: imports, page cache, Ray worker processes
                fn(config)
            for _ in range(args.repeats):
                for config in configs:
                    runs[task].setdefault(label(config), []).append(fn(config))
                    print(task, label(config), runs[task][label(config)][-1], flush=True)
    ray.shutdown()
    results: dict[str, Any] = {}
    for task, by_config in runs.items():
        results[task] = {}
        for name, done in by_config.items():
            results[task][name] = {
                "tokens_per_s": statistics.median(r["tokens"] / r["wall_s"] for r in done),
                "wall_s": statistics.median(r["wall_s"] for r in done),
                "scoring_tokens_per_s": statistics.median(
                    r["tokens"] / r["scoring_s"] for r in done if "scoring_s" in r
                )
                if "scoring_s" in done[0]
                else None,
                "tokens": done[0]["tokens"],
                "runs": done,
            }
        base = results[task]["process x1"]["tokens_per_s"]
        for entry in results[task].values():
            entry["vs_process_x1"] = entry["tokens_per_s"] / base
    ppl = {r["perplexity"] for runs_ in runs["eval"].values() for r in runs_}
    record = {
        "benchmark": "scaling",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "export": str(args.export),
        "max_length": args.max_length,
        "data": f"{args.data} x {args.data_copies}",
        "new_tokens": args.new_tokens,
        "prompts": 16,
        "generate_batch_size": 2,
        "perplexity_values": sorted(ppl),  # one value: Ray equals the single process
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "environment": {**environment(args.workers), "ray": ray.__version__},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(record))
    print(markdown(record))


def markdown(record: dict[str, Any]) -> str:
    env = record["environment"]
    lines = [
        "# Scaling: 1 and 2 workers, Ray Data vs one process",
        "",
        f"`{record['command']}` on {env.get('cpu')} ({env.get('cpu_count')} cores), "
        f"{env['date']}, Ray {env['ray']}, onnxruntime {env.get('onnxruntime-gpu') or env.get('onnxruntime')}. "
        f"Load average before {record['load_average_before'][0]:.1f}, after "
        f"{record['load_average_after'][0]:.1f} (a shared machine: other jobs ran).",
        "",
        "End to end (sessions loaded, work run, results reduced), median of the timed runs.",
        "",
        "| task | configuration | tokens | wall s | tok/s | vs process x1 | scoring tok/s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for task, by_config in record["results"].items():
        for name, r in by_config.items():
            scoring = r.get("scoring_tokens_per_s")
            lines.append(
                f"| {task} | {name} | {r['tokens']} | {r['wall_s']:.2f} | "
                f"{r['tokens_per_s']:.1f} | {r['vs_process_x1']:.2f} | "
                f"{'' if scoring is None else f'{scoring:.1f}'} |"
            )
    lines += [
        "",
        "scoring tok/s: the passes alone (one process: after its session loaded; Ray: from the "
        "dataset's start, actors' sessions loading included).",
    ]
    lines += [
        "",
        f"Eval perplexity in every run: {record['perplexity_values']} (one value: the Ray "
        "reduction is exact).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
