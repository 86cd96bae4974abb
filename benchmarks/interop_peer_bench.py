"""Decode timing of one ONNX folder through Optimum or onnxruntime-genai (run by interop_cpu.py).

Runs in the peer venv (``nox -s interop`` builds it: transformers 4.57, optimum-onnx,
onnxruntime-genai with the CPU onnxruntime); imports no llmtool code.

Usage: python interop_peer_bench.py ENGINE DIR REQUEST.json, ENGINE ``optimum`` or ``genai``;
the request gives the prompts (token ids), new tokens, warm-up and repeats, threads. Prints one
JSON object: per run the prefill (first token) and decode seconds and the decode tokens.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import numpy as np


def optimum_runs(directory: str, request: dict[str, Any]) -> list[dict[str, float]]:
    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    torch.set_num_threads(request["threads"])
    options = ort.SessionOptions()
    options.intra_op_num_threads = request["threads"]
    model = ORTModelForCausalLM.from_pretrained(
        directory, provider="CPUExecutionProvider", session_options=options
    )
    model.generation_config.eos_token_id = None

    def timed(ids: list[int], new: int) -> float:
        start = time.perf_counter()
        model.generate(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.int64),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
        )
        return time.perf_counter() - start

    new = request["new_tokens"]
    for ids in request["prompts"][: request["warmup"]]:
        timed(ids, new)
    runs = []
    for _ in range(request["repeats"]):
        for ids in request["prompts"]:
            first = timed(ids, 1)  # prefill and one token
            total = timed(ids, new)
            runs.append({"ttft_s": first, "decode_s": total - first, "tokens": new - 1})
    return runs


def genai_runs(directory: str, request: dict[str, Any]) -> list[dict[str, float]]:
    import onnxruntime_genai as og

    config = og.Config(directory)
    config.clear_providers()  # CPU
    model = og.Model(config)
    new = request["new_tokens"]

    def timed(ids: list[int]) -> dict[str, float]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + new, do_sample=False)
        generator = og.Generator(model, params)
        start = time.perf_counter()
        generator.append_tokens(np.array([ids], dtype=np.int32))
        generator.generate_next_token()
        first = time.perf_counter()
        count = 0
        while not generator.is_done() and count < new - 1:
            generator.generate_next_token()
            count += 1
        end = time.perf_counter()
        return {"ttft_s": first - start, "decode_s": end - first, "tokens": count}

    for ids in request["prompts"][: request["warmup"]]:
        timed(ids)
    return [timed(ids) for _ in range(request["repeats"]) for ids in request["prompts"]]


def main() -> None:
    engine, directory, path = sys.argv[1:4]
    with open(path, encoding="utf-8") as f:
        request = json.load(f)
    runs = (
        optimum_runs(directory, request) if engine == "optimum" else genai_runs(directory, request)
    )
    print(json.dumps({"runs": runs}))


if __name__ == "__main__":
    main()
