"""Export memory: peak RSS of ``llmtool export`` against the model's fp32 weight bytes, with
Optimum's ``optimum-cli export onnx`` of the same model side by side.

Each export is a fresh process started by a small wrapper that reports its children's peak
resident set (``getrusage(RUSAGE_CHILDREN).ru_maxrss``, which covers every process the export
starts); the same is measured for an interpreter that only imports the libraries, so the
libraries' share of the peak is known. Runs alternate between the tools, ``--rounds`` times; the
median. Optimum runs in its own virtual environment (it pins an older transformers), from a
Hugging Face directory made from the same weights.

With ``--tinyllama DIR`` the model is a ~1.1B-parameter Llama in TinyLlama-1.1B's shape (hidden
2048, 22 layers, 32 heads, 4 kv heads, intermediate 5632, vocab 32000), seeded random weights
saved as bf16 safetensors (1 GB shards) with a LlamaConfig in ``DIR`` (under /tmp, never in the
repository); both tools export that directory. Every tool's process tree is sampled
(VmRSS every 20 ms) as well, and stopped once it passes ``--cap-gib`` (recorded as stopped).

Usage:
  python benchmarks/export_memory.py --model smollm2 --optimum-python /tmp/venv-optimum/bin/python \
      --out benchmarks/results/export_memory.json
  python benchmarks/export_memory.py --tinyllama /tmp/tinyllama-bf16 --rounds 1 \
      --optimum-python /tmp/venv-optimum/bin/python --out benchmarks/results/export_memory_1b.json
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


GIB = 1024**3
TINYLLAMA = {
    "hidden_size": 2048,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "intermediate_size": 5632,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
}


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and its descendants (VmRSS from /proc)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total


def peak_rss(
    cmd: list[str], env: dict[str, str] | None = None, cap: float = float("inf")
) -> dict[str, Any]:
    """Peak RSS (bytes) and wall seconds of ``cmd`` run to completion in a fresh process: the
    wrapper's ru_maxrss of its children and the sampled VmRSS of the process tree; the tree is
    killed once its RSS passes ``cap`` bytes (``stopped`` in the result)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", WRAPPER, *cmd],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    sampled, stopped = 0, False
    while proc.poll() is None:
        sampled = max(sampled, tree_rss(proc.pid))
        if sampled > cap:
            os.killpg(proc.pid, 9)  # the wrapper's session: the export and all it started
            stopped = True
            break
        time.sleep(0.02)
    out = proc.communicate()[0] if not stopped else ""
    proc.wait()
    if stopped:
        return {"rc": None, "stopped": True, "peak_rss": sampled, "sampled_peak_rss": sampled}
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    result["sampled_peak_rss"] = sampled
    if result["rc"] != 0:
        raise SystemExit(f"{cmd[:4]} failed (exit {result['rc']})")
    return result


def make_tinyllama(dest: Path, seed: int = 0) -> int:
    """Save a random Llama in TinyLlama-1.1B's shape to ``dest`` as bf16 safetensors (with a
    small BPE tokenizer); returns its fp32 weight bytes. Kept when it is already there."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**TINYLLAMA)
    if not (dest / "config.json").exists():
        from llmtool.train.tokenizer import train_bpe_tokenizer

        torch.manual_seed(seed)
        # The default init (normal, std 0.02; unit norms) keeps activations in range.
        model = LlamaForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(dest, max_shard_size="1GB")
        del model
        text = (ROOT / "llmtool" / "data" / "sample.txt").read_text(encoding="utf-8")
        train_bpe_tokenizer([text], vocab_size=512).save_pretrained(dest)
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * h // config.num_attention_heads
    per_layer = h * (h + 2 * kv) + h * h + 3 * h * i + 2 * h
    return 4 * (layers * per_layer + 2 * config.vocab_size * h + h)


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
    parser.add_argument("--tinyllama", type=Path, help="make / reuse the 1.1B bf16 model here")
    parser.add_argument("--cap-gib", type=float, default=16.0, help="stop a tool above this RSS")
    parser.add_argument("--tools", default="llmtool,optimum")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="export-memory-"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cap = args.cap_gib * GIB
    try:
        if args.tinyllama:
            hf, args.model = args.tinyllama, str(args.tinyllama)
            weight_bytes = make_tinyllama(hf)
        else:
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
        tools = {k: v for k, v in tools.items() if k in args.tools.split(",")}
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in tools}
        for r in range(args.rounds):
            for name, (cmd, tool_env, _) in tools.items():
                out = work / f"{name}-{r}"
                runs[name].append(peak_rss([*cmd, str(out)], tool_env, cap))
                shutil.rmtree(out, ignore_errors=True)
                print(name, r, runs[name][-1], flush=True)
        rows = {}
        for name, (_, tool_env, python) in tools.items():
            base = peak_rss([python, "-c", IMPORTS[name]], tool_env)["peak_rss"]
            peak = statistics.median(x["peak_rss"] for x in runs[name])
            rows[name] = {
                "stopped_above_cap": any(x.get("stopped") for x in runs[name]),
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
        "cap_bytes": cap,
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
        if row.get("stopped_above_cap"):
            cap = record["cap_bytes"] / gib
            lines.append(
                f"| {name} | stopped above {cap:.0f} GiB | > {cap * gib / record['fp32_weight_bytes']:.2f} | "
                f"{row['imports_only_rss_bytes'] / gib:.2f} | | |"
            )
            continue
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
