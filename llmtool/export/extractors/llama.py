"""Llama-layout families: ``model.layers[i].self_attn.q_proj``, ``mlp.gate_proj``, ``model.rotary_emb``.

Llama, Mistral, Qwen2/3, Phi-3, Granite, Gemma 1/2/3, OLMo 2, SmolLM3, StableLM, StarCoder2: each
a few lines over :func:`extract_llama`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from llmtool.export.extractors.common import (
    GLU_ACTIVATIONS,
    GPT2_ACTIVATIONS,
    check_llama_config,
    concat_biases,
    config_head_dim,
    flag_variant,
    hidden_act,
    layer_windows,
    optional_array,
    optional_weight,
    refuse_variant,
    rope_tables,
    side_by_side,
)
from llmtool.export.weights import DecoderWeights, LayerWeights, to_numpy


def llama_layer(layer: Any, head_dim: int) -> LayerWeights:
    """One Llama-style decoder layer: q/k/v projections, gated MLP, two RMSNorms.

    Phi-3's packed ``qkv_proj`` and ``gate_up_proj`` already hold q, k, v and gate, up side by
    side, in the order the graph reads them.
    """
    attn, mlp = layer.self_attn, layer.mlp
    packed_qkv = getattr(attn, "qkv_proj", None)
    qkv = [packed_qkv] if packed_qkv is not None else [attn.q_proj, attn.k_proj, attn.v_proj]
    if hasattr(mlp, "experts"):  # routed experts (MoE): read by extractors.moe
        empty = np.zeros((0, 0), np.float32)
        mlp_fields: dict[str, Any] = {"up_w": empty, "up_b": None, "down_w": empty, "down_b": None}
    else:
        packed_up = getattr(mlp, "gate_up_proj", None) or getattr(mlp, "c_fc", None)  # no gate
        up = [packed_up] if packed_up is not None else [mlp.gate_proj, mlp.up_proj]
        down = getattr(mlp, "down_proj", None) or mlp.c_proj
        mlp_fields = {
            "up_w": side_by_side(up),  # gate then up
            "up_b": concat_biases(up),
            "down_w": side_by_side([down]),
            "down_b": optional_array(down, "bias"),
        }
    return LayerWeights(
        norm1_w=optional_weight(layer, "input_layernorm"),
        norm1_b=None,
        qkv_w=side_by_side(qkv),
        qkv_b=concat_biases(qkv),
        o_w=side_by_side([attn.o_proj]),
        o_b=optional_array(attn.o_proj, "bias"),
        norm2_w=optional_weight(layer, "post_attention_layernorm"),
        norm2_b=None,
        attn_scale=float(getattr(attn, "scaling", head_dim**-0.5)),
        **mlp_fields,
    )


def extract_qwen3(model: Any) -> DecoderWeights:
    """Qwen3: Llama with RMSNorm over each head of q and k (qk-norm) and no q/k/v biases."""
    w = extract_llama(model)
    for lw, layer in zip(w.layers, model.model.layers, strict=True):
        lw.q_norm_w = to_numpy(layer.self_attn.q_norm.weight)
        lw.k_norm_w = to_numpy(layer.self_attn.k_norm.weight)
    return w


def extract_granite(model: Any) -> DecoderWeights:
    """Granite: Llama with embedding, residual, attention and logits multipliers."""
    cfg = model.config
    w = extract_llama(model)  # attention_multiplier is the attention's own ``scaling``
    w.embed_scale = float(cfg.embedding_multiplier)
    w.residual_scale = float(cfg.residual_multiplier)
    w.logits_scale = 1.0 / float(cfg.logits_scaling)
    return w


def extract_gemma(model: Any) -> DecoderWeights:
    """Gemma: Llama with (1 + w) RMSNorm gains, embeddings scaled by sqrt(hidden), GeGLU."""
    w = extract_llama(model)
    w.norm_weight_offset = 1.0
    w.embed_scale = float(np.float32(model.config.hidden_size**0.5))
    return w


def extract_gemma2(model: Any) -> DecoderWeights:
    """Gemma 2: Gemma with post-norms on both branches, soft-capping, alternating windows."""
    cfg = model.config
    w = extract_gemma(model)
    for lw, layer in zip(w.layers, model.model.layers, strict=True):
        lw.post_attn_norm_w = to_numpy(layer.post_attention_layernorm.weight)
        lw.norm2_w = to_numpy(layer.pre_feedforward_layernorm.weight)
        lw.post_mlp_norm_w = to_numpy(layer.post_feedforward_layernorm.weight)
    w.attn_softcap = getattr(cfg, "attn_logit_softcapping", None)
    w.logits_softcap = getattr(cfg, "final_logit_softcapping", None)
    return w


def extract_gemma3_text(model: Any) -> DecoderWeights:
    """Gemma 3 (text): Gemma 2's layout plus per-head qk-norm and a local rope base for the
    sliding layers."""
    w = extract_gemma2(model)
    w.rope_local_cos, w.rope_local_sin = rope_tables(model, w.max_positions, "sliding_attention")
    for lw, layer, kind in zip(w.layers, model.model.layers, model.config.layer_types, strict=True):
        lw.q_norm_w = to_numpy(layer.self_attn.q_norm.weight)
        lw.k_norm_w = to_numpy(layer.self_attn.k_norm.weight)
        lw.rope_local = kind == "sliding_attention"
    return w


def extract_olmo2(model: Any) -> DecoderWeights:
    """OLMo 2: post-norms only (no pre-norms), RMSNorm over the whole q and k projections."""
    w = extract_llama(model)
    for lw, layer in zip(w.layers, model.model.layers, strict=True):
        lw.norm1_w = lw.norm2_w = None
        lw.post_attn_norm_w = to_numpy(layer.post_attention_layernorm.weight)
        lw.post_mlp_norm_w = to_numpy(layer.post_feedforward_layernorm.weight)
        lw.q_norm_w = to_numpy(layer.self_attn.q_norm.weight)
        lw.k_norm_w = to_numpy(layer.self_attn.k_norm.weight)
        lw.qk_norm_per_head = False
    return w


def extract_smollm3(model: Any) -> DecoderWeights:
    """SmolLM3: Llama whose ``no_rope_layers`` (0 = NoPE) take no rotary positions."""
    w = extract_llama(model)
    for lw, use_rope in zip(w.layers, model.config.no_rope_layers, strict=True):
        lw.use_rope = bool(use_rope)
    return w


stablelm_variant = flag_variant(
    ("qk_layernorm", "per-head LayerNorm on q and k (qk_layernorm=True)"),
    ("use_parallel_residual", "a parallel residual (use_parallel_residual=True)"),
)


def extract_stablelm(model: Any) -> DecoderWeights:
    """StableLM: Llama with LayerNorm (biases), partial rotary and optional q/k/v biases."""
    refuse_variant(model.config, stablelm_variant)
    w = extract_llama(model)
    w.norm = "layer"
    w.final_norm_b = optional_array(model.model.norm, "bias")
    for lw, layer in zip(w.layers, model.model.layers, strict=True):
        lw.norm1_b = optional_array(layer.input_layernorm, "bias")
        lw.norm2_b = optional_array(layer.post_attention_layernorm, "bias")
    return w


def extract_starcoder2(model: Any) -> DecoderWeights:
    """StarCoder2: StableLM-like LayerNorm decoder with biases and an ungated GELU MLP."""
    cfg = model.config
    w = extract_stablelm(model)
    w.activation = GPT2_ACTIVATIONS[hidden_act(cfg)]  # c_fc -> act -> c_proj, no gate
    w.norm_eps = float(cfg.norm_epsilon)
    return w


def extract_llama(model: Any) -> DecoderWeights:
    """Llama, Mistral, Qwen2 and SmolLM2: RMSNorm, rotary positions, SwiGLU MLP.

    Args:
        model: A transformers ``*ForCausalLM`` with Llama's module layout
            (``model.layers[i].self_attn.q_proj``, ``mlp.gate_proj``, ``model.rotary_emb``).
    """
    cfg = model.config
    check_llama_config(cfg)
    heads = cfg.num_attention_heads
    head_dim = config_head_dim(cfg)
    layers = [llama_layer(layer, head_dim) for layer in model.model.layers]
    for lw, window in zip(layers, layer_windows(cfg, len(layers)), strict=True):
        lw.sliding_window = window
    max_pos = cfg.max_position_embeddings
    cos, sin = rope_tables(model, max_pos)
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
        norm_eps=float(
            getattr(cfg, "rms_norm_eps", None)
            or getattr(cfg, "layer_norm_eps", None)
            or cfg.norm_epsilon
        ),
        activation=GLU_ACTIVATIONS[hidden_act(cfg)],
        embed=embed,
        final_norm_w=to_numpy(model.model.norm.weight),
        final_norm_b=None,
        lm_head=None if tied else lm_head,
        lm_head_b=optional_array(model.lm_head, "bias"),
        layers=layers,
        rope_cos=cos,
        rope_sin=sin,
        rotary_dim=cos.shape[1],
    )
