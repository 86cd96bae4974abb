"""Issue 18, the first hour of a new user: user text printed verbatim, checks before the
expensive part, messages that do not mislead."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rich.console import Console
from typer.testing import CliRunner

from conftest import SAMPLE_TEXT
from llmtool.cli import app

runner = CliRunner()

# Strings made to look like Rich markup: tags, closing tags, escapes.
BRACKETY = st.text(alphabet="[]/\\ab=# ", min_size=1, max_size=30).map(
    lambda s: "x" + s.replace(" ", "_") + "x"
)


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def render(renderable) -> str:
    out = io.StringIO()
    Console(file=out, width=2000, color_system=None).print(renderable)
    return out.getvalue()


# --- User text is printed as Rich markup -------------------------------------------------


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=BRACKETY)
def test_error_path_prints_messages_verbatim(capsys, text):
    import typer

    from llmtool.cli import handle_errors
    from llmtool.errors import UsageError

    @handle_errors
    def fails():
        raise UsageError(f"Data file {text} does not exist", f"try {text}.")

    capsys.readouterr()
    with pytest.raises(typer.Exit):
        fails()
    err = capsys.readouterr().err
    assert f"Data file {text} does not exist" in err
    assert f"try {text}." in err


@settings(max_examples=40, deadline=None)
@given(BRACKETY, BRACKETY)
def test_report_tables_print_user_text_verbatim(prompt, text):
    from llmtool.reports import export_table, generation_table, train_table

    result = {
        "provider": "cpu",
        "timing": {"prefill_s": 0.01, "decode_tokens_per_s": 10.0, "decode_tokens": 4},
        "outputs": [{"prompt": prompt, "text": text, "new_tokens": 5, "finish_reason": "length"}],
    }
    shown = render(generation_table(result))
    assert prompt in shown and text in shown
    metrics = {
        "arch": "llama",
        "preset": "tiny",
        "out": text,
        "parameters": 10,
        "steps": 1,
        "tokens": {"train": 1, "val": 1},
        "initial_val_perplexity": 3.0,
        "final_val_perplexity": 2.0,
        "tokens_per_s": 1.0,
        "machine": {"device": "cpu"},
        "wall_seconds": 1.0,
    }
    assert render(train_table(metrics)).count(text) == 2
    manifest = {
        "model_type": "llama",
        "dtype": "fp32",
        "opset": 17,
        "parameters": 10,
        "validation": {
            "tolerance": 1e-4,
            "prefill_max_abs_diff": 0.0,
            "decode_max_abs_diff": 0.0,
            "decode_steps": 2,
            "greedy_tokens_compared": 2,
            "mismatches": [],
            "greedy_match": True,
            "provider": "cpu",
            "batch": 2,
        },
    }
    assert str(Path(text)) in render(export_table(manifest, Path(text)))


@settings(max_examples=40, deadline=None)
@given(BRACKETY)
def test_eval_tables_print_user_text_verbatim(text):
    from llmtool.evaluate import render as eval_render

    section = eval_render.Section(text, ["metric", text], [[text, text]], caption=text)
    saved = eval_render.sections
    eval_render.sections = lambda record: [section]
    try:
        shown = render(eval_render.rich_tables({})[0])
    finally:
        eval_render.sections = saved
    assert shown.count(text) == 5


@pytest.mark.parametrize(
    "prompt", ["Close the tag [/] now", "In Python, a[i] is [red]indexing[/red] and"]
)
def test_generate_echoes_the_prompt_verbatim(tiny_llama_export, prompt):
    _, out = tiny_llama_export
    result = invoke("generate", out, "-p", prompt, "--max-new-tokens", "2", "--provider", "cpu")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(prompt)


def test_paths_with_brackets_are_named_verbatim(tiny_llama_export, tmp_path):
    _, out = tiny_llama_export
    result = invoke("eval", out, "--data", tmp_path / "data[old].txt")
    assert result.exit_code == 2
    assert "data[old].txt" in result.stderr
    data = tmp_path / "text[v1].txt"
    data.write_text(SAMPLE_TEXT.read_text(encoding="utf-8"), encoding="utf-8")
    report = tmp_path / "tiny[run1].json"
    result = invoke("eval", out, "--data", data, "--max-length", "64", "--json", report)
    assert result.exit_code == 0, result.output
    assert report.is_file()
    assert f"Wrote {report}" in result.stderr.replace("\n", "")


def test_plot_hint_keeps_the_extra():
    from llmtool.evaluate.render import check_plot_path

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        result = invoke("eval", "nowhere", "--plot", "x.png")
        assert "pip install 'llmtool[plot]'" in result.stderr
    else:
        check_plot_path("x.png")  # nothing to show where matplotlib is installed


# --- Checks that come after the expensive part -------------------------------------------


@pytest.fixture
def no_session(monkeypatch):
    """Creating an ONNX Runtime session fails the test (exit 1, not the expected 2)."""
    from llmtool.runtime import model

    def refuse(*args, **kwargs):
        raise AssertionError("the session was created before the options were checked")

    monkeypatch.setattr(model, "create_session", refuse)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-p", "Tell me a joke", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["-p", "word " * 2000], "exceeds the model's context of 256 tokens"),
        (["-p", "Tell me", "--max-new-tokens", "300"], "exceeds the model's context"),
    ],
)
def test_generate_checks_before_loading_and_printing(tiny_llama_export, no_session, args, message):
    _, out = tiny_llama_export
    result = invoke("generate", out, *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert result.stdout == ""
    assert "Running on" not in result.stderr


def test_check_request_reads_only_the_manifest(tiny_llama_export, no_session):
    from llmtool.errors import UsageError
    from llmtool.prompts import check_request

    _, out = tiny_llama_export
    rows = check_request(out, ["The keeper"], 4)
    assert len(rows) == 1 and rows[0]
    with pytest.raises(UsageError, match="context of 256"):
        check_request(out, ["The keeper " * 200], 4)


# --- Messages that mislead ---------------------------------------------------------------


def test_resume_needs_only_out_and_refuses_changed_data(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text(SAMPLE_TEXT.read_text(encoding="utf-8"), encoding="utf-8")
    out = tmp_path / "run"
    fast = ["--seq-len", "64", "--batch-size", "4", "--vocab-size", "384", "--eval-every", "3"]
    first = invoke("train", "--data", text, "--out", out, "--steps", "2", *fast, "--device", "cpu")
    assert first.exit_code == 0, first.output
    resumed = invoke("train", "--resume", "--out", out, "--device", "cpu")
    assert resumed.exit_code == 0, resumed.output
    text.write_text("other words entirely " * 300, encoding="utf-8")
    changed = invoke("train", "--resume", "--out", out, "--device", "cpu")
    assert changed.exit_code == 2, changed.output
    assert "not what the checkpoint" in changed.stderr
    fresh = invoke("train", "--out", tmp_path / "new")
    assert fresh.exit_code == 2 and "--data" in fresh.stderr


def test_special_tokens_inside_the_text_are_kept(tokenizer):
    import copy

    from llmtool.generate import Detokenizer, decode_new_tokens

    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    eos = tok.eos_token_id
    start = tok.convert_tokens_to_ids("<|im_start|>")
    ids = tok("Hello there")["input_ids"] + [eos, start] + tok("assistant")["input_ids"]
    text = decode_new_tokens(tok, ids, [eos])
    assert "<|im_start|>assistant" in text and tok.eos_token in text
    # A final stop token is not text; the stream and the final text agree.
    assert decode_new_tokens(tok, [*ids, eos], [eos]) == text
    detok = Detokenizer(tok, eos=[eos])
    streamed = "".join(detok.push(ids[: i + 1]) for i in range(len(ids)))
    assert streamed + detok.flush(text) == text


def test_prompt_file_latin1_gives_the_fix(tiny_llama_export, tmp_path):
    _, out = tiny_llama_export
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("café au lait\n".encode("latin-1"))
    result = invoke("generate", out, "--prompt-file", prompts)
    assert result.exit_code == 2
    assert "not valid UTF-8" in result.stderr and "convert the file to UTF-8" in result.stderr


def test_a_row_that_stops_at_its_first_token_says_so():
    from llmtool.reports import generation_table, timing_line

    result = {
        "provider": "cpu",
        "timing": {"prefill_s": 0.01, "decode_tokens_per_s": 0.0, "decode_tokens": 0},
        "outputs": [{"prompt": "p", "text": "", "new_tokens": 1, "finish_reason": "eos"}],
    }
    shown = render(generation_table(result))
    assert "1 token (eos)" in shown and "1 tokens" not in shown
    assert "0.0 tok/s" not in shown
    line = timing_line(result, result["outputs"][0]).plain
    assert "1 token " in line and "ended at its first token" in line and "tok/s" not in line
    result["outputs"][0]["new_tokens"] = 5
    result["timing"].update(decode_tokens=4, decode_tokens_per_s=40.0)
    assert "5 tokens" in timing_line(result, result["outputs"][0]).plain
    assert "decode 40.0 tok/s" in timing_line(result, result["outputs"][0]).plain
