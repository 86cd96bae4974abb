"""Encoder-decoder (T5, BART, Marian) to ONNX: an encoder graph and one decoder graph.

Both graphs are traced (``torch.onnx.export``) from thin wrappers around transformers' own
modules, so every architectural detail (T5's relative position buckets and gated-GELU, BART's
learned positions and ``final_logits_bias``, Marian's sinusoidal positions and scaled
embeddings) is transformers' code, not a re-implementation.

``encoder_model.onnx``::

    input_ids [batch, source], attention_mask [batch, source] -> last_hidden_state [batch, source, d]

``decoder_model.onnx`` serves the first step and every cached step with the same graph, with
Optimum's names::

    input_ids [batch, target]              the new decoder tokens
    encoder_attention_mask [batch, source]
    encoder_hidden_states [batch, new_source, d]   the encoder output at step 1, [batch, 0, d] after
    past_key_values.{i}.decoder.key/value  [batch, heads, past, head_dim]  (past = 0 at step 1)
    past_key_values.{i}.encoder.key/value  [batch, heads, past_source, head_dim]  (0 at step 1)
    -> logits [batch, target, vocab], present.{i}.decoder.*, present.{i}.encoder.*

Why one graph without an ``If``: transformers' caches grow by concatenation, for the cross
attention too when its layer is not marked updated. The wrapper therefore hands the cross
attention the fed-back keys/values *and* the (possibly empty) encoder output: at step 1 the past
is empty and the keys are projected from the encoder output; at later steps the runtime passes an
empty encoder output, the projection costs nothing and the keys are the past ones, unchanged.
The self-attention past grows by the new tokens as in a decoder-only export.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmtool.errors import UsageError

ENCODER_FILE = "encoder_model.onnx"
DECODER_FILE = "decoder_model.onnx"
# config.model_type -> one line for humans; export refuses any other encoder-decoder.
SEQ2SEQ_TYPES: dict[str, str] = {
    "t5": "T5 and T5 v1.1 / Flan-T5: relative position buckets, ReLU or gated-GELU FFN",
    "mt5": "mT5: T5 v1.1 layout with a large vocabulary",
    "bart": "BART: learned positions, post-norm, final_logits_bias",
    "marian": "Marian (opus-mt): sinusoidal positions, scaled embeddings",
}
KINDS = ("decoder", "encoder")  # self-attention, cross-attention cache, in Optimum's names


def is_seq2seq_config(config: Any) -> bool:
    """Whether a transformers config describes an encoder-decoder model."""
    return bool(getattr(config, "is_encoder_decoder", False))


def check_seq2seq_supported(config: Any) -> None:
    """Refuse an encoder-decoder export cannot build, from its config alone.

    Raises:
        UsageError: The ``model_type`` is not one of :data:`SEQ2SEQ_TYPES`.
    """
    model_type = getattr(config, "model_type", None)
    if model_type not in SEQ2SEQ_TYPES:
        raise UsageError(
            f"Encoder-decoder architecture '{model_type}' is not supported",
            f"llmtool exports the encoder-decoders {', '.join(sorted(SEQ2SEQ_TYPES))}.",
        )


@dataclass(frozen=True)
class Seq2SeqDims:
    """The sizes the graphs and the runtime's caches need.

    Attributes:
        layers: Decoder layers (two cache pairs each: self and cross attention).
        heads: Decoder attention heads.
        head_dim: Size of one head.
        hidden: The encoder output's width (``d_model``).
        vocab_size: Logits per position.
        max_source: The encoder's limit in tokens (None: relative positions, unbounded).
    """

    layers: int
    heads: int
    head_dim: int
    hidden: int
    vocab_size: int
    max_source: int | None

    @classmethod
    def of(cls, config: Any) -> Seq2SeqDims:
        """The dims of a T5 / BART / Marian config."""
        if config.model_type in ("t5", "mt5"):
            return cls(
                config.num_decoder_layers,
                config.num_heads,
                config.d_kv,
                config.d_model,
                config.vocab_size,
                None,
            )
        heads = config.decoder_attention_heads
        return cls(
            config.decoder_layers,
            heads,
            config.d_model // heads,
            config.d_model,
            config.vocab_size,
            config.max_position_embeddings,
        )


def cache_names(layers: int) -> list[tuple[str, str]]:
    """(past input, present output) names, per layer: self key, self value, cross key, value."""
    return [
        (f"past_key_values.{i}.{kind}.{part}", f"present.{i}.{kind}.{part}")
        for i in range(layers)
        for kind in KINDS
        for part in ("key", "value")
    ]


def cache_entries(dims: Seq2SeqDims) -> list[dict[str, Any]]:
    """The manifest's cache entries of the decoder graph (``kind``: ``self`` or ``cross``)."""
    entries = []
    for past, present in cache_names(dims.layers):
        cross = ".encoder." in past
        entries.append(
            {
                "input": past,
                "output": present,
                "kind": "cross" if cross else "self",
                "shape": ["batch", dims.heads, "past_sequence", dims.head_dim],
                "dtype": "float32",
                "sequence_axis": 2,
            }
        )
    return entries


def _wrappers(model: Any) -> tuple[Any, Any]:
    """The encoder and decoder ``nn.Module`` wrappers around a transformers seq2seq model."""
    import inspect

    import torch
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache
    from transformers.modeling_outputs import BaseModelOutput

    layers = Seq2SeqDims.of(model.config).layers
    # transformers 5 renamed past_key_values to cache (the old name warns until 5.40).
    params = inspect.signature(model.forward).parameters
    cache_kwarg = "cache" if "cache" in params else "past_key_values"

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            encoder = self.model.get_encoder()
            return encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    class Decoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(
            self,
            input_ids: Any,
            encoder_attention_mask: Any,
            encoder_hidden_states: Any,
            *past: Any,
        ) -> Any:
            # past: per layer self key, self value, cross key, cross value ([b, heads, len, dh]).
            self_data = [(past[4 * i], past[4 * i + 1]) for i in range(layers)]
            cross_data = [(past[4 * i + 2], past[4 * i + 3]) for i in range(layers)]
            cache = EncoderDecoderCache(DynamicCache(self_data), DynamicCache(cross_data))
            # Not "updated": the cross attention projects the (possibly empty) encoder output
            # and concatenates it onto the (possibly empty) past keys/values.
            cache.is_updated = {i: False for i in range(layers)}
            out = self.model(
                encoder_outputs=BaseModelOutput(last_hidden_state=encoder_hidden_states),
                attention_mask=encoder_attention_mask,
                decoder_input_ids=input_ids,
                use_cache=True,
                **{cache_kwarg: cache},
                return_dict=True,
            )
            presents = []
            for i in range(layers):
                s: Any = cache.self_attention_cache.layers[i]
                c: Any = cache.cross_attention_cache.layers[i]
                presents += [s.keys, s.values, c.keys, c.values]
            return (out.logits, *presents)

    return Encoder().eval(), Decoder().eval()


def _sample_inputs(dims: Seq2SeqDims) -> tuple[Any, Any]:
    """Trace inputs with every dynamic axis at a distinct, non-trivial size."""
    import torch

    batch, source, target, past = 2, 5, 3, 4
    ids = torch.randint(3, dims.vocab_size, (batch, source))
    mask = torch.ones(batch, source, dtype=torch.long)
    hidden = torch.randn(batch, source, dims.hidden)
    caches = []
    for _ in range(dims.layers):
        caches += [torch.randn(batch, dims.heads, past, dims.head_dim) for _ in range(2)]
        # Cross past empty + full encoder output: the first-step path carries the projection.
        caches += [torch.zeros(batch, dims.heads, 0, dims.head_dim) for _ in range(2)]
    dec_ids = torch.randint(3, dims.vocab_size, (batch, target))
    return (ids, mask), (dec_ids, mask, hidden, *caches)


def export_seq2seq_graphs(model: Any, directory: Path, opset: int) -> dict[str, Any]:
    """Trace the encoder and decoder graphs of ``model`` into ``directory``.

    Returns:
        The manifest's ``graphs`` record: each graph's file, inputs and outputs.
    """
    import warnings

    import torch

    dims = Seq2SeqDims.of(model.config)
    encoder, decoder = _wrappers(model)
    enc_inputs, dec_inputs = _sample_inputs(dims)
    names = cache_names(dims.layers)
    enc_io = (["input_ids", "attention_mask"], ["last_hidden_state"])
    dec_io = (
        ["input_ids", "encoder_attention_mask", "encoder_hidden_states", *(p for p, _ in names)],
        ["logits", *(q for _, q in names)],
    )
    axes: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "source"},
        "last_hidden_state": {0: "batch", 1: "source"},
    }
    dec_axes: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch", 1: "target"},
        "encoder_attention_mask": {0: "batch", 1: "source"},
        "encoder_hidden_states": {0: "batch", 1: "new_source"},
        "logits": {0: "batch", 1: "target"},
    }
    for past, present in names:
        cross = ".encoder." in past
        dec_axes[past] = {0: "batch", 2: "past_source" if cross else "past_target"}
        dec_axes[present] = {0: "batch", 2: "source" if cross else "total_target"}
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about every Python branch on a shape; the graphs are validated.
        warnings.simplefilter("ignore")
        for module, args, (inputs, outputs), file, dyn in (
            (encoder, enc_inputs, enc_io, ENCODER_FILE, axes),
            (decoder, dec_inputs, dec_io, DECODER_FILE, dec_axes),
        ):
            torch.onnx.export(
                module,
                args,
                str(directory / file),
                input_names=inputs,
                output_names=outputs,
                dynamic_axes=dyn,
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
    _pin_head_reshapes(directory / DECODER_FILE, dims)
    return {
        "encoder": {"file": ENCODER_FILE, "inputs": enc_io[0], "outputs": enc_io[1]},
        "decoder": {"file": DECODER_FILE, "inputs": dec_io[0], "outputs": dec_io[1]},
    }


def _pin_head_reshapes(path: Path, dims: Seq2SeqDims) -> None:
    """Replace the ``-1`` of the ``[batch, length, -1, head_dim]`` head reshapes by ``heads``.

    At cached steps the cross attention projects an empty encoder output ([batch, 0, d]);
    ONNX Runtime cannot infer a ``-1`` from zero elements, so the head count is written out.
    transformers traces ``view(*shape[:-1], -1, head_dim)`` as ``Concat(.., .., [-1], [dh])``.
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}

    def constant(name: str) -> Any:
        node = producer.get(name)
        if node is None or node.op_type != "Constant":
            return None
        return numpy_helper.to_array(node.attribute[0].t).tolist()

    heads_name = "llmtool_num_heads"
    graph.initializer.append(
        numpy_helper.from_array(np.array([dims.heads], dtype=np.int64), heads_name)
    )
    for node in graph.node:
        if node.op_type != "Reshape":
            continue
        concat = producer.get(node.input[1])
        if concat is None or concat.op_type != "Concat" or len(concat.input) != 4:
            continue
        if constant(concat.input[2]) == [-1] and constant(concat.input[3]) == [dims.head_dim]:
            concat.input[2] = heads_name
    used = {name for node in graph.node for name in node.input}
    dead = [n for n in graph.node if n.op_type == "Constant" and n.output[0] not in used]
    for node in dead:  # the -1s replaced above (ORT would warn about each)
        graph.node.remove(node)
    onnx.save(model, str(path))
