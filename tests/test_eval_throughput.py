"""Throughput scenarios: timings, memory and bandwidth figures, the PyTorch backend beside ONNX."""

from __future__ import annotations

import numpy as np
import pytest

from llmtool.errors import UsageError
from llmtool.evaluate.throughput import cache_bytes, measure_throughput, parse_sizes, plan_scenarios
from llmtool.hardware import PeakRss, gpu_peak_bandwidth
from llmtool.runtime import OnnxCausalLM


@pytest.fixture(scope="module")
def onnx_model(tiny_llama_export):
    return OnnxCausalLM(tiny_llama_export[1], "cpu")


@pytest.fixture(autouse=True)
def small_bandwidth_probe(monkeypatch):
    import llmtool.hardware as hardware

    monkeypatch.setattr(hardware.defaults, "CPU_BANDWIDTH_PROBE_BYTES", 16 * 2**20)
    hardware.measure_cpu_bandwidth.cache_clear()


def test_onnx_scenarios(onnx_model):
    result = measure_throughput(
        onnx_model, batch_sizes=[1, 2], prompt_lengths=[6], new_tokens=4, warmup=1, repeats=2
    )
    assert result["repeats"] == 2 and result["warmup"] == 1
    assert [s["key"] for s in result["scenarios"]] == ["b1.p6.n4", "b2.p6.n4"]
    weights = sum(r["bytes"] for r in onnx_model.manifest["files"].values())
    peak = result["peak_bandwidth"]["cpu"]
    assert peak["bytes_per_s"] > 1e8 and "measured" in peak["source"]
    for s in result["scenarios"]:
        b, p, n = s["batch_size"], s["prompt_length"], s["new_tokens"]
        runs = s["runs"]
        assert len(runs["ttft_s"]) == len(runs["decode_s"]) == 2
        assert s["decode_tokens_per_s"]["best"] == pytest.approx(
            b * (n - 1) / min(runs["decode_s"])
        )
        assert s["prefill_tokens_per_s"]["best"] == pytest.approx(b * p / s["ttft_s"]["best"])
        assert s["ttft_s"]["best"] == min(runs["ttft_s"]) > 0
        assert s["ttft_s"]["best"] <= s["ttft_s"]["median"]
        itl = s["inter_token_latency_s"]
        assert 0 < itl["p50"] <= itl["p90"] <= itl["p99"]
        assert s["e2e_latency_s"]["best"] >= s["ttft_s"]["best"]
        assert s["peak_rss_bytes"] > 50 * 2**20 and s["device_memory_bytes"] is None
        bw = s["bandwidth"]
        # Tiny Llama: 2 layers × (K, V) × 2 KV heads × 16 dims × 4 bytes = 512 bytes a token a row;
        # decode steps read p + 1 .. p + n - 1 tokens: p + n/2 on average.
        assert bw["kv_bytes_per_step"] == 512 * b * (p + n // 2)
        assert bw["weight_bytes"] == weights
        steps_per_s = (n - 1) / min(runs["decode_s"])
        assert bw["bytes_per_s"] == pytest.approx((weights + bw["kv_bytes_per_step"]) * steps_per_s)
        assert bw["utilization"] == pytest.approx(bw["bytes_per_s"] / peak["bytes_per_s"])
        # The tiny model's weights and cache fit in the CPU's last-level cache.
        cache = peak["cache_bytes"]
        assert cache is None or weights + bw["kv_bytes_per_step"] <= cache
        assert bw["bound"] == (
            "cache" if cache else "bandwidth" if bw["utilization"] >= 0.4 else "launch"
        )


def test_pytorch_backend_runs_the_same_scenarios(tiny_llama_export, onnx_model):
    from llmtool.evaluate.run import torch_threads
    from llmtool.models.loading import load_model

    torch_model = load_model(str(tiny_llama_export[0])).model
    with torch_threads(1):
        result = measure_throughput(
            onnx_model,
            batch_sizes=[2],
            prompt_lengths=[5],
            new_tokens=3,
            warmup=0,
            repeats=1,
            pytorch=torch_model,
        )
    onnx, pytorch = result["scenarios"]
    assert (onnx["backend"], pytorch["backend"]) == ("onnx", "pytorch")
    assert onnx["key"] == pytorch["key"] == "b2.p5.n3"
    assert pytorch["decode_tokens_per_s"]["best"] > 0
    params = sum(p.numel() for p in torch_model.parameters())
    assert pytorch["bandwidth"]["weight_bytes"] == 4 * params


def test_cache_bytes_with_a_recurrent_state():
    entries = [
        {"shape": ["batch", 2, "past_sequence", 8], "dtype": "float16"},
        {"shape": [3, "batch", 10], "dtype": "float32"},  # a state: no sequence axis
    ]
    assert cache_bytes(entries, 4, 0) == 3 * 4 * 10 * 4
    assert cache_bytes(entries, 4, 5) == 4 * 2 * 5 * 8 * 2 + 3 * 4 * 10 * 4
    assert cache_bytes(entries, 1, 1, itemsize=4) == 2 * 8 * 4 + 30 * 4


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"prompt_lengths": [250], "new_tokens": 10}, "exceeds the model's context of 256"),
        ({"new_tokens": 1}, "at least 2"),
        ({"repeats": 0}, "--repeats 1 or more"),
        ({"batch_sizes": []}, "positive integers"),
    ],
)
def test_bad_scenarios(onnx_model, kwargs, match):
    args = {"batch_sizes": [1], "prompt_lengths": [8], "new_tokens": 4, "warmup": 0, "repeats": 1}
    with pytest.raises(UsageError, match=match):
        plan_scenarios(onnx_model, **{**args, **kwargs})


def test_parse_sizes():
    assert parse_sizes("1,8, 32", "--batch-sizes") == (1, 8, 32)
    for bad in ("", "1,x", "0,2", "-1"):
        with pytest.raises(UsageError, match="--batch-sizes takes positive integers"):
            parse_sizes(bad, "--batch-sizes")


@pytest.mark.parametrize(
    ("name", "bandwidth"),
    [
        ("NVIDIA H100 80GB HBM3", 3.35e12),
        ("NVIDIA H100 PCIe", 2.0e12),
        ("NVIDIA H200", 4.8e12),
        ("NVIDIA GH200 480GB", 4.0e12),
        ("NVIDIA A100-SXM4-40GB", 1.555e12),
        ("NVIDIA A100-SXM4-80GB", 2.039e12),
        ("NVIDIA A10G", 0.6e12),
        ("NVIDIA L40S", 0.864e12),
        ("NVIDIA L4", 0.3e12),
        ("Tesla T4", 0.32e12),
        ("NVIDIA GeForce RTX 4090", 1.008e12),
        ("Some Future GPU", None),
    ],
)
def test_known_gpu_bandwidth(name, bandwidth):
    assert gpu_peak_bandwidth(name) == bandwidth


def test_peak_rss_sees_a_temporary_allocation():
    with PeakRss() as before:
        pass
    with PeakRss() as rss:
        block = np.ones(64 * 2**20 // 8)
        del block
    assert rss.peak >= before.peak + 48 * 2**20


@pytest.mark.gpu
def test_cuda_scenarios_report_device_memory_and_datasheet_bandwidth(tiny_llama_export):
    from llmtool.hardware import gpu_info

    model = OnnxCausalLM(tiny_llama_export[1], "cuda")
    result = measure_throughput(
        model, batch_sizes=[1], prompt_lengths=[8], new_tokens=4, warmup=1, repeats=2
    )
    s = result["scenarios"][0]
    assert s["device"] == "cuda" and s["device_memory_bytes"] > 0
    info = gpu_info()
    assert info is not None and info["name"] in result["peak_bandwidth"]["cuda"]["source"]
