"""What every extractor shares: reading config fields the way transformers' modelling code does
(rope parameters, head size, per-layer windows), refusing rope variants a static graph cannot
express, the model's own rotary tables, and nn.Linear weights in ONNX MatMul layout."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from llmtool.errors import UsageError
from llmtool.export.weights import DecoderWeights, LayerWeights, release_weight, to_numpy


def optional_weight(layer: Any, name: str) -> np.ndarray | None:
    module = getattr(layer, name, None)
    return None if module is None else to_numpy(module.weight)


def optional_array(module: Any, name: str) -> np.ndarray | None:
    t = getattr(module, name, None)
    return None if t is None else to_numpy(t)


def rope_parameters(cfg: Any) -> dict[str, Any]:
    """The rope settings as transformers' modelling code reads them.

    transformers 5 keeps them (``rope_type``, ``partial_rotary_factor``, ...) in
    ``config.rope_parameters``; older configs in ``rope_scaling`` or at the top level.
    """
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    return dict(rope) if isinstance(rope, dict) else {}


def rope_type(cfg: Any) -> str:
    rope = rope_parameters(cfg)
    return str(rope.get("rope_type", rope.get("type", "default")))


def partial_rotary_factor(cfg: Any) -> float:
    """The rotated fraction of each head, from ``rope_parameters`` first (transformers 5)."""
    rope = rope_parameters(cfg)
    return float(rope.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0)))


def config_head_dim(cfg: Any) -> int:
    return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)


def layer_windows(cfg: Any, num_layers: int) -> list[int | None]:
    """Each layer's sliding window, as transformers applies it.

    With ``config.layer_types`` (Qwen2's ``max_window_layers``, Gemma 2/3's alternation) only the
    layers marked ``sliding_attention`` slide; without it (Mistral) every layer does.
    """
    window = getattr(cfg, "sliding_window", None)
    if cfg.model_type == "qwen2" and not getattr(cfg, "use_sliding_window", False):
        window = None
    if not window:
        return [None] * num_layers
    types = getattr(cfg, "layer_types", None)
    if types is None:
        return [int(window)] * num_layers
    return [int(window) if t == "sliding_attention" else None for t in types]


def check_rope_config(cfg: Any, *, fused: bool = False) -> None:
    """Refuse the rope variants (and the fused rope layouts) a static graph cannot express.

    Raises:
        UsageError: Dynamic NTK scaling; longrope whose frequencies switch inside the context;
            ``--fused`` with rotary heads whose size is not a multiple of 16.
    """
    kind = rope_type(cfg)
    if kind == "dynamic":
        raise UsageError(
            "Dynamic NTK rope scaling is not supported by export", "use a model with static rope."
        )
    if kind == "longrope":
        original = rope_parameters(cfg).get("original_max_position_embeddings")
        if original is not None and cfg.max_position_embeddings > original:
            raise UsageError(
                f"longrope switches its rotary frequencies for the whole sequence once it passes "
                f"original_max_position_embeddings ({original} < max_position_embeddings "
                f"{cfg.max_position_embeddings}), which a static graph cannot express",
                f"set max_position_embeddings to {original} in config.json to export the "
                "short-context model.",
            )
    rotary = int(config_head_dim(cfg) * partial_rotary_factor(cfg))
    if fused and rotary % 16:
        raise UsageError(
            f"--fused needs a rotary dimension divisible by 16 (GroupQueryAttention's rotary "
            f"kernel); this model rotates {rotary} of {config_head_dim(cfg)} head dims",
            "export without --fused.",
        )


def rope_tables(
    model: Any, max_positions: int, layer_type: str = "full_attention", rotary: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    """The model's own rotary tables; ``layer_type`` picks one of Gemma 3's two rope bases.

    ``rotary`` is the rotary module when it is not ``model.model.rotary_emb``.
    """
    import inspect

    import torch

    rotary = rotary if rotary is not None else model.model.rotary_emb
    positions = torch.arange(max_positions, dtype=torch.long)[None, :]
    dummy = torch.zeros(1, dtype=torch.float32)
    typed = "layer_type" in inspect.signature(rotary.forward).parameters
    with torch.no_grad():
        cos, sin = rotary(dummy, positions, layer_type) if typed else rotary(dummy, positions)
    return to_numpy(cos[0]), to_numpy(sin[0])  # [P, R] each, attention scaling included


# A family's variant check: config -> why its hand-built graph cannot express the config, or
# None. The registry routes such configs to the generic torch.onnx path before loading weights.
Variant = Callable[[Any], str | None]


def flag_variant(*flags: tuple[str, str]) -> Variant:
    """A :data:`Variant` for configs whose variants are boolean fields: ``(field, reason)``
    pairs; the reason of the first field the config sets is returned."""

    def variant(cfg: Any) -> str | None:
        return next((reason for field, reason in flags if getattr(cfg, field, False)), None)

    return variant


def refuse_variant(cfg: Any, variant: Variant) -> None:
    """The extractor's safety net for what the registry routes away from it (see
    :data:`Variant`): a config that reaches the extractor anyway is refused, not mis-built.

    Raises:
        UsageError: ``variant(cfg)`` names a reason.
    """
    reason = variant(cfg)
    if reason is not None:
        raise UsageError(
            f"{cfg.model_type} with {reason}: the hand-built graph cannot express it",
            "export it with --dtype fp32 and without --fused, through the torch.onnx path.",
        )


def check_llama_config(cfg: Any) -> None:
    """Refuse the Llama-family variants the graph does not implement."""
    check_rope_config(cfg)
    act = hidden_act(cfg)
    if act not in GLU_ACTIVATIONS:
        raise UsageError(f"Activation {act} is not supported for {cfg.model_type}")


def hidden_act(cfg: Any) -> str:
    """The MLP activation's name, as the modelling code reads it (Gemma: hidden_activation)."""
    return str(getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", "silu"))


# transformers' gated-MLP activation names -> the graph's.
GLU_ACTIVATIONS = {
    "silu": "silu_glu",
    "gelu_pytorch_tanh": "gelu_tanh_glu",
    "gelu_new": "gelu_tanh_glu",
    "gelu": "gelu_glu",
}


def concat_biases(modules: list[Any]) -> np.ndarray | None:
    """The biases of side-by-side projections as one vector (zeros for a missing one)."""
    if all(m.bias is None for m in modules):
        return None
    return np.concatenate(
        [
            to_numpy(m.bias) if m.bias is not None else np.zeros(m.out_features, np.float32)
            for m in modules
        ]
    )


def side_by_side(modules: list[Any]) -> np.ndarray:
    """nn.Linear weights [out_i, in] as one [in, sum(out_i)] MatMul weight (a copy: the
    modules' weights are freed afterwards inside ``consume_linear_weights``)."""
    stacked = np.concatenate([to_numpy(m.weight) for m in modules], 0)  # [sum(out_i), in]
    out = np.ascontiguousarray(stacked.T)
    del stacked
    for m in modules:
        release_weight(m)
    return out


GPT2_ACTIVATIONS = {
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu": "gelu",
    "relu": "relu",
}


def linear_t(module: Any) -> np.ndarray:
    """One nn.Linear's weight [out, in] as a MatMul weight [in, out]."""
    return side_by_side([module])


def layer_norm(module: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """A LayerNorm's (gain, bias); a norm without affine parameters gets unit gains."""
    weight = getattr(module, "weight", None)
    if weight is None:
        return np.ones(module.normalized_shape, np.float32), None
    return to_numpy(weight), optional_array(module, "bias")


def per_head_qkv(
    w: np.ndarray, b: np.ndarray | None, heads: int, head_dim: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """A packed projection laid out per head ([H, 3, D]: GPT-NeoX, BLOOM, Falcon, BigCode) as
    q, k, v side by side ([3, H, D]); ``w`` is [E, H*3*D] (MatMul layout), ``b`` [H*3*D]."""
    order = np.arange(heads * 3 * head_dim).reshape(heads, 3, head_dim).transpose(1, 0, 2).ravel()
    return np.ascontiguousarray(w[:, order]), None if b is None else b[order]


def tied_head(model: Any, embed: np.ndarray) -> np.ndarray | None:
    """The LM head [V, E], or None when it is tied to the embeddings."""
    head = model.get_output_embeddings().weight
    if head.data_ptr() == model.get_input_embeddings().weight.data_ptr():
        return None
    table = to_numpy(head)
    return None if np.array_equal(table, embed) else table


def mlp_layer(
    norm1: Any,
    qkv: tuple[np.ndarray, np.ndarray | None],
    o: Any,
    norm2: Any,
    up: Any,
    down: Any,
    scale: float,
    **fields: Any,
) -> LayerWeights:
    """A decoder layer from its modules: LayerNorms (or None), the packed q/k/v (w, b) in MatMul
    layout, nn.Linear output / up / down projections (``up`` may be a packed (w, b) too: gate
    and up side by side); ``fields`` set the other LayerWeights."""
    n1 = layer_norm(norm1) if norm1 is not None else (None, None)
    n2 = layer_norm(norm2) if norm2 is not None else (None, None)
    up_w, up_b = up if isinstance(up, tuple) else (linear_t(up), optional_array(up, "bias"))
    return LayerWeights(
        norm1_w=n1[0],
        norm1_b=n1[1],
        qkv_w=qkv[0],
        qkv_b=qkv[1],
        o_w=linear_t(o),
        o_b=optional_array(o, "bias"),
        norm2_w=n2[0],
        norm2_b=n2[1],
        up_w=up_w,
        up_b=up_b,
        down_w=linear_t(down),
        down_b=optional_array(down, "bias"),
        attn_scale=scale,
        **fields,
    )


def layer_norm_decoder(
    model: Any, layers: list[LayerWeights], final_norm: Any, **fields: Any
) -> DecoderWeights:
    """A LayerNorm decoder's :class:`DecoderWeights` from its layers, final norm and the model's
    embeddings / head; ``fields`` give the shape and the family's features."""
    embed = to_numpy(model.get_input_embeddings().weight)
    final_w, final_b = layer_norm(final_norm)
    head = model.get_output_embeddings()
    defaults: dict[str, Any] = {
        "arch": model.config.model_type,
        "model_type": model.config.model_type,
        "vocab_size": embed.shape[0],
        "norm": "layer",
        "embed": embed,
        "final_norm_w": final_w,
        "final_norm_b": final_b,
        "lm_head": tied_head(model, embed),
        "lm_head_b": optional_array(head, "bias"),
        "layers": layers,
    }
    return DecoderWeights(**{**defaults, **fields})
