"""Error types that the CLI turns into one-sentence messages and exit codes.

Library code raises these; only :mod:`llmtool.cli` decides how they are shown.
"""

from __future__ import annotations


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
