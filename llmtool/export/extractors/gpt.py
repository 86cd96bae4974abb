"""GPT-style families: fused projections, learned absolute positions, biases (GPT-2)."""

from __future__ import annotations

from typing import Any

import numpy as np

from llmtool.errors import UsageError
from llmtool.export.extractors.common import (
    GPT2_ACTIVATIONS,
    concat_biases,
    flag_variant,
    layer_norm_decoder,
    linear_t,
    mlp_layer,
    optional_array,
    per_head_qkv,
    refuse_variant,
    side_by_side,
)
from llmtool.export.weights import DecoderWeights, LayerWeights, to_numpy

gpt2_variant = flag_variant(
    ("reorder_and_upcast_attn", "upcast, reordered attention (reorder_and_upcast_attn=True)")
)
bloom_variant = flag_variant(
    (
        "apply_residual_connection_post_layernorm",
        "a post-LayerNorm residual (apply_residual_connection_post_layernorm=True)",
    )
)


def opt_variant(cfg: Any) -> str | None:
    """What of an OPT config the hand-built graph cannot express (None: nothing)."""
    if not cfg.do_layer_norm_before:
        return "post-LayerNorm (do_layer_norm_before=False)"
    if cfg.word_embed_proj_dim != cfg.hidden_size:  # OPT-350m: project_in / project_out
        return (
            f"projected embeddings (word_embed_proj_dim {cfg.word_embed_proj_dim} != "
            f"hidden_size {cfg.hidden_size})"
        )
    if getattr(cfg, "_remove_final_layer_norm", False):
        return "no final LayerNorm (_remove_final_layer_norm=True)"
    return None


def extract_gpt2(model: Any) -> DecoderWeights:
    """GPT-2: LayerNorm, learned positions, GELU MLP, biases everywhere."""
    cfg = model.config
    refuse_variant(cfg, gpt2_variant)
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


def extract_gpt_bigcode(model: Any) -> DecoderWeights:
    """GPT-BigCode (SantaCoder, StarCoder 1): GPT-2 with one shared key/value head (multi-query)."""
    cfg = model.config
    act = GPT2_ACTIVATIONS.get(cfg.activation_function)
    if act is None:
        raise UsageError(f"GPT-BigCode activation {cfg.activation_function} is not supported")
    heads, d = cfg.n_head, cfg.n_embd // cfg.n_head
    scale = d**-0.5 if cfg.scale_attn_weights else 1.0
    layers = []
    for block in model.transformer.h:
        qkv = linear_t(block.attn.c_attn), optional_array(block.attn.c_attn, "bias")
        if not cfg.multi_query:  # [H, 3, D] per head
            qkv = per_head_qkv(*qkv, heads, d)
        mlp = block.mlp
        layers.append(
            mlp_layer(block.ln_1, qkv, block.attn.c_proj, block.ln_2, mlp.c_fc, mlp.c_proj, scale)
        )
    return layer_norm_decoder(
        model,
        layers,
        model.transformer.ln_f,
        num_heads=heads,
        num_kv_heads=1 if cfg.multi_query else heads,
        head_dim=d,
        hidden_size=cfg.n_embd,
        max_positions=cfg.n_positions,
        norm_eps=float(cfg.layer_norm_epsilon),
        activation=act,
        positions=to_numpy(model.transformer.wpe.weight),
    )


def extract_opt(model: Any) -> DecoderWeights:
    """OPT: learned positions stored with an offset of 2, pre-LayerNorm, ReLU MLP.

    The position table is read from row 2 on, so position p is row p as for GPT-2.
    """
    cfg = model.config
    dec = model.model.decoder
    refuse_variant(cfg, opt_variant)
    act = GPT2_ACTIVATIONS.get(cfg.activation_function)
    if act is None:
        raise UsageError(f"OPT activation {cfg.activation_function} is not supported by export")
    heads = cfg.num_attention_heads
    d = cfg.hidden_size // heads
    layers = []
    for layer in dec.layers:
        attn = layer.self_attn
        qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
        layers.append(
            mlp_layer(
                layer.self_attn_layer_norm,
                (side_by_side(qkv), concat_biases(qkv)),
                attn.out_proj,
                layer.final_layer_norm,
                layer.fc1,
                layer.fc2,
                float(attn.scaling),
            )
        )
    offset = int(getattr(dec.embed_positions, "offset", 2))
    return layer_norm_decoder(
        model,
        layers,
        dec.final_layer_norm,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=d,
        hidden_size=cfg.hidden_size,
        max_positions=cfg.max_position_embeddings,
        norm_eps=1e-5,  # nn.LayerNorm's default, which OPT uses
        activation=act,
        positions=to_numpy(dec.embed_positions.weight)[offset:],
    )


def extract_bloom(model: Any) -> DecoderWeights:
    """BLOOM: ALiBi instead of positions, a LayerNorm after the embeddings, per-head packed qkv."""
    import torch
    from transformers.models.bloom import modeling_bloom

    cfg = model.config
    refuse_variant(cfg, bloom_variant)
    heads, d = cfg.n_head, cfg.hidden_size // cfg.n_head
    layers = []
    for block in model.transformer.h:
        attn, mlp = block.self_attention, block.mlp
        qkv = per_head_qkv(
            linear_t(attn.query_key_value), optional_array(attn.query_key_value, "bias"), heads, d
        )
        layers.append(
            mlp_layer(
                block.input_layernorm,
                qkv,
                attn.dense,
                block.post_attention_layernorm,
                mlp.dense_h_to_4h,
                mlp.dense_4h_to_h,
                float(attn.inv_norm_factor),
            )
        )
    # [H], built as BLOOM builds them
    slopes = to_numpy(modeling_bloom._get_alibi_slopes(heads, torch.device("cpu")))
    embed_norm = model.transformer.word_embeddings_layernorm
    return layer_norm_decoder(
        model,
        layers,
        model.transformer.ln_f,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=d,
        hidden_size=cfg.hidden_size,
        # ALiBi has no position table; the context is what the config declares (or BLOOM's 2048).
        max_positions=int(getattr(cfg, "seq_length", None) or 2048),
        norm_eps=float(cfg.layer_norm_epsilon),
        activation="gelu_tanh",  # BLOOM's own tanh-approximated GELU
        alibi_slopes=slopes,
        embed_norm_w=to_numpy(embed_norm.weight),
        embed_norm_b=to_numpy(embed_norm.bias),
    )
