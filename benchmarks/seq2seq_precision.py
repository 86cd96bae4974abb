"""Encoder-decoder exports in fp16, int8 and int4: parity and the fidelity gate's figures.

For the tiny random T5, BART and Marian models the tests build (``tests/_seq2seq.py``, same
seeds), each precision is exported through :func:`llmtool.export.export_model` and the
manifest's figures are recorded: max |Δlogits| against the fp32 PyTorch model (validation),
and the gate's relative ΔPPL, KL mean and top-1 agreement on the calibration pairs. An export
the gate refuses is recorded with its refusal (the ValidationError's message carries ΔPPL).
Writes ``benchmarks/results/seq2seq_precision.{json,md}``.

    python benchmarks/seq2seq_precision.py [--block-size 32]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
RESULTS = ROOT / "benchmarks" / "results"
ARCHS = ("t5", "bart", "marian")
MODES = ("fp16", "int8", "int4")


def _one(hf: Path, out: Path, mode: str, block_size: int) -> dict[str, Any]:
    from llmtool.errors import ValidationError
    from llmtool.export import export_model

    kwargs: dict[str, Any] = {"dtype": "fp16"} if mode == "fp16" else {"quantize": mode}
    try:
        manifest = export_model(hf, out, block_size=block_size, **kwargs).manifest
    except ValidationError as err:
        return {"passed": False, "refused": err.message}
    v, f = manifest["validation"], manifest["fidelity"]
    return {
        "passed": True,
        "prefill_max_abs_diff": v["prefill_max_abs_diff"],
        "decode_max_abs_diff": v["decode_max_abs_diff"],
        "relative_delta_perplexity": f["relative_delta_perplexity"],
        "kl_mean": f["kl_divergence"]["mean"],
        "top1_agreement": f["top1_agreement"],
        "limit": f["max_relative_delta_perplexity"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block-size", type=int, default=32)
    args = parser.parse_args()
    from _seq2seq import save_tiny_seq2seq

    from llmtool import defaults
    from llmtool.hardware import environment
    from llmtool.train.tokenizer import train_bpe_tokenizer

    text = Path(defaults.SAMPLE_TEXT).read_text(encoding="utf-8")
    tokenizer = train_bpe_tokenizer([text], vocab_size=384)  # as tests/conftest.py
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in ARCHS:
            hf = save_tiny_seq2seq(arch, tokenizer, Path(tmp) / arch)
            for mode in MODES:
                row = _one(hf, Path(tmp) / f"{arch}-{mode}", mode, args.block_size)
                rows.append({"arch": arch, "mode": mode, **row})
                print(arch, mode, row, flush=True)
    record = {
        "benchmark": "seq2seq_precision",
        "block_size": args.block_size,
        "rows": rows,
        "environment": environment("cpu"),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "seq2seq_precision.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        "# Encoder-decoder exports: fp16 / int8 / int4 against the fp32 PyTorch model",
        "",
        f"Tiny random models of `tests/_seq2seq.py` (the tests' seeds), block size "
        f"{args.block_size}; {record['date']}. Produced by `python benchmarks/seq2seq_precision.py`.",
        "",
        "| arch | mode | gate | max abs Δlogits (first / decode) | rel. ΔPPL (limit) | KL mean | top-1 |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["passed"]:
            lines.append(
                f"| {r['arch']} | {r['mode']} | passes | {r['prefill_max_abs_diff']:.2e} / "
                f"{r['decode_max_abs_diff']:.2e} | {100 * r['relative_delta_perplexity']:+.2f}% "
                f"({100 * r['limit']:.1f}%) | {r['kl_mean']:.1e} | {r['top1_agreement']:.3f} |"
            )
        else:
            lines.append(f"| {r['arch']} | {r['mode']} | refused: {r['refused']} | | | | |")
    env = record["environment"]
    lines += ["", f"Environment: `{json.dumps(env, sort_keys=True)[:600]}`", ""]
    (RESULTS / "seq2seq_precision.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
