"""int8 / int4 encoder-decoder exports: ONNX Runtime's MatMulNBits quantizer and the fidelity gate.

Tiny random T5 / BART / Marian from tests/_seq2seq.py; the fp32 PyTorch model is the reference.
BART runs in the default suite, T5 and Marian under the seq2seq_full marker.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from _seq2seq import SOURCES, save_tiny_seq2seq

torch = pytest.importorskip("torch")

# (arch, mode, greedy equal to transformers'). Measured on these seeds (block 32): int8 passes on
# T5 and BART (BART's second source flips a near-tie at its first token), int4 passes on Marian;
# int8 Marian (ΔPPL +1.45% > 1%) and int4 T5 / BART (+11.3% / +7.7% > 5%, benchmarks/results/seq2seq_precision.md) fail the gate.
CASES = [
    pytest.param("bart", "int8", False),
    pytest.param("t5", "int8", True, marks=pytest.mark.seq2seq_full),
    pytest.param("marian", "int4", False, marks=pytest.mark.seq2seq_full),
]


def _hf_greedy(hf, sources, max_new_tokens):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    model, tok = AutoModelForSeq2SeqLM.from_pretrained(hf).eval(), AutoTokenizer.from_pretrained(hf)
    eos = model.generation_config.eos_token_id
    rows = []
    with torch.no_grad():
        for s in sources:  # one row at a time: no padding in the reference
            out = model.generate(
                **tok([s], return_tensors="pt"), do_sample=False, max_new_tokens=max_new_tokens
            )
            row = out[0, 1:].tolist()
            rows.append(row[: row.index(eos) + 1] if eos in row else row)
    return rows


@pytest.mark.parametrize(("arch", "mode", "exact"), CASES)
def test_quantized_export_passes_gate_and_generates(arch, mode, exact, tokenizer, tmp_path):
    import onnx

    from llmtool.export import export_model
    from llmtool.seq2seq.generate import generate_seq2seq

    hf = save_tiny_seq2seq(arch, tokenizer, tmp_path / "hf")
    out = tmp_path / "q"
    export_model(hf, out, quantize=mode, block_size=32)
    manifest = json.loads((out / "llmtool.json").read_text())
    q, f = manifest["quantization"], manifest["fidelity"]
    assert q["mode"] == mode and q["block_size"] == 32 and manifest["weights"] == mode
    assert f["passed"] and f["nonfinite_logits"] == 0 and f["pairs"] >= 4
    assert f["relative_delta_perplexity"] <= f["max_relative_delta_perplexity"]
    assert f["kl_divergence"]["mean"] < (1e-3 if mode == "int8" else 5e-2)
    assert f["top1_agreement"] >= (0.95 if mode == "int8" else 0.85)
    for name in ("encoder_model.onnx", "decoder_model.onnx"):
        ops = {n.op_type for n in onnx.load(str(out / name)).graph.node}
        assert "MatMulNBits" in ops, name
        nbits = [n for n in onnx.load(str(out / name)).graph.node if n.op_type == "MatMulNBits"]
        assert {a.i for n in nbits for a in n.attribute if a.name == "bits"} == {int(mode[3:])}
    # Tied / shared weights: the LM head is its own quantized MatMul [d, vocab], the token
    # embedding (shared with the encoder, tied to the head) stays an fp32 Gather table.
    graph = onnx.load(str(out / "decoder_model.onnx")).graph
    heads = [
        n
        for n in graph.node
        if n.op_type == "MatMulNBits"
        and any(a.name == "N" and a.i == len(tokenizer) for a in n.attribute)
    ]
    tables = {i.name: i for i in graph.initializer}
    gathers = [
        tables[n.input[0]]
        for n in graph.node
        if n.op_type == "Gather"
        and n.input[0] in tables
        and tables[n.input[0]].dims[0] == len(tokenizer)
    ]
    assert (
        len(heads) == 1 and gathers and all(t.data_type == onnx.TensorProto.FLOAT for t in gathers)
    )
    # The fp32 parity figures are still measured and recorded, not gated.
    assert manifest["validation"]["gate"] is False and manifest["validation"]["batch"] == 2
    got = generate_seq2seq(out, SOURCES[:2], max_new_tokens=8, provider="cpu")
    ids = [o.token_ids for o in got.outputs]
    ref = _hf_greedy(hf, SOURCES[:2], 8)
    if exact:
        assert ids == ref
    else:  # quantized weights flip near-ties of a random model: the gate's figures bound them
        assert any(r == g for r, g in zip(ref, ids, strict=True))


@pytest.mark.parametrize("arch", ["bart", pytest.param("t5", marks=pytest.mark.seq2seq_full)])
def test_fp16_export_validates_gates_and_generates(arch, tokenizer, tmp_path):
    """fp16 weights and arithmetic (fp32 I/O): within fp16's logit tolerance of transformers'
    fp32 model, the fidelity gate's rounding-sized ΔPPL, and transformers' greedy tokens."""
    import onnx

    from llmtool import defaults
    from llmtool.export import export_model
    from llmtool.seq2seq.generate import generate_seq2seq

    hf = save_tiny_seq2seq(arch, tokenizer, tmp_path / "hf")
    out = tmp_path / "h"
    export_model(hf, out, dtype="fp16")
    manifest = json.loads((out / "llmtool.json").read_text())
    v, f = manifest["validation"], manifest["fidelity"]
    assert manifest["weights"] == "fp16" and "quantization" not in manifest
    assert v["dtype"] == "fp16" and v["tolerance"] == defaults.PARITY_TOLERANCE["fp16"]
    # Measured: max |Δlogits| 4.7e-3 (BART) and 0.10 (T5) against the fp32 PyTorch model.
    assert 0 < v["prefill_max_abs_diff"] < 0.05 and v["decode_max_abs_diff"] < 0.25
    assert v["greedy_match"] and f["passed"] and f["top1_agreement"] >= 0.99
    assert abs(f["relative_delta_perplexity"]) <= defaults.QUANT_MAX_RELATIVE_DELTA_PPL["fp16"]
    for name in ("encoder_model.onnx", "decoder_model.onnx"):
        graph = onnx.load(str(out / name)).graph
        big = [t for t in graph.initializer if len(t.dims) == 2]
        assert big and all(t.data_type == onnx.TensorProto.FLOAT16 for t in big), name
        # The runtime's contract is unchanged: fp32 inputs / outputs (cache included).
        floats = [i for i in [*graph.input, *graph.output] if "mask" not in i.name]
        floats = [i for i in floats if i.type.tensor_type.elem_type != onnx.TensorProto.INT64]
        assert all(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for i in floats)
    got = generate_seq2seq(out, SOURCES[:2], max_new_tokens=8, provider="cpu")
    assert [o.token_ids for o in got.outputs] == _hf_greedy(hf, SOURCES[:2], 8)


def test_gate_failure_writes_nothing_and_refusals(tokenizer, tmp_path, monkeypatch):
    from llmtool import defaults
    from llmtool.errors import UsageError, ValidationError
    from llmtool.export import export_model

    hf = save_tiny_seq2seq("bart", tokenizer, tmp_path / "hf")
    out = tmp_path / "q"
    # A zero tolerance: any drift of 4-bit weights fails the gate.
    monkeypatch.setitem(defaults.QUANT_MAX_RELATIVE_DELTA_PPL, "int4", -1.0)
    with pytest.raises(ValidationError, match="drifts too far from fp32"):
        export_model(hf, out, quantize="int4", symmetric=True)
    assert not out.exists() and list(tmp_path.iterdir()) == [tmp_path / "hf"]
    with pytest.raises(UsageError, match="block-size"):
        export_model(hf, out, quantize="int4", block_size=24)
    with pytest.raises(UsageError, match="fp16"):
        export_model(hf, out, dtype="fp16", quantize="int8")


def test_cli_export_int4_then_eval(tokenizer, tmp_path):
    from typer.testing import CliRunner

    from llmtool.cli import app

    runner = CliRunner()
    # A tiny random T5 loses 11.3% perplexity in 4-bit blocks of 32: the gate refuses it.
    t5 = save_tiny_seq2seq("t5", tokenizer, tmp_path / "t5")
    res = runner.invoke(
        app, ["export", str(t5), "--out", str(tmp_path / "t5q"), "--quantize", "int4"]
    )
    assert res.exit_code == 1 and "drifts too far from fp32" in res.output
    assert not (tmp_path / "t5q").exists()
    res = runner.invoke(
        app,
        ["export", str(t5), "--out", str(tmp_path / "x"), "--dtype", "fp16", "--quantize", "int8"],
    )
    assert res.exit_code == 2 and "fp16" in res.output
    hf = save_tiny_seq2seq("marian", tokenizer, tmp_path / "hf")
    out = tmp_path / "q4"
    res = runner.invoke(app, ["export", str(hf), "--out", str(out), "--quantize", "int4"])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "llmtool.json").read_text())["fidelity"]["passed"]
    pairs = tmp_path / "p.tsv"
    pairs.write_text("source\ttarget\n" + "".join(f"{s}\t{s}\n" for s in SOURCES[:3]))
    report = tmp_path / "r.json"
    args = ["eval", str(out), "--data", str(pairs), "--reference", str(hf), "--provider", "cpu"]
    res = runner.invoke(app, [*args, "--json", str(report)])
    assert res.exit_code == 0, res.output
    r = json.loads(report.read_text())
    assert np.isfinite(r["fidelity"]["kl_divergence"]["mean"])
    # Text targets the model finds unlikely agree less than the gate's greedy ones (0.88): 0.68.
    assert r["fidelity"]["top1_agreement"] >= 0.6
