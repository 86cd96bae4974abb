"""Extractors: read a transformers model into the neutral :class:`DecoderWeights`.

One function per family of checkpoints that share a module layout; the registry
(:mod:`llmtool.export.registry`) maps each ``config.model_type`` to one. To add a family, write
an ``extract_*`` function here (usually a few lines on top of an existing one) and add its entry
to the registry.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from llmtool.errors import UsageError
from llmtool.export.weights import DecoderWeights, LayerWeights, to_numpy


def _optional_array(module: Any, name: str) -> np.ndarray | None:
    t = getattr(module, name, None)
    return None if t is None else to_numpy(t)


def _rope_tables(model: Any, max_positions: int) -> tuple[np.ndarray, np.ndarray]:
    import torch

    rotary = model.model.rotary_emb
    positions = torch.arange(max_positions, dtype=torch.long)[None, :]
    dummy = torch.zeros(1, dtype=torch.float32)
    with torch.no_grad():
        cos, sin = rotary(dummy, positions)
    return to_numpy(cos[0]), to_numpy(sin[0])  # [P, D] each, attention scaling included


def _check_llama_config(cfg: Any) -> None:
    """Refuse the Llama-family variants the graph does not implement."""
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


def _concat_biases(modules: list[Any]) -> np.ndarray | None:
    """The biases of side-by-side projections as one vector (zeros for a missing one)."""
    if all(m.bias is None for m in modules):
        return None
    return np.concatenate(
        [
            to_numpy(m.bias) if m.bias is not None else np.zeros(m.out_features, np.float32)
            for m in modules
        ]
    )


def _side_by_side(modules: list[Any]) -> np.ndarray:
    """nn.Linear weights [out_i, in] as one [in, sum(out_i)] MatMul weight."""
    return np.ascontiguousarray(np.concatenate([to_numpy(m.weight) for m in modules], 0).T)


def llama_layer(layer: Any, head_dim: int) -> LayerWeights:
    """One Llama-style decoder layer: separate q/k/v projections, gated MLP, two RMSNorms."""
    attn, mlp = layer.self_attn, layer.mlp
    qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
    return LayerWeights(
        norm1_w=to_numpy(layer.input_layernorm.weight),
        norm1_b=None,
        qkv_w=_side_by_side(qkv),
        qkv_b=_concat_biases(qkv),
        o_w=_side_by_side([attn.o_proj]),
        o_b=_optional_array(attn.o_proj, "bias"),
        norm2_w=to_numpy(layer.post_attention_layernorm.weight),
        norm2_b=None,
        up_w=_side_by_side([mlp.gate_proj, mlp.up_proj]),  # gate then up
        up_b=_concat_biases([mlp.gate_proj, mlp.up_proj]),
        down_w=_side_by_side([mlp.down_proj]),
        down_b=_optional_array(mlp.down_proj, "bias"),
        attn_scale=float(getattr(attn, "scaling", head_dim**-0.5)),
    )


def extract_llama(model: Any) -> DecoderWeights:
    """Llama, Mistral, Qwen2 and SmolLM2: RMSNorm, rotary positions, SwiGLU MLP.

    Args:
        model: A transformers ``*ForCausalLM`` with Llama's module layout
            (``model.layers[i].self_attn.q_proj``, ``mlp.gate_proj``, ``model.rotary_emb``).
    """
    cfg = model.config
    _check_llama_config(cfg)
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    window = getattr(cfg, "sliding_window", None)
    if cfg.model_type == "qwen2" and not getattr(cfg, "use_sliding_window", False):
        window = None
    max_pos = cfg.max_position_embeddings
    cos, sin = _rope_tables(model, max_pos)
    embed = to_numpy(model.model.embed_tokens.weight)
    lm_head = to_numpy(model.lm_head.weight)
    tied = (
        model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        or np.array_equal(lm_head, embed)
    )
    return DecoderWeights(
        arch="llama",
        model_type=cfg.model_type,
        num_heads=heads,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        hidden_size=cfg.hidden_size,
        vocab_size=cfg.vocab_size,
        max_positions=max_pos,
        norm="rms",
        norm_eps=float(cfg.rms_norm_eps),
        activation="silu_glu",
        embed=embed,
        final_norm_w=to_numpy(model.model.norm.weight),
        final_norm_b=None,
        lm_head=None if tied else lm_head,
        lm_head_b=_optional_array(model.lm_head, "bias"),
        layers=[llama_layer(layer, head_dim) for layer in model.model.layers],
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
                norm1_w=to_numpy(block.ln_1.weight),
                norm1_b=to_numpy(block.ln_1.bias),
                qkv_w=to_numpy(block.attn.c_attn.weight),
                qkv_b=to_numpy(block.attn.c_attn.bias),
                o_w=to_numpy(block.attn.c_proj.weight),
                o_b=to_numpy(block.attn.c_proj.bias),
                norm2_w=to_numpy(block.ln_2.weight),
                norm2_b=to_numpy(block.ln_2.bias),
                up_w=to_numpy(block.mlp.c_fc.weight),
                up_b=to_numpy(block.mlp.c_fc.bias),
                down_w=to_numpy(block.mlp.c_proj.weight),
                down_b=to_numpy(block.mlp.c_proj.bias),
                attn_scale=scale,
            )
        )
    embed = to_numpy(model.transformer.wte.weight)
    lm_head = to_numpy(model.lm_head.weight)
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
        final_norm_w=to_numpy(model.transformer.ln_f.weight),
        final_norm_b=to_numpy(model.transformer.ln_f.bias),
        lm_head=None if np.array_equal(lm_head, embed) else lm_head,
        layers=layers,
        positions=to_numpy(model.transformer.wpe.weight),
    )
