"""The typed export→runtime contract (Manifest, CacheSpec) and the row padding, without a model."""

import numpy as np
import pytest

from llmtool.errors import UsageError
from llmtool.manifest import CacheSpec, Manifest
from llmtool.runtime.decoders import cache_length, empty_cache, mask_positions, pad_rows

KV = {
    "input": "past_key_values.0.key",
    "output": "present.0.key",
    "shape": ["batch", 2, "past_sequence", 8],
    "dtype": "float16",
    "sequence_axis": 2,
}
STATE = {
    "input": "past_state.0.h",
    "output": "present_state.0.h",
    "shape": ["batch", 10],
    "dtype": "float32",
    "sequence_axis": None,
}


def manifest(**fields):
    base = {"model_file": "model.onnx", "vocab_size": 50, "cache": [KV, STATE]}
    return {**base, **fields}


def test_cache_spec_shapes_and_bytes():
    kv, state = (CacheSpec.from_entry(e) for e in (KV, STATE))
    assert kv.name == kv.past == "past_key_values.0.key" and kv.present == "present.0.key"
    assert kv.shape(3, 7) == [3, 2, 7, 8] and kv.nbytes(3, 7) == 3 * 2 * 7 * 8 * 2
    assert kv.nbytes(3, 7, itemsize=4) == 3 * 2 * 7 * 8 * 4
    assert state.shape(3, 7) == [3, 10] and state.nbytes(3, 7) == 3 * 10 * 4
    assert (kv.sequence_axis, state.sequence_axis) == (2, None)
    # Entries without sequence_axis (older exports) find it from the shape.
    old = CacheSpec.from_entry({k: v for k, v in KV.items() if k != "sequence_axis"})
    assert old.sequence_axis == 2
    cache = empty_cache([kv, state], 2)
    assert cache[kv.name].shape == (2, 2, 0, 8) and cache[kv.name].dtype == np.float16
    assert cache[state.name].shape == (2, 10) and not cache[state.name].any()


def test_padding_side_from_the_manifest_or_the_layout():
    assert Manifest.from_dict(manifest(layout="fused", padding="right")).padding == "right"
    # Exports written before the padding field: the layout decides.
    assert Manifest.from_dict(manifest(layout="fused")).padding == "right"
    assert Manifest.from_dict(manifest()).padding == "left"
    m = Manifest.from_dict(manifest(max_positions=128))
    assert m.layout == "standard" and m.max_positions == 128 and len(m.cache) == 2
    assert m.raw["vocab_size"] == m.vocab_size == 50


def without(raw, key):
    return {k: v for k, v in raw.items() if k != key}


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (manifest(cache=[{**KV, "dtype": "int8"}]), "cache dtype"),
        (manifest(padding="middle"), "padding side"),
        (without(manifest(), "vocab_size"), "lacks the field 'vocab_size'"),
    ],
)
def test_unusable_manifests_are_refused(raw, match):
    with pytest.raises(UsageError, match=match):
        Manifest.from_dict(raw)


def test_pad_rows_on_either_side():
    ids, mask = pad_rows([[5, 6, 7], [8]], "left", pad_id=1)
    assert ids.tolist() == [[5, 6, 7], [1, 1, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert mask_positions(mask).tolist() == [[0, 1, 2], [0, 0, 0]]
    ids, mask = pad_rows([[5, 6, 7], [8]], "right")
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert ids.dtype == mask.dtype == np.int64


def test_cache_length_rounds_up_within_the_context():
    class Model:
        max_positions: int | None = None

    model = Model()
    assert cache_length(model, 1) == 64 and cache_length(model, 65) == 128
    model.max_positions = 100
    assert cache_length(model, 65) == 100
