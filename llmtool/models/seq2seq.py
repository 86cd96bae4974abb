"""Loading an encoder-decoder (T5, BART, Marian) from a Hugging Face directory.

The same safety rules as :func:`llmtool.models.loading.load_model`: safetensors unless pickle is
allowed, never remote code, nothing fetched. ``AutoModelForSeq2SeqLM`` builds transformers' own
class for the config.
"""

from __future__ import annotations

from typing import Any

from llmtool.errors import UsageError
from llmtool.models.loading import (
    LoadedModel,
    ModelSpec,
    _check_vocab,
    _check_weights,
    _dtype_kwarg,
    load_tokenizer,
    quiet_transformers,
    read_config,
)
from llmtool.models.upcast import plan_half_load, upcast_to_fp32


def load_seq2seq(spec: ModelSpec, *, allow_pickle: bool = False) -> LoadedModel:
    """Load a PyTorch encoder-decoder (fp32, eval mode, eager attention) and its tokenizer.

    Raises:
        UsageError: Not a Hugging Face directory, or weights transformers cannot load.
    """
    import torch
    from transformers import AutoModelForSeq2SeqLM, GenerationConfig

    quiet_transformers()
    if spec.kind != "hf_dir":
        raise UsageError(
            f"{spec.display} is not a Hugging Face directory",
            "encoder-decoder models load from a directory (config.json + safetensors).",
        )
    _check_weights(spec.path, allow_pickle)
    config = read_config(spec)  # a readable config, with the clear error if not
    tokenizer = load_tokenizer(spec)
    # bf16 / fp16 safetensors: loaded in their dtype and widened tensor by tensor (models/upcast).
    half = plan_half_load(AutoModelForSeq2SeqLM, config, spec.path)
    try:
        model = AutoModelForSeq2SeqLM.from_pretrained(
            spec.path,
            trust_remote_code=False,
            use_safetensors=not allow_pickle or None,
            attn_implementation="eager",
            **_dtype_kwarg(half.dtype if half else torch.float32),
        )
    except Exception as e:  # safetensors and torch each raise their own types
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(
            f"Cannot load model weights from {spec.display} ({first[:200]})",
            "check that the weight files are complete and match config.json.",
        ) from e
    if half:
        upcast_to_fp32(model, half)
    model.eval()
    generation_config: Any
    try:
        generation_config = GenerationConfig.from_pretrained(spec.path)
    except OSError:
        generation_config = GenerationConfig.from_model_config(model.config)
    _check_vocab(model.config, tokenizer, spec)
    return LoadedModel(model, tokenizer, model.config, generation_config, spec)
