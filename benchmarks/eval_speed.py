"""Perplexity speed on CPU: ``llmtool eval`` against transformers and llama.cpp, in one run (issue 15).

What is measured: scored tokens per second of a perplexity evaluation of SmolLM2-135M-Instruct
(``smollm2``) on a fixed slice of the WikiText-2 raw test split, and the perplexity each engine
reports, under two window conventions:

* ``hf`` (transformers' perplexity guide: windows of ``--max-length`` tokens every ``--stride``
  tokens, each scoring the tokens no earlier window scored): llmtool's ``--protocol hf`` on its
  fp32 and int4 exports against the guide's own loop in transformers (``model(ids,
  labels=...)``, the default SDPA attention, fp32).
* ``llama-cpp`` (llama-perplexity: disjoint chunks of ``--max-length`` tokens, the second half
  scored): llmtool's ``--protocol llama-cpp`` on the same exports against llama.cpp's own
  procedure through llama-cpp-python on the GGUF file the exports were made from (Q4_1 weights,
  llama.cpp's quantized arithmetic).

Both conventions feed about two tokens per scored token, so all tok/s figures are comparable;
the ratios that count are those within one convention. The slice: the first ``--lines`` lines of
``wikitext-2-raw-test.txt`` (one paragraph a line), as one document that every engine tokenizes
itself. Every engine runs with ``--threads`` threads. One untimed warm-up run per engine (the
first window only), then ``--repeats`` rounds in which every engine runs the whole slice in turn
(round robin, so load from elsewhere on a shared machine hits all engines alike); the median per
engine. The load average is recorded before and after.

The script starts itself again with glibc's malloc asking for huge pages, as ``llmtool eval``
does, so every engine in it gets them.

``llama.cpp-f32`` runs llama.cpp on an F32 copy of the same GGUF (every tensor de-quantized,
metadata unchanged): the same weights as llmtool's fp32 export, so the perplexity residual
between the two is the protocol's alone (``residuals_llama_cpp`` in the JSON).

Usage: python benchmarks/eval_speed.py --out benchmarks/results/eval_speed.json
(``--engines`` picks a group; ``--append`` adds a group's results, timed in their own round
robin, to an existing ``--out``: the committed results are the ``hf`` and ``llama-cpp`` groups
run one after the other.)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from cpu_generate import environment, log  # noqa: E402  (the same machine record)

EXPORTS: dict[str, dict[str, Any]] = {
    "fp32": {},
    "fp32-fused": {"fused": True},
    "int4": {"quantize": "int4", "fused": True},
}
# One timed run: scored tokens, seconds (wall, tokenization included) and the perplexity.
Run = dict[str, Any]
Runner = Callable[[bool], Run]  # runner(warmup) -> Run; warmup runs the first window only


def llmtool_runner(path: Path, text: Path, protocol: str, args: argparse.Namespace) -> Runner:
    """``evaluate_perplexity`` on a loaded export (as ``llmtool eval DIR --data TEXT``)."""
    from llmtool.evaluate import evaluate_perplexity
    from llmtool.runtime import OnnxCausalLM, SessionOptions

    model = OnnxCausalLM(path, "cpu", options=SessionOptions(intra_op_threads=args.threads))
    stride = args.stride if protocol == "hf" else None

    def run(warmup: bool) -> Run:
        t = time.perf_counter()
        r = evaluate_perplexity(
            model,
            text,
            max_length=args.max_length,
            stride=stride,
            protocol=protocol,
            max_tokens=1 if warmup else None,
        )
        return {
            "seconds": time.perf_counter() - t,
            "tokens": r.tokens,
            "windows": r.windows,
            "perplexity": r.perplexity,
        }

    return run


def transformers_runner(text: Path, args: argparse.Namespace) -> Runner:
    """The transformers perplexity guide's loop, summing each window's NLL exactly."""
    import torch

    from llmtool.models.loading import load_model

    torch.set_num_threads(args.threads)
    loaded = load_model("smollm2")
    model, tok = loaded.model, loaded.tokenizer
    model.set_attn_implementation("sdpa")  # transformers' default (llmtool loads eager)
    content = text.read_text(encoding="utf-8")

    def run(warmup: bool) -> Run:
        t = time.perf_counter()
        ids = tok(content, return_tensors="pt")["input_ids"]  # [1, N]
        n = ids.size(1)
        nll_sum, count, windows, prev_end = 0.0, 0, 0, 0
        for begin in range(0, n, args.stride):
            end = min(begin + args.max_length, n)
            target = ids[:, begin:end].clone()
            target[:, : -(end - prev_end)] = -100  # already scored by an earlier window
            with torch.inference_mode():
                loss = model(ids[:, begin:end], labels=target).loss  # mean over scored
            scored = int((target[:, 1:] != -100).sum())
            nll_sum += float(loss) * scored
            count += scored
            windows += 1
            prev_end = end
            if end == n or warmup:
                break
        return {
            "seconds": time.perf_counter() - t,
            "tokens": count,
            "windows": windows,
            "perplexity": float(torch.tensor(nll_sum / count).exp()),
        }

    return run


def f32_gguf(src: Path, dst: Path) -> Path:
    """``src`` with every tensor de-quantized to F32: the same weights llmtool's fp32 export holds.

    Metadata (tokenizer included) is copied as is, so only llama.cpp's arithmetic changes.
    """
    if dst.is_file():
        return dst
    import numpy as np
    from gguf import GGUFReader, GGUFValueType, GGUFWriter  # type: ignore[import-untyped]
    from gguf.quants import dequantize  # type: ignore[import-untyped]

    reader = GGUFReader(str(src))
    writer = GGUFWriter(str(dst), reader.fields["general.architecture"].contents())
    for name, f in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        if name == "general.file_type":
            writer.add_uint32(name, 0)  # ALL_F32
        elif f.types[0] == GGUFValueType.ARRAY:
            writer.add_key_value(name, f.contents(), f.types[0], sub_type=f.types[-1])
        else:
            writer.add_key_value(name, f.contents(), f.types[0])
    for t in reader.tensors:
        values = dequantize(t.data, t.tensor_type).astype(np.float32)
        writer.add_tensor(t.name, values.reshape([int(n) for n in reversed(t.shape)]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def llama_cpp_runner(text: Path, args: argparse.Namespace, gguf: Path) -> Runner:
    """llama-perplexity's procedure through llama-cpp-python on the GGUF (Q4_1) file.

    As ``llama-perplexity -c L``: the text tokenized as the GGUF says (BOS only when its
    ``add_bos_token`` is set), ``N // L`` chunks; each chunk's first token replaced by BOS when
    BOS is added; the logits at chunk positions ``L/2 .. L-2`` score the next tokens.
    """
    import numpy as np
    from llama_cpp import Llama  # type: ignore[import-not-found]

    from llmtool.evaluate.metrics import token_nll
    from llmtool.models.loading import load_tokenizer, resolve_spec

    n_ctx = args.max_length
    llm = Llama(
        model_path=str(gguf),
        n_ctx=n_ctx,
        n_batch=n_ctx,
        n_ubatch=min(n_ctx, 512),
        n_threads=args.threads,
        n_threads_batch=args.threads,
        logits_all=True,
        verbose=False,
    )
    add_bos = llm.metadata.get("tokenizer.ggml.add_bos_token", "true") == "true"
    content = text.read_text(encoding="utf-8").encode("utf-8")
    first = n_ctx // 2
    # The residual's first suspect: do both tokenizers give the same ids? (HF: transformers'
    # tokenizer built from the same GGUF, the one llmtool's export carries.)
    hf_ids = load_tokenizer(resolve_spec("smollm2"))(content.decode("utf-8"))["input_ids"]
    same_ids = hf_ids == llm.tokenize(content, add_bos=add_bos, special=False)

    def run(warmup: bool) -> Run:
        t = time.perf_counter()
        ids = np.asarray(llm.tokenize(content, add_bos=add_bos, special=False), dtype=np.int64)
        nll = []
        chunks = 1 if warmup else len(ids) // n_ctx
        for i in range(chunks):
            chunk = ids[i * n_ctx : (i + 1) * n_ctx].copy()
            if add_bos:
                chunk[0] = llm.token_bos()
            llm.reset()
            llm.eval(chunk.tolist())
            logits = np.asarray(llm.scores[first : n_ctx - 1], dtype=np.float32)  # [L/2 - 1, V]
            nll.append(token_nll(logits, chunk[first + 1 :]))
        scored = np.concatenate(nll)
        return {
            "seconds": time.perf_counter() - t,
            "tokens": len(scored),
            "windows": chunks,
            "perplexity": float(np.exp(scored.mean())),
            "tokenizer_tokens": len(ids),
            "same_token_ids_as_transformers": same_ids,
            "gguf": gguf.name,
        }

    return run


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def summarize(runs: list[Run]) -> dict[str, Any]:
    rates = [r["tokens"] / r["seconds"] for r in runs]
    return {
        "scored_tokens_per_s": statistics.median(rates),
        "spread": (max(rates) - min(rates)) / max(rates),
        "seconds": statistics.median(r["seconds"] for r in runs),
        "tokens": runs[0]["tokens"],
        "windows": runs[0]["windows"],
        "perplexity": runs[0]["perplexity"],
        "runs": runs,
    }


PEERS = {"hf": "transformers", "llama-cpp": "llama.cpp"}


def residuals(results: dict[str, Any]) -> dict[str, Any]:
    """Relative perplexity differences under ``llama-cpp``: llmtool against llama.cpp."""
    out: dict[str, Any] = {}
    pairs = [
        ("llmtool-fp32:llama-cpp", "llama.cpp-f32:llama-cpp"),
        ("llmtool-fp32-fused:llama-cpp", "llama.cpp-f32:llama-cpp"),
        ("llmtool-fp32:llama-cpp", "llama.cpp:llama-cpp"),
        ("llmtool-fp32-fused:llama-cpp", "llama.cpp:llama-cpp"),
        ("llmtool-int4:llama-cpp", "llama.cpp:llama-cpp"),
        ("llama.cpp-f32:llama-cpp", "llama.cpp:llama-cpp"),
    ]
    for ours, theirs in pairs:
        if ours in results and theirs in results:
            a, b = results[ours], results[theirs]
            out[f"{ours} vs {theirs}"] = {
                "relative": a["perplexity"] / b["perplexity"] - 1,
                "same_tokens_scored": a["tokens"] == b["tokens"],
            }
    return out


def markdown(report: dict[str, Any]) -> str:
    """The results as a Markdown page (written next to the JSON)."""
    env, proto = report["environment"], report["protocol"]
    lines = [
        "# Perplexity speed: SmolLM2-135M-Instruct on WikiText-2, CPU",
        "",
        f"{proto['slice']}; window {proto['max_length']}, stride {proto['stride']} (`hf`) / "
        f"chunks of {proto['max_length']} (`llama-cpp`); {env['threads']} threads for every "
        f"engine; {proto['statistic']}. Load average (1, 5, 15 min) before "
        f"{env['load_average_before']}, after {env['load_average_after']} on "
        f"{env['cpu_count']} cores (a shared machine: absolute figures move with the load, the "
        "ratios of one run are what count).",
        "",
        "| protocol | engine | scored tok/s | vs peer | spread | tokens scored | windows "
        "| perplexity | run |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"].values():
        ratio = r.get("vs_peer")
        cells = [
            r["protocol"],
            r["engine"],
            f"{r['scored_tokens_per_s']:.0f}",
            f"{ratio:.2f}x" if ratio else "peer",
            f"{100 * r['spread']:.0f}%",
            f"{r['tokens']:,}",
            str(r["windows"]),
            f"{r['perplexity']:.4f}",
            str(r.get("run", 1)),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    for name, err in report["errors"].items():
        lines.append(f"| {name} | failed: {err[:120]} | | | | | | | |")
    res = report.get("residuals_llama_cpp", {})
    if res:
        lines += [
            "",
            "Perplexity residuals under `llama-cpp` (same chunks, same scored tokens):",
            "",
        ]
        lines += [f"* {k}: {100 * v['relative']:+.4f}%" for k, v in res.items()]
    lines += ["", *report.get("notes", [])]
    lines.append("")
    for i, extra in enumerate(report.get("more_runs", []), start=2):
        e = extra["environment"]
        lines.append(
            f"Run {i} (the rows marked {i}; its own round robin, {extra['date']}): load average "
            f"before {e['load_average_before']}, after {e['load_average_after']}; "
            f"`python {extra['command'].split(' ', 1)[1]}`."
        )
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


def prepare(args: argparse.Namespace, text: Path, report: dict[str, Any]) -> dict[str, Runner]:
    """Export (or reuse) the llmtool models and load every engine, one at a time."""
    from llmtool.export import export_model
    from llmtool.models.loading import smollm2_path

    runners: dict[str, Runner] = {}
    for engine in args.engines.split(","):
        log(f"preparing {engine}")
        try:
            if engine.startswith("llmtool-"):
                dtype, protocol = engine.removeprefix("llmtool-").split(":")
                path = args.workdir / f"smollm2-{dtype}"
                if not (path / "llmtool.json").is_file():
                    export_model("smollm2", path, force=True, **EXPORTS[dtype])
                runners[engine] = llmtool_runner(path, text, protocol, args)
            elif engine == "transformers:hf":
                runners[engine] = transformers_runner(text, args)
            elif engine == "llama.cpp:llama-cpp":
                runners[engine] = llama_cpp_runner(text, args, smollm2_path())
            elif engine == "llama.cpp-f32:llama-cpp":
                gguf = f32_gguf(smollm2_path(), args.workdir / "smollm2-f32.gguf")
                runners[engine] = llama_cpp_runner(text, args, gguf)
            else:
                raise ValueError(f"unknown engine {engine}")
            runners[engine](True)  # warm-up: the first window
        except Exception as e:  # an engine that fails is recorded; the run goes on
            report["errors"][engine] = f"{type(e).__name__}: {e}"[:500]
            log(f"  failed: {report['errors'][engine]}")
            runners.pop(engine, None)
    return runners


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument(
        "--engines",
        default="llmtool-fp32:hf,llmtool-fp32-fused:hf,llmtool-int4:hf,transformers:hf,"
        "llmtool-fp32-fused:llama-cpp,llmtool-int4:llama-cpp,llama.cpp:llama-cpp,"
        "llama.cpp-f32:llama-cpp",
    )
    parser.add_argument(
        "--data", type=Path, default=ROOT.parent / "shared" / "data" / "wikitext-2-raw-test.txt"
    )
    parser.add_argument("--lines", type=int, default=40, help="the slice: the first N lines")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--stride", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None, help="exports (made if missing)")
    parser.add_argument("--no-malloc-huge-pages", action="store_true")
    parser.add_argument(
        "--append", action="store_true", help="add these engines' results to an existing --out"
    )
    args = parser.parse_args()
    if not args.no_malloc_huge_pages:
        from llmtool.hugepages import restart_with_huge_page_malloc

        restart_with_huge_page_malloc()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.workdir = args.workdir or Path(tempfile.mkdtemp(prefix="llmtool-eval-bench-"))
    args.workdir.mkdir(parents=True, exist_ok=True)

    lines = args.data.read_text(encoding="utf-8").splitlines(keepends=True)[: args.lines]
    text = args.workdir / "slice.txt"
    text.write_text("".join(lines), encoding="utf-8")
    env = environment(args.threads)
    env["load_average_before"] = load_average()
    report: dict[str, Any] = {
        "benchmark": "Perplexity speed, SmolLM2-135M-Instruct on WikiText-2 (issue 15)",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "protocol": {
            "model": "smollm2 (SmolLM2-135M-Instruct; llama.cpp reads the Q4_1 GGUF, llmtool and "
            "transformers its de-quantized fp32 weights; llmtool int4 re-quantizes them, Q4_1 "
            "grid, blocks of 32)",
            "slice": f"the first {args.lines} lines of {args.data.name} "
            f"({len(text.read_bytes()):,} bytes, one document)",
            "max_length": args.max_length,
            "stride": args.stride,
            "statistic": f"median over {args.repeats} round-robin rounds, after one warm-up "
            "window per engine; tok/s = scored tokens / wall time of the whole evaluation "
            "(tokenization included)",
        },
        "environment": env,
        "results": {},
        "errors": {},
    }
    runners = prepare(args, text, report)
    if "llama_cpp" in sys.modules:  # also when run from a build tree without package metadata
        env.setdefault("llama_cpp_python", sys.modules["llama_cpp"].__version__)
    runs: dict[str, list[Run]] = {engine: [] for engine in runners}
    for repeat in range(args.repeats):
        log(f"timed round {repeat + 1} of {args.repeats}")
        for engine, run in runners.items():
            time.sleep(0.2)  # the previous engine's spinning worker threads go idle first
            runs[engine].append(run(False))
            log(f"  {engine}: {runs[engine][-1]}")
    env["load_average_after"] = load_average()
    for engine, engine_runs in runs.items():
        name, protocol = engine.split(":")
        report["results"][engine] = {"engine": name, "protocol": protocol}
        report["results"][engine].update(summarize(engine_runs))
    if args.append and args.out.is_file():
        # Another group of engines, timed in its own round robin: kept beside the first run's.
        first = json.loads(args.out.read_text())
        for engine in report["results"]:
            report["results"][engine]["run"] = len(first.get("more_runs", [])) + 2
        first["results"].update(report["results"])
        first["errors"].update(report["errors"])
        extra = {k: report[k] for k in ("command", "date", "environment")}
        first.setdefault("more_runs", []).append(extra)
        report = first
    for entry in report["results"].values():
        peer = report["results"].get(f"{PEERS[entry['protocol']]}:{entry['protocol']}")
        if peer and peer is not entry:
            entry["vs_peer"] = entry["scored_tokens_per_s"] / peer["scored_tokens_per_s"]
    report["residuals_llama_cpp"] = residuals(report["results"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report))
    log(f"wrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
