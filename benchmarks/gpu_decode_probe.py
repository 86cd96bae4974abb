"""Where decode time goes on the GPU: the full generate loop against bare CUDA-graph replays.

For one model shape (random weights, fused fp16 export), batch 1: tokens/s of
``llmtool.generate`` and of back-to-back replays of the captured decode step with no host work
between them. The gap is the host's share (input updates, reading the token, Python). Run it
with ``ORT_ENABLE_XQA=1`` to try ONNX Runtime's XQA decode kernel for GroupQueryAttention.

Usage: python benchmarks/gpu_decode_probe.py --shape tinyllama-1.1b --out probe.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    from gpu_generate import make_hf_dir

    from llmtool.export import export_model
    from llmtool.generate import generate
    from llmtool.runtime import OnnxCausalLM

    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="tinyllama-1.1b")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--onnx", type=Path, default=None, help="reuse an existing fused fp16 export"
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    onnx_dir = args.onnx
    if onnx_dir is None or not onnx_dir.exists():
        hf, _ = make_hf_dir(args.shape, work / "hf")
        onnx_dir = args.onnx or work / "onnx"
        export_model(hf, onnx_dir, dtype="fp16", fused=True, force=True)
    model = OnnxCausalLM(onnx_dir, "cuda")
    prompt = [list(np.random.default_rng(0).integers(3, 300, 128))]
    for _ in range(2):
        generate(model, prompt, max_new_tokens=128, stop_at_eos=False)
    res = generate(model, prompt, max_new_tokens=128, stop_at_eos=False)
    loop_tps = res.timing.decode_tokens / res.timing.decode_s
    decoder = next(iter(model._decoders.values()))
    run = model.session.run_with_iobinding
    t = time.perf_counter()
    for _ in range(200):
        run(decoder.step_binding, decoder.step_options)
    replay_ms = (time.perf_counter() - t) / 200 * 1e3
    result = {
        "shape": args.shape,
        "xqa": os.environ.get("ORT_ENABLE_XQA"),
        "generate_tokens_per_s": loop_tps,
        "generate_ms_per_token": 1e3 / loop_tps,
        "bare_replay_ms": replay_ms,
    }
    print(json.dumps(result))
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
