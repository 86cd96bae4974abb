"""CUDA execution provider tests (marker ``gpu``; skipped where CUDA is not usable).

They run on the GPU machine (see benchmarks/README.md): the fused fp16 export on CUDA against
PyTorch fp32, CUDA graph replay at batch 1 and 8, and provider selection.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from llmtool.export import export_model
from llmtool.generate import generate
from llmtool.runtime import OnnxCausalLM, SessionOptions

pytestmark = pytest.mark.gpu
PROMPTS = [
    "The keeper climbed the steps",
    "A ship",
    "Fog until noon",
    "The light came on at dusk",
] * 2


@pytest.fixture(scope="module")
def fused_fp16(tiny_llama_export, tmp_path_factory):
    hf, _ = tiny_llama_export
    out = tmp_path_factory.mktemp("gpu") / "fused-fp16"
    export_model(hf, out, dtype="fp16", fused=True)
    return hf, out


def teacher_forced_top1(
    model: OnnxCausalLM, torch_model, rows: list[list[int]], positions: int
) -> float:
    """Top-1 agreement of the export's decoder with PyTorch fp32 over teacher-forced positions."""
    import torch

    agree = total = 0
    for row in rows:
        ids = torch.tensor([row])
        with torch.no_grad():
            ref = torch_model(ids).logits[0].float().numpy()
        prompt = 8
        decoder = model.decoder(1, len(row) + 64)
        got = [decoder.prefill([row[:prompt]]).logits()[0].copy()]
        for t in range(prompt, len(row) - 1):
            got.append(decoder.step(np.array([row[t]])).logits()[0].copy())
        for k, logits in enumerate(got):
            agree += int(logits.argmax() == ref[prompt - 1 + k].argmax())
            total += 1
            if total >= positions:
                return agree / total
    return agree / total


def test_session_runs_on_cuda(fused_fp16):
    _, out = fused_fp16
    model = OnnxCausalLM(out, "cuda")
    assert model.provider == "cuda" and model.session.get_providers()[0] == "CUDAExecutionProvider"
    assert model.cuda_graph


def test_fp16_cuda_top1_agreement_with_pytorch(fused_fp16):
    from conftest import SAMPLE_TEXT, load_hf

    hf, out = fused_fp16
    loaded = load_hf(hf)
    ids = loaded.tokenizer(SAMPLE_TEXT.read_text())["input_ids"]
    rows = [ids[i : i + 72] for i in range(0, 72 * 4, 72)]
    agreement = teacher_forced_top1(OnnxCausalLM(out, "cuda"), loaded.model, rows, 256)
    assert agreement >= 0.99


@pytest.mark.parametrize("batch", [1, 8])
def test_cuda_graph_replay_matches_plain_run(fused_fp16, batch):
    _, out = fused_fp16
    graph = OnnxCausalLM(out, "cuda")
    plain = OnnxCausalLM(out, "cuda", options=SessionOptions(cuda_graph=False))
    assert graph.cuda_graph and not plain.cuda_graph
    prompts = PROMPTS[:batch]
    runs = [generate(graph, prompts, max_new_tokens=24, stop_at_eos=False) for _ in range(3)]
    reference = generate(plain, prompts, max_new_tokens=24, stop_at_eos=False)
    for run in runs:  # the first run captures the graph, later runs replay it
        assert [o.token_ids for o in run.outputs] == [o.token_ids for o in reference.outputs]


def test_cuda_greedy_equals_cpu_fp32_where_no_near_tie(tiny_llama_export, fused_fp16):
    _, fp32 = tiny_llama_export
    _, fp16 = fused_fp16
    a = generate(OnnxCausalLM(fp32, "cpu"), PROMPTS[:4], max_new_tokens=16)
    b = generate(OnnxCausalLM(fp16, "cuda"), PROMPTS[:4], max_new_tokens=16)
    same = sum(x.token_ids == y.token_ids for x, y in zip(a.outputs, b.outputs, strict=True))
    assert same >= 3  # random tiny weights have near-ties; most rows must match exactly


@pytest.mark.skipif(
    not os.environ.get("LLMTOOL_SMOLLM2_GGUF"), reason="set LLMTOOL_SMOLLM2_GGUF to the GGUF file"
)
def test_smollm2_fp16_cuda_top1_agreement(tmp_path):
    from conftest import SAMPLE_TEXT
    from llmtool.models.loading import load_model

    gguf = Path(os.environ["LLMTOOL_SMOLLM2_GGUF"])
    out = tmp_path / "smollm2-fp16"
    result = export_model(gguf, out, dtype="fp16", fused=True)
    loaded = load_model(str(gguf))
    ids = loaded.tokenizer(SAMPLE_TEXT.read_text())["input_ids"]
    rows = [ids[i : i + 136] for i in range(0, 136 * 2, 136)]
    agreement = teacher_forced_top1(OnnxCausalLM(out, "cuda"), loaded.model, rows, 256)
    print(f"SmolLM2 fp16 CUDA top-1 agreement {agreement:.4f}; validation {result.validation}")
    assert agreement >= 0.99


def test_device_memory_flat_over_500_generations(fused_fp16):
    """Endurance on the GPU: mixed batch sizes and lengths; device memory stops growing after warm-up."""
    from llmtool.hardware import gpu_memory_used

    _, out = fused_fp16
    model = OnnxCausalLM(out, "cuda")
    rng = np.random.default_rng(0)

    def one() -> None:
        batch = int(rng.choice([1, 2, 4, 8]))
        prompts = [
            list(rng.integers(1, model.vocab_size, int(rng.integers(1, 40)))) for _ in range(batch)
        ]
        generate(model, prompts, max_new_tokens=int(rng.integers(1, 24)), stop_at_eos=False)

    for _ in range(100):  # every (batch, cache length) decoder and its CUDA graph gets created
        one()
    before = gpu_memory_used()
    for _ in range(500):
        one()
    after = gpu_memory_used()
    assert before is not None and after is not None
    print(f"device memory {before / 2**20:.0f} MiB -> {after / 2**20:.0f} MiB over 500 generations")
    assert after - before <= 64 * 2**20


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_export_runs_on_cuda_as_on_cpu(tiny_llama_export, tmp_path, mode):
    """A CPU-oriented quantized export (MatMulNBits, int4's extra correction features) also
    runs on CUDA, with the CPU's logits up to kernel rounding."""
    hf, _ = tiny_llama_export
    out = tmp_path / mode
    export_model(hf, out, quantize=mode)  # the standard graph: every op has an fp32 CUDA kernel
    rows = [[5, 17, 42, 99, 7, 3, 250, 11]]
    logits = {}
    for provider in ("cpu", "cuda"):
        model = OnnxCausalLM(out, provider, options=SessionOptions(cuda_graph=False))
        assert model.provider == provider
        decoder = model.decoder(1, 64)
        got = [decoder.prefill(rows).logits()[0].copy()]
        for token in (4, 8, 15, 16):
            got.append(decoder.step(np.array([token])).logits()[0].copy())
        logits[provider] = np.stack(got)
    scale = np.abs(logits["cpu"]).max()
    assert np.abs(logits["cuda"] - logits["cpu"]).max() < 0.05 * scale
    assert (logits["cuda"].argmax(-1) == logits["cpu"].argmax(-1)).mean() >= 0.8
