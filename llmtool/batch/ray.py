"""Ray Data: ``eval --ray`` and ``generate --prompt-file P --out R --ray`` on actors.

Both split the work into rows of a Ray Dataset and run them with ``map_batches`` on a pool of
actors, each holding one ONNX Runtime session (a GPU each on CUDA, ``--threads`` CPU threads
each otherwise, 1 by default). Perplexity ships the forward passes of
:func:`llmtool.evaluate.perplexity.prepare` (one row per pass) and the driver adds the returned
:class:`~llmtool.evaluate.passes.PassScore` in pass order, so the record equals the
single-process one. Generation ships the batches of :func:`llmtool.batch.generate.generate_file`
and yields their rows back in batch order, so the results file is written as it would be by
one process. Ray is the optional ``llmtool[ray]`` extra, imported only here.
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from typing import Any

import numpy as np

from llmtool.errors import LlmtoolError, UsageError

INSTALL_HINT = "install the extra: pip install 'llmtool[ray]' (Ray Data 2.x)."


def require_ray() -> Any:
    """The ``ray`` module, or a :class:`UsageError` that says how to install it."""
    try:
        import ray
        import ray.data
    except ImportError as e:
        raise UsageError("--ray needs Ray Data, which is not installed", INSTALL_HINT) from e
    return ray


def connect(address: str) -> Any:
    """Join the Ray cluster at ``address`` (``local``: start one here) unless already joined.

    Raises:
        UsageError: Ray is missing, or the cluster cannot be reached.
    """
    ray = require_ray()
    if not ray.is_initialized():
        try:
            ray.init(
                address=None if address == "local" else address,
                include_dashboard=False,
                log_to_driver=False,
                logging_level="ERROR",
            )
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise UsageError(
                f"Cannot reach the Ray cluster at {address}: {str(e).splitlines()[0][:200]}",
                "start it with `ray start --head` or pass its address (ray://HOST:10001).",
            ) from e
    ray.data.DataContext.get_current().enable_progress_bars = False
    return ray


def pool(ray: Any, provider: str, threads: int) -> tuple[int, dict[str, float]]:
    """How many actors the cluster holds, and what each asks for (a GPU, or ``threads`` CPUs)."""
    resources = ray.cluster_resources()
    if provider == "cuda" or (provider == "auto" and resources.get("GPU", 0) >= 1):
        return max(1, int(resources.get("GPU", 0))), {"num_gpus": 1}
    return max(1, int(resources.get("CPU", 1) // threads)), {"num_cpus": threads}


def _session_options(options: Any, threads: int) -> Any:
    from llmtool.runtime.session import SessionOptions

    return replace(options or SessionOptions(), intra_op_threads=threads)


class PassScorer:
    """A Ray actor: one session (and reference) scoring pickled passes."""

    def __init__(
        self, model_dir: str, provider: str, options: Any, reference: str | None, pickle_ok: bool
    ) -> None:
        from llmtool.evaluate.reference import load_reference
        from llmtool.runtime.model import OnnxCausalLM

        self.model = OnnxCausalLM(model_dir, provider, options=options)
        self.reference = (
            load_reference(reference, provider, options, allow_pickle=pickle_ok)
            if reference is not None
            else None
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from llmtool.evaluate.passes import score_pass

        pieces = [
            pickle.dumps(score_pass(self.model.window_logits, self.reference, pickle.loads(blob)))
            for blob in batch["item"]
        ]
        return {"index": batch["index"], "piece": np.array(pieces, dtype=object)}


def _run(
    ray: Any, items: list[Any], actor: type, kwargs: dict[str, Any], workers: int, ask: dict
) -> Iterator[tuple[int, Any]]:
    """``(index, result)`` of every item, as actors finish them (in no particular order)."""
    rows = [{"index": i, "item": pickle.dumps(x)} for i, x in enumerate(items)]
    ds = ray.data.from_items(rows, override_num_blocks=min(len(rows), workers * 4))
    ds = ds.map_batches(
        actor,
        fn_constructor_kwargs=kwargs,
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=workers),
        **ask,
    )
    try:
        for row in ds.iter_rows():
            yield int(row["index"]), pickle.loads(row["piece"])
    except Exception as e:
        raise _worker_error(e) from e


def _worker_error(error: BaseException) -> LlmtoolError:
    """An actor's own :class:`LlmtoolError` (Ray wraps it), or one sentence naming the failure."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, LlmtoolError):
            return seen
        cause = getattr(seen, "cause", None)  # RayTaskError keeps the original here
        seen = cause if isinstance(cause, BaseException) else seen.__cause__
    # An actor that failed in __init__ reaches the driver as ActorDiedError, whose text alone
    # keeps the original error ("llmtool.errors.UsageError: ..."): rebuild that error from it.
    import re

    import llmtool.errors

    found = re.findall(r"llmtool\.errors\.(\w+): (.+)", str(error))
    if found:
        name, message = found[-1]
        kind = getattr(llmtool.errors, name, LlmtoolError)
        if isinstance(kind, type) and issubclass(kind, LlmtoolError):
            return kind(message.strip())
    first = str(error).strip().splitlines()[-1][:300] if str(error).strip() else ""
    return LlmtoolError(
        f"A Ray Data worker failed ({type(error).__name__}: {first})",
        "check that every node has llmtool and the model directory, or rerun with --debug.",
    )


def ray_scorer(
    address: str,
    *,
    threads: int = 0,
    reference: str | None = None,
    allow_pickle: bool = False,
    session_options: Any = None,
    workers: int | None = None,
) -> Callable[..., Any]:
    """A ``score_fn`` for :func:`~llmtool.evaluate.perplexity.evaluate_perplexity` on Ray.

    Args:
        address: ``local`` or a Ray cluster address.
        threads: ONNX Runtime threads per actor (0: 1).
        reference: The ``--reference`` spec (each actor loads it).
        allow_pickle: Accept pickle weights for a PyTorch reference.
        session_options: ONNX Runtime settings (the thread count is replaced by ``threads``).
        workers: At most this many actors (default: as many as the cluster holds).
    """
    ray = connect(address)

    def score_on_ray(plan: Any, on_window: Callable[[int, int], None] | None = None) -> Any:
        from llmtool.evaluate.metrics import FidelityAccumulator
        from llmtool.evaluate.passes import add_pass
        from llmtool.evaluate.perplexity import Scores

        per_actor = threads or 1
        size, ask = pool(ray, plan.model.provider, per_actor)
        kwargs = {
            "model_dir": str(plan.model.directory),
            "provider": plan.model.provider,
            "options": _session_options(session_options, per_actor),
            "reference": reference,
            "pickle_ok": allow_pickle,
        }
        scores = Scores([[] for _ in plan.corpus.documents], 0, 0.0)
        if plan.reference is not None:
            scores.fidelity = FidelityAccumulator()
        start = time.perf_counter()
        pieces: dict[int, Any] = {}
        items = [p for _, p in plan.passes]
        actors = min(size, workers or size)
        for index, piece in _run(ray, items, PassScorer, kwargs, actors, ask):
            pieces[index] = piece
            if on_window is not None:
                on_window(len(pieces), len(items))
        for index, (document, _) in enumerate(plan.passes):  # pass order: the exact sums
            add_pass(scores, document, pieces[index])
        scores.seconds = time.perf_counter() - start
        return scores

    return score_on_ray


class BatchGenerator:
    """A Ray actor: one session generating pickled batches of prompt rows."""

    def __init__(self, job: Any) -> None:
        from llmtool.runtime.model import OnnxCausalLM

        self.job = job
        self.model = OnnxCausalLM(job.model_dir, job.provider, options=job.session_options)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from llmtool.batch.generate import run_batch

        pieces = [
            pickle.dumps(run_batch(self.model, self.job, pickle.loads(blob)))
            for blob in batch["item"]
        ]
        return {"index": batch["index"], "piece": np.array(pieces, dtype=object)}


def ray_generate_runner(
    address: str, threads: int = 0, workers: int | None = None
) -> tuple[Any, int]:
    """A ``runner`` for :func:`~llmtool.batch.generate.generate_file` on Ray, and its workers.

    Batches run on the actors in any order; their rows come back in batch order (a batch is
    held until those before it are done), so the results file does not depend on the workers.
    """
    ray = connect(address)
    per_actor = threads or 1

    def runner(job: Any, batches: list[Any]) -> Iterator[list[dict[str, Any]]]:
        if not batches:
            return
        size, ask = pool(ray, job.provider, per_actor)
        job = replace(job, session_options=_session_options(job.session_options, per_actor))
        actors = min(size, workers or size)
        yield from in_order(_run(ray, batches, BatchGenerator, {"job": job}, actors, ask))

    size, _ = pool(ray, "auto", per_actor)
    return runner, min(size, workers or size)


def in_order(pieces: Iterable[tuple[int, Any]]) -> Iterator[Any]:
    """Results keyed by index, yielded in index order as soon as each is next."""
    done: dict[int, Any] = {}
    following = 0
    for index, piece in pieces:
        done[index] = piece
        while following in done:
            yield done.pop(following)
            following += 1
