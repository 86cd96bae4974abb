"""A small ONNX graph builder: nodes, initializers and constants with readable names.

The graph builders (transformer, fused, recurrent) describe a model with it;
:meth:`GraphBuilder.save` writes the model, moving weights to an external data file when they
would not fit in one protobuf.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from llmtool import defaults

NP_TO_ONNX = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.int64): TensorProto.INT64,
    np.dtype(np.int32): TensorProto.INT32,
    np.dtype(np.bool_): TensorProto.BOOL,
    np.dtype(np.uint8): TensorProto.UINT8,
}

Dim = int | str


class GraphBuilder:
    """Collects nodes and initializers for one ONNX graph.

    Args:
        opset: ONNX opset of the default domain.
        name: Graph name.
    """

    def __init__(self, opset: int, name: str = "llmtool") -> None:
        self.opset = opset
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.weights: dict[str, np.ndarray] = {}
        self._constants: dict[tuple[str, bytes, tuple[int, ...]], str] = {}
        self._scope: list[str] = []
        self._counter = 0
        self.domains: dict[str, int] = {}

    # Naming -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def scope(self, name: str) -> Iterator[None]:
        """Prefix node and value names made inside the block with ``name/``."""
        self._scope.append(name)
        try:
            yield
        finally:
            self._scope.pop()

    def fresh_name(self, base: str) -> str:
        """A name no other node or value has: ``scope/base_N`` (N counts every name made)."""
        self._counter += 1
        prefix = "/".join(self._scope)
        return f"{prefix}/{base}_{self._counter}" if prefix else f"{base}_{self._counter}"

    # Graph interface --------------------------------------------------------------------
    def add_input(self, name: str, elem_type: int, shape: Sequence[Dim]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    def add_output(self, value: str, name: str, elem_type: int, shape: Sequence[Dim]) -> None:
        """Expose ``value`` as a graph output called ``name`` (through Identity if renamed)."""
        if value != name:
            self.nodes.append(helper.make_node("Identity", [value], [name], name=f"output/{name}"))
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))

    def weight(self, name: str, array: np.ndarray) -> str:
        """Register a weight initializer (kept as numpy until :meth:`save`)."""
        if name in self.weights:
            raise ValueError(f"duplicate initializer {name}")
        self.weights[name] = np.ascontiguousarray(array)
        return name

    def const(self, value: Any, dtype: Any = np.int64) -> str:
        """A small constant initializer, shared between identical values."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.tobytes(), array.shape)
        if key not in self._constants:
            name = f"const/{array.dtype.name}_{len(self._constants)}"
            self.weights[name] = array
            self._constants[key] = name
        return self._constants[key]

    def op(
        self,
        op_type: str,
        inputs: Sequence[str],
        *,
        outputs: int = 1,
        domain: str = "",
        name: str | None = None,
        names: Sequence[str] | None = None,
        **attrs: Any,
    ) -> Any:
        """Append a node; returns its output name, or a list of names when it has several.

        ``names`` gives the outputs explicit names (graph outputs, or "" for an unused optional
        output); otherwise they are derived from the node name.
        """
        node_name = self.fresh_name(name or op_type)
        outs = list(names) if names is not None else [f"{node_name}/out{i}" for i in range(outputs)]
        if domain:
            self.domains.setdefault(domain, 1)
        self.nodes.append(
            helper.make_node(
                op_type, list(inputs), outs, name=node_name, domain=domain or None, **attrs
            )
        )
        return outs[0] if len(outs) == 1 else outs

    # Common patterns --------------------------------------------------------------------
    def reduce_mean_last(self, x: str) -> str:
        # ReduceMean took `axes` as an attribute before opset 18 and as an input from 18 on.
        if self.opset >= 18:
            return self.op("ReduceMean", [x, self.const([-1])], keepdims=1)
        return self.op("ReduceMean", [x], axes=[-1], keepdims=1)

    def split_last(self, x: str, sizes: Sequence[int]) -> list[str]:
        return self.op("Split", [x, self.const(list(sizes))], outputs=len(sizes), axis=-1)

    # Serialization ----------------------------------------------------------------------
    def weight_bytes(self) -> int:
        return sum(a.nbytes for a in self.weights.values())

    def to_model(self, producer: str, version: str) -> onnx.ModelProto:
        """Assemble a ModelProto with every initializer inline (small models and tests)."""
        inits = [numpy_helper.from_array(a, n) for n, a in self.weights.items()]
        return self._assemble(inits, producer, version)

    def _assemble(
        self, inits: list[onnx.TensorProto], producer: str, version: str
    ) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, self.name, self.inputs, self.outputs, initializer=inits
        )
        imports = [helper.make_opsetid("", self.opset)]
        imports += [helper.make_opsetid(d, v) for d, v in self.domains.items()]
        model = helper.make_model(graph, opset_imports=imports, producer_name=producer)
        model.producer_version = version
        # IR version 8 is read by every onnxruntime release llmtool supports (>= 1.14).
        model.ir_version = min(model.ir_version, 8 if self.opset <= 18 else 9)
        return model

    def save(
        self, path: Path, producer: str, version: str, data_suffix: str = ".data"
    ) -> list[Path]:
        """Write the model to ``path``; returns the files written.

        Weights go to ``<name><data_suffix>`` beside it (transformers.js expects ``_data``) when
        their total exceeds :data:`llmtool.defaults.EXTERNAL_DATA_THRESHOLD` bytes.
        """
        path = Path(path)
        external = self.weight_bytes() > defaults.EXTERNAL_DATA_THRESHOLD
        if not external:
            # Streamed: the graph without initializers, then one ModelProto per initializer.
            # Protobuf merges repeated occurrences of a message field and appends repeated
            # fields, so the file parses as the one model to_model() builds, while only one
            # weight's bytes exist at a time (a whole ModelProto and its serialization would be
            # two more copies of every weight at the export's peak).
            with open(path, "wb") as f:
                f.write(self._assemble([], producer, version).SerializeToString())
                for name, array in self.weights.items():
                    _write_initializer(f, name, array)
            return [path]
        data_path = path.with_name(path.name + data_suffix)
        inits = []
        offset = 0
        with open(data_path, "wb") as f:
            for name, array in self.weights.items():
                if array.nbytes < 1024:
                    inits.append(numpy_helper.from_array(array, name))
                    continue
                pad = (-offset) % 4096  # page-aligned so ORT can mmap the weights
                f.write(b"\0" * pad)
                offset += pad
                f.write(_raw_bytes(array))  # a view: no copy of the weight
                tensor = TensorProto()
                tensor.name = name
                tensor.data_type = NP_TO_ONNX[array.dtype]
                tensor.dims.extend(array.shape)
                tensor.data_location = TensorProto.EXTERNAL
                for key, value in (
                    ("location", data_path.name),
                    ("offset", str(offset)),
                    ("length", str(array.nbytes)),
                ):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = key, value
                inits.append(tensor)
                offset += array.nbytes
        model = self._assemble(inits, producer, version)
        onnx.save_model(model, str(path))
        return [path, data_path]


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, length: int) -> bytes:
    """A length-delimited protobuf field's key and length."""
    return _varint(number << 3 | 2) + _varint(length)


# Initializers of at least this many bytes are written straight from their array.
DIRECT_WRITE_BYTES = 1 << 20
# ModelProto.graph, GraphProto.initializer and TensorProto.raw_data field numbers (onnx.proto).
_MODEL_GRAPH, _GRAPH_INITIALIZER, _TENSOR_RAW_DATA = 7, 5, 9


def _write_initializer(f: Any, name: str, array: np.ndarray) -> None:
    """Append ``ModelProto{graph: {initializer: [tensor]}}`` to ``f``, the tensor's bytes written
    straight from ``array`` (no copy of it is made, however large)."""
    if not array.flags.c_contiguous:  # (np.ascontiguousarray would make a scalar 1-d)
        array = np.ascontiguousarray(array)
    if array.nbytes < DIRECT_WRITE_BYTES or array.dtype not in NP_TO_ONNX:  # through onnx
        tensor = numpy_helper.from_array(array, name)
        f.write(onnx.ModelProto(graph=onnx.GraphProto(initializer=[tensor])).SerializeToString())
        return
    header = TensorProto()
    header.name = name
    header.data_type = NP_TO_ONNX[array.dtype]
    header.dims.extend(array.shape)
    head = header.SerializeToString()
    tensor_len = len(head) + len(_field(_TENSOR_RAW_DATA, array.nbytes)) + array.nbytes
    graph_len = len(_field(_GRAPH_INITIALIZER, tensor_len)) + tensor_len
    f.write(_field(_MODEL_GRAPH, graph_len) + _field(_GRAPH_INITIALIZER, tensor_len) + head)
    f.write(_field(_TENSOR_RAW_DATA, array.nbytes))
    f.write(_raw_bytes(array))


def _raw_bytes(array: np.ndarray) -> memoryview:
    """A C-contiguous array's bytes as ONNX stores them (little-endian), without a copy."""
    if sys.byteorder != "little":  # ONNX raw_data is little-endian
        array = array.astype(array.dtype.newbyteorder("<"))
    return array.reshape(-1).view(np.uint8).data
