"""The one registry of architectures: which ``config.model_type`` export builds, and how.

Each entry (:class:`Architecture`) names the extractor that reads the PyTorch model into the
builders' input, the standard and fused graph builders, whether int8 / int4 weights apply, and a
one-line note. Adding a transformer family is an extractor in :mod:`llmtool.export.extractors`
(often a few lines over :func:`~llmtool.export.extractors.extract_llama`) plus one line here::

    "phi3": decoder(extract_phi3, "Llama with fused qkv and gate_up projections"),

Loading (:mod:`llmtool.models.loading`) accepts any causal LM; only export consults this table,
through :func:`check_supported` (before the weights are loaded) and :func:`build_graph`. A
``model_type`` not in the table, for which transformers has a causal LM, takes :data:`GENERIC`:
the standard graph traced by ``torch.onnx.export(dynamo=True)`` (:mod:`llmtool.export.generic`).
So does a variant its entry's ``variant`` says the hand-built graph cannot express, with a
message (:func:`generic_notice`). ``--fused`` where no fused graph expresses a config falls back
to the standard graph with a message (:func:`fused_fallback`). The manifest's ``builder`` (and
``builder_reason``) says which path built a graph: ``hand-built`` or ``torch.onnx.dynamo``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llmtool.errors import UsageError
from llmtool.export.contract import BuiltGraph, GraphOptions, WeightFormat
from llmtool.export.extractors import (
    Variant,
    bloom_variant,
    check_rope_config,
    cohere_variant,
    extract_bloom,
    extract_cohere,
    extract_falcon,
    extract_gemma,
    extract_gemma2,
    extract_gemma3_text,
    extract_gpt2,
    extract_gpt_bigcode,
    extract_gpt_neox,
    extract_gptj,
    extract_granite,
    extract_llama,
    extract_mixtral,
    extract_olmo2,
    extract_opt,
    extract_phi,
    extract_qwen3,
    extract_qwen3_moe,
    extract_smollm3,
    extract_stablelm,
    extract_starcoder2,
    falcon_variant,
    gpt2_variant,
    opt_variant,
    phi_variant,
    stablelm_variant,
)
from llmtool.export.fused import build_fused
from llmtool.export.generic import BUILDER as GENERIC_BUILDER
from llmtool.export.generic import NO_FUSED as GENERIC_NO_FUSED
from llmtool.export.generic import build_generic, check_generic, has_causal_lm
from llmtool.export.recurrent import build_recurrent_graph
from llmtool.export.transformer import build_decoder
from llmtool.export.weights import DecoderWeights
from llmtool.models.recurrent_config import LSTM_TYPE, RNN_TYPE

# (source, dtype, opset, weight format) -> graph; the source is what the extractor returned.
Builder = Callable[[Any, str, int, WeightFormat], BuiltGraph]


@dataclass(frozen=True)
class Architecture:
    """How export builds one ``config.model_type``.

    Attributes:
        note: One line for humans (docs, error messages).
        build: The standard graph's builder.
        extract: PyTorch model -> the builders' input (:class:`DecoderWeights` for transformer
            decoders); None when the builders read the PyTorch model itself.
        build_fused: The fused (contrib-op) graph's builder; None when ``--fused`` falls back to
            the standard graph.
        no_fused: Why there is no fused graph (when ``build_fused`` is None).
        quantizable: Whether ``--quantize`` (int8 / int4 weight blocks) applies.
        check: Refuses, from the config alone, variants the builders cannot express
            (``check(config, fused=...)`` raises :class:`~llmtool.errors.UsageError`).
        variant: Config -> why the hand-built graph cannot express it (None: it can); such a
            config takes :data:`GENERIC` (fp32, standard graph), with a message.
        variants: One line for humans: the variants ``variant`` sends to :data:`GENERIC`.
    """

    note: str
    build: Builder
    extract: Callable[[Any], Any] | None = None
    build_fused: Builder | None = None
    no_fused: str = ""
    quantizable: bool = True
    check: Callable[..., None] | None = None
    variant: Variant | None = None
    variants: str = ""


def decoder(
    extract: Callable[[Any], DecoderWeights],
    note: str,
    *,
    rotary: bool = True,
    variant: Variant | None = None,
    variants: str = "",
) -> Architecture:
    """A transformer decoder: read into :class:`DecoderWeights`, standard and fused graphs."""
    check = check_rope_config if rotary else None
    return Architecture(
        note, build_decoder, extract, build_fused, check=check, variant=variant, variants=variants
    )


ARCHITECTURES: dict[str, Architecture] = {
    "llama": decoder(extract_llama, "Llama and SmolLM2: RMSNorm, rotary positions, SwiGLU"),
    "mistral": decoder(extract_llama, "Llama with a sliding attention window"),
    "qwen2": decoder(extract_llama, "Llama with q/k/v biases and an optional sliding window"),
    "qwen3": decoder(extract_qwen3, "Llama with RMSNorm on each q and k head (qk-norm)"),
    "granite": decoder(
        extract_granite, "Llama with embedding, residual, attention and logits multipliers"
    ),
    "phi3": decoder(extract_llama, "Llama with packed qkv and gate_up projections"),
    "gemma": decoder(extract_gemma, "Llama with (1 + w) RMSNorm, sqrt(hidden) embeddings, GeGLU"),
    "gemma2": decoder(
        extract_gemma2, "Gemma with pre+post norms, soft-capping, alternating sliding window"
    ),
    "gemma3_text": decoder(
        extract_gemma3_text, "Gemma 2 layout with per-head qk-norm and a local rope base"
    ),
    "olmo2": decoder(extract_olmo2, "Llama with post-norms only and RMSNorm on all of q and k"),
    "smollm3": decoder(extract_smollm3, "Llama with NoPE layers (no rotary positions)"),
    "stablelm": decoder(
        extract_stablelm,
        "Llama with LayerNorm (biases) and partial rotary",
        variant=stablelm_variant,
        variants="qk_layernorm, use_parallel_residual",
    ),
    "starcoder2": decoder(
        extract_starcoder2, "LayerNorm with biases, ungated GELU MLP, optional sliding window"
    ),
    "gpt2": decoder(
        extract_gpt2,
        "LayerNorm, learned positions, GELU MLP, biases everywhere",
        rotary=False,
        variant=gpt2_variant,
        variants="reorder_and_upcast_attn",
    ),
    "gpt_bigcode": decoder(
        extract_gpt_bigcode,
        "GPT-2 layout with one shared key/value head (multi-query)",
        rotary=False,
    ),
    "opt": decoder(
        extract_opt,
        "Pre-LayerNorm, learned positions (offset 2), ReLU MLP",
        rotary=False,
        variant=opt_variant,
        variants="post-LayerNorm (do_layer_norm_before=False), word_embed_proj_dim != "
        "hidden_size (OPT-350m), _remove_final_layer_norm",
    ),
    "bloom": Architecture(
        "ALiBi attention biases, LayerNorm after the embeddings, GELU MLP",
        build_decoder,
        extract_bloom,
        no_fused="GroupQueryAttention has no ALiBi bias",
        variant=bloom_variant,
        variants="apply_residual_connection_post_layernorm",
    ),
    "gpt_neox": decoder(extract_gpt_neox, "Parallel residual, partial rotary, LayerNorm (Pythia)"),
    "gptj": decoder(
        extract_gptj, "Parallel residual with one LayerNorm, interleaved partial rotary"
    ),
    "phi": decoder(
        extract_phi,
        "Phi-1/2: parallel attention and MLP, partial rotary, LayerNorm",
        variant=phi_variant,
        variants="qk_layernorm",
    ),
    "falcon": decoder(
        extract_falcon,
        "Parallel attention, multi-query or grouped KV (new decoder architecture)",
        variant=falcon_variant,
        variants="ALiBi (alibi=True)",
    ),
    "cohere": decoder(
        extract_cohere,
        "Parallel block, bias-free LayerNorm, interleaved rotary, logit scale",
        variant=cohere_variant,
        variants="use_qk_norm",
    ),
    # No shared expert: their configs have none (Qwen2-MoE's has no entry, so GENERIC).
    "mixtral": decoder(extract_mixtral, "Mistral with top-k routed SwiGLU experts (MoE)"),
    "qwen3_moe": decoder(extract_qwen3_moe, "Qwen3 with top-k routed SwiGLU experts (MoE)"),
    LSTM_TYPE: Architecture(
        "llmtool train's LSTM: the (h, c) state is the cache",
        build_recurrent_graph,
        no_fused="a recurrent state has no attention for the fused ops",
        quantizable=False,
    ),
    RNN_TYPE: Architecture(
        "llmtool train's Elman RNN: the h state is the cache",
        build_recurrent_graph,
        no_fused="a recurrent state has no attention for the fused ops",
        quantizable=False,
    ),
}


# Any other transformers causal LM: traced by torch.onnx's dynamo exporter, standard graph only.
GENERIC = Architecture(
    "Any other transformers causal LM with a KV cache: traced by torch.onnx (dynamo), fp32",
    build_generic,
    no_fused=GENERIC_NO_FUSED,
)
HAND_BUILT = "hand-built"


def variant_reason(config: Any) -> str | None:
    """Why a registered family's hand-built graph cannot express this config, named with its
    type (``"opt with post-LayerNorm (do_layer_norm_before=False)"``); None when it can or the
    type has no entry."""
    model_type = getattr(config, "model_type", None)
    entry = ARCHITECTURES.get(model_type) if isinstance(model_type, str) else None
    reason = entry.variant(config) if entry is not None and entry.variant is not None else None
    return None if reason is None else f"{model_type} with {reason}"


def generic_notice(config: Any) -> str | None:
    """The one-line message of an export that a variant sends down the generic path."""
    variant = variant_reason(config)
    tail = "the hand-built graph cannot express it; exporting through torch.onnx (dynamo)"
    return None if variant is None else f"{variant}: {tail}"


def architecture(config: Any) -> Architecture | None:
    """The registry entry for a config's ``model_type``: its own; :data:`GENERIC` when
    transformers has a decoder-only causal LM for it and it has no entry, or its entry's
    ``variant`` says the hand-built graph cannot express the config; else None."""
    model_type = getattr(config, "model_type", None)
    if not isinstance(model_type, str):
        return None
    entry = ARCHITECTURES.get(model_type)
    if entry is None and has_causal_lm(config):
        return GENERIC
    if entry is not None and variant_reason(config) is not None:
        return GENERIC
    return entry


def supported_model_types() -> list[str]:
    """The ``config.model_type`` values export accepts, sorted."""
    return sorted(ARCHITECTURES)


def fused_model_types() -> list[str]:
    """The model types with a fused graph (``export --fused``), sorted."""
    return sorted(t for t, a in ARCHITECTURES.items() if a.build_fused is not None)


def quantizable_model_types() -> list[str]:
    """The model types ``export --quantize`` applies to, sorted."""
    return sorted(t for t, a in ARCHITECTURES.items() if a.quantizable)


def check_supported(
    config: Any, *, fused: bool = False, quantize: str | None = None, dtype: str = "fp32"
) -> None:
    """Refuse a model export cannot build, from its config alone (before loading weights).

    Args:
        config: The model's transformers config (its ``model_type`` is looked up).
        fused: The fused graph is asked for.
        quantize: A quantization mode is asked for (``int8`` / ``int4``), or None.
        dtype: The export dtype (the generic path exports fp32 only).

    Raises:
        UsageError: The architecture, or the variant asked for, is not supported; the message
            names those that are.
    """
    model_type = getattr(config, "model_type", None)
    entry = architecture(config)
    if entry is None:
        raise UsageError(
            f"Architecture '{model_type}' is not supported (transformers has no causal LM for it)",
            f"llmtool exports {', '.join(supported_model_types())}, and other transformers "
            "causal LMs through torch.onnx.",
        )
    variant = variant_reason(config)
    if variant is not None:
        _check_variant(variant, fused=fused, dtype=dtype)
    if entry is GENERIC:
        check_generic(config, dtype=dtype)
    if fused and entry.build_fused is None:
        raise UsageError(
            f"--fused is not available for '{model_type}' ({entry.no_fused})",
            f"it supports {', '.join(fused_model_types())}; export without --fused.",
        )
    if entry.check is not None:
        entry.check(config, fused=fused)
    if quantize and not entry.quantizable:
        raise UsageError(
            f"--quantize is not available for '{model_type}'",
            f"it supports {', '.join(quantizable_model_types())}; export without --quantize.",
        )


def fused_fallback(config: Any, *, quantize: str | None = None, dtype: str = "fp32") -> str | None:
    """The message of a ``--fused`` export that falls back to the standard graph, or None when
    the fused graph can be built. Where no fused graph expresses a config (BLOOM's ALiBi, the
    generic path, a rotary size GroupQueryAttention cannot turn), the standard graph is written
    and this printed (``layout: standard`` in llmtool.json).

    Raises:
        UsageError: The standard graph is refused too (its own reason).
    """
    try:
        check_supported(config, fused=True, quantize=quantize, dtype=dtype)
        return None
    except UsageError as fused_error:
        check_supported(config, fused=False, quantize=quantize, dtype=dtype)
        return f"{fused_error.message.rstrip('.')}: writing the standard graph instead"


def _check_variant(variant: str, *, fused: bool, dtype: str) -> None:
    """Refuse what the generic path cannot build for a variant routed to it.

    Raises:
        UsageError: ``--fused`` (the traced graph has no fused layout) or a dtype other than fp32.
    """
    if fused:
        raise UsageError(
            f"--fused is not available for {variant}: the hand-built graph cannot express it, "
            "and the torch.onnx path it takes instead builds the standard graph only",
            "export without --fused (fp32).",
        )
    if dtype != "fp32":
        raise UsageError(
            f"--dtype {dtype} is not available for {variant}: the hand-built graph cannot "
            "express it, and the torch.onnx path it takes instead exports fp32 only",
            "drop --dtype or use --dtype fp32.",
        )


def extract(model: Any) -> DecoderWeights:
    """Read a supported transformer decoder into a :class:`DecoderWeights`.

    Raises:
        UsageError: ``model`` is not a registered transformer decoder.
    """
    model_type = model.config.model_type
    entry = ARCHITECTURES.get(model_type)
    if entry is None or entry.extract is None:
        raise UsageError(f"No decoder extractor for '{model_type}'")
    weights: DecoderWeights = entry.extract(model)
    return weights


def build_graph(
    model: Any, dtype: str, opset: int, options: GraphOptions | None = None
) -> BuiltGraph:
    """Build the ONNX graph for a loaded PyTorch model.

    Args:
        model: The PyTorch model (transformers causal LM or llmtool's recurrent LM).
        dtype: ``fp32`` or ``fp16``.
        opset: ONNX opset.
        options: Fused layout and weight format (standard float graph by default).

    Raises:
        UsageError: The architecture or the variant asked for is not supported.
    """
    options = options or GraphOptions()
    check_supported(
        model.config, fused=options.fused, quantize=options.weights.quantize, dtype=dtype
    )
    entry = architecture(model.config)
    assert entry is not None  # check_supported refused an unknown type
    source = model if entry.extract is None else entry.extract(model)
    build = entry.build_fused if options.fused else entry.build
    assert build is not None  # check_supported refused a missing fused builder
    variant = variant_reason(model.config)
    try:
        built = build(source, dtype, opset, options.weights)
    except UsageError as err:
        if variant is None:
            raise
        # The exporter's refusal names the type; the variant says why it was asked at all.
        raise UsageError(
            f"{variant}, which the hand-built graph cannot express: {err.message}", err.hint
        ) from None
    built.meta.setdefault("builder", GENERIC_BUILDER if entry is GENERIC else HAND_BUILT)
    if variant is not None:  # recorded in llmtool.json and shown under the export table
        built.meta["builder_reason"] = f"{variant}: the hand-built graph cannot express it"
    return built
