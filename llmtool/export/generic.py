"""The generic path: the standard KV-cache graph of a family nobody wrote an extractor for.

Any ``*ForCausalLM`` that transformers runs with a :class:`~transformers.DynamicCache` is traced
by ``torch.onnx.export(..., dynamo=True)`` (torch.export, then onnxscript's lowering) through a
small wrapper module, :class:`_CacheModel`, that takes the cache as flat tensors. The graph gets
the I/O contract of the hand-built standard graph (:mod:`llmtool.export.transformer`)::

    input_ids [batch, sequence], attention_mask [batch, total_sequence],
    position_ids [batch, sequence], past_key_values.{i}.key / .value
    [batch, kv_heads, past_sequence, head_dim]  ->  logits [batch, sequence, vocab] (float32),
    present.{i}.key / .value [batch, kv_heads, total_sequence, head_dim]

so :class:`~llmtool.runtime.decoders.StandardDecoder` and export validation drive it unchanged.
The trace is made with a past of length 3 (torch.export specialises sizes 0 and 1), and the
traced graph concatenates the past with the new keys, so it also takes the empty past of a
prefill. fp32 only; no fused variant (the contrib-op graph needs the neutral decoder
description an extractor provides). ``--quantize`` runs ONNX Runtime's ``MatMulNBitsQuantizer``
over the traced graph's MatMuls, gated like every quantized export. Arithmetic the model runs in
bfloat16 on purpose (Falcon's ALiBi) is widened to float32 for ONNX Runtime's CPU, rounded back
to bfloat16 as torch rounds it (:func:`_widen_bfloat16`).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import onnx

from llmtool import defaults
from llmtool.errors import UsageError
from llmtool.export.contract import BuiltGraph, GraphIO, WeightFormat, cache_entries

BUILDER = "torch.onnx.dynamo"
NO_FUSED = "no extractor, so no fused graph: families without one take the generic path"
# onnxscript lowers to opset 18 and older opsets only through a converter that leaves opset-18
# attributes behind (Split's num_outputs), so the graph is traced at 18 or the opset asked for.
MIN_TRACE_OPSET = 18
# Example sizes of the trace: none may be 0 or 1, which torch.export would specialise.
_BATCH, _PAST, _SEQUENCE = 2, 3, 4


def has_causal_lm(config: Any) -> bool:
    """Whether transformers has a decoder-only ``*ForCausalLM`` for the config's model type.

    Encoders that transformers can also run as decoders (BERT, RoBERTa: types with a masked-LM
    head) count only when the config says ``is_decoder``.
    """
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return False
    encoder = model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    return not encoder or bool(getattr(config, "is_decoder", False))


def check_generic(config: Any, *, dtype: str = "fp32") -> None:
    """Refuse, from the config alone, what the generic path cannot build (the registry has
    already checked that transformers has a causal LM for the type).

    Raises:
        UsageError: A dtype other than fp32.
    """
    if dtype != "fp32":
        raise UsageError(
            f"'{config.model_type}' takes the generic torch.onnx path, which exports fp32 only",
            "drop --dtype or use --dtype fp32.",
        )


class ExportedGraph:
    """A traced ONNX model with the two things the pipeline uses of a ``GraphBuilder``."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model

    @property
    def inputs(self) -> Any:
        return self.model.graph.input

    @property
    def outputs(self) -> Any:
        return self.model.graph.output

    def save(
        self, path: Path, producer: str, version: str, data_suffix: str = ".data"
    ) -> list[Path]:
        """Write the model to ``path`` (weights beside it past the 2 GB protobuf limit)."""
        self.model.producer_name, self.model.producer_version = producer, version
        path = Path(path)
        if self.model.ByteSize() <= defaults.EXTERNAL_DATA_THRESHOLD:
            onnx.save_model(self.model, str(path))
            return [path]
        data = path.with_name(path.name + data_suffix)
        onnx.save_model(
            self.model,
            str(path),
            save_as_external_data=True,
            location=data.name,
            size_threshold=1024,
        )
        return [path, data]


def _cache_kwarg(model: Any) -> str:
    # transformers 5.2x renamed forward's ``past_key_values`` to ``cache`` (the old name warns).
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _cache_model(model: Any) -> Any:
    """A module taking the cache as flat tensors, as the ONNX graph does."""
    import torch
    from transformers import DynamicCache

    kwarg = _cache_kwarg(model)

    class _CacheModel(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any, position_ids: Any, past: Any) -> Any:
            # past: (key_0, value_0, key_1, ...) each [B, kv_heads, P, head_dim]. No config:
            # every layer a full (growing) cache, as the runtime's contract has it; sliding
            # layers are windowed by transformers' mask, which reads config.layer_types.
            cache = DynamicCache(ddp_cache_data=list(zip(past[0::2], past[1::2], strict=True)))
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=True,
                return_dict=True,
                **{kwarg: cache},
            )
            present = [
                t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)
            ]
            return (out.logits.float(), *present)

    return _CacheModel().eval()


def _cache_shape(model: Any) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) as the model's own cache holds them after one token.

    Raises:
        UsageError: The model does not return a key/value cache (a recurrent or state-space
            family), so the contract has no past_key_values to feed.
    """
    import torch

    model_type = model.config.model_type
    try:
        with torch.no_grad():
            out = model(input_ids=torch.zeros((1, 2), dtype=torch.long), use_cache=True)
        layers = out.past_key_values.layers
        shapes = {tuple(layer.keys.shape) for layer in layers}
    except (AttributeError, TypeError) as err:
        raise UsageError(
            f"'{model_type}' has no extractor and its model returns no key/value cache for "
            f"torch.onnx to export ({type(err).__name__}: {err})",
            "llmtool exports attention decoders whose transformers model returns a DynamicCache.",
        ) from None
    if len(shapes) != 1:
        raise UsageError(
            f"'{model_type}' has no extractor and its cache layers differ in shape {sorted(shapes)}",
            "llmtool's KV-cache contract needs one shape for every layer.",
        )
    ((_, kv_heads, _, head_dim),) = shapes
    return len(layers), kv_heads, head_dim


def _reason(err: BaseException) -> str:
    """The exporter's reason in one line: the innermost cause's first line."""
    while err.__cause__ is not None:
        err = err.__cause__
    line = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {line}"[:300]


def _name_axes(model: onnx.ModelProto) -> None:
    """Give the graph's dynamic axes the contract's names (the tracer names them s10, s70, ...
    and writes expressions such as ``s69 + s70`` for the present's length)."""
    seq_axes = {"input_ids": "sequence", "position_ids": "sequence", "logits": "sequence"}
    for value in [*model.graph.input, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        name = value.name
        axis1 = seq_axes.get(name) or ("total_sequence" if name == "attention_mask" else None)
        names = {0: "batch", 1: axis1}
        if name.startswith("past_key_values."):
            names[2] = "past_sequence"
        elif name.startswith("present."):
            names[2] = "total_sequence"
        for axis, label in names.items():
            if label is not None and axis < len(dims):
                dims[axis].Clear()
                dims[axis].dim_param = label


# Elementwise ops that ONNX Runtime's CPU provider has no bfloat16 kernel for.
_BF16_ARITHMETIC = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Neg", "Abs", "Sqrt"})


def _widen_bfloat16(model: onnx.ModelProto) -> None:
    """Run the graph's bfloat16 arithmetic in float32, rounding each result back to bfloat16.

    Some modelling code computes a small tensor in bfloat16 on purpose (Falcon's ALiBi: slopes
    times key positions); ONNX Runtime's CPU has no bfloat16 ``Mul``. The product of bfloat16
    values is exact in float32, so float32 arithmetic plus a Cast to bfloat16 (round to nearest
    even) gives torch's numbers.
    """
    bf16 = onnx.TensorProto.BFLOAT16
    graph = model.graph
    casts = any(a.name == "to" and a.i == bf16 for n in graph.node for a in n.attribute)
    if not casts and all(t.data_type != bf16 for t in graph.initializer):
        return
    if model.ByteSize() > defaults.EXTERNAL_DATA_THRESHOLD:
        return  # shape inference needs a proto under 2 GB; ONNX Runtime then says what it lacks
    inferred = onnx.shape_inference.infer_shapes(model).graph
    types = {t.name: t.data_type for t in graph.initializer}
    for v in [*inferred.value_info, *inferred.input, *inferred.output]:
        types[v.name] = v.type.tensor_type.elem_type
    nodes = []
    for node in graph.node:
        if node.op_type not in _BF16_ARITHMETIC or types.get(node.output[0]) != bf16:
            nodes.append(node)
            continue
        for k, name in enumerate(node.input):
            if types.get(name) == bf16:
                wide = f"{node.name}_in{k}_float"
                nodes.append(
                    onnx.helper.make_node("Cast", [name], [wide], to=onnx.TensorProto.FLOAT)
                )
                node.input[k] = wide
        out = node.output[0]
        node.output[0] = f"{node.name}_float"
        nodes.append(node)
        nodes.append(onnx.helper.make_node("Cast", [node.output[0]], [out], to=bf16))
    del graph.node[:]
    graph.node.extend(nodes)


def _trace(model: Any, num_layers: int, kv_heads: int, head_dim: int, opset: int) -> Any:
    """torch.onnx.export(dynamo=True) of the cache wrapper; returns the ModelProto."""
    import torch
    from torch.export import Dim

    names = [f"{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    ids = torch.randint(0, model.config.vocab_size, (_BATCH, _SEQUENCE))
    mask = torch.ones((_BATCH, _PAST + _SEQUENCE), dtype=torch.long)
    positions = torch.arange(_PAST, _PAST + _SEQUENCE)[None].expand(_BATCH, -1)
    past = tuple(torch.zeros(_BATCH, kv_heads, _PAST, head_dim) for _ in names)
    dynamic = Dim.DYNAMIC
    shapes = ({0: dynamic, 1: dynamic},) * 3 + (tuple({0: dynamic, 2: dynamic} for _ in names),)
    program = torch.onnx.export(
        _cache_model(model),
        (ids, mask, positions, past),
        dynamo=True,
        input_names=["input_ids", "attention_mask", "position_ids"]
        + [f"past_key_values.{n}" for n in names],
        output_names=["logits"] + [f"present.{n}" for n in names],
        dynamic_shapes=shapes,
        opset_version=max(opset, MIN_TRACE_OPSET),
        optimize=True,
        verbose=False,
    )
    assert program is not None  # dynamo=True always returns the ONNXProgram
    return program.model_proto


def build_generic(model: Any, dtype: str, opset: int, fmt: WeightFormat) -> BuiltGraph:
    """The standard graph of a transformers causal LM, traced by torch.onnx's dynamo exporter.

    Args:
        model: The loaded transformers ``*ForCausalLM`` (fp32, eval mode).
        dtype: ``fp32`` (refused otherwise by :func:`check_generic`).
        opset: ONNX opset of the graph.
        fmt: Float weights, or ``int8`` / ``int4`` blocks applied after the trace.

    Raises:
        UsageError: The model returns no KV cache, or the exporter cannot trace it (the message
            names the model type and the exporter's reason).
    """
    check_generic(model.config, dtype=dtype)
    model_type = model.config.model_type
    num_layers, kv_heads, head_dim = _cache_shape(model)
    try:
        proto = _trace(model, num_layers, kv_heads, head_dim, opset)
    except Exception as err:  # the exporter raises many types; all mean "cannot trace"
        raise UsageError(
            f"torch.onnx (dynamo) cannot export '{model_type}': {_reason(err)}",
            "this family needs an extractor (llmtool/export/extractors/); report it.",
        ) from None
    _name_axes(proto)
    _widen_bfloat16(proto)
    if fmt.quantize:
        from llmtool.export.quantize import quantize_traced

        proto = quantize_traced(proto, fmt.quantize, fmt.block_size, fmt.symmetric)
    names = [f"{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    io = GraphIO(
        inputs=["input_ids", "attention_mask", "position_ids"]
        + [f"past_key_values.{n}" for n in names],
        outputs=["logits"] + [f"present.{n}" for n in names],
        cache=cache_entries(num_layers, kv_heads, head_dim, dtype),
    )
    config = model.config
    meta = {
        "architecture": type(model).__name__,
        "model_type": model_type,
        "builder": BUILDER,
        "num_layers": num_layers,
        "num_heads": getattr(config, "num_attention_heads", None),
        "num_kv_heads": kv_heads,
        "hidden_size": getattr(config, "hidden_size", None),
        "head_dim": head_dim,
        "vocab_size": int(config.vocab_size),
        "max_positions": getattr(config, "max_position_embeddings", None),
        "features": [],
        "graph_opset": max(opset, MIN_TRACE_OPSET),
    }
    return BuiltGraph(ExportedGraph(proto), io, meta)  # type: ignore[arg-type]
