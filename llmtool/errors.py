"""Error types that the CLI turns into one-sentence messages and exit codes.

Library code raises these; only :mod:`llmtool.cli` decides how they are shown.
"""

from __future__ import annotations

_interrupted = False


def watch_interrupts() -> None:
    """Remember Ctrl-C (SIGINT) before raising KeyboardInterrupt as Python does.

    A KeyboardInterrupt that lands inside the import of a C extension comes out as an
    ImportError, and code that tolerates ImportError (optional dependencies) can swallow it; the
    flag lets the CLI and :func:`llmtool.fsutil.atomic_directory` see the interrupt anyway.
    Installed by the CLI (main thread only).
    """
    import signal

    def on_sigint(signum: int, frame: object) -> None:
        global _interrupted
        _interrupted = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)


def interrupted() -> bool:
    """Whether Ctrl-C was pressed since :func:`watch_interrupts`."""
    return _interrupted


class LlmtoolError(Exception):
    """Base class: a failure the user can act on.

    Attributes:
        exit_code: Process exit status the CLI uses for this error.
        hint: What to do next, appended to the message.
    """

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message.rstrip('.')}: {self.hint}"
        return self.message


class UsageError(LlmtoolError):
    """Bad input: a missing path, an invalid option, an unsupported model (exit code 2)."""

    exit_code = 2


class ValidationError(LlmtoolError):
    """An export whose ONNX graph does not match PyTorch within tolerance (exit code 1)."""

    exit_code = 1


class RegressionError(LlmtoolError):
    """A metric worse than its baseline beyond tolerance (``llmtool eval --baseline``; exit code 1)."""

    exit_code = 1


_OOM_MARKERS = (
    "out of memory",
    "failed to allocate memory",
    "bad_alloc",
    "outofmemory",
    "cudaerrormemoryallocation",
)


def classify(error: BaseException) -> LlmtoolError | None:
    """Map a low-level failure that has a known cause to a clear :class:`LlmtoolError`.

    Out-of-memory (host or GPU, from PyTorch or ONNX Runtime), a full disk and a denied
    permission get a sentence with what to do; anything else returns ``None``.
    """
    import errno

    text = str(error).lower()
    if isinstance(error, MemoryError) or any(
        marker in text.replace(" ", "") or marker in text for marker in _OOM_MARKERS
    ):
        return UsageError(
            "Out of memory",
            "use a smaller batch (fewer prompts), shorter prompts, a lower --max-new-tokens or "
            "--max-length, or a smaller model.",
        )
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        where = f" writing {error.filename}" if error.filename else ""
        return LlmtoolError(
            f"No space left on the device{where}; nothing was left half-written",
            "free some disk space or write somewhere else.",
        )
    if isinstance(error, PermissionError):
        return UsageError(
            f"Permission denied: {error.filename or error}", "choose a path you can write."
        )
    return None
