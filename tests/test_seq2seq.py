"""Encoder-decoder export, validation and generation: T5 v1.1, BART and Marian vs transformers.

Tiny random models (tests/_seq2seq.py) are exported once per architecture; generation through
the two ONNX Runtime sessions must give transformers' own ``generate`` tokens, greedy and beam.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys

import numpy as np
import pytest
from _seq2seq import SEQ2SEQ_ARCHS, SOURCES, tiny_seq2seq_export

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module", params=SEQ2SEQ_ARCHS)
def seq2seq_export(request, tokenizer, tmp_path_factory):
    """(arch, hf_dir, onnx_dir, result) per architecture."""
    return (request.param, *tiny_seq2seq_export(request.param, tokenizer, tmp_path_factory))


# The checks beyond export and greedy / beam equality run on BART by default, on every
# architecture under the seq2seq_full marker (nox -s seq2seq).
ONE_ARCH = [
    pytest.param(a, marks=() if a == "bart" else pytest.mark.seq2seq_full) for a in SEQ2SEQ_ARCHS
]


@pytest.fixture(params=ONE_ARCH)
def one_export(request, tokenizer, tmp_path_factory):
    return (request.param, *tiny_seq2seq_export(request.param, tokenizer, tmp_path_factory))


@functools.cache
def _hf(path):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    return AutoModelForSeq2SeqLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def _reference(hf, sources, **kwargs):
    """transformers' generate tokens per row (start token dropped, cut after EOS)."""
    model, tok = _hf(hf)
    enc = tok(list(sources), return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=False, **kwargs)
    eos = model.generation_config.eos_token_id
    rows = []
    for row in out[:, 1:].tolist():
        rows.append(row[: row.index(eos) + 1] if eos in row else row)
    return rows


def test_export_writes_two_validated_graphs(seq2seq_export):
    import onnx

    arch, _, out, _result = seq2seq_export
    manifest = json.loads((out / "llmtool.json").read_text())
    assert manifest["kind"] == "seq2seq" and manifest["model_type"] == arch
    v = manifest["validation"]
    assert v["passed"] and v["greedy_match"] and v["decode_steps"] == 16 and v["batch"] == 2
    assert v["prefill_max_abs_diff"] < 1e-4 and v["decode_max_abs_diff"] < 1e-4
    assert set(manifest["files"]) == {"encoder_model.onnx", "decoder_model.onnx"}
    decoder = onnx.load(str(out / "decoder_model.onnx"))
    inputs = [i.name for i in decoder.graph.input]
    outputs = [o.name for o in decoder.graph.output]
    # Optimum's names; one graph for the first and the cached steps.
    assert inputs[:3] == ["input_ids", "encoder_attention_mask", "encoder_hidden_states"]
    assert "past_key_values.1.decoder.key" in inputs and "past_key_values.0.encoder.value" in inputs
    assert outputs[0] == "logits" and "present.1.encoder.key" in outputs
    past = next(i for i in decoder.graph.input if i.name == "past_key_values.0.decoder.key")
    dims = [d.dim_param or d.dim_value for d in past.type.tensor_type.shape.dim]
    assert dims[0] == "batch" and dims[2] == "past_target"
    kinds = {e["input"]: e["kind"] for e in manifest["cache"]}
    assert kinds["past_key_values.0.encoder.key"] == "cross"


def test_greedy_and_beam_equal_transformers(seq2seq_export):
    from llmtool.runtime.seq2seq import OnnxSeq2Seq
    from llmtool.seq2seq.generate import generate_seq2seq

    _, hf, out, _ = seq2seq_export
    model = OnnxSeq2Seq(out, "cpu")
    runs = {}
    for beams in (1, 4):
        got = generate_seq2seq(model, SOURCES, max_new_tokens=12, num_beams=beams, provider="cpu")
        ref = _reference(hf, SOURCES, max_new_tokens=12, num_beams=beams)
        assert [o.token_ids for o in got.outputs] == ref, beams
        runs[beams] = got.outputs
    lengths = {o.new_tokens for o in runs[1]}
    reasons = {o.finish_reason for o in runs[1]}
    assert "eos" in reasons and len(lengths) > 1  # greedy rows end at different steps


def test_teacher_forced_logits_equal_pytorch(one_export):

    from llmtool.runtime.seq2seq import OnnxSeq2Seq

    _, hf, out, _ = one_export
    model = OnnxSeq2Seq(out, "cpu")
    sources = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    targets = [[20, 21, 22, 23], [24, 25]]
    got = model.teacher_forced(sources, targets)
    ref_model = _hf(hf)[0]
    for src, tgt, logits in zip(sources, targets, got, strict=True):
        dec = [model.decoder_start_token_id, *tgt[:-1]]
        with torch.no_grad():
            ref = ref_model(input_ids=torch.tensor([src]), decoder_input_ids=torch.tensor([dec]))
        np.testing.assert_allclose(logits, ref.logits[0].numpy(), atol=1e-4)


def test_sampling_is_seeded_and_stops(one_export):
    from llmtool.runtime.stopping import StopConditions
    from llmtool.sampling import SamplingConfig
    from llmtool.seq2seq.generate import generate_seq2seq

    _, _, out, _ = one_export
    sampling = SamplingConfig(strategy="top-k", top_k=20, temperature=1.5, seed=3)
    runs = [
        generate_seq2seq(out, SOURCES[:2], max_new_tokens=8, sampling=sampling, provider="cpu")
        for _ in range(2)
    ]
    assert [o.token_ids for o in runs[0].outputs] == [o.token_ids for o in runs[1].outputs]
    greedy = generate_seq2seq(out, SOURCES[:1], max_new_tokens=8, provider="cpu").outputs[0]
    cut = greedy.text[2:4]
    if cut.strip():
        stopped = generate_seq2seq(
            out, SOURCES[:1], max_new_tokens=8, provider="cpu", stop=StopConditions(stop=(cut,))
        ).outputs[0]
        assert stopped.finish_reason == "stop" and cut not in stopped.text


def test_bad_input_is_a_clear_usage_error(one_export, tmp_path):
    from llmtool.errors import UsageError
    from llmtool.export import export_model
    from llmtool.seq2seq.generate import generate_seq2seq

    arch, hf, out, _ = one_export
    with pytest.raises(UsageError, match="fp16"):
        export_model(hf, tmp_path / "x", dtype="fp16", quantize="int8")
    with pytest.raises(UsageError, match="--block-size"):
        export_model(hf, tmp_path / "x", quantize="int8", block_size=24)
    with pytest.raises(UsageError, match="empty"):
        generate_seq2seq(out, [""], provider="cpu")
    if arch not in ("t5", "mt5"):  # learned / sinusoidal positions: a limit on the source
        with pytest.raises(UsageError, match="encoder's limit of 128"):
            generate_seq2seq(out, ["word " * 300], provider="cpu")
    with pytest.raises(UsageError, match="--num-beams"):
        generate_seq2seq(out, ["x"], num_beams=0, provider="cpu")
    from llmtool.runtime.model import OnnxCausalLM

    with pytest.raises(UsageError, match="encoder-decoder export"):
        OnnxCausalLM(out, "cpu")


def test_unknown_encoder_decoder_is_refused(tmp_path, tokenizer):
    from transformers import PegasusConfig, PegasusForConditionalGeneration

    from llmtool.errors import UsageError
    from llmtool.export import export_model

    cfg = PegasusConfig(
        vocab_size=len(tokenizer),
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=16,
        decoder_ffn_dim=16,
    )
    PegasusForConditionalGeneration(cfg).save_pretrained(tmp_path / "peg")
    tokenizer.save_pretrained(tmp_path / "peg")
    with pytest.raises(UsageError, match="'pegasus' is not supported"):
        export_model(tmp_path / "peg", tmp_path / "out")


def test_cli_generate_beam_subprocess(tokenizer, tmp_path_factory):
    hf, out, _ = tiny_seq2seq_export("bart", tokenizer, tmp_path_factory)
    cmd = [
        sys.executable,
        "-m",
        "llmtool",
        "generate",
        str(out),
        "-p",
        SOURCES[0],
        "-p",
        SOURCES[1],
        "--num-beams",
        "3",
        "--max-new-tokens",
        "10",
        "--provider",
        "cpu",
        "--json",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = [o["token_ids"] for o in json.loads(proc.stdout)["outputs"]]
    assert got == _reference(hf, SOURCES[:2], max_new_tokens=10, num_beams=3)
    bad = subprocess.run([*cmd[:-1], "--chat"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_cli_generate_in_process_and_refusals(tokenizer, tmp_path_factory, tmp_path):
    from typer.testing import CliRunner

    from llmtool.cli import app

    hf, out, _ = tiny_seq2seq_export("t5", tokenizer, tmp_path_factory)
    runner = CliRunner()
    res = runner.invoke(
        app,
        [
            "generate",
            str(out),
            "-p",
            SOURCES[0],
            "--max-new-tokens",
            "6",
            "--provider",
            "cpu",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    ref = _reference(hf, SOURCES[:1], max_new_tokens=6)
    assert json.loads(res.stdout)["outputs"][0]["token_ids"] == ref[0]
    res = runner.invoke(app, ["export", str(hf), "--out", str(tmp_path / "o2"), "--fused"])
    assert res.exit_code == 2 and "--fused" in res.output
    res = runner.invoke(app, ["generate", str(out), "-p", "x", "--chat", "--provider", "cpu"])
    assert res.exit_code == 2 and "decoder-only" in res.output


def test_generation_config_rules_as_transformers(tokenizer, tmp_path_factory, tmp_path):
    """forced_bos / forced_eos / min_length / bad_words_ids from generation_config.json."""
    import shutil

    from llmtool.seq2seq.generate import generate_seq2seq

    hf, out, _ = tiny_seq2seq_export("bart", tokenizer, tmp_path_factory)
    rules = {"forced_bos_token_id": 7, "min_length": 6, "bad_words_ids": [[34], [259]]}
    dirs = []
    for src in (hf, out):
        dst = shutil.copytree(src, tmp_path / src.name)
        config = json.loads((dst / "generation_config.json").read_text())
        config.update(rules, forced_eos_token_id=config["eos_token_id"])
        (dst / "generation_config.json").write_text(json.dumps(config))
        dirs.append(dst)
    for beams in (1, 3):
        got = generate_seq2seq(dirs[1], SOURCES, max_new_tokens=10, num_beams=beams, provider="cpu")
        ref = _reference(dirs[0], SOURCES, max_new_tokens=10, num_beams=beams)
        assert [o.token_ids for o in got.outputs] == ref, beams
        assert all(o.token_ids[0] == 7 and 34 not in o.token_ids for o in got.outputs)
        assert all(len(o.token_ids) >= 5 for o in got.outputs)


def test_generation_config_defaults_num_beams_no_repeat_as_transformers(
    tokenizer, tmp_path_factory, tmp_path
):
    """num_beams, no_repeat_ngram_size and length_penalty from generation_config.json with no
    --num-beams: equal to transformers' generate() with no arguments but the length; reported."""
    import shutil

    from typer.testing import CliRunner

    from llmtool.cli import app
    from llmtool.seq2seq.generate import generate_seq2seq

    hf, out, _ = tiny_seq2seq_export("bart", tokenizer, tmp_path_factory)
    dirs = []
    for src in (hf, out):
        dst = shutil.copytree(src, tmp_path / src.name)
        config = json.loads((dst / "generation_config.json").read_text())
        config.update(num_beams=3, no_repeat_ngram_size=2, length_penalty=0.6)
        (dst / "generation_config.json").write_text(json.dumps(config))
        dirs.append(dst)
    got = generate_seq2seq(dirs[1], SOURCES, max_new_tokens=12, provider="cpu")
    ref = _reference(dirs[0], SOURCES, max_new_tokens=12)
    assert [o.token_ids for o in got.outputs] == ref
    # Greedy with the config's n-gram rule: transformers' num_beams=1 with the same config.
    got1 = generate_seq2seq(dirs[1], SOURCES, max_new_tokens=12, num_beams=1, provider="cpu")
    assert [o.token_ids for o in got1.outputs] == _reference(
        dirs[0], SOURCES, max_new_tokens=12, num_beams=1
    )
    for o in (*got.outputs, *got1.outputs):
        bigrams = list(zip(o.token_ids, o.token_ids[1:], strict=False))
        assert len(bigrams) == len(set(bigrams))
    res = CliRunner().invoke(
        app, ["generate", str(dirs[1]), "-p", SOURCES[0], "--max-new-tokens", "12", "--json"]
    )
    assert res.exit_code == 0, res.output
    assert "From generation_config.json: num_beams=3, no_repeat_ngram_size=2" in res.output
