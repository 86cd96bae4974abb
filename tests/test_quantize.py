"""Quantized exports: fidelity recorded and gated, I/O contract unchanged, generation works."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from llmtool import defaults
from llmtool.errors import UsageError, ValidationError
from llmtool.export import export_model
from llmtool.generate import generate
from llmtool.runtime import OnnxCausalLM


def io_types(path):
    model = onnx.load(str(path), load_external_data=False)
    return (
        {i.name: i.type.tensor_type.elem_type for i in model.graph.input},
        {o.name: o.type.tensor_type.elem_type for o in model.graph.output},
    )


@pytest.fixture(
    scope="module",
    params=[("int4", False), ("int8", False), ("int4", True), ("int8", True)],
    ids=["int4", "int8", "int4-fused", "int8-fused"],
)
def quantized(request, tiny_llama_export, tmp_path_factory):
    mode, fused = request.param
    hf, fp32 = tiny_llama_export
    out = tmp_path_factory.mktemp("quant") / f"{mode}-{fused}"
    return mode, fused, hf, fp32, export_model(hf, out, quantize=mode, fused=fused)


def test_fidelity_recorded_and_within_threshold(quantized):
    mode, _, _, _, result = quantized
    f = result.manifest["fidelity"]
    assert f["passed"]
    assert f["max_relative_delta_perplexity"] == defaults.QUANT_MAX_RELATIVE_DELTA_PPL[mode]
    assert f["relative_delta_perplexity"] <= f["max_relative_delta_perplexity"]  # increase gated
    assert f["nonfinite_logits"] == 0 and 0.5 < f["top1_agreement"] <= 1.0
    assert (
        0 <= f["kl_divergence"]["median"] <= f["kl_divergence"]["p99"] <= f["kl_divergence"]["max"]
    )
    assert result.manifest["quantization"]["mode"] == mode


def test_quantized_ops_present(quantized):
    mode, _, _, _, result = quantized
    graph = onnx.load(str(result.out / "model.onnx")).graph
    nodes, weights = graph.node, {i.name for i in graph.initializer}
    # Every linear layer is quantized: no float MatMul / Gemm reads a weight any more.
    assert not [n for n in nodes if n.op_type in ("MatMul", "Gemm") and n.input[1] in weights]
    bits = [
        next(a.i for a in n.attribute if a.name == "bits")
        for n in nodes
        if n.op_type == "MatMulNBits"
    ]
    layers = result.manifest["num_layers"]
    if mode == "int4":  # 4 linear layers per block (q/k/v fused or not); the head at 8 bits
        assert bits.count(8) == 1 and bits.count(4) >= 4 * layers
    else:
        assert set(bits) == {8} and len(bits) >= 4 * layers + 1
    assert result.manifest["files"]["model.onnx"]["bytes"] < 0.6 * (
        result.manifest["parameters"] * 4 + (result.manifest["vocab_size"] * 64 * 4)
    )


def test_io_contract_unchanged(quantized, tmp_path):
    _, fused, hf, fp32, result = quantized
    reference = result.out if not fused else export_model(hf, tmp_path / "f", fused=True).out
    base_in, base_out = io_types((fp32 if not fused else reference) / "model.onnx")
    q_in, q_out = io_types(result.out / "model.onnx")
    assert q_in == base_in and q_out == base_out
    assert result.manifest["inputs"] == list(q_in) and result.manifest["outputs"] == list(q_out)


def test_quantized_generation_runs(quantized):
    *_, result = quantized
    model = OnnxCausalLM(result.out, "cpu")
    out = generate(model, ["The keeper climbed", "A"], max_new_tokens=8, stop_at_eos=False)
    assert all(o.new_tokens == 8 for o in out.outputs)
    assert all(0 <= t < model.vocab_size for o in out.outputs for t in o.token_ids)


def test_fidelity_gate_fails_and_writes_nothing(tiny_llama_export, tmp_path, monkeypatch):
    hf, _ = tiny_llama_export
    monkeypatch.setitem(defaults.QUANT_MAX_RELATIVE_DELTA_PPL, "int4", -1.0)  # unattainable
    with pytest.raises(ValidationError, match="drifts too far"):
        export_model(hf, tmp_path / "q", quantize="int4")
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"quantize": "int2"}, "Unknown quantization"),
        ({"quantize": "int4", "block_size": 24}, "block-size"),
        ({"quantize": "int4", "dtype": "fp16"}, "fp32"),
    ],
)
def test_bad_quantize_options(tiny_llama_export, tmp_path, kwargs, match):
    with pytest.raises(UsageError, match=match):
        export_model(tiny_llama_export[0], tmp_path / "x", **kwargs)


def test_head_matmul_graph_equals_gemm_graph(tiny_llama_export):
    """Untying the head for quantization changes no number in fp32."""
    import torch

    from conftest import load_hf
    from llmtool.export.registry import extract
    from llmtool.export.transformer import build_decoder_graph

    loaded = load_hf(tiny_llama_export[0])
    w = extract(loaded.model)
    import onnxruntime as ort

    from llmtool.export.contract import WeightFormat

    outs = []
    for head_matmul in (False, True):
        g, io = build_decoder_graph(w, "fp32", 17, WeightFormat(head_matmul=head_matmul))
        sess = ort.InferenceSession(
            g.to_model("t", "0").SerializeToString(), providers=["CPUExecutionProvider"]
        )
        ids = np.array([[5, 6, 7, 8]])
        feeds = {
            "input_ids": ids,
            "attention_mask": np.ones_like(ids),
            "position_ids": np.arange(4)[None],
        }
        for c in io.cache:
            feeds[c["input"]] = np.zeros([1, c["shape"][1], 0, c["shape"][3]], np.float32)
        outs.append(sess.run(["logits"], feeds)[0])
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-5)
    del torch


@pytest.mark.parametrize("symmetric", [False, True])
def test_int4_blocks_reproduce_a_q4_1_grid(symmetric):
    """Weights already on a Q4_1 grid (d * q + min per block of 32) come back when asymmetric:
    the integer zero point plus the per-block correction cancel the rounding (up to the 4-bit
    rounding of the correction itself, d / 30)."""
    import onnxruntime as ort

    from llmtool.export.graph import GraphBuilder
    from llmtool.export.quantize import int4_matmul

    rng = np.random.default_rng(0)
    k, n, bs = 96, 40, 32
    d = rng.uniform(0.01, 0.1, size=(k // bs, n)).astype(np.float32)
    # Blocks that span zero, as trained weights do: the zero point round(-min / d) is in 0..15.
    low = (-d * rng.uniform(0, 15, size=(k // bs, n))).astype(np.float32)
    q = rng.integers(0, 16, size=(k, n))
    q[0::bs], q[1::bs] = 0, 15  # every block spans the whole code range, as Q4_1 blocks do
    w = (np.repeat(d, bs, axis=0) * q + np.repeat(low, bs, axis=0)).astype(np.float32)
    g = GraphBuilder(17)
    g.add_input("x", onnx.TensorProto.FLOAT, ["b", "s", k])
    y = int4_matmul(g, "x", "lin", w, bs, symmetric)
    g.add_output(y, "y", onnx.TensorProto.FLOAT, ["b", "s", n])
    session = ort.InferenceSession(
        g.to_model("t", "0").SerializeToString(), providers=["CPUExecutionProvider"]
    )
    x = rng.normal(size=(2, 3, k)).astype(np.float32)
    got = session.run(["y"], {"x": x})[0]
    error = np.abs(got - x @ w).max() / np.abs(x @ w).max()
    if symmetric:
        assert error > 2e-2  # a fresh symmetric grid: rounding error, not exact
        assert error < 0.1
    else:
        assert error < 1e-2  # int8 activations (accuracy level 4) are the only rounding left
