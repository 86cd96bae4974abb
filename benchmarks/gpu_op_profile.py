"""Per-operator time of one decode step (ONNX Runtime profiling, no CUDA graph), by op type.

Usage: python benchmarks/gpu_op_profile.py --onnx FUSED_FP16_DIR --out profile.json
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import onnxruntime as ort

    from llmtool.runtime import OnnxCausalLM, SessionOptions

    parser = argparse.ArgumentParser()
    parser.add_argument("--onnx", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    model = OnnxCausalLM(args.onnx, "cuda", options=SessionOptions(cuda_graph=False))
    so = ort.SessionOptions()
    so.enable_profiling = True
    so.profile_file_prefix = str(args.out.with_suffix(""))
    model.session = ort.InferenceSession(
        str(args.onnx / "model.onnx"),
        so,
        providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
    )
    decoder = model.decoder(1, 320)
    decoder.step_binding = decoder._bind(decoder.ids, decoder.mask_value, decoder.positions)
    tokens = decoder.prefill([list(range(3, 131))]).argmax()
    for _ in range(args.steps):
        tokens = decoder.step(tokens).argmax()
    trace = json.loads(Path(model.session.end_profiling()).read_text())
    by_op: dict[str, float] = collections.defaultdict(float)
    count: dict[str, int] = collections.defaultdict(int)
    steps = 0
    for ev in trace:
        if ev.get("cat") == "Node" and ev["name"].endswith("_kernel_time"):
            if ev["args"].get("provider") is None:
                continue
            by_op[ev["args"]["op_name"]] += ev["dur"]
            count[ev["args"]["op_name"]] += 1
        if ev.get("cat") == "Session" and ev["name"] == "model_run":
            steps += 1
    # The prefill is one of the runs; averages are per run over decode-shaped runs dominated.
    table = {
        op: {"us_per_step": by_op[op] / steps, "calls_per_step": count[op] / steps} for op in by_op
    }
    total = sum(v["us_per_step"] for v in table.values())
    result = {
        "steps": steps,
        "kernel_us_per_step": total,
        "ops": dict(sorted(table.items(), key=lambda kv: -kv[1]["us_per_step"])),
    }
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result)[:3000])


if __name__ == "__main__":
    main()
