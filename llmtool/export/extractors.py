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


def _optional_weight(layer: Any, name: str) -> np.ndarray | None:
    module = getattr(layer, name, None)
    return None if module is None else to_numpy(module.weight)


def _optional_array(module: Any, name: str) -> np.ndarray | None:
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


def _rope_tables(
    model: Any, max_positions: int, layer_type: str = "full_attention"
) -> tuple[np.ndarray, np.ndarray]:
    """The model's own rotary tables; ``layer_type`` picks one of Gemma 3's two rope bases."""
    import inspect

    import torch

    rotary = model.model.rotary_emb
    positions = torch.arange(max_positions, dtype=torch.long)[None, :]
    dummy = torch.zeros(1, dtype=torch.float32)
    typed = "layer_type" in inspect.signature(rotary.forward).parameters
    with torch.no_grad():
        cos, sin = rotary(dummy, positions, layer_type) if typed else rotary(dummy, positions)
    return to_numpy(cos[0]), to_numpy(sin[0])  # [P, R] each, attention scaling included


def _check_llama_config(cfg: Any) -> None:
    """Refuse the Llama-family variants the graph does not implement."""
    check_rope_config(cfg)
    act = _hidden_act(cfg)
    if act not in GLU_ACTIVATIONS:
        raise UsageError(f"Activation {act} is not supported for {cfg.model_type}")


def _hidden_act(cfg: Any) -> str:
    """The MLP activation's name, as the modelling code reads it (Gemma: hidden_activation)."""
    return str(getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", "silu"))


# transformers' gated-MLP activation names -> the graph's.
GLU_ACTIVATIONS = {
    "silu": "silu_glu",
    "gelu_pytorch_tanh": "gelu_tanh_glu",
    "gelu_new": "gelu_tanh_glu",
    "gelu": "gelu_glu",
}


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
    """One Llama-style decoder layer: q/k/v projections, gated MLP, two RMSNorms.

    Phi-3's packed ``qkv_proj`` and ``gate_up_proj`` already hold q, k, v and gate, up side by
    side, in the order the graph reads them.
    """
    attn, mlp = layer.self_attn, layer.mlp
    packed_qkv = getattr(attn, "qkv_proj", None)
    qkv = [packed_qkv] if packed_qkv is not None else [attn.q_proj, attn.k_proj, attn.v_proj]
    packed_up = getattr(mlp, "gate_up_proj", None) or getattr(mlp, "c_fc", None)  # c_fc: no gate
    up = [packed_up] if packed_up is not None else [mlp.gate_proj, mlp.up_proj]
    down = getattr(mlp, "down_proj", None) or mlp.c_proj
    return LayerWeights(
        norm1_w=_optional_weight(layer, "input_layernorm"),
        norm1_b=None,
        qkv_w=_side_by_side(qkv),
        qkv_b=_concat_biases(qkv),
        o_w=_side_by_side([attn.o_proj]),
        o_b=_optional_array(attn.o_proj, "bias"),
        norm2_w=_optional_weight(layer, "post_attention_layernorm"),
        norm2_b=None,
        up_w=_side_by_side(up),  # gate then up
        up_b=_concat_biases(up),
        down_w=_side_by_side([down]),
        down_b=_optional_array(down, "bias"),
        attn_scale=float(getattr(attn, "scaling", head_dim**-0.5)),
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
    w.rope_local_cos, w.rope_local_sin = _rope_tables(model, w.max_positions, "sliding_attention")
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


def extract_stablelm(model: Any) -> DecoderWeights:
    """StableLM: Llama with LayerNorm (biases), partial rotary and optional q/k/v biases."""
    cfg = model.config
    if getattr(cfg, "qk_layernorm", False) or getattr(cfg, "use_parallel_residual", False):
        raise UsageError(
            "StableLM with qk_layernorm or use_parallel_residual is not supported by export",
            "export a StableLM without them.",
        )
    w = extract_llama(model)
    w.norm = "layer"
    w.final_norm_b = _optional_array(model.model.norm, "bias")
    for lw, layer in zip(w.layers, model.model.layers, strict=True):
        lw.norm1_b = _optional_array(layer.input_layernorm, "bias")
        lw.norm2_b = _optional_array(layer.post_attention_layernorm, "bias")
    return w


def extract_starcoder2(model: Any) -> DecoderWeights:
    """StarCoder2: StableLM-like LayerNorm decoder with biases and an ungated GELU MLP."""
    cfg = model.config
    w = extract_stablelm(model)
    w.activation = GPT2_ACTIVATIONS[_hidden_act(cfg)]  # c_fc -> act -> c_proj, no gate
    w.norm_eps = float(cfg.norm_epsilon)
    return w


def extract_llama(model: Any) -> DecoderWeights:
    """Llama, Mistral, Qwen2 and SmolLM2: RMSNorm, rotary positions, SwiGLU MLP.

    Args:
        model: A transformers ``*ForCausalLM`` with Llama's module layout
            (``model.layers[i].self_attn.q_proj``, ``mlp.gate_proj``, ``model.rotary_emb``).
    """
    cfg = model.config
    _check_llama_config(cfg)
    heads = cfg.num_attention_heads
    head_dim = config_head_dim(cfg)
    layers = [llama_layer(layer, head_dim) for layer in model.model.layers]
    for lw, window in zip(layers, layer_windows(cfg, len(layers)), strict=True):
        lw.sliding_window = window
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
        norm_eps=float(
            getattr(cfg, "rms_norm_eps", None)
            or getattr(cfg, "layer_norm_eps", None)
            or cfg.norm_epsilon
        ),
        activation=GLU_ACTIVATIONS[_hidden_act(cfg)],
        embed=embed,
        final_norm_w=to_numpy(model.model.norm.weight),
        final_norm_b=None,
        lm_head=None if tied else lm_head,
        lm_head_b=_optional_array(model.lm_head, "bias"),
        layers=layers,
        rope_cos=cos,
        rope_sin=sin,
        rotary_dim=cos.shape[1],
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
