"""Interop in the default environment (transformers 5): metadata, left padding, genai_config, foreign exports.

The peers themselves (transformers 4.57, Optimum, onnxruntime-genai) run in their own venv:
tests/test_interop_peers.py (``nox -s interop``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import TINY_LLAMA_SHAPE

ROPE_THETA = 100000.0  # SmolLM2's base; not transformers' default 10000, so a misread shows
ROWS = [[5, 6, 7, 8, 9, 10, 11], [12, 13]]  # unequal prompts: one row is padded
NEW_TOKENS = 8


def save_rope_model(tokenizer, path: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        **TINY_LLAMA_SHAPE,
        vocab_size=len(tokenizer),
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
    )
    LlamaForCausalLM(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def rope_exports(tokenizer, tmp_path_factory):
    """(hf_dir, standard export, fused export) of a tiny Llama with rope_theta 1e5."""
    from llmtool.export import export_model

    hf = save_rope_model(tokenizer, tmp_path_factory.mktemp("hf-rope"))
    root = tmp_path_factory.mktemp("rope-onnx")
    export_model(hf, root / "standard")
    export_model(hf, root / "fused", fused=True)
    return hf, root / "standard", root / "fused"


def llmtool_tokens(directory: Path, rows=ROWS) -> list[list[int]]:
    from llmtool.generate import generate

    result = generate(directory, rows, max_new_tokens=NEW_TOKENS, provider="cpu", stop_at_eos=False)
    return [o.token_ids for o in result.outputs]


def torch_tokens(hf: Path, rows=ROWS) -> list[list[int]]:
    """transformers' own greedy generate, left-padded: the independent reference."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf).eval()
    length = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (length - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )
    return out[:, length:].tolist()


def test_portable_config_keeps_5x_and_adds_4x_keys():
    from llmtool.export.interop import portable_config, portable_tokenizer_config

    plain = portable_config(
        {"rope_parameters": {"rope_theta": 1e5, "rope_type": "default"}, "dtype": "float32"}
    )
    assert plain["rope_theta"] == 1e5 and plain["rope_scaling"] is None
    assert plain["rope_parameters"] == {"rope_theta": 1e5, "rope_type": "default"}
    assert plain["torch_dtype"] == "float32"
    llama3 = {"rope_theta": 5e5, "rope_type": "llama3", "factor": 8.0}
    scaled = portable_config({"rope_parameters": llama3})
    assert scaled["rope_theta"] == 5e5
    assert scaled["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0}
    gemma3 = portable_config(
        {
            "rope_parameters": {
                "full_attention": {"rope_theta": 1e6, "rope_type": "default"},
                "sliding_attention": {"rope_theta": 1e4, "rope_type": "default"},
            }
        }
    )
    assert (gemma3["rope_theta"], gemma3["rope_local_base_freq"]) == (1e6, 1e4)
    tok = portable_tokenizer_config({"tokenizer_class": "TokenizersBackend", "is_local": True})
    assert tok == {"tokenizer_class": "PreTrainedTokenizerFast"}
    assert (
        portable_tokenizer_config({"tokenizer_class": "GPT2Tokenizer"})["tokenizer_class"]
        == "GPT2Tokenizer"
    )


def test_metadata_reads_back_the_same_under_transformers_5(rope_exports, tokenizer):
    from transformers import AutoConfig, AutoTokenizer

    _, standard, _ = rope_exports
    raw = json.loads((standard / "config.json").read_text())
    assert raw["rope_theta"] == ROPE_THETA  # the key transformers 4.x reads
    assert AutoConfig.from_pretrained(standard).rope_parameters["rope_theta"] == ROPE_THETA
    tok_config = json.loads((standard / "tokenizer_config.json").read_text())
    assert tok_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    text = "The capital of France is Paris."
    assert (
        AutoTokenizer.from_pretrained(standard)(text)["input_ids"] == tokenizer(text)["input_ids"]
    )


def run_left_padded(directory: Path, rows=ROWS) -> list[list[int]]:
    """Greedy decoding as Optimum drives a graph: left padding, the returned cache fed back."""
    import onnxruntime as ort

    session = ort.InferenceSession(
        str(directory / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    names = {i.name for i in session.get_inputs()}
    length, batch = max(len(r) for r in rows), len(rows)
    ids = np.array([[0] * (length - len(r)) + r for r in rows], dtype=np.int64)
    mask = (
        np.arange(length)[None, :] >= length - np.array([len(r) for r in rows])[:, None]
    ).astype(np.int64)
    past = {
        i.name: np.zeros((batch, i.shape[1], 0, i.shape[3]), np.float32)
        for i in session.get_inputs()
        if i.name.startswith("past_key_values.")
    }
    out: list[list[int]] = [[] for _ in rows]
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    for _ in range(NEW_TOKENS):
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, **past}
        result = dict(
            zip(
                [o.name for o in session.get_outputs()],
                session.run(None, {k: v for k, v in feeds.items() if k in names}),
                strict=True,
            )
        )
        token = result["logits"][:, -1].argmax(-1)
        for row, t in zip(out, token, strict=True):
            row.append(int(t))
        past = {
            k.replace("present.", "past_key_values."): v
            for k, v in result.items()
            if k.startswith("present.")
        }
        ids = token[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
        positions = positions[:, -1:] + 1
    return out


def test_fused_graph_takes_left_padding(rope_exports):
    hf, standard, fused = rope_exports
    expected = torch_tokens(hf)
    assert llmtool_tokens(fused) == expected  # llmtool's own right-padded path
    assert run_left_padded(fused) == expected  # Optimum's left-padded path, same graph
    assert run_left_padded(standard) == expected


def test_genai_config_matches_the_graph(rope_exports):
    import onnx

    _, standard, fused = rope_exports
    for directory, shared in ((standard, False), (fused, True)):
        config = json.loads((directory / "genai_config.json").read_text())
        manifest = json.loads((directory / "llmtool.json").read_text())
        decoder = config["model"]["decoder"]
        graph = onnx.load(str(directory / decoder["filename"]), load_external_data=False).graph
        inputs, outputs = {i.name for i in graph.input}, {o.name for o in graph.output}
        assert (
            set(decoder["inputs"].values()) - {"past_key_values.%d.key", "past_key_values.%d.value"}
            <= inputs
        )
        for i in range(decoder["num_hidden_layers"]):
            assert decoder["inputs"]["past_key_names"] % i in inputs
            assert decoder["outputs"]["present_value_names"] % i in outputs
        assert decoder["num_hidden_layers"] == manifest["num_layers"] == 2
        assert (decoder["num_key_value_heads"], decoder["head_size"]) == (2, 16)
        assert (
            config["model"]["type"] == "llama"
            and config["model"]["vocab_size"] == manifest["vocab_size"]
        )
        assert config["search"]["past_present_share_buffer"] is shared
        assert ("position_ids" in decoder["inputs"]) is (not shared)


def optimum_style(export: Path, out: Path) -> Path:
    """What an Optimum export holds: model.onnx, config and tokenizer, no llmtool.json."""
    shutil.copytree(export, out)
    (out / "llmtool.json").unlink()
    (out / "genai_config.json").unlink()
    return out


def test_generate_and_eval_accept_an_optimum_export(rope_exports, tmp_path, sample_text_file):
    from llmtool.cli import app
    from llmtool.evaluate import evaluate_perplexity
    from llmtool.runtime.model import OnnxCausalLM

    _, standard, _ = rope_exports
    foreign = optimum_style(standard, tmp_path / "optimum")
    model = OnnxCausalLM(foreign, "cpu")
    assert (model.recognised, model.layout, model.padding) == ("optimum", "standard", "left")
    assert [c.present for c in model.cache_entries] == [
        c.present for c in OnnxCausalLM(standard, "cpu").cache_entries
    ]
    assert llmtool_tokens(foreign) == llmtool_tokens(standard)
    ours = evaluate_perplexity(standard, sample_text_file, max_length=64, provider="cpu")
    theirs = evaluate_perplexity(foreign, sample_text_file, max_length=64, provider="cpu")
    assert theirs.perplexity == pytest.approx(ours.perplexity, rel=1e-6)
    report = tmp_path / "eval.json"
    result = CliRunner().invoke(
        app,
        [
            "eval",
            str(foreign),
            "--data",
            str(sample_text_file),
            "--max-length",
            "64",
            "--reference",
            str(standard),
            "--json",
            str(report),
        ],
    )
    assert result.exit_code == 0, result.output
    record = json.loads(report.read_text())
    assert record["config"]["recognised"] == "optimum"
    assert record["reference"]["kl_divergence"]["max"] < 1e-6
    assert record["reference"]["top1_agreement"] == 1.0


def test_generate_cli_says_which_layout_it_recognised(rope_exports, tmp_path):
    _, _, fused = rope_exports
    foreign = tmp_path / "genai"
    shutil.copytree(fused, foreign)
    (foreign / "llmtool.json").unlink()  # genai_config.json stays: an onnxruntime-genai folder
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmtool",
            "generate",
            str(foreign),
            "-p",
            "hello",
            "--max-new-tokens",
            "4",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Recognised an onnxruntime-genai export" in proc.stderr
    assert len(json.loads(proc.stdout)["outputs"][0]["token_ids"]) >= 1


def test_an_export_without_a_kv_cache_is_refused_clearly(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from llmtool.cli import app

    graph = helper.make_graph(
        [helper.make_node("Cast", ["input_ids"], ["logits"], to=TensorProto.FLOAT)],
        "no_cache",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence"])],
    )
    onnx.save(helper.make_model(graph), tmp_path / "model.onnx")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 8}))
    result = CliRunner().invoke(app, ["generate", str(tmp_path), "-p", "hi"])
    assert result.exit_code == 2
    assert "looks like an optimum export" in result.output and "no KV cache" in result.output


def test_transformers_js_file_names():
    from llmtool.export.interop import transformers_js_file

    assert transformers_js_file("fp32", None) == ("onnx/model.onnx", "fp32")
    assert transformers_js_file("fp16", None) == ("onnx/model_fp16.onnx", "fp16")
    assert transformers_js_file("fp32", "int4") == ("onnx/model_q4.onnx", "q4")
    assert transformers_js_file("fp32", "int8") == ("onnx/model_quantized.onnx", "q8")


def test_transformers_js_layout(rope_exports, tmp_path):
    import onnx

    hf, standard, _ = rope_exports
    out = tmp_path / "js"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmtool",
            "export",
            str(hf),
            "--out",
            str(out),
            "--layout",
            "transformers.js",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    # What transformers.js reads (onnx/ + config, generation config, tokenizer), and llmtool's own.
    assert files == {
        "onnx/model.onnx",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "genai_config.json",
        "llmtool.json",
    }
    config = json.loads((out / "config.json").read_text())
    assert config["transformers.js_config"] == {"dtype": "fp32", "use_external_data_format": False}
    assert config["rope_theta"] == ROPE_THETA
    graph = onnx.load(str(out / "onnx" / "model.onnx")).graph
    past = next(i for i in graph.input if i.name == "past_key_values.0.key")
    # transformers.js sizes its first (empty) cache from this symbol; others become 0.
    assert past.type.tensor_type.shape.dim[0].dim_param == "batch_size"
    assert (
        json.loads((out / "genai_config.json").read_text())["model"]["decoder"]["filename"]
        == "onnx/model.onnx"
    )
    assert llmtool_tokens(out) == llmtool_tokens(standard)


def test_an_older_optimum_export_is_refused_with_what_to_do(tmp_path):
    from llmtool.cli import app

    (tmp_path / "decoder_model_merged.onnx").write_bytes(b"")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    result = CliRunner().invoke(
        app, ["eval", str(tmp_path), "--data", str(tmp_path / "config.json")]
    )
    assert result.exit_code == 2
    assert "older Optimum export" in result.output and "optimum-cli" in result.output
