"""Run llmtool exports through other consumers; run by tests/test_interop_peers.py in the peer venv.

The peer venv (``nox -s interop``) holds transformers 4.57 (Optimum's pin), optimum-onnx and
onnxruntime-genai with the CPU onnxruntime, none of which can share llmtool's own environment.
This script imports no llmtool code: it reads the export directories as those tools' users
would and prints one JSON object:

  config     {dir: what a 4.x AutoConfig reads: rope_theta, vocab_size, model_type}
  tokenizer  {dir: {"class": ..., "ids": AutoTokenizer's ids of the text}}
  optimum    {dir: greedy tokens per row of ORTModelForCausalLM.generate (left-padded batch)}
  genai      {dir: {"1": tokens of row 0 alone, "2": tokens of every row, batched}}

Usage: python interop_peer.py REQUEST.json, the request naming the directories, the prompt
rows (token ids), the number of new tokens and the text to tokenize.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np


def read_config(directory: str) -> dict[str, Any]:
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(directory)
    return {
        "transformers": transformers.__version__,
        "rope_theta": getattr(config, "rope_theta", None),
        "vocab_size": config.vocab_size,
        "model_type": config.model_type,
    }


def read_tokenizer(directory: str, text: str) -> dict[str, Any]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(directory)
    return {"class": type(tok).__name__, "ids": tok(text)["input_ids"]}


def optimum_tokens(directory: str, rows: list[list[int]], new_tokens: int) -> list[list[int]]:
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    model = ORTModelForCausalLM.from_pretrained(directory, provider="CPUExecutionProvider")
    model.generation_config.eos_token_id = (
        None  # exactly new_tokens, as llmtool's stop_at_eos=False
    )
    length = max(len(r) for r in rows)
    # Left padding, as Optimum's users (and its tokenizer with padding_side="left") batch.
    ids = torch.tensor([[0] * (length - len(r)) + r for r in rows], dtype=torch.int64)
    mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows], dtype=torch.int64)
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    return out[:, length:].tolist()


def genai_tokens(directory: str, rows: list[list[int]], new_tokens: int) -> list[list[int]]:
    import onnxruntime_genai as og

    model = og.Model(directory)
    length = max(len(r) for r in rows)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=length + new_tokens, do_sample=False, batch_size=len(rows))
    generator = og.Generator(model, params)
    # genai takes a batch as one array padded on the right with pad_token_id (0 here).
    generator.append_tokens(np.array([r + [0] * (length - len(r)) for r in rows], dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    return [[int(t) for t in generator.get_sequence(i)[length:]] for i in range(len(rows))]


def main() -> None:
    with open(sys.argv[1], encoding="utf-8") as f:
        request = json.load(f)
    rows, n = request["rows"], request["new_tokens"]
    result: dict[str, Any] = {"config": {}, "tokenizer": {}, "optimum": {}, "genai": {}}
    for d in request.get("metadata", []):
        result["config"][d] = read_config(d)
        result["tokenizer"][d] = read_tokenizer(d, request["text"])
    for d in request.get("optimum", []):
        result["optimum"][d] = optimum_tokens(d, rows, n)
    for d in request.get("genai", []):
        result["genai"][d] = {"1": genai_tokens(d, rows[:1], n), "2": genai_tokens(d, rows, n)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
