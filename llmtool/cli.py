"""The ``llmtool`` command line: thin Typer wrappers over the library functions.

Imports of torch, transformers and onnxruntime happen inside the commands, so ``llmtool --help``
stays fast. Errors from the library (:class:`llmtool.errors.LlmtoolError`) become one sentence on
stderr and an exit code (2 for bad input, 1 for a failed check); ``--debug`` shows the traceback.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer

from llmtool import defaults

F = TypeVar("F", bound=Callable[..., Any])

app = typer.Typer(
    name="llmtool",
    help="Train, export, verify and run causal LMs with ONNX Runtime.\n\n"
    "Exit codes: 0 success, 1 a check failed (export validation, a regression), 2 bad input.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
_state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        from llmtool import __version__

        typer.echo(f"llmtool {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version."
    ),
) -> None:
    _state["debug"] = debug


def _fail(message: str, code: int) -> None:
    from llmtool.console import err_console

    err_console.print(f"[bold red]Error:[/] {message}", soft_wrap=True)
    raise typer.Exit(code)


def handle_errors(func: F) -> F:
    """Turn library errors into one line on stderr and an exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from llmtool.errors import LlmtoolError

        try:
            return func(*args, **kwargs)
        except typer.Exit:
            raise
        except LlmtoolError as e:
            if _state["debug"]:
                raise
            _fail(str(e), e.exit_code)
        except KeyboardInterrupt:
            _fail("Interrupted; nothing was left half-written.", 130)
        except MemoryError:
            if _state["debug"]:
                raise
            _fail("Out of memory: try a smaller batch, fewer prompts or a shorter --max-length.", 1)
        except Exception as e:
            if _state["debug"]:
                raise
            first = str(e).splitlines()[0] if str(e) else ""
            _fail(
                f"Unexpected {type(e).__name__}: {first[:300]} (rerun with --debug for the traceback).",
                1,
            )

    return wrapper  # type: ignore[return-value]


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


@app.command("export")
@handle_errors
def export_cmd(
    model: str = typer.Argument(..., help="Hugging Face directory, .gguf file, or 'smollm2'."),
    out: Path = typer.Option(..., "--out", "-o", help="Directory to create."),
    dtype: str = typer.Option(defaults.EXPORT_DTYPE, help="fp32 or fp16."),
    opset: int = typer.Option(defaults.OPSET, help="ONNX opset (17-21)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out."),
    allow_pickle: bool = typer.Option(
        False, "--allow-pickle", help="Accept pickle weights (can run code)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON on stdout."),
) -> None:
    """Export MODEL to ONNX with a KV cache and validate it against PyTorch.

    Exits 1, writing nothing, when ONNX Runtime and PyTorch disagree beyond tolerance.
    """
    from llmtool.console import console, err_console
    from llmtool.export import export_model
    from llmtool.reports import export_table

    with err_console.status("Exporting") as status:
        result = export_model(
            model,
            out,
            dtype=dtype,
            opset=opset,
            force=force,
            allow_pickle=allow_pickle,
            on_stage=lambda s: status.update(s),
        )
    if as_json:
        _print_json({"out": str(result.out), "seconds": result.seconds, **result.manifest})
        return
    console.print(export_table(result.manifest, result.out))


def _read_prompts(prompts: list[str], prompt_file: Path | None) -> list[str]:
    from llmtool.errors import UsageError

    collected = list(prompts)
    if prompt_file is not None:
        if not prompt_file.is_file():
            raise UsageError(f"Prompt file {prompt_file} does not exist")
        try:
            lines = prompt_file.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise UsageError(
                f"{prompt_file} is not valid UTF-8 (bad byte at offset {e.start})"
            ) from e
        from_file = [line for line in lines if line.strip()]
        if not from_file:
            raise UsageError(
                f"Prompt file {prompt_file} has no prompts", "write one prompt per line."
            )
        collected += from_file
    if not collected:
        raise UsageError("No prompt given", "pass --prompt TEXT or --prompt-file FILE.")
    return collected


@app.command("generate")
@handle_errors
def generate_cmd(
    model_dir: Path = typer.Argument(..., help="An llmtool export directory."),
    prompt: list[str] = typer.Option([], "--prompt", "-p", help="Prompt text; repeat for a batch."),
    prompt_file: Path | None = typer.Option(None, "--prompt-file", help="One prompt per line."),
    max_new_tokens: int = typer.Option(
        defaults.MAX_NEW_TOKENS, help="Most tokens to generate per prompt."
    ),
    strategy: str = typer.Option(defaults.STRATEGY, help="greedy or top-k (sampling)."),
    top_k: int = typer.Option(defaults.TOP_K, help="Candidates kept when sampling."),
    top_p: float = typer.Option(defaults.TOP_P, help="Nucleus mass kept when sampling, in (0, 1]."),
    temperature: float = typer.Option(
        defaults.TEMPERATURE, help="Logit divisor when sampling, > 0."
    ),
    seed: int = typer.Option(
        defaults.SEED, help="Sampling seed: the same seed gives the same text."
    ),
    provider: str = typer.Option(
        defaults.PROVIDER, help="auto, cuda or cpu. cuda never falls back to CPU."
    ),
    threads: int = typer.Option(0, help="ONNX Runtime intra-op threads (0: all cores)."),
    stream: bool = typer.Option(
        True, "--stream/--no-stream", help="Print text as it is generated."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print results as JSON on stdout."),
) -> None:
    """Generate text from an export with ONNX Runtime."""
    from llmtool.console import console, err_console
    from llmtool.generate import generate
    from llmtool.reports import generation_table
    from llmtool.runtime import OnnxCausalLM, SessionOptions
    from llmtool.sampling import SamplingConfig

    prompts = _read_prompts(prompt, prompt_file)
    sampling = SamplingConfig(
        strategy=strategy, top_k=top_k, top_p=top_p, temperature=temperature, seed=seed
    )
    sampling.validate()
    model = OnnxCausalLM(model_dir, provider, options=SessionOptions(intra_op_threads=threads))
    err_console.print(f"[dim]Running on {model.provider.upper()} ({model.directory.name})[/]")
    streaming = stream and not as_json and len(prompts) == 1
    if streaming:
        console.print(prompts[0], style="bold", end="")

    def on_text(row: int, text: str) -> None:
        console.print(text, end="", markup=False, highlight=False)

    result = generate(
        model,
        prompts,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        on_text=on_text if streaming else None,
    ).to_dict()
    if as_json:
        _print_json(result)
        return
    if streaming:
        console.print()
        t = result["timing"]
        err_console.print(
            f"[dim]{result['outputs'][0]['new_tokens']} tokens · {result['provider']} · first token "
            f"{t['prefill_s'] * 1000:.0f} ms · decode {t['decode_tokens_per_s']:.1f} tok/s[/]"
        )
    else:
        console.print(generation_table(result))


@app.command("eval")
@handle_errors
def eval_cmd(
    model_dir: Path = typer.Argument(..., help="An llmtool export directory."),
    data: Path = typer.Option(..., "--data", help="UTF-8 text file to score."),
    max_length: int | None = typer.Option(
        None, help="Window length (default: min(context, 1024))."
    ),
    stride: int | None = typer.Option(None, help="Step between windows (default: max-length / 2)."),
    provider: str = typer.Option(defaults.PROVIDER, help="auto, cuda or cpu."),
    threads: int = typer.Option(0, help="ONNX Runtime intra-op threads (0: all cores)."),
    json_path: Path | None = typer.Option(
        None, "--json", help="Also write the results to this JSON file."
    ),
) -> None:
    """Sliding-window perplexity of an export on a text file."""
    from rich.progress import Progress

    from llmtool.console import console, err_console
    from llmtool.evaluate import evaluate_perplexity
    from llmtool.reports import perplexity_table, write_json
    from llmtool.runtime import SessionOptions

    with Progress(console=err_console, transient=True) as progress:
        task = progress.add_task("Scoring windows", total=None)
        result = evaluate_perplexity(
            model_dir,
            data,
            max_length=max_length,
            stride=stride,
            provider=provider,
            session_options=SessionOptions(intra_op_threads=threads),
            on_window=lambda done, total: progress.update(task, completed=done, total=total),
        )
    record = result.to_dict()
    console.print(perplexity_table(record, title=f"Perplexity of {model_dir.name} on {data.name}"))
    if json_path is not None:
        write_json(json_path, record)
        err_console.print(f"[dim]Wrote {json_path}[/]")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
