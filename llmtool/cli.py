"""The ``llmtool`` command line: thin Typer wrappers over the library functions.

Imports of torch, transformers and onnxruntime happen inside the commands, so ``llmtool --help``
stays fast. Errors from the library (:class:`llmtool.errors.LlmtoolError`) become one sentence on
stderr and an exit code (2 for bad input, 1 for a failed check); ``--debug`` shows the traceback.
"""

from __future__ import annotations

import functools
import json
import os
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
    from rich.text import Text

    from llmtool.console import err_console

    err_console.print(Text.assemble(("Error:", "bold red"), " ", message), soft_wrap=True)
    raise typer.Exit(code)


# ONNX Runtime session options shared by `generate` and `eval`.
GRAPH_OPTIMIZATION_OPTION: Any = typer.Option(
    defaults.ORT_GRAPH_OPTIMIZATION,
    "--graph-optimization",
    help="ONNX Runtime graph optimizations: all, extended, basic or disable.",
)
CPU_ARENA_OPTION: Any = typer.Option(
    defaults.ORT_CPU_ARENA,
    "--cpu-arena/--no-cpu-arena",
    help="ONNX Runtime's CPU memory arena (reuses buffers across steps).",
)
HUGE_PAGES_OPTION: Any = typer.Option(
    defaults.ORT_HUGE_PAGES,
    "--huge-pages/--no-huge-pages",
    help="Put CPU weights on 2 MB huge pages (Linux): about +10% fp32 decode speed.",
)


RAY_OPTION: Any = typer.Option(
    None,
    "--ray",
    metavar="[ADDRESS]",
    help="Shard the work over Ray Data actors: a local Ray cluster, or the one at ADDRESS "
    "(needs the ray extra: pip install 'llmtool[ray]').",
)


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
            from llmtool.errors import UsageError

            if isinstance(e, UsageError) and os.environ.get("RANK", "0") != "0":
                raise typer.Exit(e.exit_code) from None  # under torchrun rank 0 says it once
            _fail(str(e), e.exit_code)
        except KeyboardInterrupt:
            _fail("Interrupted; nothing was left half-written.", 130)
        except Exception as e:
            from llmtool.errors import classify, interrupted

            if interrupted():  # e.g. an ImportError made of a Ctrl-C inside a C extension
                _fail("Interrupted; nothing was left half-written.", 130)
            if _state["debug"]:
                raise
            known = classify(e)
            if known is not None:
                _fail(str(known), known.exit_code)
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
    model: str = typer.Argument(
        ..., metavar="MODEL", help="Hugging Face directory, .gguf file, or 'smollm2'."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Directory to create."),
    dtype: str = typer.Option(defaults.EXPORT_DTYPE, help="fp32 or fp16."),
    opset: int = typer.Option(defaults.OPSET, help="ONNX opset (17-21)."),
    fused: bool = typer.Option(
        False,
        "--fused",
        help="Emit ONNX Runtime's fused ops (GroupQueryAttention, skip norms) for fast generation: "
        "in-place KV cache, CUDA graphs. Use with --dtype fp16 on CUDA.",
    ),
    quantize: str | None = typer.Option(
        None,
        help="int8 or int4 weight blocks (MatMulNBits, int8 activations per block); records and "
        "gates fidelity to fp32 (ΔPPL, KL, top-1).",
    ),
    block_size: int = typer.Option(
        defaults.QUANT_BLOCK_SIZE,
        help="Quantization block length along each weight's input dimension.",
    ),
    symmetric: bool = typer.Option(
        False,
        "--symmetric/--asymmetric",
        help="int4 grid: asymmetric stores each block as d*q+min exactly (Q4_1); symmetric is "
        "smaller and faster, less exact.",
    ),
    calibration: Path | None = typer.Option(
        None, help="Text for the fidelity check of --quantize (default: the shipped sample)."
    ),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out."),
    allow_pickle: bool = typer.Option(
        False, "--allow-pickle", help="Accept pickle weights (can run code)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON on stdout."),
    layout: str = typer.Option(
        defaults.EXPORT_LAYOUT,
        help="File layout: llmtool (model.onnx) or transformers.js (onnx/model.onnx, "
        "onnx/model_fp16.onnx, onnx/model_q4.onnx, onnx/model_quantized.onnx).",
    ),
) -> None:
    """Export MODEL to ONNX with a KV cache and validate it against PyTorch.

    Exits 1, writing nothing, when ONNX Runtime and PyTorch disagree beyond tolerance.
    """
    from llmtool.console import console, err_console, plain
    from llmtool.export.pipeline import export_model
    from llmtool.reports import export_table

    with err_console.status("Exporting") as status:
        result = export_model(
            model,
            out,
            dtype=dtype,
            opset=opset,
            fused=fused,
            quantize=quantize,
            block_size=block_size,
            symmetric=symmetric,
            calibration=calibration,
            force=force,
            allow_pickle=allow_pickle,
            on_stage=lambda s: status.update(plain(s)),
            layout=layout,
            on_notice=lambda s: err_console.print(plain(s, "yellow")),
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
        from llmtool.fsutil import decode_text

        lines = decode_text(prompt_file.read_bytes(), prompt_file).splitlines()
        from_file = [line for line in lines if line.strip()]
        if not from_file:
            raise UsageError(
                f"Prompt file {prompt_file} has no prompts", "write one prompt per line."
            )
        collected += from_file
    if not collected:
        raise UsageError("No prompt given", "pass --prompt TEXT or --prompt-file FILE.")
    return collected


def _read_schema(path: Path | None) -> str | None:
    """The text of a --json-schema file (None without one)."""
    if path is None:
        return None
    from llmtool.errors import UsageError

    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"Cannot read the JSON schema {path}: {exc.strerror}") from exc


@app.command("generate")
@handle_errors
def generate_cmd(
    model_dir: Path = typer.Argument(..., metavar="DIR", help="An llmtool export directory."),
    prompt: list[str] = typer.Option([], "--prompt", "-p", help="Prompt text; repeat for a batch."),
    prompt_file: Path | None = typer.Option(
        None, "--prompt-file", help="One prompt per line (with --out: or JSONL, see below)."
    ),
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
    threads: int = typer.Option(
        defaults.ORT_THREADS, help="ONNX Runtime intra-op threads (0: one per core)."
    ),
    graph_optimization: str = GRAPH_OPTIMIZATION_OPTION,
    cpu_arena: bool = CPU_ARENA_OPTION,
    huge_pages: bool = HUGE_PAGES_OPTION,
    stream: bool = typer.Option(
        True, "--stream/--no-stream", help="Print text as it is generated."
    ),
    ignore_eos: bool = typer.Option(
        False, "--ignore-eos", help="Always generate --max-new-tokens tokens (for benchmarks)."
    ),
    chat: bool = typer.Option(
        False, "--chat", help="Render each prompt as a user turn with the model's chat template."
    ),
    system: str | None = typer.Option(None, "--system", help="System message for --chat."),
    messages: Path | None = typer.Option(
        None, "--messages", help="JSONL file, one conversation (a list of messages) a line."
    ),
    stop: list[str] = typer.Option(
        [], "--stop", help="Stop string (repeatable): the text is cut before it."
    ),
    max_time: float | None = typer.Option(
        None, "--max-time", help="Seconds after which generation stops (finish reason: time)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print results as JSON on stdout."),
    repetition_penalty: float = typer.Option(
        1.0, help="transformers' penalty on prompt + output tokens, > 0 (1: off)."
    ),
    presence_penalty: float = typer.Option(0.0, help="OpenAI presence penalty, in [-2, 2]."),
    frequency_penalty: float = typer.Option(0.0, help="OpenAI frequency penalty, in [-2, 2]."),
    min_p: float = typer.Option(0.0, help="Sampling: drop tokens below min-p x top probability."),
    no_repeat_ngram_size: int = typer.Option(0, help="Never repeat an n-gram of this size."),
    json_schema: Path | None = typer.Option(
        None, "--json-schema", metavar="FILE", help="Constrain output to this JSON schema."
    ),
    regex: str | None = typer.Option(None, help="Constrain output to this regular expression."),
    logprobs: int | None = typer.Option(
        None, help="With --json: each token's log-probability and N alternatives (0-20)."
    ),
    out: Path | None = typer.Option(
        None,
        "--out",
        help="Batch job: write one JSON line per --prompt-file row here, as rows finish; "
        "rows already in it are skipped (resume after a crash).",
    ),
    id_field: str = typer.Option(
        "id", help="With --out and a .jsonl --prompt-file: the field holding each row's id."
    ),
    batch_size: int = typer.Option(8, help="With --out: prompts per generation batch."),
    force: bool = typer.Option(False, "--force", help="With --out: start the results over."),
    ray: str | None = RAY_OPTION,
    num_beams: int | None = typer.Option(
        None,
        "--num-beams",
        help="Encoder-decoder exports: beam search with N beams (as transformers' num_beams) "
        "[default: the export's generation_config.json num_beams for a greedy search, else 1].",
    ),
) -> None:
    """Generate text from an export with ONNX Runtime (a seq2seq export's PROMPT is its source).

    With --out RESULTS.jsonl it is a resumable batch job over --prompt-file (text, or JSONL
    with "prompt" or "messages" and an optional id): each row gets its own seed, derived from
    --seed and its id, so the results do not depend on batching, workers or restarts.
    """
    from llmtool.chat_template import read_messages_file
    from llmtool.console import console, dim, err_console, plain
    from llmtool.generate import StopConditions, generate
    from llmtool.prompts import Prompt, check_request
    from llmtool.reports import generation_table, timing_line
    from llmtool.runtime.model import OnnxCausalLM
    from llmtool.runtime.session import SessionOptions
    from llmtool.sampling import SamplingConfig

    prompts: list[Prompt] = []
    if out is None and ray is None:
        if messages is not None:
            prompts += read_messages_file(messages)
        if prompt or prompt_file is not None or messages is None:
            prompts += _read_prompts(prompt, prompt_file)
    conditions = StopConditions(stop=tuple(stop), max_time=max_time, eos=not ignore_eos)
    conditions.validate()
    sampling = SamplingConfig(
        strategy=strategy,
        top_k=top_k,
        top_p=top_p,
        temperature=temperature,
        seed=seed,
        repetition_penalty=repetition_penalty,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        min_p=min_p,
        no_repeat_ngram_size=no_repeat_ngram_size,
        json_schema=_read_schema(json_schema),
        regex=regex,
        logprobs=logprobs,
    )
    sampling.validate()
    session_options = SessionOptions(
        intra_op_threads=threads,
        graph_optimization=graph_optimization,
        cpu_arena=cpu_arena,
        huge_pages=huge_pages,
    )
    if out is not None or ray is not None:
        from llmtool.batch.generate import BatchJob

        job = BatchJob(
            str(model_dir),
            max_new_tokens,
            sampling,
            conditions,
            chat,
            system,
            provider,
            session_options,
            batch_size,
        )
        _generate_file(job, prompt_file, out, id_field, force, ray, as_json)
        return
    from llmtool.runtime.seq2seq import is_seq2seq_export

    if is_seq2seq_export(model_dir):
        _generate_seq2seq(
            model_dir,
            prompts,
            max_new_tokens,
            sampling,
            num_beams,
            conditions,
            provider,
            session_options,
            stream=stream and not as_json,
            as_json=as_json,
            chat=chat,
        )
        return
    if num_beams not in (None, 1):
        from llmtool.errors import UsageError

        raise UsageError("--num-beams is for encoder-decoder exports", "drop --num-beams.")
    # Options and prompt lengths first: the manifest and tokenizer know the context, the
    # (slow) session is not needed to refuse a request.
    check_request(model_dir, prompts, max_new_tokens, chat, system)
    model = OnnxCausalLM(model_dir, provider, options=session_options)
    err_console.print(dim(f"Running on {model.provider.upper()} ({model.directory.name})"))
    if model.recognised != "llmtool":
        err_console.print(
            dim(f"Recognised an {model.recognised} export (cache inferred from its graph)")
        )
    streaming = stream and not as_json and len(prompts) == 1
    if streaming and isinstance(prompts[0], str) and not chat:
        console.print(plain(prompts[0], "bold"), end="")

    def on_text(row: int, text: str) -> None:
        console.print(plain(text), end="")

    result = generate(
        model,
        prompts,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        on_text=on_text if streaming else None,
        stop=conditions,
        chat=chat,
        system=system,
    ).to_dict()
    if as_json:
        _print_json(result)
        return
    if streaming:
        console.print()
        err_console.print(timing_line(result, result["outputs"][0]))
    else:
        console.print(generation_table(result))


def _generate_file(
    job: Any,
    prompt_file: Path | None,
    out: Path | None,
    id_field: str,
    force: bool,
    ray: str | None,
    as_json: bool,
) -> None:
    """``generate --prompt-file P --out R [--ray]``: the batch job, with a progress bar."""
    from llmtool.batch.generate import generate_file
    from llmtool.console import dim, err_console
    from llmtool.errors import UsageError

    if prompt_file is None or out is None:
        raise UsageError(
            "A batch job needs both --prompt-file and --out",
            "pass --prompt-file PROMPTS.jsonl --out RESULTS.jsonl.",
        )
    if job.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {job.batch_size}")
    runner, workers = None, 1
    if ray is not None:
        from llmtool.batch.ray import ray_generate_runner

        runner, workers = ray_generate_runner(ray, job.session_options.intra_op_threads)
    with eval_progress(err_console) as progress:
        task = progress.add_task("Generating", total=None)
        summary = generate_file(
            job,
            prompt_file,
            out,
            id_field=id_field,
            force=force,
            runner=runner,
            workers=workers,
            on_row=lambda row: progress.advance(task),
        )
    if as_json:
        from dataclasses import asdict

        _print_json(asdict(summary))
        return
    err_console.print(
        dim(
            f"Wrote {summary.generated} rows to {summary.out} ({summary.skipped} already there), "
            f"{summary.new_tokens} tokens at {summary.tokens_per_s:,.1f} tok/s"
        ),
        soft_wrap=True,
    )


def _generate_seq2seq(
    model_dir: Path,
    prompts: list[Any],
    max_new_tokens: int,
    sampling: Any,
    num_beams: int | None,
    conditions: Any,
    provider: str,
    session_options: Any,
    *,
    stream: bool,
    as_json: bool,
    chat: bool,
) -> None:
    """`generate` on an encoder-decoder export: each prompt is a source."""
    from llmtool.console import console, dim, err_console, plain
    from llmtool.errors import UsageError
    from llmtool.reports import generation_table, timing_line
    from llmtool.runtime.seq2seq import OnnxSeq2Seq
    from llmtool.seq2seq.generate import config_defaults, default_beams, generate_seq2seq

    if chat or not all(isinstance(p, str) for p in prompts):
        raise UsageError(
            "--chat and --messages need a decoder-only export", "pass --prompt SOURCE."
        )
    model = OnnxSeq2Seq(model_dir, provider, options=session_options)
    err_console.print(dim(f"Running on {model.provider.upper()} ({model.directory.name})"))
    from_config = config_defaults(model)
    if num_beams is None:
        num_beams = default_beams(model, sampling, conditions)
    else:
        from_config.pop("num_beams", None)
    if num_beams == 1:  # beam-only settings do not apply to one beam
        for key in ("num_beams", "length_penalty", "early_stopping"):
            from_config.pop(key, None)
    if from_config:
        used = ", ".join(f"{k}={json.dumps(v)}" for k, v in from_config.items())
        err_console.print(dim(f"From generation_config.json: {used}"), soft_wrap=True)
    streaming = stream and len(prompts) == 1 and num_beams == 1

    def on_text(row: int, text: str) -> None:
        console.print(plain(text), end="")

    result = generate_seq2seq(
        model,
        prompts,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        num_beams=num_beams,
        on_text=on_text if streaming else None,
        stop=conditions,
    ).to_dict()
    if as_json:
        _print_json(result)
    elif streaming:
        console.print()
        err_console.print(timing_line(result, result["outputs"][0]))
    else:
        console.print(generation_table(result))


def eval_progress(console: Any, get_time: Any = None) -> Any:
    """The progress bar of ``eval``: done / total, elapsed and an ETA.

    Rich estimates speed over the last 30 s by default, so steps longer than that (a throughput
    scenario, a window of a large model) left the ETA at -:--:--; the estimate here spans the run.
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        speed_estimate_period=24 * 3600,
        get_time=get_time,
    )


CHAT_HELP = "Commands: /reset (new conversation), /system TEXT, /exit. Ctrl-C stops an answer."


@app.command("chat")
@handle_errors
def chat_cmd(
    model_dir: Path = typer.Argument(..., metavar="DIR", help="An llmtool export directory."),
    system: str | None = typer.Option(None, "--system", help="System message."),
    max_new_tokens: int = typer.Option(
        defaults.CHAT_MAX_NEW_TOKENS, help="Most tokens per answer."
    ),
    strategy: str = typer.Option(defaults.STRATEGY, help="greedy or top-k (sampling)."),
    top_k: int = typer.Option(defaults.TOP_K, help="Candidates kept when sampling."),
    top_p: float = typer.Option(defaults.TOP_P, help="Nucleus mass kept when sampling, in (0, 1]."),
    temperature: float = typer.Option(
        defaults.TEMPERATURE, help="Logit divisor when sampling, > 0."
    ),
    seed: int = typer.Option(defaults.SEED, help="Sampling seed."),
    stop: list[str] = typer.Option([], "--stop", help="Stop string (repeatable)."),
    provider: str = typer.Option(
        defaults.PROVIDER, help="auto, cuda or cpu. cuda never falls back to CPU."
    ),
) -> None:
    """Chat with an export in the terminal; the KV cache is kept from turn to turn."""
    from llmtool.chat import ChatSession
    from llmtool.console import console, dim, err_console, plain
    from llmtool.errors import UsageError
    from llmtool.generate import StopConditions
    from llmtool.runtime.model import OnnxCausalLM
    from llmtool.sampling import SamplingConfig

    sampling = SamplingConfig(
        strategy=strategy, top_k=top_k, top_p=top_p, temperature=temperature, seed=seed
    )
    sampling.validate()
    model = OnnxCausalLM(model_dir, provider)
    session = ChatSession(
        model, sampling, max_new_tokens, StopConditions(stop=tuple(stop)), system=system
    )
    err_console.print(
        dim(f"Chatting with {model.directory.name} on {model.provider.upper()}. {CHAT_HELP}")
    )

    def on_text(row: int, text: str) -> None:
        console.print(text, end="", markup=False, highlight=False)
        console.file.flush()

    while True:
        try:
            line = console.input("[bold green]> [/]")
        except KeyboardInterrupt:
            console.print()
            continue
        except EOFError:
            console.print()
            return
        command, _, rest = line.strip().partition(" ")
        if command == "/exit":
            return
        if command == "/reset":
            session.reset()
            err_console.print("[dim]New conversation.[/]")
            continue
        if command == "/system":
            session.reset(rest.strip() or None, keep_system=False)
            err_console.print("[dim]System message set; new conversation.[/]")
            continue
        if not line.strip():
            continue
        try:
            turn = session.send(line, on_text)
        except UsageError as e:
            err_console.print(plain(e, "red"))
            continue
        console.print()
        if turn.finish_reason == "eos" and len(turn.token_ids) == 1:
            err_console.print("[yellow](the model ended its answer at once)[/]")
        err_console.print(
            dim(
                f"{len(turn.token_ids)} tokens ({turn.finish_reason}) · prefill "
                f"{turn.prefill_tokens} tokens · {turn.tokens_per_s:.1f} tok/s"
            )
        )


@app.command("eval")
@handle_errors
def eval_cmd(
    model_dir: Path = typer.Argument(..., metavar="DIR", help="An llmtool export directory."),
    data: Path | None = typer.Option(
        None,
        "--data",
        help="Text to score: a UTF-8 file, a directory of .txt files, or JSONL (one document a line).",
    ),
    protocol: str = typer.Option(
        defaults.EVAL_PROTOCOL,
        help="hf: sliding window with --stride (transformers); lm-eval: disjoint windows per "
        "document, word and byte perplexity (lm-evaluation-harness); llama-cpp: chunks of "
        "--max-length, second half scored (llama-perplexity).",
    ),
    text_field: str = typer.Option(
        defaults.EVAL_TEXT_FIELD, help="The field holding the text in JSONL data."
    ),
    max_length: int | None = typer.Option(
        None,
        help="Tokens per forward pass (default: the model's context for lm-eval, as "
        "lm-evaluation-harness; else min(context, 1024)).",
    ),
    stride: int | None = typer.Option(
        None, help="Step between windows, --protocol hf only (default: max-length / 2)."
    ),
    preprocess: str | None = typer.Option(
        None,
        help="wikitext: score each document detokenized as lm-evaluation-harness' wikitext "
        "task does (words and bytes counted on the original text).",
    ),
    max_tokens: int | None = typer.Option(
        None,
        help="Score only the first windows, up to about this many tokens (bounds a CI run; "
        "word and byte perplexity are then not reported).",
    ),
    reference: str | None = typer.Option(
        None,
        help="A PyTorch model (Hugging Face dir, .gguf, smollm2) or another export scored on the "
        "same tokens: ΔPPL, ln(PPL/PPL_ref), KL divergence, top-1 agreement.",
    ),
    throughput: bool = typer.Option(
        False, "--throughput", help="Time prefill and decode per batch size and prompt length."
    ),
    batch_sizes: str = typer.Option(
        ",".join(map(str, defaults.THROUGHPUT_BATCH_SIZES)), help="Batch sizes, comma-separated."
    ),
    prompt_lengths: str | None = typer.Option(
        None,
        help="Prompt lengths in tokens, comma-separated [default: "
        f"{','.join(map(str, defaults.THROUGHPUT_PROMPT_LENGTHS))}, fitted to the model's context].",
    ),
    new_tokens: int | None = typer.Option(
        None,
        help=f"Tokens generated per row [default: {defaults.THROUGHPUT_NEW_TOKENS}, at most a "
        "quarter of the context].",
    ),
    warmup: int = typer.Option(defaults.THROUGHPUT_WARMUP, help="Untimed runs per scenario."),
    repeats: int = typer.Option(
        defaults.THROUGHPUT_REPEATS, help="Timed runs per scenario; tok/s is the best of them."
    ),
    backend: list[str] = typer.Option(
        [],
        "--backend",
        help="pytorch: also time the PyTorch model (a PyTorch --reference, else the model the "
        "export came from) in the same scenarios, side by side.",
    ),
    provider: str = typer.Option(defaults.PROVIDER, help="auto, cuda or cpu."),
    threads: int = typer.Option(
        defaults.ORT_THREADS,
        help="Intra-op threads of ONNX Runtime and of the PyTorch models (0: one per core).",
    ),
    graph_optimization: str = GRAPH_OPTIMIZATION_OPTION,
    cpu_arena: bool = CPU_ARENA_OPTION,
    huge_pages: bool = HUGE_PAGES_OPTION,
    json_path: Path | None = typer.Option(
        None, "--json", help="Write the report as versioned JSON to this file."
    ),
    markdown_path: Path | None = typer.Option(
        None,
        "--markdown",
        help="Write the report as Markdown (also appended to $GITHUB_STEP_SUMMARY when set).",
    ),
    plot_path: Path | None = typer.Option(
        None,
        "--plot",
        help="Write a PNG: decode tok/s by batch size, perplexity with its interval.",
    ),
    baseline: Path | None = typer.Option(
        None, "--baseline", help="An earlier --json report: exit 1 if a metric got worse."
    ),
    tolerance: list[str] = typer.Option(
        [],
        "--tolerance",
        help=f"What --baseline lets pass: perplexity=PCT (and beyond sigmas=N standard errors of "
        f"the paired window-by-window difference), throughput=PCT (and beyond the spread of "
        f"the repeats) [default: perplexity={100 * defaults.GATE_PERPLEXITY_TOLERANCE:g}%,"
        f"sigmas={defaults.GATE_SIGMAS:g},throughput={100 * defaults.GATE_THROUGHPUT_TOLERANCE:g}%]. "
        f"Encoder-decoder exports: perplexity, sigmas (paired pair by pair), throughput, and "
        f"bleu=POINTS / chrf=POINTS that BLEU / chrF may fall [default: "
        f"{defaults.GATE_BLEU_POINTS:g} each].",
    ),
    allow_pickle: bool = typer.Option(
        False, "--allow-pickle", help="Accept pickle weights for PyTorch models (can run code)."
    ),
    ray: str | None = RAY_OPTION,
    source_field: str = typer.Option(
        "source", help="Encoder-decoder exports: the source's field in JSONL (or a TSV header)."
    ),
    target_field: str = typer.Option(
        "target", help="Encoder-decoder exports: the target's field in JSONL (or a TSV header)."
    ),
    num_beams: int = typer.Option(
        1, "--num-beams", help="Encoder-decoder exports: beams when generating for BLEU / chrF."
    ),
) -> None:
    """Perplexity, fidelity to a reference and throughput of an export, gated against a baseline.

    For an encoder-decoder export, --data is a TSV (source<TAB>target) or JSONL file of pairs:
    perplexity of the targets given the sources, BLEU and chrF (sacrebleu) of generated targets.

    Exit codes: 0 success (and nothing worse than --baseline beyond --tolerance); 1 a metric
    regressed against --baseline; 2 bad input, or a baseline measured with another config
    (data hash, protocol, window, dtype, throughput shapes).
    """
    from rich.markup import escape

    from llmtool.console import console, dim, err_console
    from llmtool.errors import RegressionError
    from llmtool.runtime.seq2seq import is_seq2seq_export

    if is_seq2seq_export(model_dir):
        if ray is not None:
            from llmtool.errors import UsageError

            raise UsageError(
                "--ray is not available for encoder-decoder exports yet",
                "drop it; run eval on one machine.",
            )
        from llmtool.evaluate.throughput import parse_sizes

        timed = {
            "batch_sizes": parse_sizes(batch_sizes, "--batch-sizes"),
            "warmup": warmup,
            "repeats": repeats,
            **({} if new_tokens is None else {"new_tokens": new_tokens}),
            **(
                {}
                if prompt_lengths is None
                else {"source_lengths": parse_sizes(prompt_lengths, "--prompt-lengths")}
            ),
        }
        _eval_seq2seq(
            model_dir,
            data,
            (source_field, target_field),
            num_beams,
            provider,
            reference,
            json_path,
            (baseline, tolerance),
            timed if throughput else None,
        )
        return
    from llmtool.evaluate.gate import parse_tolerance
    from llmtool.evaluate.render import check_plot_path, rich_tables, write_reports
    from llmtool.evaluate.run import EvalOptions, parse_backends, run_eval
    from llmtool.evaluate.throughput import parse_sizes

    check_plot_path(plot_path)
    options = EvalOptions(
        data=data,
        protocol=protocol,
        text_field=text_field,
        max_length=max_length,
        stride=stride,
        preprocess=preprocess,
        max_tokens=max_tokens,
        reference=reference,
        throughput=throughput,
        batch_sizes=parse_sizes(batch_sizes, "--batch-sizes"),
        prompt_lengths=None
        if prompt_lengths is None
        else parse_sizes(prompt_lengths, "--prompt-lengths"),
        new_tokens=new_tokens,
        warmup=warmup,
        repeats=repeats,
        backends=parse_backends(backend),
        provider=provider,
        threads=threads,
        graph_optimization=graph_optimization,
        cpu_arena=cpu_arena,
        huge_pages=huge_pages,
        allow_pickle=allow_pickle,
        ray=ray,
    )
    with eval_progress(err_console) as progress:
        task = progress.add_task("Starting", total=None)
        report = run_eval(
            model_dir,
            options,
            baseline=baseline,
            tolerance=parse_tolerance(tolerance),
            on_progress=lambda text, done, total: progress.update(
                task, description=escape(text), completed=done, total=total
            ),
        )
    for table in rich_tables(report.record):
        console.print(table)
    for path in write_reports(
        report.record,
        json_path=json_path,
        markdown_path=markdown_path,
        plot_path=plot_path,
        baseline=report.baseline,
    ):
        err_console.print(dim(f"Wrote {path}"), soft_wrap=True)
    if report.gate is not None and not report.gate.passed:
        worse = [row.metric for row in report.gate.failed]
        raise RegressionError(
            f"{len(worse)} metric(s) worse than the baseline beyond tolerance: {', '.join(worse)}",
            "see the table above, or widen --tolerance if the change is expected.",
        )


def _eval_seq2seq(
    model_dir: Path,
    data: Path | None,
    fields: tuple[str, str],
    num_beams: int,
    provider: str,
    reference: str | None,
    json_path: Path | None,
    gate: tuple[Path | None, list[str]],
    throughput: dict[str, Any] | None = None,
) -> None:
    """`eval` on an encoder-decoder export: target perplexity, BLEU, chrF, timing, the gate."""
    from rich.markup import escape
    from rich.table import Table

    from llmtool.console import console, dim, err_console
    from llmtool.errors import RegressionError, UsageError
    from llmtool.fsutil import write_json
    from llmtool.seq2seq.evaluate import evaluate_seq2seq
    from llmtool.seq2seq.gate import parse_seq2seq_tolerance

    if data is None:
        raise UsageError("No --data given", "pass a TSV or JSONL file of source/target pairs.")
    with eval_progress(err_console) as progress:
        task = progress.add_task("Starting", total=None)
        record = evaluate_seq2seq(
            model_dir,
            data,
            source_field=fields[0],
            target_field=fields[1],
            num_beams=num_beams,
            provider=provider,
            reference=reference,
            baseline=gate[0],
            tolerance=parse_seq2seq_tolerance(gate[1]),
            throughput=throughput,
            on_progress=lambda text, done, total: progress.update(
                task, description=escape(text), completed=done, total=total
            ),
        )
    table = Table(title=f"{record['model_type']} on {record['pairs']} pairs")
    table.add_column("metric")
    table.add_column("value", justify="right")
    se = record["standard_error"]
    table.add_row("target perplexity", f"{record['perplexity']:.4g}")
    table.add_row("NLL ± standard error", f"{record['nll']:.4f} ± {se:.4f}" if se else "-")
    table.add_row("target tokens", str(record["tokens"]))
    table.add_row("BLEU", f"{record['bleu']:.2f}")
    table.add_row("chrF", f"{record['chrf']:.2f}")
    table.add_row("decoder tok/s", f"{record['timing']['decoder_tokens_per_s']:.1f}")
    if "fidelity" in record:
        f = record["fidelity"]
        table.add_row("ΔPPL vs reference", f"{f['delta_perplexity']:+.4g}")
        table.add_row("KL mean (nats)", f"{f['kl_divergence']['mean']:.3g}")
        table.add_row("top-1 agreement", f"{100 * f['top1_agreement']:.1f}%")
    console.print(table)
    if "throughput" in record:
        timed = Table(title="Throughput (medians over repeats, greedy, EOS ignored)")
        for name in ("batch", "source tok", "new tok", "encoder ms", "TTFT ms", "decoder tok/s"):
            timed.add_column(name, justify="right")
        for sc in record["throughput"]["scenarios"]:
            timed.add_row(
                str(sc["batch_size"]),
                str(sc["source_tokens"]),
                str(sc["new_tokens"]),
                f"{sc['encoder_ms']:.2f}",
                f"{sc['ttft_ms']:.2f}",
                f"{sc['decoder_tokens_per_s']:.1f} ± {100 * sc['spread']:.0f}%",
            )
        console.print(timed)
    if json_path is not None:
        write_json(json_path, record)
        err_console.print(dim(f"Wrote {json_path}"), soft_wrap=True)
    if "gate" in record:
        _print_seq2seq_gate(record["gate"])
        worse = [r["metric"] for r in record["gate"]["rows"] if r["status"] == "worse"]
        if worse:
            raise RegressionError(
                f"{len(worse)} metric(s) worse than the baseline beyond tolerance: {', '.join(worse)}",
                "see the table above, or widen --tolerance if the change is expected.",
            )


def _print_seq2seq_gate(gate: dict[str, Any]) -> None:
    """The seq2seq gate's rows as a Rich table."""
    from rich.table import Table

    from llmtool.console import console

    table = Table(title=f"Against baseline {gate['baseline']}")
    for name in ("metric", "baseline", "this run", "limit", "status"):
        table.add_column(name, justify="right" if name in ("baseline", "this run") else "left")
    for r in gate["rows"]:
        old, new = ("-" if v is None else f"{v:.4g}" for v in (r["old"], r["new"]))
        table.add_row(r["metric"], old, new, r["limit"], r["status"])
    console.print(table)


@app.command("train")
@handle_errors
def train_cmd(
    data: Path | None = typer.Option(
        None,
        "--data",
        help="UTF-8 text file or directory of .txt files (with --resume: the checkpoint's).",
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Directory to create (or --resume)."),
    arch: str | None = typer.Option(
        None,
        help=f"llama, gpt2, lstm or rnn (default: {defaults.TRAIN_ARCH}); t5 or bart: an "
        "encoder-decoder on a TSV / JSONL of source-target pairs.",
    ),
    preset: str | None = typer.Option(
        None, help=f"tiny (CPU), small or base (GPU) (default: {defaults.TRAIN_PRESET})."
    ),
    tokenizer: str | None = typer.Option(
        None, help="bpe (train one on the data) or a tokenizer directory (default: bpe)."
    ),
    vocab_size: int | None = typer.Option(None, help="BPE vocabulary (default: the preset's)."),
    steps: int | None = typer.Option(None, help="Optimizer steps (default: the preset's)."),
    batch_size: int | None = typer.Option(None, help="Rows per micro-batch."),
    grad_accum: int | None = typer.Option(None, help="Micro-batches per optimizer step."),
    seq_len: int | None = typer.Option(None, help="Tokens per row (the Transformers' context)."),
    lr: float | None = typer.Option(None, help="Peak learning rate."),
    val_fraction: float | None = typer.Option(
        None, help=f"Held-out tail of the tokens (default: {defaults.VAL_FRACTION})."
    ),
    seed: int | None = typer.Option(None, help=f"Seed (default: {defaults.SEED})."),
    eval_every: int | None = typer.Option(None, help="Steps between validations."),
    checkpoint_every: int | None = typer.Option(None, help="Steps between checkpoints."),
    device: str = typer.Option(defaults.TRAIN_DEVICE, help="auto, cpu or cuda."),
    fsdp: bool = typer.Option(
        False,
        "--fsdp",
        help="Under torchrun: shard the model over the ranks with FSDP2 instead of DDP.",
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue from the last checkpoint in --out."
    ),
    force: bool = typer.Option(False, "--force", help="Delete an existing --out and start over."),
    as_json: bool = typer.Option(
        False, "--json", help="Print the final metrics as JSON on stdout."
    ),
) -> None:
    """Train a small LM on your text; the result takes `llmtool export` unchanged.

    Options not given come from the preset, or with --resume from the checkpoint. Under
    `torchrun --nproc-per-node N` it trains on N ranks (DDP, or --fsdp): --batch-size is the
    per-rank micro-batch, rank 0 writes --out, tok/s are global.
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from llmtool.console import console, dim, err_console
    from llmtool.reports import train_table
    from llmtool.seq2seq.train import SEQ2SEQ_ARCHS
    from llmtool.train import TrainOptions, TrainProgress, train_model

    if arch in SEQ2SEQ_ARCHS:
        # --seq-len cuts a text stream into windows: pairs have no stream to cut (each is padded
        # to its longest side). The tokenizer is always a BPE trained on both sides.
        unsupported = {
            "--tokenizer": tokenizer,
            "--vocab-size": vocab_size,
            "--grad-accum": grad_accum,
            "--seq-len": seq_len,
        }
        given = [name for name, value in unsupported.items() if value]
        if given:
            from llmtool.errors import UsageError

            raise UsageError(
                f"{', '.join(given)} not available with --arch {arch}: pairs are padded per batch "
                "and the tokenizer is a BPE trained on both sides",
                "drop them (the preset sets the vocabulary; lower --batch-size for memory).",
            )
        _train_seq2seq(
            data,
            out,
            arch,
            preset,
            steps,
            batch_size,
            lr,
            seed,
            device,
            force,
            as_json,
            eval_every,
            val_fraction,
            (checkpoint_every, resume),
        )
        return

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(
            "loss {task.fields[loss]} · val ppl {task.fields[ppl]} · {task.fields[tps]} tok/s"
        ),
        TimeRemainingColumn(),
    )
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 alone reports
    with Progress(*columns, console=err_console, transient=True, disable=not main_rank) as progress:
        task = progress.add_task("Preparing", total=None, loss="-", ppl="-", tps="-")

        def on_stage(text: str) -> None:
            if main_rank:
                progress.console.print(dim(text))

        def on_step(p: TrainProgress) -> None:
            progress.update(
                task,
                description="Training",
                completed=p.step,
                total=p.steps,
                loss=f"{p.loss:.3f}",
                ppl=f"{p.val_perplexity:.1f}",
                tps=f"{p.tokens_per_s:,.0f}",
            )

        try:
            result = train_model(
                data,
                out,
                TrainOptions(
                    arch=arch,
                    preset=preset,
                    tokenizer=tokenizer,
                    vocab_size=vocab_size,
                    steps=steps,
                    batch_size=batch_size,
                    grad_accum=grad_accum,
                    seq_len=seq_len,
                    lr=lr,
                    val_fraction=val_fraction,
                    seed=seed,
                    eval_every=eval_every,
                    checkpoint_every=checkpoint_every,
                ),
                device=device,
                resume=resume,
                force=force,
                fsdp=fsdp,
                on_stage=on_stage,
                on_step=on_step,
            )
        except KeyboardInterrupt:
            _fail(
                f"Interrupted; continue from the last checkpoint with `--resume --out {out}`.", 130
            )
    if not main_rank:
        return
    if as_json:
        _print_json(result.summary())
        return
    console.print(train_table(result.metrics))


def _train_seq2seq(
    data: Path | None,
    out: Path,
    arch: str,
    preset: str | None,
    steps: int | None,
    batch_size: int | None,
    lr: float | None,
    seed: int | None,
    device: str,
    force: bool,
    as_json: bool,
    eval_every: int | None,
    val_fraction: float | None,
    checkpoints: tuple[int | None, bool],
) -> None:
    """`train --arch t5|bart`: an encoder-decoder on source/target pairs (checkpoints, resume)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from llmtool.console import console, dim, err_console
    from llmtool.errors import UsageError
    from llmtool.reports import train_table
    from llmtool.seq2seq.train import Seq2SeqTrainOptions, train_seq2seq

    if data is None:
        raise UsageError("No --data given", "pass --data PAIRS.tsv (source<TAB>target lines).")
    options = Seq2SeqTrainOptions(
        arch=arch,
        preset=preset or "tiny",
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=defaults.SEED if seed is None else seed,
        eval_every=eval_every,
        val_fraction=defaults.VAL_FRACTION if val_fraction is None else val_fraction,
        checkpoint_every=checkpoints[0],
    )
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]} · val ppl {task.fields[ppl]}"),
    )
    with Progress(*columns, console=err_console, transient=True) as progress:
        task = progress.add_task("Preparing", total=None, loss="-", ppl="-")
        metrics = train_seq2seq(
            data,
            out,
            options,
            device=device,
            force=force,
            resume=checkpoints[1],
            on_stage=lambda text: progress.console.print(dim(text)),
            on_step=lambda p: progress.update(
                task,
                description="Training",
                completed=p.step,
                total=p.steps,
                loss=f"{p.loss:.3f}",
                ppl=f"{p.val_perplexity:.2f}",
            ),
        )
    if as_json:
        _print_json({k: v for k, v in metrics.items() if k != "curve"})
        return
    table = train_table(metrics)
    table.add_row("exact match (held-out, greedy)", f"{100 * metrics['exact_match']:.1f}%")
    console.print(table)


MALLOC_HUGE_PAGE_COMMANDS = ("generate", "eval")  # the commands that run CPU sessions


def _restart_with_huge_page_malloc(argv: list[str]) -> None:
    """Start again, once, with glibc's malloc asking for huge pages (see llmtool.hugepages).

    Only for commands that run ONNX Runtime sessions, before anything is loaded; never when
    ``--no-huge-pages`` is given or where it cannot work.
    """
    command = next((a for a in argv[1:] if not a.startswith("-")), None)
    if command in MALLOC_HUGE_PAGE_COMMANDS and "--no-huge-pages" not in argv:
        from llmtool.hugepages import restart_with_huge_page_malloc

        restart_with_huge_page_malloc()


def optional_values(argv: list[str]) -> list[str]:
    """``--ray`` with no value (last, or before another option) means ``--ray local``.

    Typer has no option with an optional value, so the bare flag is completed here.
    """
    out = []
    for i, arg in enumerate(argv):
        out.append(arg)
        following = argv[i + 1] if i + 1 < len(argv) else None
        if arg == "--ray" and (following is None or following.startswith("-")):
            out.append("local")
    return out


def main() -> None:
    """Console-script entry point."""
    from llmtool.errors import watch_interrupts

    sys.argv[1:] = optional_values(sys.argv[1:])
    _restart_with_huge_page_malloc(sys.argv)
    watch_interrupts()
    app()


if __name__ == "__main__":
    main()
