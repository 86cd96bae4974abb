"""Generation throughput: llmtool's fused CUDA path against its peers, in one run.

Protocol (issue 4): random weights in real model shapes, fp16, prompt of 128 tokens, 128 new
tokens, greedy, batch 1 and 8; each configuration is warmed up once, then timed ``--repeats``
times and the median reported. Peers, all in this one process:

* ``llmtool``: ``llmtool export --fused --dtype fp16`` + ``llmtool.generate.generate`` on the CUDA
  execution provider (IO binding, in-place KV cache, CUDA graph of the decode step, argmax on the
  device); ``llmtool-no-graph`` is the same without the CUDA graph;
* ``llmtool-standard``: the standard (unfused) fp16 export with numpy feeds, for reference;
* ``hf-eager``: transformers ``generate`` in PyTorch (eager attention, fp16, CUDA);
* ``genai`` / ``genai-graph``: onnxruntime-genai's model builder (fp16, cuda) and its generate
  API, without and with ``enable_cuda_graph``;
* ``optimum``: ORTModelForCausalLM, where it installs.

Reported per configuration: time to first token (TTFT), decode tokens/s over all rows
(tokens after the first / decode time), end-to-end tokens/s, ms per decode step, and decode speed
as a share of the HBM bound (peak bandwidth / fp16 weight bytes, per sequence).

Usage (GPU machine):  python benchmarks/gpu_generate.py --out benchmarks/results/gpu_generate.json
Smoke test on CPU:    python benchmarks/gpu_generate.py --shapes tiny --device cpu --out /tmp/b.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        tie_word_embeddings=True,
    ),
    "tinyllama-1.1b": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    ),
    "tiny": dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
        max_position_embeddings=512,
        rope_theta=10000.0,
        tie_word_embeddings=True,
    ),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def environment(device: str) -> dict[str, Any]:
    import importlib.metadata as md

    import torch

    env: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
    }
    for dist in (
        "torch",
        "transformers",
        "onnx",
        "onnxruntime-gpu",
        "onnxruntime",
        "onnxruntime-genai-cuda",
        "llmtool",
    ):
        with contextlib.suppress(md.PackageNotFoundError):
            env[dist] = md.version(dist)
    import onnxruntime

    env["onnxruntime_imported"] = onnxruntime.__version__
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
        try:
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version,memory.total", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            env["driver"] = None
        from llmtool.hardware import gpu_peak_bandwidth

        env["peak_bandwidth_bytes_per_s"] = gpu_peak_bandwidth(env["gpu"])
    return env


def make_hf_dir(shape: str, path: Path) -> tuple[Path, int]:
    """A random Llama of the given shape, saved in fp16 with a small BPE tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmtool.train.tokenizer import train_bpe_tokenizer

    torch.manual_seed(0)
    cfg = dict(SHAPES[shape])
    theta = cfg.pop("rope_theta")
    config = LlamaConfig(rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, **cfg)
    config.rope_parameters = {"rope_type": "default", "rope_theta": theta}
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(torch.float16)
    model.save_pretrained(path)
    text = (ROOT / "llmtool" / "data" / "sample.txt").read_text(encoding="utf-8")
    train_bpe_tokenizer([text], vocab_size=384).save_pretrained(path)
    n_params = sum(p.numel() for p in model.parameters())
    return path, n_params


def summarize(runs: list[dict[str, float]], batch: int, new_tokens: int) -> dict[str, Any]:
    """Medians over runs: each run gives ttft_s and decode_s for ``new_tokens`` tokens per row."""
    ttft = statistics.median(r["ttft_s"] for r in runs)
    decode = statistics.median(r["decode_s"] for r in runs)
    total = statistics.median(r["ttft_s"] + r["decode_s"] for r in runs)
    steps = new_tokens - 1
    return {
        "ttft_ms": ttft * 1e3,
        "decode_tokens_per_s": batch * steps / decode,
        "per_sequence_tokens_per_s": steps / decode,
        "e2e_tokens_per_s": batch * new_tokens / total,
        "ms_per_token": decode / steps * 1e3,
        "best_decode_tokens_per_s": max(batch * steps / r["decode_s"] for r in runs),
        "runs": runs,
    }


def timed(fn: Any, warmup: int, repeats: int) -> list[dict[str, float]]:
    for _ in range(warmup):
        fn()
    return [fn() for _ in range(repeats)]


# Peers ---------------------------------------------------------------------------------------
def bench_llmtool(
    onnx_dir: Path,
    prompts: np.ndarray,
    new: int,
    device: str,
    cuda_graph: bool,
    warmup: int,
    repeats: int,
) -> dict[str, Any]:
    from llmtool.generate import generate
    from llmtool.runtime import OnnxCausalLM, SessionOptions

    provider = "cuda" if device == "cuda" else "cpu"
    model = OnnxCausalLM(onnx_dir, provider, options=SessionOptions(cuda_graph=cuda_graph))
    rows = [list(r) for r in prompts]

    def run() -> dict[str, float]:
        res = generate(model, rows, max_new_tokens=new, stop_at_eos=False)
        assert all(o.new_tokens == new for o in res.outputs)
        return {"ttft_s": res.timing.prefill_s, "decode_s": res.timing.decode_s}

    runs = timed(run, warmup, repeats)
    out = {"provider": model.provider, "cuda_graph": model.cuda_graph, "runs_raw": runs}
    gc.collect()
    return out


def bench_hf(
    hf_dir: Path, prompts: np.ndarray, new: int, device: str, warmup: int, repeats: int
) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.float16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=dtype, attn_implementation="eager"
    ).to(device)
    model.eval()
    ids = torch.tensor(prompts, device=device)
    mask = torch.ones_like(ids)

    def gen(n: int) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
            )
        if device == "cuda":
            torch.cuda.synchronize()
        assert out.shape[1] == ids.shape[1] + n
        return time.perf_counter() - t

    def run() -> dict[str, float]:
        ttft = gen(1)
        total = gen(new)
        return {"ttft_s": ttft, "decode_s": max(total - ttft, 1e-9)}

    runs = timed(run, warmup, repeats)
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"runs_raw": runs, "attention": "eager"}


def build_genai(hf_dir: Path, out: Path, device: str) -> None:
    cmd = [
        sys.executable,
        "-m",
        "onnxruntime_genai.models.builder",
        "-i",
        str(hf_dir),
        "-o",
        str(out),
        "-p",
        "fp16" if device == "cuda" else "fp32",
        "-e",
        device,
        "-c",
        str(out.parent / "genai-cache"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"model builder failed: {proc.stderr[-2000:]}")


def bench_genai(
    model_dir: Path,
    prompts: np.ndarray,
    new: int,
    device: str,
    cuda_graph: bool,
    warmup: int,
    repeats: int,
) -> dict[str, Any]:
    import onnxruntime_genai as og

    config = og.Config(str(model_dir))
    config.clear_providers()
    if device == "cuda":
        config.append_provider("cuda")
        if cuda_graph:
            config.set_provider_option("cuda", "enable_cuda_graph", "1")
    model = og.Model(config)
    batch, plen = prompts.shape
    ids = prompts.astype(np.int32)

    def run() -> dict[str, float]:
        params = og.GeneratorParams(model)
        params.set_search_options(
            max_length=plen + new, min_length=plen + new, do_sample=False, batch_size=batch
        )
        gen = og.Generator(model, params)
        t = time.perf_counter()
        gen.append_tokens(ids)
        gen.generate_next_token()
        gen.get_next_tokens()
        ttft = time.perf_counter() - t
        t = time.perf_counter()
        steps = 0
        while not gen.is_done():
            gen.generate_next_token()
            gen.get_next_tokens()
            steps += 1
        decode = time.perf_counter() - t
        assert steps == new - 1, f"genai generated {steps + 1} tokens, expected {new}"
        del gen
        return {"ttft_s": ttft, "decode_s": decode}

    runs = timed(run, warmup, repeats)
    gc.collect()
    return {"runs_raw": runs, "cuda_graph": cuda_graph}


def bench_optimum(
    hf_dir: Path, prompts: np.ndarray, new: int, device: str, warmup: int, repeats: int
) -> dict[str, Any]:
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM  # type: ignore[import-not-found]

    provider = "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"
    model = ORTModelForCausalLM.from_pretrained(
        hf_dir, export=True, provider=provider, use_io_binding=device == "cuda"
    )
    ids = torch.tensor(prompts, device=device)

    def gen(n: int) -> float:
        t = time.perf_counter()
        model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )
        return time.perf_counter() - t

    def run() -> dict[str, float]:
        ttft = gen(1)
        return {"ttft_s": ttft, "decode_s": gen(new) - ttft}

    return {"runs_raw": timed(run, warmup, repeats)}


# Driver ----------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shapes", default="smollm2-135m,tinyllama-1.1b")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--prompt-length", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--peers",
        default="llmtool,llmtool-no-graph,llmtool-standard,hf-eager,genai,genai-graph,optimum",
    )
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()

    from llmtool.export import export_model

    peers = args.peers.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="llmtool-bench-"))
    env = environment(args.device)
    log(f"environment: {json.dumps(env)}")
    report: dict[str, Any] = {
        "benchmark": "generation throughput (issue 4)",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "protocol": {
            "weights": "random, real model shapes",
            "dtype": "fp16" if args.device == "cuda" else "fp32",
            "prompt_tokens": args.prompt_length,
            "new_tokens": args.new_tokens,
            "decoding": "greedy",
            "warmup": args.warmup,
            "repeats": args.repeats,
            "statistic": "median",
        },
        "environment": env,
        "results": [],
        "errors": [],
    }

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")

    for shape in args.shapes.split(","):
        log(f"== {shape}")
        hf_dir, n_params = make_hf_dir(shape, work / shape / "hf")
        weight_bytes = n_params * (2 if args.device == "cuda" else 4)
        bound = (
            (env.get("peak_bandwidth_bytes_per_s") or 0) / weight_bytes
            if args.device == "cuda"
            else None
        )
        report.setdefault("shapes", {})[shape] = {
            **SHAPES[shape],
            "parameters": n_params,
            "weight_bytes": weight_bytes,
            "hbm_bound_tokens_per_s": bound,
        }
        rng = np.random.default_rng(0)
        dirs: dict[str, Path] = {}
        dtype = "fp16" if args.device == "cuda" else "fp32"

        def onnx_dir(
            kind: str,
            shape: str = shape,
            hf_dir: Path = hf_dir,
            dirs: dict = dirs,
            dtype: str = dtype,
        ) -> Path:
            if kind not in dirs:
                t = time.perf_counter()
                path = work / shape / f"onnx-{kind}"
                if kind.startswith("genai"):
                    build_genai(hf_dir, path, args.device)
                else:
                    result = export_model(
                        hf_dir, path, dtype=dtype, fused=kind == "fused", force=True
                    )
                    report["shapes"][shape][f"export_{kind}_validation"] = {
                        k: result.validation[k]
                        for k in (
                            "passed",
                            "prefill_max_abs_diff",
                            "decode_max_abs_diff",
                            "greedy_match",
                        )
                    }
                log(f"built {kind} in {time.perf_counter() - t:.0f} s")
                dirs[kind] = path
            return dirs[kind]

        for batch in batches:
            prompts = rng.integers(3, 300, size=(batch, args.prompt_length))
            for peer in peers:
                log(f"{shape} b{batch} {peer}")
                t0 = time.perf_counter()
                try:
                    if peer in ("llmtool", "llmtool-no-graph"):
                        raw = bench_llmtool(
                            onnx_dir("fused"),
                            prompts,
                            args.new_tokens,
                            args.device,
                            peer == "llmtool",
                            args.warmup,
                            args.repeats,
                        )
                    elif peer == "llmtool-standard":
                        raw = bench_llmtool(
                            onnx_dir("standard"),
                            prompts,
                            args.new_tokens,
                            args.device,
                            False,
                            args.warmup,
                            args.repeats,
                        )
                    elif peer == "hf-eager":
                        raw = bench_hf(
                            hf_dir, prompts, args.new_tokens, args.device, args.warmup, args.repeats
                        )
                    elif peer in ("genai", "genai-graph"):
                        raw = bench_genai(
                            onnx_dir("genai"),
                            prompts,
                            args.new_tokens,
                            args.device,
                            peer == "genai-graph",
                            args.warmup,
                            args.repeats,
                        )
                    elif peer == "optimum":
                        raw = bench_optimum(
                            hf_dir, prompts, args.new_tokens, args.device, args.warmup, args.repeats
                        )
                    else:
                        raise ValueError(f"unknown peer {peer}")
                except Exception as e:  # a peer that fails is recorded, the run goes on
                    msg = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:500] if str(e).strip() else ''}"
                    log(f"  failed: {msg}")
                    traceback.print_exc(limit=3)
                    report["errors"].append(
                        {"shape": shape, "batch": batch, "peer": peer, "error": msg}
                    )
                    save()
                    continue
                runs = raw.pop("runs_raw")
                entry = {
                    "shape": shape,
                    "peer": peer,
                    "batch": batch,
                    **summarize(runs, batch, args.new_tokens),
                    **raw,
                    "wall_s": time.perf_counter() - t0,
                }
                if bound:
                    entry["hbm_bound_share"] = entry["per_sequence_tokens_per_s"] / bound
                report["results"].append(entry)
                log(
                    f"  decode {entry['decode_tokens_per_s']:.0f} tok/s, TTFT {entry['ttft_ms']:.1f} ms"
                )
                save()
        shutil.rmtree(work / shape, ignore_errors=True)
    save()
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
