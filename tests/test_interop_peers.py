"""llmtool's exports through transformers 4.57, Optimum and onnxruntime-genai, run for real.

Those packages cannot share llmtool's environment (Optimum pins transformers 4.57;
onnxruntime-genai needs the CPU ``onnxruntime``, which clashes with ``onnxruntime-gpu``), so
``nox -s interop`` builds a second venv and names its python in ``LLMTOOL_INTEROP_PYTHON``; these
tests export here (transformers 5) and run tests/interop_peer.py there. Without the variable
they are skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from test_interop import NEW_TOKENS, ROPE_THETA, ROWS, llmtool_tokens, save_rope_model, torch_tokens

PEER_PYTHON = os.environ.get("LLMTOOL_INTEROP_PYTHON")
PEER_SCRIPT = Path(__file__).with_name("interop_peer.py")
# A node_modules holding @huggingface/transformers (nox -s interop installs it where npm works).
NODE_PATH = os.environ.get("LLMTOOL_INTEROP_NODE_PATH")
JS_SCRIPT = Path(__file__).with_name("interop_transformers_js.mjs")
TEXT = "The capital of France is Paris."
EOS = 0

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(not PEER_PYTHON, reason="needs LLMTOOL_INTEROP_PYTHON (nox -s interop)"),
]


@pytest.fixture(scope="module")
def peer_run(tokenizer, tmp_path_factory):
    """The exports, and what the peer venv's consumers made of them."""
    from llmtool.export import export_model

    hf = save_rope_model(tokenizer, tmp_path_factory.mktemp("hf-peers"))
    root = tmp_path_factory.mktemp("peer-onnx")
    exports = {
        "standard": export_model(hf, root / "standard").out,
        "fused": export_model(hf, root / "fused", fused=True).out,
        # In transformers.js's layout (onnx/model_q4.onnx): genai and transformers.js run it.
        "int4": export_model(
            hf, root / "int4", fused=True, quantize="int4", layout="transformers.js"
        ).out,
    }
    request = {
        "metadata": [str(p) for p in exports.values()],
        "optimum": [str(exports["standard"]), str(exports["fused"])],
        "genai": [str(p) for p in exports.values()],
        "rows": ROWS,
        "new_tokens": NEW_TOKENS,
        "text": TEXT,
        "transformers_js": [str(exports["int4"])],
    }
    path = root / "request.json"
    path.write_text(json.dumps(request))
    assert PEER_PYTHON is not None
    proc = subprocess.run(
        [PEER_PYTHON, str(PEER_SCRIPT), str(path)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["transformers_js"] = None
    if NODE_PATH:
        js = subprocess.run(
            ["node", str(JS_SCRIPT), str(path)],
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "NODE_PATH": NODE_PATH},
        )
        assert js.returncode == 0, js.stderr[-4000:]
        result["transformers_js"] = json.loads(js.stdout.strip().splitlines()[-1])
    return hf, exports, result


def until_eos(tokens: list[int]) -> list[int]:
    """Tokens up to and including the first EOS (genai stops a row there and pads it)."""
    return tokens[: tokens.index(EOS) + 1] if EOS in tokens else tokens


def test_transformers_4_reads_the_same_metadata(peer_run, tokenizer):
    _, exports, result = peer_run
    for directory in exports.values():
        config = result["config"][str(directory)]
        assert config["transformers"].startswith("4.")
        assert config["rope_theta"] == ROPE_THETA  # not 4.x's default 10000
        assert config["vocab_size"] == len(tokenizer)
        seen = result["tokenizer"][str(directory)]
        assert seen["class"] == "PreTrainedTokenizerFast"
        assert seen["ids"] == tokenizer(TEXT)["input_ids"]


def test_optimum_gives_llmtools_tokens_on_standard_and_fused(peer_run):
    hf, exports, result = peer_run
    expected = torch_tokens(hf)
    for name in ("standard", "fused"):
        assert llmtool_tokens(exports[name]) == expected
        # Optimum left-pads the batch; the fused graph must not be silently wrong on it.
        assert result["optimum"][str(exports[name])] == expected, name


def test_onnxruntime_genai_runs_every_export(peer_run):
    _, exports, result = peer_run
    for name, directory in exports.items():
        ours = llmtool_tokens(directory)
        theirs = result["genai"][str(directory)]
        assert [until_eos(t) for t in theirs["2"]] == [until_eos(t) for t in ours], name
        alone = llmtool_tokens(directory, ROWS[:1])
        assert [until_eos(t) for t in theirs["1"]] == [until_eos(t) for t in alone], name


def test_transformers_js_runs_the_transformers_js_layout(peer_run, tokenizer):
    _, exports, result = peer_run
    if result["transformers_js"] is None:
        pytest.skip("needs LLMTOOL_INTEROP_NODE_PATH (Node and @huggingface/transformers)")
    seen = result["transformers_js"][str(exports["int4"])]
    assert seen["text_ids"] == tokenizer(TEXT)["input_ids"]
    # Left-padded batch 2 through the fused int4 graph, as transformers.js generates.
    assert seen["tokens"] == llmtool_tokens(exports["int4"])


# onnxruntime-genai's model builder needs transformers 5 and the CPU onnxruntime: a third venv.
BUILDER_PYTHON = os.environ.get("LLMTOOL_GENAI_BUILDER_PYTHON")


@pytest.fixture(scope="module")
def genai_folder(peer_run, tmp_path_factory):
    """A folder made by onnxruntime-genai's own model builder from the same weights."""
    if not BUILDER_PYTHON:
        pytest.skip("needs LLMTOOL_GENAI_BUILDER_PYTHON (nox -s interop)")
    hf = peer_run[0]
    root = tmp_path_factory.mktemp("genai-builder")
    out = root / "model"
    proc = subprocess.run(
        [
            BUILDER_PYTHON,
            "-m",
            "onnxruntime_genai.models.builder",
            "-i",
            str(hf),
            "-o",
            str(out),
            "-p",
            "fp32",
            "-e",
            "cpu",
            "-c",
            str(root / "cache"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def test_llmtool_runs_and_evaluates_a_genai_builder_folder(
    peer_run, genai_folder, sample_text_file
):
    from typer.testing import CliRunner

    from llmtool.cli import app
    from llmtool.runtime.model import OnnxCausalLM

    hf, exports, _ = peer_run
    model = OnnxCausalLM(genai_folder, "cpu")
    # genai's graph: GroupQueryAttention without llmtool's next_token, so right padding.
    assert (model.recognised, model.layout, model.padding) == (
        "onnxruntime-genai",
        "standard",
        "right",
    )
    assert llmtool_tokens(genai_folder) == torch_tokens(hf)
    report = genai_folder.parent / "eval.json"
    result = CliRunner().invoke(
        app,
        [
            "eval",
            str(genai_folder),
            "--data",
            str(sample_text_file),
            "--max-length",
            "64",
            "--reference",
            str(exports["standard"]),
            "--json",
            str(report),
        ],
    )
    assert result.exit_code == 0, result.output
    reference = json.loads(report.read_text())["reference"]
    assert reference["top1_agreement"] == 1.0 and reference["kl_divergence"]["max"] < 1e-5
