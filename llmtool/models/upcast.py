"""Load a half-precision checkpoint as fp32 without holding both copies.

transformers' ``from_pretrained(dtype=float32)`` on bf16 / fp16 safetensors maps every shard
(0.5x the fp32 bytes) while it fills the fp32 parameters (1x), so a 1.1B model peaks at about
1.5x before llmtool's export starts. Loading in the checkpoint's own dtype and converting one
parameter at a time peaks near 1x instead, and the values are the same: bf16 and fp16 widen to
fp32 exactly.

What differs is what the model computes at ``__init__`` rather than reads from the file
(rotary ``inv_freq``, Gemma's ``embed_scale``, causal-mask tables): under a bf16 load those come
out rounded to bf16. They are recomputed here in fp32 from a skeleton of the same class whose
parameters live on the meta device (no weight memory), so the result equals transformers' own
fp32 load tensor for tensor (tests/test_upcast_loading.py checks that per family).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# safetensors header dtype names of the half types this path widens.
HALF_TYPES = {"BF16": "bfloat16", "F16": "float16"}
FLOAT_TYPES = {"BF16", "F16", "F32", "F64", "F8_E4M3", "F8_E5M2"}


def stored_half_dtype(path: Path) -> tuple[str | None, set[str]]:
    """The one half dtype every floating tensor of a safetensors checkpoint is stored in.

    Args:
        path: A Hugging Face model directory.

    Returns:
        (``"bfloat16"`` / ``"float16"``, or None when the floating tensors are fp32, mixed or
        unreadable; the checkpoint's tensor names).
    """
    from safetensors import SafetensorError, safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        return None, set()
    kinds: set[str] = set()
    names: set[str] = set()
    try:
        for file in files:
            with safe_open(str(file), "pt") as f:  # the header only: no tensor data is read
                keys = f.keys()  # a safe_open handle is not iterable
                names.update(keys)
                for name in keys:
                    kind = f.get_slice(name).get_dtype()
                    if kind in FLOAT_TYPES:
                        kinds.add(kind)
    except (OSError, SafetensorError):
        return None, set()
    if len(kinds) != 1:
        return None, names
    return HALF_TYPES.get(next(iter(kinds))), names


@dataclass
class HalfLoad:
    """How to load a half-precision checkpoint as fp32 (see :func:`plan_half_load`).

    Attributes:
        dtype: The checkpoint's dtype (``torch.bfloat16`` / ``torch.float16``), to load in.
        buffers: Name -> fp32 tensor of the floating buffers the model computes itself (not
            read from the file), as an fp32 build of the class computes them.
    """

    dtype: Any
    buffers: dict[str, Any]


def plan_half_load(auto_class: Any, config: Any, path: Path) -> HalfLoad | None:
    """Whether a checkpoint can be loaded in its half dtype and widened, and with what buffers.

    A skeleton of the class (parameters on the meta device, real buffers) is built in fp32 from
    ``config``. Every parameter (any one name of a tied group) and every persistent floating
    buffer must be a tensor of the file: one that transformers would compute at init instead
    (Marian's sinusoidal positions) or read under another name (converted checkpoints) would
    otherwise keep bf16 rounding, so those models take transformers' fp32 load.

    Args:
        auto_class: ``AutoModelForCausalLM`` or ``AutoModelForSeq2SeqLM``.
        config: The model's config.
        path: The Hugging Face directory.

    Returns:
        The plan, or None to load in fp32 directly.
    """
    import torch

    half, stored = stored_half_dtype(path)
    if half is None:
        return None
    from accelerate import init_empty_weights

    try:
        with init_empty_weights(include_buffers=False):  # parameters on meta, buffers real
            skeleton = auto_class.from_config(
                copy.deepcopy(config), dtype=torch.float32, attn_implementation="eager"
            )
        skeleton.tie_weights()  # the patched registration re-wraps, and so unties, tied weights
    except Exception:  # any build error: the fp32 load then reports the model's own
        return None
    groups: dict[int, set[str]] = {}
    for name, param in skeleton.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), set()).add(name)
    if any(not names & stored for names in groups.values()):
        return None
    computed: dict[str, Any] = {}
    for owner, module in skeleton.named_modules():
        for leaf, buf in module.named_buffers(recurse=False):
            name = f"{owner}.{leaf}" if owner else leaf
            if not buf.is_floating_point() or name in stored:
                continue
            if leaf not in module._non_persistent_buffers_set:
                return None  # a state-dict buffer the file does not hold under this name
            computed[name] = buf
    return HalfLoad(getattr(torch, half), computed)


def upcast_to_fp32(model: Any, plan: HalfLoad) -> None:
    """Widen a model loaded in ``plan.dtype`` to fp32 in place, one tensor at a time.

    Args:
        model: A transformers model loaded in bf16 / fp16 from a checkpoint ``plan`` accepted.
        plan: From :func:`plan_half_load` (its buffers replace the half-precision ones).
    """
    import torch

    with torch.no_grad():
        for module in model.modules():
            for param in module.parameters(recurse=False):
                # Tied parameters are one object: widened once, the tie is kept.
                if param.is_floating_point() and param.dtype != torch.float32:
                    param.data = param.data.to(torch.float32)
            for name, buf in module.named_buffers(recurse=False):
                if buf.is_floating_point() and buf.dtype != torch.float32:
                    module._buffers[name] = buf.to(torch.float32)
        for name, value in plan.buffers.items():
            owner, _, leaf = name.rpartition(".")
            target = model.get_submodule(owner) if owner else model
            target._buffers[leaf] = value
    model.config.dtype = torch.float32
