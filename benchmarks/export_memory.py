"""Export memory: peak RSS of ``llmtool export`` against the model's fp32 weight bytes, with
Optimum's ``optimum-cli export onnx`` of the same model side by side.

Each export is a fresh process started by a small wrapper that reports its children's peak
resident set (``getrusage(RUSAGE_CHILDREN).ru_maxrss``, which covers every process the export
starts); the same is measured for an interpreter that only imports the libraries, so the
libraries' share of the peak is known. Runs alternate between the tools, ``--rounds`` times; the
median. Optimum runs in its own virtual environment (it pins an older transformers), from a
Hugging Face directory made from the same weights.

Usage:
  python benchmarks/export_memory.py --model smollm2 --optimum-python /work/venv-optimum-fam/bin/python \
      --out benchmarks/results/export_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WRAPPER = (
    "import json, resource, subprocess, sys, time\n"
    "t = time.perf_counter()\n"
    "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE).returncode\n"
    "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024\n"
    "print(json.dumps({'rc': rc, 'peak_rss': peak, 'seconds': time.perf_counter() - t}))\n"
)
IMPORTS = {
    "llmtool": "import torch, transformers, onnx, onnxruntime, llmtool.export.pipeline",
    "optimum": "import torch, transformers, onnx, onnxruntime, optimum.exporters.onnx",
}


def peak_rss(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Peak RSS (bytes) and wall seconds of ``cmd`` run to completion in a fresh process."""
    out = subprocess.run(
        [sys.executable, "-c", WRAPPER, *cmd], capture_output=True, text=True, env=env, check=True
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    if result["rc"] != 0:
        raise SystemExit(f"{cmd[:4]} failed (exit {result['rc']})")
    return result


def hf_copy(model: str, dest: Path) -> int:
    """Save the model llmtool loads for ``model`` as an fp32 Hugging Face directory (Optimum's
    input); returns its fp32 weight bytes."""
    from transformers import AutoModelForCausalLM

    from llmtool.models.loading import load_model, resolve_spec

    loaded = load_model(resolve_spec(model))
    # A GGUF-loaded model refuses save_pretrained (it counts as quantized): copy its de-quantized
    # weights into a plain model of the same config.
    config = loaded.model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(loaded.model.state_dict())
    plain.save_pretrained(dest)
    loaded.tokenizer.save_pretrained(dest)
    return sum(p.numel() * 4 for p in plain.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--optimum-python", help="python of a venv with optimum-onnx installed")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="export-memory-"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        hf = work / "hf"
        weight_bytes = hf_copy(args.model, hf)
        tools: dict[str, tuple[list[str], dict[str, str] | None, str]] = {
            "llmtool": (
                [sys.executable, "-m", "llmtool", "export", args.model, "--out"],
                env,
                sys.executable,
            )
        }
        if args.optimum_python:
            cli = str(Path(args.optimum_python).parent / "optimum-cli")
            opt = [cli, "export", "onnx", "--model", str(hf), "--task", "text-generation-with-past"]
            tools["optimum"] = (opt, None, args.optimum_python)
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in tools}
        for r in range(args.rounds):
            for name, (cmd, tool_env, _) in tools.items():
                out = work / f"{name}-{r}"
                runs[name].append(peak_rss([*cmd, str(out)], tool_env))
                shutil.rmtree(out, ignore_errors=True)
                print(name, r, runs[name][-1], flush=True)
        rows = {}
        for name, (_, tool_env, python) in tools.items():
            base = peak_rss([python, "-c", IMPORTS[name]], tool_env)["peak_rss"]
            peak = statistics.median(x["peak_rss"] for x in runs[name])
            rows[name] = {
                "peak_rss_bytes": peak,
                "peak_over_fp32_weights": peak / weight_bytes,
                "imports_only_rss_bytes": base,
                "peak_minus_imports_over_fp32_weights": (peak - base) / weight_bytes,
                "seconds": statistics.median(x["seconds"] for x in runs[name]),
                "runs": runs[name],
            }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    import torch
    import transformers

    record = {
        "benchmark": "export_memory",
        "model": args.model,
        "fp32_weight_bytes": weight_bytes,
        "rounds": args.rounds,
        "tools": rows,
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "load_average": os.getloadavg(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(render(record, args))
    print(args.out.with_suffix(".md").read_text())


def render(record: dict[str, Any], args: argparse.Namespace) -> str:
    gib = 1024**3
    m = record["machine"]
    lines = [
        "# Export memory: peak RSS of an export against the fp32 weight bytes",
        "",
        f"Model `{record['model']}`, fp32 weights {record['fp32_weight_bytes'] / gib:.3f} GiB; "
        f"median of {record['rounds']} rounds, tools in turn; {m['cores']} cores, load average "
        f"{', '.join(f'{x:.2f}' for x in m['load_average'])} at the end; torch {m['torch']}, "
        f"transformers {m['transformers']} (llmtool's venv); {record['date']}.",
        "",
        "| tool | peak RSS GiB | × fp32 weights | imports alone GiB | (peak − imports) × weights | seconds |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, row in record["tools"].items():
        lines.append(
            f"| {name} | {row['peak_rss_bytes'] / gib:.2f} | {row['peak_over_fp32_weights']:.2f} | "
            f"{row['imports_only_rss_bytes'] / gib:.2f} | "
            f"{row['peak_minus_imports_over_fp32_weights']:.2f} | {row['seconds']:.1f} |"
        )
    cmd = " ".join(sys.argv[1:])
    lines += [
        "",
        "Produced by:",
        "",
        "```bash",
        f"python benchmarks/export_memory.py {cmd}",
        "```",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
