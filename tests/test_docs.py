"""The commands shown in README.md and docs/ against the real CLI.

Every ``llmtool ...`` line in a code block (and in inline code) may only use options the Typer
app has; a representative subset is run for real against a tiny model trained here, and its
output must still have what the docs show (table rows, JSON keys, error sentences).
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from llmtool.cli import app

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted(
    [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "docs" / "commands").glob("*.md")]
)
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`(llmtool [^`]+)`")
OPTION = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")


def _commands() -> list[tuple[str, str]]:
    """(where, command line) for every llmtool command in a code block or inline code span."""
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        name = page.relative_to(ROOT).as_posix()
        for match in FENCE.finditer(text):
            lang, body = match.group(1), match.group(2)
            lines = body.splitlines()
            for i, line in enumerate(lines):
                command = line.removeprefix("$ ").strip()
                if not command.startswith("llmtool ") or (lang == "console" and line[:2] != "$ "):
                    continue
                # A synopsis (not a console session) continues on the indented lines below.
                j = i + 1
                while lang != "console" and j < len(lines) and lines[j].startswith("  "):
                    command += " " + lines[j].strip()
                    j += 1
                found.append((f"{name}: {line.strip()[:60]}", command))
        for match in INLINE.finditer(FENCE.sub("", text)):
            found.append((f"{name}: `{match.group(1)[:60]}`", match.group(1)))
    return found


COMMANDS = _commands()


def _known_options() -> tuple[set[str], dict[str, set[str]]]:
    group = typer.main.get_command(app)
    assert isinstance(group, typer.core.TyperGroup)

    def names(params) -> set[str]:
        return {o for p in params for o in (*p.opts, *getattr(p, "secondary_opts", []))} | {
            "--help"
        }

    return names(group.params), {n: names(c.params) for n, c in group.commands.items()}


def test_the_docs_show_commands():
    assert len(COMMANDS) > 30
    assert {c.split()[1] for _, c in COMMANDS} >= {"export", "generate", "eval", "train"}


@pytest.mark.parametrize(("where", "command"), COMMANDS, ids=[w for w, _ in COMMANDS])
def test_every_documented_option_exists(where, command):
    global_options, commands = _known_options()
    words = command.split()[1:]
    while words and words[0] in global_options:
        words = words[1:]
    if not words or words[0] in ("COMMAND", "...") or words[0].startswith("-"):
        assert set(OPTION.findall(command)) <= global_options, where
        return
    assert words[0] in commands, f"{where}: no command {words[0]!r}"
    unknown = set(OPTION.findall(" ".join(words[1:]))) - commands[words[0]] - global_options
    assert not unknown, f"{where}: {sorted(unknown)} not options of llmtool {words[0]}"


# --- a representative subset, run for real -------------------------------------------------

runner = CliRunner()


def _documented(page: str, command_start: str) -> tuple[list[str], str]:
    """The argv of the first console command starting with ``command_start`` and its output."""
    text = (ROOT / page).read_text(encoding="utf-8")
    for match in FENCE.finditer(text):
        if match.group(1) != "console":
            continue
        lines = match.group(2).splitlines()
        for i, line in enumerate(lines):
            if line.startswith(f"$ {command_start}"):
                rest = []
                for out in lines[i + 1 :]:
                    if out.startswith("$ "):
                        break
                    rest.append(out)
                return shlex.split(line[2:])[1:], "\n".join(rest)
    raise AssertionError(f"{page} no longer shows `{command_start}`")


def _row_labels(output: str) -> list[str]:
    """The first cell of every table row in rendered output."""
    return [
        line.split("│")[1].strip()
        for line in output.splitlines()
        if line.startswith("│") and line.split("│")[1].strip()
    ]


@pytest.fixture(scope="module")
def docs_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("docs")


def _run(docs_dir: Path, argv: list[str], **replace: str):
    from llmtool import console as console_module

    argv = [a.replace("/tmp/docs", str(docs_dir)) for a in argv]
    for old, new in replace.items():
        argv[argv.index(old) + 1] = new
    saved = console_module.console.width
    console_module.console.width = 200  # rows on one line, as captured in the docs
    try:
        return runner.invoke(app, argv)
    finally:
        console_module.console._width = None
        del saved


def test_documented_commands_run(docs_dir):
    # train (fewer steps than the page) → export → generate → eval, as the pages chain them.
    argv, shown = _documented("docs/commands/train.md", "llmtool train --data")
    result = _run(docs_dir, argv, **{"--steps": "3"})
    assert result.exit_code == 0, result.output
    assert set(_row_labels(shown)) <= set(_row_labels(result.stdout))

    argv, shown = _documented("docs/commands/export.md", "llmtool export /tmp/docs/tiny --out")
    result = _run(docs_dir, argv)
    assert result.exit_code == 0, result.output
    assert set(_row_labels(shown)) <= set(_row_labels(result.stdout))
    assert f"Exported llama → {docs_dir}/tiny-onnx" in " ".join(result.stdout.split())

    argv, shown = _documented("docs/commands/generate.md", "llmtool generate /tmp/docs/tiny-onnx")
    result = _run(docs_dir, argv)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("The keeper")
    assert "Running on CPU (tiny-onnx)" in result.stderr

    argv, _ = _documented(
        "docs/commands/generate.md",
        'llmtool generate /tmp/docs/tiny-onnx -p "The keeper" --max-new-tokens 8 --json',
    )
    result = _run(docs_dir, argv)
    assert result.exit_code == 0, result.output
    text = (ROOT / "docs/commands/generate.md").read_text(encoding="utf-8")
    after = text.split("--max-new-tokens 8 --json", 1)[1]  # the JSON shown for that command
    shown_json = json.loads(after.split("```json\n", 1)[1].split("```", 1)[0])
    actual = json.loads(result.stdout)
    assert actual.keys() == shown_json.keys()
    assert actual["outputs"][0].keys() == shown_json["outputs"][0].keys()
    assert actual["timing"].keys() == shown_json["timing"].keys()

    argv, shown = _documented(
        "docs/commands/eval.md",
        "llmtool eval /tmp/docs/tiny-onnx --data llmtool/data/sample.txt --json",
    )
    result = _run(docs_dir, [a.replace("llmtool/data", str(ROOT / "llmtool/data")) for a in argv])
    assert result.exit_code == 0, result.output
    assert set(_row_labels(shown)) <= set(_row_labels(result.stdout))
    assert (docs_dir / "ppl.json").is_file()

    # errors.md: the error sentences, word for word.
    argv, shown = _documented("docs/errors.md", "llmtool export smollm2 --out /tmp/docs/tiny-onnx")
    result = _run(docs_dir, argv)
    assert result.exit_code == 2
    expected = shown.splitlines()[0].replace("/tmp/docs", str(docs_dir))
    assert " ".join(result.stderr.split()) == expected
    argv, shown = _documented("docs/errors.md", "llmtool generate /tmp/docs/tiny-onnx -p hi")
    result = _run(docs_dir, argv)
    assert result.exit_code == 2
    assert shown.splitlines()[0].replace("llmtool", "root") in result.output.replace(
        "llmtool", "root"
    )


def test_committed_cli_reference_is_current():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "cli_reference", ROOT / "docs/hooks/cli_reference.py"
    )
    assert spec and spec.loader
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    committed = (ROOT / "docs/reference/cli.md").read_text(encoding="utf-8")
    assert committed == hook.render() + "\n", "run `python docs/hooks/cli_reference.py`"
