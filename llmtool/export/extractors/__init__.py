"""Extractors: read a transformers model into the neutral :class:`DecoderWeights`.

One function per family of checkpoints that share a module layout, grouped by layout:
:mod:`.llama` (Llama-style ``self_attn.q_proj`` / ``mlp.gate_proj`` stacks), :mod:`.gpt`
(GPT-2-style fused projections and learned positions, ALiBi), :mod:`.parallel`
(parallel-residual blocks), :mod:`.moe` (routed experts); :mod:`.common` holds the config readers
and weight helpers they share. The registry (:mod:`llmtool.export.registry`) maps each
``config.model_type`` to one. To add a family, write an ``extract_*`` function in the module of
its layout (usually a few lines on top of an existing one) and add its entry to the registry.
"""

from llmtool.export.extractors.common import (
    Variant,
    check_rope_config,
    config_head_dim,
    layer_windows,
    partial_rotary_factor,
    rope_parameters,
    rope_type,
)
from llmtool.export.extractors.gpt import (
    bloom_variant,
    extract_bloom,
    extract_gpt2,
    extract_gpt_bigcode,
    extract_opt,
    gpt2_variant,
    opt_variant,
)
from llmtool.export.extractors.llama import (
    extract_gemma,
    extract_gemma2,
    extract_gemma3_text,
    extract_granite,
    extract_llama,
    extract_olmo2,
    extract_qwen3,
    extract_smollm3,
    extract_stablelm,
    extract_starcoder2,
    llama_layer,
    stablelm_variant,
)
from llmtool.export.extractors.moe import extract_mixtral, extract_qwen3_moe
from llmtool.export.extractors.parallel import (
    cohere_variant,
    extract_cohere,
    extract_falcon,
    extract_gpt_neox,
    extract_gptj,
    extract_phi,
    falcon_variant,
    phi_variant,
)

__all__ = [
    "Variant",
    "bloom_variant",
    "check_rope_config",
    "cohere_variant",
    "config_head_dim",
    "extract_bloom",
    "extract_cohere",
    "extract_falcon",
    "extract_gemma",
    "extract_gemma2",
    "extract_gemma3_text",
    "extract_gpt2",
    "extract_gpt_bigcode",
    "extract_gpt_neox",
    "extract_gptj",
    "extract_granite",
    "extract_llama",
    "extract_mixtral",
    "extract_olmo2",
    "extract_opt",
    "extract_phi",
    "extract_qwen3",
    "extract_qwen3_moe",
    "extract_smollm3",
    "extract_stablelm",
    "extract_starcoder2",
    "falcon_variant",
    "gpt2_variant",
    "layer_windows",
    "llama_layer",
    "opt_variant",
    "partial_rotary_factor",
    "phi_variant",
    "rope_parameters",
    "rope_type",
    "stablelm_variant",
]
