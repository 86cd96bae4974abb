"""Mixture-of-experts families: Llama-layout attention with top-k routed SwiGLU experts.

Mixtral and Qwen3-MoE keep every expert's gate and up projections in one tensor
(``experts.gate_up_proj`` [n, 2*I, E], gate first) and the down projections in another
(``experts.down_proj`` [n, E, I]); the router is ``mlp.gate.weight`` [n, E].
"""

from __future__ import annotations

from typing import Any

import numpy as np

from llmtool.errors import UsageError
from llmtool.export.extractors.llama import extract_llama, extract_qwen3
from llmtool.export.weights import DecoderWeights, MoeWeights, to_numpy


def _moe(block: Any, top_k: int, normalize: bool) -> MoeWeights:
    gate_up = to_numpy(block.experts.gate_up_proj)  # [n, 2I, E]
    down = to_numpy(block.experts.down_proj)  # [n, E, I]
    return MoeWeights(
        router_w=np.ascontiguousarray(to_numpy(block.gate.weight).T),  # [E, n]
        up_w=[np.ascontiguousarray(m.T) for m in gate_up],  # [E, 2I] each: gate then up
        down_w=[np.ascontiguousarray(m.T) for m in down],  # [I, E] each
        top_k=top_k,
        normalize=normalize,
    )


def _with_experts(w: DecoderWeights, model: Any, top_k: int, normalize: bool) -> DecoderWeights:
    for lw, layer in zip(w.layers, model.model.layers, strict=True):
        mlp = layer.mlp
        # Mixtral's and Qwen3-MoE's configs have no shared expert (Qwen2-MoE's, with one, has
        # no registry entry and takes the generic path): a safety net for a module that has one.
        if getattr(mlp, "shared_expert", None) is not None:
            raise UsageError(
                f"{model.config.model_type} with a shared expert: the hand-built graph cannot "
                "express it"
            )
        if hasattr(mlp, "experts"):  # sparse layer (Qwen3-MoE may mix in dense ones)
            lw.moe = _moe(mlp, top_k, normalize)
    return w


def extract_mixtral(model: Any) -> DecoderWeights:
    """Mixtral: Mistral with top-k routed experts (weights renormalized over the top k)."""
    cfg = model.config
    w = extract_llama(model)
    return _with_experts(w, model, cfg.num_experts_per_tok, True)


def extract_qwen3_moe(model: Any) -> DecoderWeights:
    """Qwen3-MoE: Qwen3 (qk-norm) with top-k routed experts (``norm_topk_prob`` renormalizes)."""
    cfg = model.config
    w = extract_qwen3(model)
    return _with_experts(w, model, cfg.num_experts_per_tok, bool(cfg.norm_topk_prob))
