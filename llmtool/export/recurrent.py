"""The ONNX graph of a recurrent LM (:mod:`llmtool.models.recurrent`): the state is the cache.

  inputs   input_ids [batch, sequence] int64
           attention_mask [batch, total_sequence] int64 (its last ``sequence`` columns belong
               to these tokens; 0 = padding, where the state is left unchanged)
           past_state.{i}.h (and .c for an LSTM) [batch, hidden] float32
  outputs  logits [batch, sequence, vocab] float32
           present_state.{i}.h (and .c) [batch, hidden] float32

Each layer is one ONNX ``Scan`` over time whose body is the cell: the input projection of all
steps is one MatMul outside the loop, the body adds the recurrent projection, applies the gates
and keeps the old state (``Where``) at masked steps. ONNX's own LSTM / RNN operators cannot skip
steps in the middle or at the start of a row (their ``sequence_lens`` only covers right padding),
which left-padded batches need. The state stays float32 whatever the export dtype; fp16 exports
store the weights in fp16 and compute in float32.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from onnx import TensorProto, helper

from llmtool.export.contract import (
    FLOAT_TYPES,
    BuiltGraph,
    GraphIO,
    WeightFormat,
    state_cache_entries,
)
from llmtool.export.graph import GraphBuilder
from llmtool.export.weights import to_numpy


class _RecurrentGraph:
    def __init__(self, model: Any, dtype: str, opset: int) -> None:
        self.model = model
        self.config = model.config
        self.dtype = dtype
        self.np_float = FLOAT_TYPES[dtype][0]
        self.g = GraphBuilder(opset, name=self.config.model_type)

    def weight(self, name: str, array: np.ndarray) -> str:
        """A weight stored in the export dtype, used as float32."""
        w = self.g.weight(name, array.astype(self.np_float))
        return w if self.dtype == "fp32" else self.g.op("Cast", [w], to=TensorProto.FLOAT)

    def cell_body(self, layer: int, recurrent_w: str) -> Any:
        """The Scan body of one layer: (state..., x_proj_t, mask_t) -> (state..., h_t).

        The body reads its weights and constants from the outer graph by name.
        """
        lstm = self.config.cell == "lstm"
        names = self.config.state_names
        body = GraphBuilder(self.g.opset, name=f"layer{layer}_step")
        prefix = f"layer{layer}/step"
        old = {n: f"{prefix}/{n}_in" for n in names}
        x_t, m_t = f"{prefix}/x_proj_t", f"{prefix}/mask_t"
        width = (4 if lstm else 1) * self.config.hidden_size
        inputs = [
            *(
                helper.make_tensor_value_info(old[n], TensorProto.FLOAT, ["batch", None])
                for n in names
            ),
            helper.make_tensor_value_info(x_t, TensorProto.FLOAT, ["batch", width]),
            helper.make_tensor_value_info(m_t, TensorProto.BOOL, ["batch", 1]),
        ]
        with body.scope(prefix):
            gates = body.op("Add", [x_t, body.op("MatMul", [old["h"], recurrent_w])])  # [B, 4H]
            if lstm:
                # PyTorch's gate order: input, forget, cell, output.
                sizes = self.g.const([self.config.hidden_size] * 4)  # an outer-graph constant
                i, f, g, o = body.op("Split", [gates, sizes], outputs=4, axis=-1)
                c = body.op(
                    "Add",
                    [
                        body.op("Mul", [body.op("Sigmoid", [f]), old["c"]]),
                        body.op("Mul", [body.op("Sigmoid", [i]), body.op("Tanh", [g])]),
                    ],
                )
                h = body.op("Mul", [body.op("Sigmoid", [o]), body.op("Tanh", [c])])
                new = {"h": h, "c": c}
            else:
                new = {"h": body.op("Tanh", [gates])}
            kept = {n: body.op("Where", [m_t, new[n], old[n]], name=f"keep_{n}") for n in names}
            out_t = body.op("Identity", [kept["h"]], name="h_t")
        outputs = [
            *(
                helper.make_tensor_value_info(kept[n], TensorProto.FLOAT, ["batch", None])
                for n in names
            ),
            helper.make_tensor_value_info(out_t, TensorProto.FLOAT, ["batch", None]),
        ]
        assert not body.weights, "Scan bodies take their weights from the outer graph"
        return helper.make_graph(body.nodes, f"layer{layer}_step", inputs, outputs)

    def build(self) -> tuple[GraphBuilder, GraphIO]:
        g, c, rnn = self.g, self.config, self.model.rnn
        g.add_input("input_ids", TensorProto.INT64, ["batch", "sequence"])
        g.add_input("attention_mask", TensorProto.INT64, ["batch", "total_sequence"])
        cache = state_cache_entries(c.num_layers, c.hidden_size, c.state_names)
        for entry in cache:
            g.add_input(entry["input"], TensorProto.FLOAT, entry["shape"])

        with g.scope("embed"):
            embed = self.weight("embed_tokens.weight", to_numpy(self.model.embed_tokens.weight))
            x = g.op("Gather", [embed, "input_ids"], axis=0)  # [B, S, H]
        with g.scope("mask"):
            # The last `sequence` columns of the mask, as [B, S, 1] bool (scanned over axis 1).
            length = g.op("Shape", ["input_ids"], start=1, end=2)
            big = g.const([np.iinfo(np.int64).max])
            mask = g.op("Slice", ["attention_mask", g.op("Neg", [length]), big, g.const([1])])
            mask = g.op("Unsqueeze", [g.op("Cast", [mask], to=TensorProto.BOOL), g.const([2])])
        for layer in range(c.num_layers):
            with g.scope(f"layer{layer}"):
                w_ih = to_numpy(getattr(rnn, f"weight_ih_l{layer}"))  # [4H or H, H]
                w_hh = to_numpy(getattr(rnn, f"weight_hh_l{layer}"))
                bias = to_numpy(getattr(rnn, f"bias_ih_l{layer}")) + to_numpy(
                    getattr(rnn, f"bias_hh_l{layer}")
                )
                x_proj = g.op(
                    "Add",
                    [
                        g.op("MatMul", [x, self.weight(f"layer{layer}.w_ih", w_ih.T)]),
                        self.weight(f"layer{layer}.bias", bias),
                    ],
                )  # [B, S, 4H]: every step's input projection at once
                recurrent_w = self.weight(f"layer{layer}.w_hh", w_hh.T)  # [H, 4H]
                states = [f"past_state.{layer}.{n}" for n in c.state_names]
                outs = g.op(
                    "Scan",
                    [*states, x_proj, mask],
                    outputs=len(states) + 1,
                    body=self.cell_body(layer, recurrent_w),
                    num_scan_inputs=2,
                    scan_input_axes=[1, 1],
                    scan_output_axes=[1],
                )
                for name, value in zip(c.state_names, outs[:-1], strict=True):
                    g.add_output(
                        value,
                        f"present_state.{layer}.{name}",
                        TensorProto.FLOAT,
                        ["batch", c.hidden_size],
                    )
                x = outs[-1]  # [B, S, H]
        with g.scope("lm_head"):
            table = (
                embed
                if c.tie_word_embeddings
                else self.weight("lm_head.weight", to_numpy(self.model.lm_head.weight))
            )
            bias = self.weight("lm_head.bias", to_numpy(self.model.lm_head.bias))
            # Gemm with transB reads the [V, H] table in place, so a tied head costs no copy.
            flat = g.op("Reshape", [x, g.const([-1, c.hidden_size])])
            logits = g.op("Gemm", [flat, table, bias], transB=1)  # [B*S, V]
            shape = g.op("Concat", [g.op("Shape", ["input_ids"]), g.const([c.vocab_size])], axis=0)
            logits = g.op("Reshape", [logits, shape])  # [B, S, V]
        # The graph's outputs: logits first, then the states in cache order.
        present = g.outputs
        g.outputs = []
        g.add_output(logits, "logits", TensorProto.FLOAT, ["batch", "sequence", c.vocab_size])
        g.outputs += present
        io = GraphIO(
            inputs=[i.name for i in g.inputs],
            outputs=[o.name for o in g.outputs],
            cache=cache,
        )
        return g, io


def build_recurrent_graph(
    model: Any, dtype: str, opset: int, fmt: WeightFormat | None = None
) -> BuiltGraph:
    """LSTM and Elman RNN language models trained by ``llmtool train``.

    Args:
        model: A :class:`~llmtool.models.recurrent.RecurrentLM`.
        dtype: ``fp32`` or ``fp16`` weights (the state stays float32).
        opset: ONNX opset.
        fmt: Unused: recurrent graphs keep float weights (the registry refuses ``--quantize``).
    """
    c = model.config
    graph, io = _RecurrentGraph(model, dtype, opset).build()
    meta = {
        "architecture": c.cell,
        "model_type": c.model_type,
        "num_layers": c.num_layers,
        "hidden_size": c.hidden_size,
        "vocab_size": c.vocab_size,
        "max_positions": None,
    }
    return BuiltGraph(graph, io, meta)
