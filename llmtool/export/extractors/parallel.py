"""Parallel-residual families: attention and MLP both read the layer's input.

GPT-NeoX (Pythia), GPT-J, Phi-1/2, Falcon and Cohere (Command R): ``h + attn(norm(h)) +
mlp(norm'(h))``, with one shared norm or two, rotary positions on part of each head, halves or
interleaved pairs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from llmtool.errors import UsageError
from llmtool.export.extractors.common import (
    GLU_ACTIVATIONS,
    GPT2_ACTIVATIONS,
    concat_biases,
    config_head_dim,
    flag_variant,
    hidden_act,
    layer_norm_decoder,
    linear_t,
    mlp_layer,
    optional_array,
    per_head_qkv,
    refuse_variant,
    rope_tables,
    side_by_side,
)
from llmtool.export.weights import DecoderWeights, to_numpy


def _activation(cfg: Any, name: str) -> str:
    act = GPT2_ACTIVATIONS.get(name)
    if act is None:
        raise UsageError(f"Activation {name} is not supported for {cfg.model_type}")
    return act


def _rope(model: Any, rotary: Any, max_positions: int) -> dict[str, Any]:
    cos, sin = rope_tables(model, max_positions, rotary=rotary)
    return {"rope_cos": cos, "rope_sin": sin, "rotary_dim": cos.shape[1]}


# What of each family's config the hand-built graph cannot express (see common.Variant).
phi_variant = flag_variant(("qk_layernorm", "LayerNorm on q and k (qk_layernorm=True)"))
falcon_variant = flag_variant(("alibi", "ALiBi (alibi=True)"))
cohere_variant = flag_variant(("use_qk_norm", "LayerNorm on q and k (use_qk_norm=True)"))


def extract_gpt_neox(model: Any) -> DecoderWeights:
    """GPT-NeoX / Pythia: per-head packed qkv, partial rotary, parallel residual (optional)."""
    cfg = model.config
    heads, d = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    layers = []
    for layer in model.gpt_neox.layers:
        attn, mlp = layer.attention, layer.mlp
        qkv = per_head_qkv(
            linear_t(attn.query_key_value), optional_array(attn.query_key_value, "bias"), heads, d
        )
        layers.append(
            mlp_layer(
                layer.input_layernorm,
                qkv,
                attn.dense,
                layer.post_attention_layernorm,
                mlp.dense_h_to_4h,
                mlp.dense_4h_to_h,
                float(attn.scaling),
                parallel=bool(cfg.use_parallel_residual),
            )
        )
    return layer_norm_decoder(
        model,
        layers,
        model.gpt_neox.final_layer_norm,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=d,
        hidden_size=cfg.hidden_size,
        max_positions=cfg.max_position_embeddings,
        norm_eps=float(cfg.layer_norm_eps),
        activation=_activation(cfg, cfg.hidden_act),
        **_rope(model, model.gpt_neox.rotary_emb, cfg.max_position_embeddings),
    )


def extract_gptj(model: Any) -> DecoderWeights:
    """GPT-J: one shared LayerNorm, parallel residual, rotary on interleaved pairs of the first
    ``rotary_dim`` dims of each head."""
    cfg = model.config
    heads, d = cfg.n_head, cfg.n_embd // cfg.n_head
    layers = []
    for block in model.transformer.h:
        attn, mlp = block.attn, block.mlp
        qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
        layers.append(
            mlp_layer(
                block.ln_1,
                (side_by_side(qkv), concat_biases(qkv)),
                attn.out_proj,
                None,  # the MLP reads ln_1's output too
                mlp.fc_in,
                mlp.fc_out,
                float(attn.scaling),
                parallel=True,
            )
        )
    # GPT-J's own table: [P, R] = sin | cos of each frequency, repeated pairwise when applied.
    sincos = to_numpy(model.transformer.rotary_emb.embed_positions)
    sin, cos = np.split(sincos, 2, axis=1)
    return layer_norm_decoder(
        model,
        layers,
        model.transformer.ln_f,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=d,
        hidden_size=cfg.n_embd,
        max_positions=cfg.n_positions,
        norm_eps=float(cfg.layer_norm_epsilon),
        activation=_activation(cfg, cfg.activation_function),
        rope_cos=np.repeat(cos, 2, axis=1),
        rope_sin=np.repeat(sin, 2, axis=1),
        rotary_dim=sincos.shape[1],
        rotary_interleaved=True,
    )


def extract_phi(model: Any) -> DecoderWeights:
    """Phi-1 / Phi-1.5 / Phi-2: one shared LayerNorm, parallel attention and MLP, partial rotary,
    biases everywhere (the LM head too)."""
    cfg = model.config
    refuse_variant(cfg, phi_variant)
    heads, d = cfg.num_attention_heads, config_head_dim(cfg)
    layers = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
        layers.append(
            mlp_layer(
                layer.input_layernorm,
                (side_by_side(qkv), concat_biases(qkv)),
                attn.dense,
                None,
                mlp.fc1,
                mlp.fc2,
                float(attn.scaling),
                parallel=True,
            )
        )
    return layer_norm_decoder(
        model,
        layers,
        model.model.final_layernorm,
        num_heads=heads,
        num_kv_heads=cfg.num_key_value_heads or heads,
        head_dim=d,
        hidden_size=cfg.hidden_size,
        max_positions=cfg.max_position_embeddings,
        norm_eps=float(cfg.layer_norm_eps),
        activation=_activation(cfg, cfg.hidden_act),
        **_rope(model, model.model.rotary_emb, cfg.max_position_embeddings),
    )


def _falcon_qkv(cfg: Any, attn: Any, heads: int, kv_heads: int, d: int) -> Any:
    """Falcon's packed qkv as q, k, v side by side, from each of its three layouts."""
    w, b = linear_t(attn.query_key_value), optional_array(attn.query_key_value, "bias")
    if cfg.new_decoder_architecture:  # per KV group: its rep query heads, then k, then v
        rep = heads // kv_heads
        idx = np.arange(w.shape[1]).reshape(kv_heads, rep + 2, d)
        order = np.concatenate([idx[:, :rep].ravel(), idx[:, rep].ravel(), idx[:, rep + 1].ravel()])
        return np.ascontiguousarray(w[:, order]), None if b is None else b[order]
    if not cfg.multi_query:
        return per_head_qkv(w, b, heads, d)
    return w, b  # multi-query: q heads, then the one k and v head


def extract_falcon(model: Any) -> DecoderWeights:
    """Falcon: parallel attention (one or two LayerNorms) or sequential, multi-query or grouped
    KV heads (``new_decoder_architecture``), rotary positions."""
    cfg = model.config
    refuse_variant(cfg, falcon_variant)
    heads, d = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    kv_heads = cfg.num_kv_heads if cfg.new_decoder_architecture or not cfg.multi_query else 1
    two_norms = cfg.new_decoder_architecture and cfg.num_ln_in_parallel_attn == 2
    parallel = bool(cfg.new_decoder_architecture or cfg.parallel_attn)
    layers = []
    for layer in model.transformer.h:
        attn = layer.self_attention
        norm1 = layer.ln_attn if two_norms else layer.input_layernorm
        norm2 = (
            layer.ln_mlp if two_norms else (None if parallel else layer.post_attention_layernorm)
        )
        layers.append(
            mlp_layer(
                norm1,
                _falcon_qkv(cfg, attn, heads, kv_heads, d),
                attn.dense,
                norm2,
                layer.mlp.dense_h_to_4h,
                layer.mlp.dense_4h_to_h,
                float(attn.inv_norm_factor),
                parallel=parallel,
            )
        )
    return layer_norm_decoder(
        model,
        layers,
        model.transformer.ln_f,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=d,
        hidden_size=cfg.hidden_size,
        max_positions=cfg.max_position_embeddings,
        norm_eps=float(cfg.layer_norm_epsilon),
        activation=_activation(cfg, cfg.activation),
        **_rope(model, model.transformer.rotary_emb, cfg.max_position_embeddings),
    )


def extract_cohere(model: Any) -> DecoderWeights:
    """Cohere (Command R): one shared bias-free LayerNorm, parallel attention and SwiGLU MLP,
    rotary on interleaved pairs, logits times ``logit_scale``."""
    cfg = model.config
    refuse_variant(cfg, cohere_variant)
    heads, d = cfg.num_attention_heads, config_head_dim(cfg)
    layers = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        qkv, up = [attn.q_proj, attn.k_proj, attn.v_proj], [mlp.gate_proj, mlp.up_proj]
        layers.append(
            mlp_layer(
                layer.input_layernorm,  # CohereLayerNorm: mean-centred, no bias
                (side_by_side(qkv), concat_biases(qkv)),
                attn.o_proj,
                None,
                (side_by_side(up), concat_biases(up)),  # gate then up, each read once
                mlp.down_proj,
                float(attn.scaling),
                parallel=True,
            )
        )
    return layer_norm_decoder(
        model,
        layers,
        model.model.norm,
        num_heads=heads,
        num_kv_heads=cfg.num_key_value_heads or heads,
        head_dim=d,
        hidden_size=cfg.hidden_size,
        max_positions=cfg.max_position_embeddings,
        norm_eps=float(cfg.layer_norm_eps),
        activation=GLU_ACTIVATIONS[hidden_act(cfg)],
        logits_scale=float(cfg.logit_scale),
        rotary_interleaved=True,
        **_rope(model, model.model.rotary_emb, cfg.max_position_embeddings),
    )
