"""Chat templates (token ids against transformers' apply_chat_template), stop conditions and the
KV-cache-keeping ChatSession, on a tiny Llama export whose tokenizer carries ChatML tokens."""

from __future__ import annotations

import copy
import json

import pytest

from llmtool.errors import UsageError

SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% endif %}"
)
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "+ '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)
# Whitespace control, namespace, loop controls and raise_exception, as real templates use them.
FANCY = (
    "{%- set ns = namespace(n=0) -%}\n{% for m in messages %}\n  {% if m['role'] == 'tool' %}"
    "{{ raise_exception('no tools') }}{% endif %}\n  {% set ns.n = ns.n + 1 %}\n"
    "  [{{ ns.n }}] {{ m['role'] | upper }}: {{ m['content'] | tojson }}\n{% endfor %}\n"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEMPLATES = {"smollm2": SMOLLM2, "chatml": CHATML, "llama3": LLAMA3, "fancy": FANCY}
SPECIAL = ["<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another, café-style?"},
    ],
]


@pytest.fixture(scope="module")
def chat_tokenizer(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": SPECIAL})
    tok.chat_template = SMOLLM2
    return tok


@pytest.fixture(scope="module")
def chat_export(chat_tokenizer, tmp_path_factory):
    """A tiny Llama export whose tokenizer carries SmolLM2's template; <|im_end|> is not EOS."""
    from conftest import build_tiny_model
    from llmtool.export import export_model

    hf = tmp_path_factory.mktemp("hf-chat")
    build_tiny_model("llama", len(chat_tokenizer), seed=3).save_pretrained(hf)
    chat_tokenizer.save_pretrained(hf)
    out = tmp_path_factory.mktemp("onnx-chat") / "model"
    export_model(hf, out)
    return out


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("convo", range(len(CONVERSATIONS)))
def test_render_ids_match_transformers(chat_tokenizer, name, convo):
    from llmtool.chat_template import render_ids

    tok = copy.copy(chat_tokenizer)
    tok.chat_template = TEMPLATES[name]
    messages = CONVERSATIONS[convo]
    expected = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(expected, dict) or hasattr(expected, "keys"):
        expected = expected["input_ids"]
    assert render_ids(tok, messages) == list(expected)
    assert render_ids(tok, messages, add_generation_prompt=False) != list(expected)


def test_template_errors(chat_tokenizer, tokenizer):
    from llmtool.chat_template import render_ids

    tok = copy.copy(chat_tokenizer)
    tok.chat_template = "{{ messages[0]['content'] }}{{ unknown_variable }}"
    with pytest.raises(UsageError, match="variable that is not given"):
        render_ids(tok, CONVERSATIONS[0])
    tok.chat_template = FANCY
    with pytest.raises(UsageError, match="no tools"):
        render_ids(tok, [{"role": "tool", "content": "x"}])
    with pytest.raises(UsageError, match="no chat template"):
        render_ids(tokenizer, CONVERSATIONS[0])
    tok.chat_template = "{{ ''.__class__.__mro__ }}"  # the sandbox refuses internals
    with pytest.raises(UsageError):
        render_ids(tok, CONVERSATIONS[0])


def test_end_of_turn(chat_tokenizer):
    from llmtool.chat_template import end_of_turn_ids

    tok = copy.copy(chat_tokenizer)
    assert end_of_turn_ids(tok) == [tok.convert_tokens_to_ids("<|im_end|>")]
    tok.chat_template = LLAMA3
    assert end_of_turn_ids(tok) == [tok.convert_tokens_to_ids("<|eot_id|>")]


def test_chat_generate_prompt_ids_and_end_of_turn(chat_export, chat_tokenizer):
    from llmtool.generate import generate
    from llmtool.runtime.model import OnnxCausalLM

    model = OnnxCausalLM(chat_export, "cpu")
    result = generate(model, ["Hello there"], chat=True, system="Be brief.", max_new_tokens=12)
    out = result.outputs[0]
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello there"},
    ]
    expected = chat_tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True
    )
    if hasattr(expected, "keys"):
        expected = expected["input_ids"]
    assert out.prompt_ids == list(expected)
    # The same ids given directly generate the same tokens (but without the end-of-turn stop).
    raw = generate(model, [out.prompt_ids], max_new_tokens=12).outputs[0]
    end = chat_tokenizer.convert_tokens_to_ids("<|im_end|>")
    n = len(out.token_ids)
    assert raw.token_ids[:n] == out.token_ids
    assert (out.finish_reason == "eos") == (out.token_ids[-1] == end or out.token_ids[-1] == 0)


def test_stop_strings_cut_text_across_tokens(chat_export):
    from llmtool.generate import StopConditions, generate
    from llmtool.runtime.model import OnnxCausalLM

    model = OnnxCausalLM(chat_export, "cpu")
    free = generate(model, ["To be or not"], max_new_tokens=24, stop_at_eos=False).outputs[0]
    text = free.text
    # A stop string that starts inside one token and ends in a later one.
    tok = model.tokenizer
    pieces = [tok.decode(free.token_ids[: i + 1], skip_special_tokens=True) for i in range(24)]
    i = next(i for i in range(4, 24) if len(pieces[i]) - len(pieces[i - 1]) >= 2)
    start = len(pieces[i - 1]) - 1
    stop = text[start : len(pieces[i]) + 0]
    assert len(stop) >= 2
    streamed: list[str] = []
    result = generate(
        model,
        ["To be or not"],
        max_new_tokens=24,
        stop=StopConditions(stop=(stop,), eos=False),
        on_text=lambda row, t: streamed.append(t),
    )
    out = result.outputs[0]
    first = text.find(stop)
    assert out.finish_reason == "stop"
    assert out.text == text[:first] == "".join(streamed)
    assert out.token_ids == free.token_ids[: len(out.token_ids)]
    assert len(out.token_ids) < 24


def test_length_and_time_reasons(chat_export):
    from llmtool.generate import StopConditions, generate
    from llmtool.runtime.model import OnnxCausalLM

    model = OnnxCausalLM(chat_export, "cpu")
    out = generate(model, ["a", "bb"], max_new_tokens=5, stop_at_eos=False).outputs
    assert [o.finish_reason for o in out] == ["length", "length"]
    timed = generate(
        model, ["a"], max_new_tokens=200, stop=StopConditions(max_time=1e-9, eos=False)
    ).outputs[0]
    assert timed.finish_reason == "time" and timed.new_tokens == 1
    with pytest.raises(UsageError):
        generate(model, ["a"], stop=StopConditions(stop=("",)))


def test_chat_session_reuses_cache(chat_export):
    from llmtool.chat import ChatSession
    from llmtool.generate import generate
    from llmtool.runtime.model import OnnxCausalLM

    model = OnnxCausalLM(chat_export, "cpu")
    session = ChatSession(model, max_new_tokens=10, system="Be brief.")
    first = session.send("Hello there")
    assert first.prefill_tokens == first.prompt_tokens
    cached = list(session.cached)
    second = session.send("And then?")
    full = session.conversation()[:-1]  # everything up to the second user turn
    from llmtool.chat_template import render_ids

    ids = render_ids(model.tokenizer, full)
    common = next(
        (k for k, (a, b) in enumerate(zip(cached, ids, strict=False)) if a != b), len(cached)
    )
    # The turn fed only what the cache lacked: at least the whole first prompt was reused.
    assert second.prefill_tokens == len(ids) - common
    assert common >= first.prompt_tokens
    assert second.prompt_tokens == len(ids)
    scratch = generate(model, [full], max_new_tokens=10).outputs[0]
    assert scratch.prompt_ids == ids
    assert second.token_ids == scratch.token_ids
    assert second.text == scratch.text
    session.reset()
    assert session.conversation() == [{"role": "system", "content": "Be brief."}]
    again = session.send("Hello there")
    assert again.token_ids == first.token_ids and again.prefill_tokens == first.prompt_tokens


def test_messages_file_and_cli(chat_export, tmp_path):
    from typer.testing import CliRunner

    from llmtool.cli import app

    runner = CliRunner()
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(json.dumps(c) for c in CONVERSATIONS) + "\n", encoding="utf-8")
    res = runner.invoke(
        app,
        ["generate", str(chat_export), "--messages", str(path), "--json", "--max-new-tokens", "4"],
    )
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)["outputs"]
    assert len(rows) == 2 and all(r["prompt_ids"] for r in rows)
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n", encoding="utf-8")
    res = runner.invoke(app, ["generate", str(chat_export), "--messages", str(empty)])
    assert res.exit_code == 2 and "no conversations" in res.output
    res = runner.invoke(
        app,
        [
            "generate",
            str(chat_export),
            "-p",
            "hi",
            "--chat",
            "--stop",
            "e",
            "--max-new-tokens",
            "30",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    row = json.loads(res.stdout)["outputs"][0]
    assert "e" not in row["text"]


def test_chat_without_template_exits_2(tiny_llama_export):
    from typer.testing import CliRunner

    from llmtool.cli import app

    res = CliRunner().invoke(app, ["generate", str(tiny_llama_export[1]), "-p", "hi", "--chat"])
    assert res.exit_code == 2
    assert "no chat template" in res.output
    assert len([line for line in res.output.splitlines() if line.strip()]) <= 2


def test_chat_in_a_real_terminal(chat_export):
    """`llmtool chat` in a pseudo-terminal: streamed answers, tok/s, /system, /reset, Ctrl-C, /exit."""
    import os
    import sys

    pexpect = pytest.importorskip("pexpect")
    from llmtool.chat import ChatSession
    from llmtool.runtime.model import OnnxCausalLM

    expected = ChatSession(OnnxCausalLM(chat_export, "cpu"), max_new_tokens=60).send("Hi there")
    assert len(expected.text) > 10
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "COLUMNS": "200"}
    child = pexpect.spawn(
        sys.executable,
        ["-m", "llmtool", "chat", str(chat_export), "--max-new-tokens", "60"],
        env=env,
        encoding="utf-8",
        timeout=40,
        dimensions=(40, 200),
    )
    child.expect("Commands: /reset")
    child.expect("> ")
    child.sendline("Hi there")
    # The streamed answer is the library's answer; then the tok/s line.
    child.expect_exact(expected.text[:10])
    child.expect(r"60 tokens \(length\) · prefill \d+ tokens · [\d.]+ tok/s")
    child.expect("> ")
    child.sendline("And more")
    child.expect(r"prefill (\d+) tokens")
    assert int(child.match.group(1)) < expected.prompt_tokens + 60  # only the new turn's tokens
    child.expect("> ")
    # Ctrl-C while answering stops the answer, not the chat.
    child.sendline("/reset")
    child.expect("New conversation")
    child.expect("> ")
    child.sendline("Hi there")
    child.expect_exact(expected.text[:5])
    child.sendintr()
    child.expect(r"tokens \((interrupted|length)\)")
    child.expect("> ")
    child.sendline("/system Answer in French.")
    child.expect("System message set")
    child.expect("> ")
    child.sendline("Hi there")
    child.expect(r"tok/s")
    child.expect("> ")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
