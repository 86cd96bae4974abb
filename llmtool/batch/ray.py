"""Ray Data: ``eval --ray`` and ``generate --prompt-file ... --out ... --ray`` on actors.

Filled in below; :func:`require_ray` is the one place that says how to install the extra.
"""

from __future__ import annotations

from typing import Any

from llmtool.errors import UsageError

INSTALL_HINT = "install the extra: pip install 'llmtool[ray]' (Ray Data 2.x)."


def require_ray() -> Any:
    """The ``ray`` module, or a :class:`UsageError` that says how to install it."""
    try:
        import ray
        import ray.data
    except ImportError as e:
        raise UsageError("--ray needs Ray Data, which is not installed", INSTALL_HINT) from e
    return ray


def ray_generate_runner(address: str) -> tuple[Any, int]:
    """Placeholder until the Ray runner is written."""
    require_ray()
    raise UsageError("--ray is not available for generate yet")
