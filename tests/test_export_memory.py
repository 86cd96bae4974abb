"""Export memory: the inline model file is written one weight at a time, yet is the same model.

``GraphBuilder.save`` streams a small model as the graph without initializers followed by one
ModelProto per initializer (protobuf merges them on parsing), so the export's peak holds no
ModelProto or serialized copy of the weights. benchmarks/export_memory.py measures the peak.
"""

from __future__ import annotations

import numpy as np
import pytest


@pytest.mark.parametrize("direct_bytes", [0, 1 << 20])  # every weight written from its array / none
def test_streamed_model_file_parses_as_the_whole_model(
    tokenizer, tmp_path, monkeypatch, direct_bytes
):
    import onnx
    import onnxruntime as ort

    from conftest import build_tiny_model
    from llmtool.export import graph as graph_module
    from llmtool.export.registry import build_graph

    monkeypatch.setattr(graph_module, "DIRECT_WRITE_BYTES", direct_bytes)

    model = build_tiny_model("llama", len(tokenizer))
    built = build_graph(model, "fp32", 17)
    path = tmp_path / "model.onnx"
    assert built.graph.save(path, "llmtool", "test") == [path]
    whole = built.graph.to_model("llmtool", "test")
    streamed = onnx.load(str(path))
    assert streamed == whole  # same nodes, I/O, opsets and every initializer's bytes
    assert len(streamed.graph.initializer) == len(built.graph.weights) > 10
    # ONNX Runtime reads it too: logits of a prompt equal the in-memory model's.
    feeds = {
        "input_ids": np.array([[1, 2, 3]], np.int64),
        "attention_mask": np.ones((1, 3), np.int64),
        "position_ids": np.arange(3, dtype=np.int64)[None],
    }
    for entry in built.io.cache:
        shape = [1 if d == "batch" else 0 if d == "past_sequence" else d for d in entry["shape"]]
        feeds[entry["input"]] = np.zeros(shape, np.float32)
    a = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["logits"], feeds)
    b = ort.InferenceSession(whole.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        ["logits"], feeds
    )
    np.testing.assert_array_equal(a[0], b[0])


def test_fp32_weights_are_not_copied_into_the_graph(tokenizer):
    from conftest import build_tiny_model
    from llmtool.export.registry import extract
    from llmtool.export.transformer import DecoderGraph

    weights = extract(build_tiny_model("llama", len(tokenizer)))
    graph = DecoderGraph(weights, "fp32", 17)
    graph.build()
    stored = graph.g.weights["layers.0.attn.qkv.weight"]
    assert np.shares_memory(stored, weights.layers[0].qkv_w)  # the extractor's array itself


def test_consumed_extraction_frees_linear_weights_and_keeps_the_graph(tokenizer):
    """Inside consume_linear_weights each nn.Linear weight is freed once copied (the export holds
    one fp32 copy of the weights, not two), and the extracted weights are the same numbers."""
    import torch

    from conftest import build_tiny_model
    from llmtool.export.registry import extract
    from llmtool.export.weights import consume_linear_weights

    kept = extract(build_tiny_model("llama", len(tokenizer)))
    model = build_tiny_model("llama", len(tokenizer))
    params = sum(p.numel() for p in model.parameters())
    with consume_linear_weights():
        consumed = extract(model)
    linears = [m for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(m.weight.device.type == "meta" for m in linears)
    assert sum(p.numel() for p in model.parameters()) == params  # shapes kept for the manifest
    for a, b in zip(kept.layers, consumed.layers, strict=True):
        for name in ("qkv_w", "o_w", "up_w", "down_w"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
