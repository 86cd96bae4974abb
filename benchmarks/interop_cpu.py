"""SmolLM2-135M through llmtool, Optimum and onnxruntime-genai on the CPU, in one script.

Protocol (issue 16): the same SmolLM2-135M-Instruct weights (``smollm2``, saved once as a
Hugging Face directory), batch 1, greedy, ``--new-tokens`` new tokens (EOS ignored where the
engine allows; genai stops at EOS and its tokens are counted), the same prompts as token ids for
every engine, one warm-up, then ``--repeats`` rounds; medians. Each engine runs in its own
process, one after another (the load average before and after is recorded: on a shared machine
the figures move with other load).

Engines (decode tok/s, prefill ms):

* llmtool's fused fp32 and fused int4 exports, through ``llmtool.generate``;
* Optimum's ORTModelForCausalLM on its own ``optimum-cli export onnx`` export;
* onnxruntime-genai on llmtool's fused fp32 and int4 exports (their genai_config.json), and on
  its own model-builder exports (fp32, int4) of the same directory.

Exports (wall time and peak RSS of the exporting process, from ``getrusage`` of a child):
``llmtool export`` (validation included) vs ``optimum-cli export onnx`` vs genai's builder.

The peers live in other venvs (``--peer-python``: transformers 4.57, optimum-onnx,
onnxruntime-genai; ``--builder-python``: onnxruntime-genai with transformers 5, for its builder),
as ``nox -s interop`` builds them.

Usage: python benchmarks/interop_cpu.py --out benchmarks/results/interop_cpu.json \\
    --peer-python .nox/interop-peers/bin/python --builder-python .nox/interop-builder/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = [
    "The capital of France is",
    "Write a short story about a lighthouse keeper who",
    "def fibonacci(n):",
]
# Runs a command and prints its wall time and the peak RSS of the child (KiB on Linux).
MEASURE = (
    "import resource, subprocess, sys, time; t = time.perf_counter(); "
    "rc = subprocess.run(sys.argv[1:]).returncode; "
    "print('MEASURE', rc, time.perf_counter() - t, "
    "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def measured(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Wall seconds and peak RSS (GB) of ``cmd``, run as a child of a fresh python."""
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE, *cmd],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )
    line = next(x for x in proc.stdout.splitlines() if x.startswith("MEASURE"))
    _, rc, seconds, rss = line.split()
    if int(rc) != 0:
        raise RuntimeError(f"{cmd[:3]} failed: {proc.stderr[-2000:]}")
    return {"seconds": round(float(seconds), 1), "peak_rss_gb": round(int(rss) / 2**20, 2)}


def summarize(runs: list[dict[str, float]]) -> dict[str, Any]:
    return {
        "decode_tokens_per_s": round(
            statistics.median(r["tokens"] / r["decode_s"] for r in runs if r["tokens"]), 1
        ),
        "prefill_ms": round(statistics.median(r["ttft_s"] for r in runs) * 1e3, 1),
        "runs": len(runs),
    }


def llmtool_runs(path: Path, request: dict[str, Any]) -> list[dict[str, float]]:
    from llmtool.generate import generate
    from llmtool.runtime import OnnxCausalLM, SessionOptions

    model = OnnxCausalLM(path, "cpu", options=SessionOptions(intra_op_threads=request["threads"]))
    new = request["new_tokens"]
    for ids in request["prompts"][: request["warmup"]]:
        generate(model, [ids], max_new_tokens=new, stop_at_eos=False)
    runs = []
    for _ in range(request["repeats"]):
        for ids in request["prompts"]:
            r = generate(model, [ids], max_new_tokens=new, stop_at_eos=False)
            runs.append(
                {
                    "ttft_s": r.timing.prefill_s,
                    "decode_s": r.timing.decode_s,
                    "tokens": r.timing.decode_tokens,
                }
            )
    return runs


def peer_runs(python: str, engine: str, path: Path, request_path: Path) -> list[dict[str, float]]:
    script = ROOT / "benchmarks" / "interop_peer_bench.py"
    proc = subprocess.run(
        [python, str(script), engine, str(path), str(request_path)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{engine} on {path.name} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["runs"]


def save_hf_dir(hf: Path) -> None:
    """The GGUF's weights (dequantized, as every engine here gets them) as a Hugging Face dir.

    transformers refuses ``save_pretrained`` on a GGUF-loaded model, so the state dict is written
    with safetensors (the tied LM head once) and the config without its GGUF marker.
    """
    from safetensors.torch import save_file

    from llmtool.export.interop import portable_metadata
    from llmtool.models.loading import load_model

    loaded = load_model("smollm2")
    hf.mkdir(parents=True)
    state = {k: v.detach().contiguous() for k, v in loaded.model.state_dict().items()}
    if getattr(loaded.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, str(hf / "model.safetensors"), metadata={"format": "pt"})
    config = {k: v for k, v in loaded.config.to_dict().items() if v is not None}
    config.pop("quantization_config", None)
    config["architectures"] = [type(loaded.model).__name__]  # genai's builder dispatches on it
    (hf / "config.json").write_text(json.dumps(config, indent=2))
    loaded.tokenizer.save_pretrained(hf)
    loaded.generation_config.save_pretrained(hf)
    # Optimum's transformers 4.57 would read rope_theta 10000 from transformers 5's files.
    portable_metadata(hf)


def exports(work: Path, args: argparse.Namespace) -> tuple[dict[str, Path], dict[str, Any]]:
    """Every export of the same weights, with the exporters' time and peak RSS."""
    hf = work / "smollm2-hf"
    if not hf.is_dir():
        save_hf_dir(hf)
    llmtool = [sys.executable, "-m", "llmtool", "export", str(hf), "--fused"]
    builder = [args.builder_python, "-m", "onnxruntime_genai.models.builder", "-i", str(hf)]
    builder_tail = ["-e", "cpu", "-c", str(work / "hf-cache")]
    jobs = {
        "llmtool-fused-fp32": [*llmtool, "--out", str(work / "llmtool-fp32")],
        "llmtool-fused-int4": [*llmtool, "--quantize", "int4", "--out", str(work / "llmtool-int4")],
        "optimum-cli": [
            str(Path(args.peer_python).parent / "optimum-cli"),
            "export",
            "onnx",
            "--model",
            str(hf),
            "--task",
            "text-generation-with-past",
            str(work / "optimum"),
        ],
        "genai-builder-fp32": [
            *builder,
            "-o",
            str(work / "genai-fp32"),
            "-p",
            "fp32",
            *builder_tail,
        ],
        "genai-builder-int4": [
            *builder,
            "-o",
            str(work / "genai-int4"),
            "-p",
            "int4",
            *builder_tail,
        ],
    }
    # Figures of exports already made in --work are kept (a rerun resumes where one failed).
    done = work / "export_figures.json"
    figures = json.loads(done.read_text()) if done.is_file() else {}
    for name, cmd in jobs.items():
        if name in figures:
            continue
        log(f"export {name}")
        figures[name] = measured(cmd, {"HF_HUB_OFFLINE": "1"})
        log(f"  {figures[name]}")
        done.write_text(json.dumps(figures))
    dirs = {
        name: work / d
        for name, d in (
            ("llmtool-fp32", "llmtool-fp32"),
            ("llmtool-int4", "llmtool-int4"),
            ("optimum", "optimum"),
            ("genai-fp32", "genai-fp32"),
            ("genai-int4", "genai-int4"),
        )
    }
    return dirs, figures


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [
        "# SmolLM2-135M on the CPU: llmtool, Optimum, onnxruntime-genai",
        "",
        f"{env['date']} · {env['cpu']} · {env['cpu_count']} cores · {env['threads']} threads · "
        f"load average {env['load_before']} before, {env['load_after']} after (shared machine)",
        f"· batch 1, greedy, {report['new_tokens']} new tokens, {len(PROMPTS)} prompts x "
        f"{report['repeats']} repeats, medians; one process per engine.",
        "",
        "| engine | model | decode tok/s | prefill ms |",
        "|---|---|---:|---:|",
    ]
    for row in report["decode"]:
        lines.append(
            f"| {row['engine']} | {row['model']} | {row['decode_tokens_per_s']} | "
            f"{row['prefill_ms']} |"
        )
    lines += ["", "| export | seconds | peak RSS GB |", "|---|---:|---:|"]
    for name, f in report["exports"].items():
        lines.append(f"| {name} | {f['seconds']} | {f['peak_rss_gb']} |")
    lines += ["", "llmtool's export time includes its validation against PyTorch (and, for int4,"]
    lines += ["the fidelity check); Optimum's and genai's do not validate.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--peer-python", required=True)
    parser.add_argument("--builder-python", required=True)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--work", type=Path, help="keep exports here (default: a temporary dir)")
    args = parser.parse_args()
    from llmtool.hardware import cpu_name
    from llmtool.models.loading import ModelSpec, load_tokenizer

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="interop-bench-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        dirs, export_figures = exports(work, args)
        tok = load_tokenizer(ModelSpec("hf_dir", dirs["llmtool-fp32"], None, "llmtool-fp32"))
        request = {
            "prompts": [tok(p)["input_ids"] for p in PROMPTS],
            "new_tokens": args.new_tokens,
            "warmup": 1,
            "repeats": args.repeats,
            "threads": args.threads,
        }
        request_path = work / "request.json"
        request_path.write_text(json.dumps(request))
        plan = [
            ("llmtool", "llmtool-fp32", "llmtool fused fp32"),
            ("llmtool", "llmtool-int4", "llmtool fused int4"),
            ("optimum", "optimum", "optimum-cli export (fp32)"),
            ("genai", "llmtool-fp32", "llmtool fused fp32"),
            ("genai", "llmtool-int4", "llmtool fused int4"),
            ("genai", "genai-fp32", "genai builder fp32"),
            ("genai", "genai-int4", "genai builder int4"),
        ]
        decode = []
        for engine, key, label in plan:
            log(f"decode {engine} on {label}")
            if engine == "llmtool":
                runs = llmtool_runs(dirs[key], request)
            else:
                runs = peer_runs(args.peer_python, engine, dirs[key], request_path)
            decode.append({"engine": engine, "model": label, **summarize(runs)})
            log(f"  {decode[-1]}")
    report = {
        "benchmark": "interop_cpu",
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "environment": {
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "cpu": cpu_name(),
            "cpu_count": os.cpu_count(),
            "threads": args.threads,
            "load_before": round(load_before, 2),
            "load_after": round(os.getloadavg()[0], 2),
        },
        "decode": decode,
        "exports": export_figures,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report))
    log(f"wrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
