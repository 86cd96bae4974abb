"""Architecture adapters: read a transformers model into one neutral decoder description.

Every supported architecture is a pre-norm decoder; the differences (norm kind, positions,
MLP activation, biases) are fields of :class:`DecoderWeights`, so one graph builder
(:mod:`llmtool.export.transformer`) serves them all. To add an architecture, write an ``extract_*``
function and register it in :data:`EXTRACTORS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llmtool.errors import UsageError


@dataclass
class LayerWeights:
    """One decoder layer; matrices are [in_features, out_features] (ONNX MatMul layout)."""

    norm1_w: np.ndarray  # [E]
    norm1_b: np.ndarray | None  # [E] (LayerNorm only)
    qkv_w: np.ndarray  # [E, (H + 2*KVH) * D]: q, k, v side by side
    qkv_b: np.ndarray | None  # [(H + 2*KVH) * D]
    o_w: np.ndarray  # [H*D, E]
    o_b: np.ndarray | None
    norm2_w: np.ndarray
    norm2_b: np.ndarray | None
    up_w: np.ndarray  # [E, I] or, for gated MLPs, [E, 2*I]: gate then up
    up_b: np.ndarray | None
    down_w: np.ndarray  # [I, E]
    down_b: np.ndarray | None
    attn_scale: float  # multiplies q·k


@dataclass
class DecoderWeights:
    """A decoder-only LM in architecture-neutral form (float32 numpy arrays)."""

    arch: str  # the export family: "llama" (RMSNorm, rotary, SwiGLU) or "gpt2"
    model_type: str  # config.model_type as transformers names it
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_positions: int
    norm: str  # "rms" or "layer"
    norm_eps: float
    activation: str  # "silu_glu", "gelu_tanh", "gelu", "relu"
    embed: np.ndarray  # [V, E]
    final_norm_w: np.ndarray
    final_norm_b: np.ndarray | None
    lm_head: np.ndarray | None  # [V, E]; None when tied to ``embed``
    lm_head_b: np.ndarray | None = None
    layers: list[LayerWeights] = field(default_factory=list)
    positions: np.ndarray | None = None  # [P, E] learned absolute positions (GPT-2)
    rope_cos: np.ndarray | None = None  # [P, D] (scaling folded in)
    rope_sin: np.ndarray | None = None  # [P, D]
    sliding_window: int | None = None

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def _np(t: Any) -> np.ndarray:
    return t.detach().to("cpu").float().numpy()


def _np_opt(module: Any, name: str) -> np.ndarray | None:
    t = getattr(module, name, None)
    return None if t is None else _np(t)


def _rope_tables(model: Any, max_positions: int) -> tuple[np.ndarray, np.ndarray]:
    import torch

    rotary = model.model.rotary_emb
    positions = torch.arange(max_positions, dtype=torch.long)[None, :]
    dummy = torch.zeros(1, dtype=torch.float32)
    with torch.no_grad():
        cos, sin = rotary(dummy, positions)
    return _np(cos[0]), _np(sin[0])  # [P, D] each, attention scaling included


def extract_llama(model: Any) -> DecoderWeights:
    """Llama, Mistral, Qwen2 and SmolLM2: RMSNorm, rotary positions, SwiGLU MLP."""
    cfg = model.config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    rope_type = (
        rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    )
    if rope_type == "dynamic":
        raise UsageError(
            "Dynamic NTK rope scaling is not supported by export", "use a model with static rope."
        )
    if getattr(cfg, "partial_rotary_factor", 1.0) != 1.0:
        raise UsageError("Partial rotary embeddings are not supported by export")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise UsageError(f"Activation {cfg.hidden_act} is not supported for {cfg.model_type}")
    window = getattr(cfg, "sliding_window", None)
    if cfg.model_type == "qwen2" and not getattr(cfg, "use_sliding_window", False):
        window = None
    max_pos = cfg.max_position_embeddings
    cos, sin = _rope_tables(model, max_pos)
    layers = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        qkv_w = np.concatenate(
            [_np(attn.q_proj.weight), _np(attn.k_proj.weight), _np(attn.v_proj.weight)], 0
        ).T
        biases = [getattr(attn, n).bias for n in ("q_proj", "k_proj", "v_proj")]
        qkv_b = (
            None
            if all(b is None for b in biases)
            else np.concatenate(
                [
                    _np(b) if b is not None else np.zeros(getattr(attn, n).out_features, np.float32)
                    for b, n in zip(biases, ("q_proj", "k_proj", "v_proj"), strict=True)
                ]
            )
        )
        gate_b, up_b = mlp.gate_proj.bias, mlp.up_proj.bias
        layers.append(
            LayerWeights(
                norm1_w=_np(layer.input_layernorm.weight),
                norm1_b=None,
                qkv_w=np.ascontiguousarray(qkv_w),
                qkv_b=qkv_b,
                o_w=np.ascontiguousarray(_np(attn.o_proj.weight).T),
                o_b=_np_opt(attn.o_proj, "bias"),
                norm2_w=_np(layer.post_attention_layernorm.weight),
                norm2_b=None,
                up_w=np.ascontiguousarray(
                    np.concatenate([_np(mlp.gate_proj.weight), _np(mlp.up_proj.weight)], 0).T
                ),
                up_b=None if gate_b is None else np.concatenate([_np(gate_b), _np(up_b)]),
                down_w=np.ascontiguousarray(_np(mlp.down_proj.weight).T),
                down_b=_np_opt(mlp.down_proj, "bias"),
                attn_scale=float(getattr(attn, "scaling", head_dim**-0.5)),
            )
        )
    embed = _np(model.model.embed_tokens.weight)
    lm_head = _np(model.lm_head.weight)
    tied = (
        model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        or np.array_equal(lm_head, embed)
    )
    return DecoderWeights(
        arch="llama",
        model_type=cfg.model_type,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        hidden_size=cfg.hidden_size,
        vocab_size=cfg.vocab_size,
        max_positions=max_pos,
        norm="rms",
        norm_eps=float(cfg.rms_norm_eps),
        activation="silu_glu",
        embed=embed,
        final_norm_w=_np(model.model.norm.weight),
        final_norm_b=None,
        lm_head=None if tied else lm_head,
        lm_head_b=_np_opt(model.lm_head, "bias"),
        layers=layers,
        rope_cos=cos,
        rope_sin=sin,
        sliding_window=window,
    )


GPT2_ACTIVATIONS = {
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu": "gelu",
    "relu": "relu",
}


def extract_gpt2(model: Any) -> DecoderWeights:
    """GPT-2: LayerNorm, learned positions, GELU MLP, biases everywhere."""
    cfg = model.config
    if getattr(cfg, "reorder_and_upcast_attn", False):
        raise UsageError("GPT-2 with reorder_and_upcast_attn is not supported by export")
    act = GPT2_ACTIVATIONS.get(cfg.activation_function)
    if act is None:
        raise UsageError(f"GPT-2 activation {cfg.activation_function} is not supported by export")
    heads = cfg.n_head
    head_dim = cfg.n_embd // heads
    layers = []
    for i, block in enumerate(model.transformer.h):
        scale = head_dim**-0.5 if cfg.scale_attn_weights else 1.0
        if getattr(cfg, "scale_attn_by_inverse_layer_idx", False):
            scale /= float(i + 1)
        # GPT-2's Conv1D stores weights as [in, out] already.
        layers.append(
            LayerWeights(
                norm1_w=_np(block.ln_1.weight),
                norm1_b=_np(block.ln_1.bias),
                qkv_w=_np(block.attn.c_attn.weight),
                qkv_b=_np(block.attn.c_attn.bias),
                o_w=_np(block.attn.c_proj.weight),
                o_b=_np(block.attn.c_proj.bias),
                norm2_w=_np(block.ln_2.weight),
                norm2_b=_np(block.ln_2.bias),
                up_w=_np(block.mlp.c_fc.weight),
                up_b=_np(block.mlp.c_fc.bias),
                down_w=_np(block.mlp.c_proj.weight),
                down_b=_np(block.mlp.c_proj.bias),
                attn_scale=scale,
            )
        )
    embed = _np(model.transformer.wte.weight)
    lm_head = _np(model.lm_head.weight)
    return DecoderWeights(
        arch="gpt2",
        model_type=cfg.model_type,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=head_dim,
        hidden_size=cfg.n_embd,
        vocab_size=cfg.vocab_size,
        max_positions=cfg.n_positions,
        norm="layer",
        norm_eps=float(cfg.layer_norm_epsilon),
        activation=act,
        embed=embed,
        final_norm_w=_np(model.transformer.ln_f.weight),
        final_norm_b=_np(model.transformer.ln_f.bias),
        lm_head=None if np.array_equal(lm_head, embed) else lm_head,
        layers=layers,
        positions=_np(model.transformer.wpe.weight),
    )


EXTRACTORS: dict[str, Callable[[Any], DecoderWeights]] = {
    "llama": extract_llama,
    "mistral": extract_llama,
    "qwen2": extract_llama,
    "gpt2": extract_gpt2,
}


def extract(model: Any) -> DecoderWeights:
    """Read a supported transformers model into a :class:`DecoderWeights`."""
    extractor = EXTRACTORS.get(model.config.model_type)
    if extractor is None:
        raise UsageError(f"No decoder extractor for '{model.config.model_type}'")
    return extractor(model)
