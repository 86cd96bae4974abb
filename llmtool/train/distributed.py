"""``llmtool train`` under ``torchrun``: the process group, DDP or FSDP2, and what ranks share.

``torchrun`` starts one process per rank with ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in the
environment; :func:`setup` joins them into a process group (NCCL on CUDA, gloo on CPU) and
:func:`wrap` puts the model under DistributedDataParallel, or with ``fsdp`` under FSDP2
(``torch.distributed.fsdp.fully_shard``: each block's parameters, gradients and optimizer state
sharded over the ranks). Every rank reads the same corpus and draws the same global order of
training windows; a micro-batch is the next ``world_size * batch_size`` windows of that order,
rank ``r`` training on rows ``[r * b, (r + 1) * b)`` (:class:`llmtool.train.data.BatchSampler`),
so the data position is global and ``--resume`` works at another world size. Gradients are
averaged over the ranks, which makes 2 ranks x batch b the same optimization as 1 rank x 2b.
Rank 0 alone writes; the state it saves is the full, unsharded one, so a checkpoint does not
depend on how many ranks wrote it.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from llmtool.errors import LlmtoolError, UsageError
from llmtool.train.options import resolve_device

# How long a rank waits in a collective for the others (torch's default is 30 minutes); a rank
# that died is usually noticed at once (its sockets close), this bounds the rest.
TIMEOUT = timedelta(minutes=10)


class RankFailure(LlmtoolError):
    """Another rank of the job failed or was killed, so this one stopped (exit code 1)."""


@dataclass(frozen=True)
class Dist:
    """Where this process stands in the job.

    Attributes:
        rank: Global rank (0 writes the output).
        world_size: Processes in the job (1 without torchrun).
        local_rank: Rank on this machine (its GPU index on CUDA).
        fsdp: The model is sharded with FSDP2 rather than replicated with DDP.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    fsdp: bool = False

    @property
    def main(self) -> bool:
        """This rank writes checkpoints, the model and the metrics."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """More than one rank: collectives are needed."""
        return self.world_size > 1


def launched_world_size() -> int:
    """``WORLD_SIZE`` as torchrun set it (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(device: str, fsdp: bool) -> tuple[Dist, torch.device]:
    """Join the torchrun job (if any) and pick this rank's device.

    Args:
        device: ``auto``, ``cpu`` or ``cuda``; on CUDA each rank takes GPU ``LOCAL_RANK``.
        fsdp: Shard the model with FSDP2.

    Raises:
        UsageError: ``fsdp`` outside a torchrun job of at least 2 ranks, or a bad device.
    """
    world = launched_world_size()
    dev = resolve_device(device)
    if world <= 1:
        if fsdp:
            raise UsageError(
                "--fsdp shards the model over the ranks of a torchrun job, and there is one",
                "launch it with `torchrun --nproc-per-node N llmtool train --fsdp ...` (N >= 2).",
            )
        return Dist(), dev
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        nccl_device = dev if backend == "nccl" else None
        dist.init_process_group(backend, timeout=TIMEOUT, device_id=nccl_device)
    _stop_on_sigterm(rank)
    return Dist(rank, world, local, fsdp), dev


_saved_sigterm: list[Any] = []  # the handler before :func:`setup`, put back by :func:`shutdown`


def _stop_on_sigterm(rank: int) -> None:
    """torchrun stops the other ranks with SIGTERM when one fails: say so in one sentence."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers belong to the main thread; the default (exit) stays

    def on_sigterm(signum: int, frame: object) -> None:
        raise RankFailure(
            f"Rank {rank} was stopped because another rank of the job failed or was killed "
            "(its error is above); the last complete checkpoint is kept",
            "fix that rank's error and rerun the same command with --resume.",
        )

    _saved_sigterm.append(signal.signal(signal.SIGTERM, on_sigterm))


# What gloo and NCCL say when a peer's process is gone (they raise a plain RuntimeError).
_PEER_GONE = (
    "connection reset",
    "connection closed",
    "connection refused",
    "broken pipe",
    "timed out",
    "nccl",
    "gloo",
)


def peer_failure(error: BaseException) -> bool:
    """Whether ``error`` is a collective that failed because another rank went away."""
    import torch.distributed as dist

    if isinstance(error, dist.DistError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(marker in text for marker in _PEER_GONE)


def lost_contact(rank: int, error: BaseException) -> RankFailure:
    """The error a rank raises when a collective fails because a peer went away."""
    first = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
    return RankFailure(
        f"Rank {rank} lost contact with the other ranks of the job (one of them failed or was "
        f"killed: {first}); the last complete checkpoint is kept",
        "fix the failed rank's error and rerun the same command with --resume.",
    )


def shutdown(d: Dist) -> None:
    """Wait for every rank, then leave the process group."""
    if d.active:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
        if _saved_sigterm:
            signal.signal(signal.SIGTERM, _saved_sigterm.pop())


def barrier(d: Dist) -> None:
    """Wait until every rank gets here (no-op on one rank)."""
    if d.active:
        import torch.distributed as dist

        dist.barrier()


def all_sum(d: Dist, values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of ``values`` over the ranks (float64, so counts stay exact)."""
    if not d.active:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def wrap(model: Any, d: Dist, device: torch.device) -> Any:
    """DDP (replicas, gradients all-reduced) or FSDP2 (sharded per block, then the rest)."""
    if not d.active:
        return model
    if d.fsdp:
        from torch.distributed.fsdp import fully_shard

        # Each block is its own unit (all-gathered just before it runs, freed after); the root
        # unit holds what is left: embeddings, final norm, the tied output head.
        for module in list(model.modules()):
            if isinstance(module, torch.nn.ModuleList):
                for block in module:
                    fully_shard(block)
        return fully_shard(model)
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    # No buffer sync per forward: the models' buffers (rotary tables) are constants.
    return DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False)


def gradient_sync(model: Any, d: Dist, sync: bool) -> contextlib.AbstractContextManager:
    """Reduce gradients over the ranks in this backward pass only if ``sync``.

    With gradient accumulation, the micro-batches before the last accumulate locally and the
    last one's backward reduces the sum: one all-reduce (DDP) or reduce-scatter (FSDP) per
    optimizer step instead of one per micro-batch, the same gradients.
    """
    if d.active and d.fsdp:
        model.set_requires_gradient_sync(sync)
    elif d.active and not sync:
        return model.no_sync()
    return contextlib.nullcontext()


def unwrap(model: Any) -> Any:
    """The module under DDP (FSDP2 keeps the module itself, with the same parameter names)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def _options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model(model: Any, d: Dist, build: Callable[[], Any]) -> Any:
    """An unsharded module with the current weights (on rank 0; collective under FSDP).

    Under FSDP the shards are gathered into a full state dict on rank 0's CPU and loaded into a
    fresh module from ``build``; the other ranks get None.
    """
    if not d.fsdp:
        return unwrap(model)
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_options())
    if not d.main:
        return None
    plain = build()
    plain.load_state_dict(state)
    return plain


def optimizer_state(model: Any, optimizer: Any, d: Dist) -> dict[str, Any]:
    """The optimizer's full state dict in torch's usual form (parameters numbered in order).

    DDP replicas hold the full state already; under FSDP it is gathered (a collective) and
    renumbered, so a checkpoint resumes under any of single process, DDP or FSDP.
    """
    if not d.fsdp:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    named: Any = get_optimizer_state_dict(model, optimizer, options=_options())
    if not d.main:
        return {}
    index: dict[str, int] = {}
    groups = []
    for group in named["param_groups"]:
        params = []
        for fqn in group["params"]:
            index[fqn] = len(index)
            params.append(index[fqn])
        groups.append({**group, "params": params})
    state = {index[fqn]: value for fqn, value in named["state"].items()}
    return {"state": state, "param_groups": groups}


def load_optimizer_state(model: Any, optimizer: Any, saved: dict[str, Any], d: Dist) -> None:
    """Load what :func:`optimizer_state` saved (every rank reads the full state)."""
    if not d.fsdp:
        optimizer.load_state_dict(saved)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_optimizer_state_dict,
    )

    name_of = {id(p): name for name, p in model.named_parameters()}
    names = [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]
    groups = [
        {**group, "params": [names[i] for i in group["params"]]} for group in saved["param_groups"]
    ]
    state = {names[i]: value for i, value in saved["state"].items()}
    set_optimizer_state_dict(
        model,
        optimizer,
        {"state": state, "param_groups": groups},
        options=StateDictOptions(full_state_dict=True),
    )
