"""The neutral description of a decoder-only LM that every transformer graph is built from.

Every supported transformer family is a pre-norm decoder; the differences (norm kind, positions,
MLP activation, biases) are fields of :class:`DecoderWeights`, so one graph builder
(:mod:`llmtool.export.transformer`, and its fused variant) serves them all. The extractors
(:mod:`llmtool.export.extractors`) fill it from a transformers model.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# True inside consume_linear_weights(): extractors free each nn.Linear weight once copied.
_CONSUME: contextvars.ContextVar[bool] = contextvars.ContextVar("consume_weights", default=False)


def to_numpy(t: Any) -> np.ndarray:
    """A torch tensor (any device, any float dtype) as a float32 numpy array."""
    return t.detach().to("cpu").float().numpy()


@contextlib.contextmanager
def consume_linear_weights(enabled: bool = True) -> Iterator[None]:
    """Inside the block, an extractor frees each linear weight as soon as it has copied it into
    MatMul layout (see :func:`release_weight`).

    Export memory: the transposed copy of every linear weight would otherwise live beside the
    PyTorch model's own until both are dropped, two fp32 copies of the model at once; consumed,
    the extraction holds one (plus the layer in hand). The PyTorch model can not run afterwards,
    so its reference outputs must be computed first.
    """
    token = _CONSUME.set(enabled)
    try:
        yield
    finally:
        _CONSUME.reset(token)


def release_weight(module: Any) -> None:
    """Replace ``module.weight`` by a meta tensor of its shape (freeing its storage) when inside
    :func:`consume_linear_weights`; the shape and ``numel`` stay as they were."""
    if not _CONSUME.get():
        return
    import torch

    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.nn.Parameter) and weight.device.type != "meta":
        module.weight = torch.nn.Parameter(
            torch.empty_like(weight, device="meta"), requires_grad=False
        )


@dataclass
class MoeWeights:
    """A top-k routed mixture of gated experts (Mixtral, Qwen3-MoE) in place of the MLP.

    The graph computes every expert densely and sums them weighted by the routing weights, which
    are zero outside each token's top-k: exact, with no data-dependent shapes.
    """

    router_w: np.ndarray  # [E, n_experts]; router logits = x @ router_w
    up_w: list[np.ndarray]  # per expert [E, 2*I]: gate then up
    down_w: list[np.ndarray]  # per expert [I, E]
    top_k: int
    normalize: bool  # renormalize the top-k softmax weights to sum to 1


@dataclass
class LayerWeights:
    """One decoder layer; matrices are [in_features, out_features] (ONNX MatMul layout)."""

    norm1_w: np.ndarray | None  # [E]; None: no norm before attention (OLMo 2)
    norm1_b: np.ndarray | None  # [E] (LayerNorm only)
    qkv_w: np.ndarray  # [E, (H + 2*KVH) * D]: q, k, v side by side
    qkv_b: np.ndarray | None  # [(H + 2*KVH) * D]
    o_w: np.ndarray  # [H*D, E]
    o_b: np.ndarray | None
    norm2_w: np.ndarray | None  # before the MLP; None: none (OLMo 2)
    norm2_b: np.ndarray | None
    up_w: np.ndarray  # [E, I] or, for gated MLPs, [E, 2*I]: gate then up
    up_b: np.ndarray | None
    down_w: np.ndarray  # [I, E]
    down_b: np.ndarray | None
    attn_scale: float  # multiplies q·k
    # Keys a query may see: the last ``sliding_window`` positions (itself included); None = all.
    # Per layer, as transformers reads ``config.layer_types`` (Qwen2's max_window_layers).
    sliding_window: int | None = None
    # qk-norm (Qwen3, OLMo 2 style): RMSNorm weights [D] over each head of q and k, before rope.
    q_norm_w: np.ndarray | None = None
    k_norm_w: np.ndarray | None = None
    rope_local: bool = False  # True: the layer uses the local rope tables (Gemma 3's sliding)
    use_rope: bool = True  # False: a NoPE layer (SmolLM3's no_rope_layers)
    qk_norm_per_head: bool = True  # False: over the whole projection [H*D] (OLMo 2)
    # Norm placement: post-norms on each branch's output, before the residual add (Gemma 2/3,
    # OLMo 2); None where the family has none.
    post_attn_norm_w: np.ndarray | None = None
    post_mlp_norm_w: np.ndarray | None = None
    # Parallel residual (GPT-NeoX, GPT-J, Phi, Falcon, Cohere): h + attn(norm1(h)) + mlp(x2),
    # where x2 is norm2(h), or norm1(h) itself when norm2_w is None (one shared norm).
    parallel: bool = False
    moe: MoeWeights | None = None  # routed experts instead of up_w / down_w


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
    # "silu_glu", "gelu_tanh_glu", "gelu_glu" (gated: up_w holds gate then up), or
    # "gelu_tanh", "gelu", "relu".
    activation: str
    embed: np.ndarray  # [V, E]
    final_norm_w: np.ndarray
    final_norm_b: np.ndarray | None
    lm_head: np.ndarray | None  # [V, E]; None when tied to ``embed``
    lm_head_b: np.ndarray | None = None
    layers: list[LayerWeights] = field(default_factory=list)
    positions: np.ndarray | None = None  # [P, E] learned absolute positions (GPT-2)
    rope_cos: np.ndarray | None = None  # [P, R] (scaling folded in)
    rope_sin: np.ndarray | None = None  # [P, R]
    # R: the rotated leading part of each head (partial rotary); the rest passes unrotated.
    rotary_dim: int | None = None
    # A second rope base for some layers (Gemma 3's sliding layers): [P, R] each.
    rope_local_cos: np.ndarray | None = None
    rope_local_sin: np.ndarray | None = None
    # Multipliers (Granite): embeddings * embed_scale, residual += branch * residual_scale,
    # logits * logits_scale.
    # Gemma's RMSNorm multiplies by (offset + w); the graph adds it when it stores the gains.
    norm_weight_offset: float = 0.0
    embed_scale: float = 1.0
    residual_scale: float = 1.0
    logits_scale: float = 1.0
    # Soft-capping (Gemma 2): cap * tanh(x / cap) on attention scores / final logits.
    attn_softcap: float | None = None
    logits_softcap: float | None = None
    # Rotary pairs (x[2i], x[2i+1]) instead of halves (GPT-J, Cohere); tables then interleaved
    # too (cos[:, 2i] == cos[:, 2i + 1]).
    rotary_interleaved: bool = False
    alibi_slopes: np.ndarray | None = None  # [H]: ALiBi (BLOOM) adds slope_h * key position
    embed_norm_w: np.ndarray | None = None  # a norm right after the embeddings (BLOOM)
    embed_norm_b: np.ndarray | None = None

    @property
    def windows(self) -> list[int]:
        """The distinct sliding windows of the layers, sorted."""
        return sorted({lw.sliding_window for lw in self.layers if lw.sliding_window})

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def manifest_meta(self) -> dict[str, Any]:
        """The manifest fields that describe this decoder (``BuiltGraph.meta``)."""
        return {
            "architecture": self.arch,
            "model_type": self.model_type,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
            "max_positions": self.max_positions,
            "features": self.features(),
        }

    def features(self) -> list[str]:
        """The named departures from a plain Llama decoder this model uses (for the manifest)."""
        found = []
        if any(lw.q_norm_w is not None for lw in self.layers):
            found.append("qk_norm")
        if self.rotary_dim and self.rotary_dim < self.head_dim:
            found.append("partial_rotary")
        if self.windows:
            found.append("sliding_window")
        if any(lw.post_attn_norm_w is not None for lw in self.layers):
            found.append("post_norms")
        if any(lw.norm1_w is None for lw in self.layers):
            found.append("no_pre_norms")
        if self.attn_softcap or self.logits_softcap:
            found.append("softcap")
        if self.rope_cos is not None and not all(lw.use_rope for lw in self.layers):
            found.append("nope_layers")
        if any(lw.parallel for lw in self.layers):
            found.append("parallel_residual")
        if self.rotary_interleaved:
            found.append("interleaved_rotary")
        if self.alibi_slopes is not None:
            found.append("alibi")
        if any(lw.moe is not None for lw in self.layers):
            found.append("moe")
        if self.embed_norm_w is not None:
            found.append("embedding_norm")
        if self.norm_weight_offset:
            found.append("offset_rms_norm")
        if self.embed_scale != 1.0:
            found.append("scaled_embeddings")
        if (self.embed_scale, self.residual_scale, self.logits_scale) != (1.0, 1.0, 1.0):
            found.append("multipliers")
        return found
