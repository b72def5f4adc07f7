"""kit.serving.protocol (numpy arrays in and out, never torch) for any model: named dims with ranges, integer and bool inputs, dict outputs, and
the red-team defects of issue 9 (each refused with a 400 before any forward pass)."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from kit.serving.http import status_of
from kit.serving.protocol import RequestError, parse_predict, parse_v2_infer, predict_response, v2_metadata, v2_response
from kit.signature import Signature, TensorSpec

TEXT = Signature(
    inputs=(TensorSpec("ids", "int64", ("batch", "seq")), TensorSpec("mask", "bool", ("batch", "seq"))),
    outputs=(TensorSpec("logits", "float32", ("batch", 3)), TensorSpec("score", "float32", ("batch",))),
    max_batch=64, dims={"batch": (1, 64), "seq": (2, 16)}, output_kind="dict",
)
IMAGE = Signature(inputs=(TensorSpec("x", "float32", ("batch", "h", 16, 2)),),
                  outputs=(TensorSpec("y", "float32", ("batch",)),), dims={"batch": (1, 64), "h": (1, 8)})


def _predict(doc: object, sig: Signature = TEXT) -> tuple[tuple[np.ndarray, ...], bool]:
    return parse_predict(orjson.dumps(doc), sig, 64)


def _v2(inputs: list[dict], sig: Signature = TEXT, binary: bytes = b"", **extra: object):
    head = orjson.dumps({"inputs": inputs, **extra})
    return parse_v2_infer(head + binary, str(len(head)) if binary else None, sig, 64)


def _refused(fn, *args, match: str, **kw) -> RequestError:
    with pytest.raises(RequestError, match=match) as ei:
        fn(*args, **kw)
    assert status_of(ei.value) == 400
    return ei.value


def test_predict_takes_int_ids_and_bool_masks_at_any_seq_in_range():
    for seq in (2, 7, 16):
        (ids, mask), unbatched = _predict({"inputs": {"ids": [[1] * seq, [2] * seq],
                                                       "mask": [[True] * seq, [False] * seq]}})
        assert ids.dtype == np.int64 and mask.dtype == np.bool_ and ids.shape == (2, seq) and not unbatched
    (ids, _), unbatched = _predict({"inputs": {"ids": [1, 2, 3], "mask": [True, True, False]}})
    assert unbatched and ids.shape == (1, 3)


def test_a_seq_outside_the_range_or_disagreeing_is_a_400_naming_it():
    _refused(_predict, {"inputs": {"ids": [[1] * 17], "mask": [[True] * 17]}},
             match=r"'ids' dim 1 \(seq\) is 17; this model accepts seq from 2 to 16")
    _refused(_predict, {"inputs": {"ids": [[1] * 4], "mask": [[True] * 5]}}, match="disagree on seq")
    _refused(_v2, [{"name": "ids", "shape": [1, 1], "datatype": "INT64", "data": [1]},
                   {"name": "mask", "shape": [1, 1], "datatype": "BOOL", "data": [True]}],
             match="accepts seq from 2 to 16")


def test_bools_mixed_into_numbers_and_numbers_for_bools_are_refused():
    _refused(_predict, {"inputs": {"ids": [[1, True, 3]], "mask": [[True, True, True]]}}, match="mixes true/false")
    _refused(_predict, {"inputs": {"ids": [[1, 2, 3]], "mask": [[1, 0, 1]]}}, match="expected bool")
    _refused(_predict, {"inputs": {"ids": [[1.5, 2, 3]], "mask": [[True] * 3]}}, match="non-integer")
    _refused(_predict, {"inputs": [[[True, 0.5] * 8] * 3]}, IMAGE, match="mixes true/false")
    _refused(_predict, {"inputs": [[[True, False] * 8] * 3]}, IMAGE, match="true/false values; expected float32")
    _refused(_v2, [{"name": "x", "shape": [1, 1, 16, 2], "datatype": "FP32", "data": [True] * 32}], IMAGE,
             match="datatype FP32 but the data holds true/false")


def test_integers_outside_the_input_dtype_are_refused():
    sig = Signature(inputs=(TensorSpec("ids", "int32", ("batch", 2)),), outputs=(TensorSpec("y", "float32", ("batch",)),))
    _refused(_predict, {"inputs": [[1, 2**40]]}, sig, match=r"outside the range of int32")
    (ids,), _ = _predict({"inputs": [[1, 2**30]]}, sig)
    assert ids.dtype == np.int32


def test_v2_shape_that_overflows_int64_is_a_400_not_a_500():
    big = [2**30, 2**30, 16, 2]
    err = _refused(_v2, [{"name": "x", "shape": big, "datatype": "FP32", "parameters": {"binary_data_size": 0}}],
                   IMAGE, binary=b"", match="binary_data_size is 0 bytes")
    assert str(2**65 * 4) in str(err)
    # the digits-like case: a rank the model does not take is refused before anything is sized from it
    _refused(_v2, [{"name": "x", "shape": big[:3], "datatype": "FP32", "parameters": {"binary_data_size": 0}}],
             IMAGE, match="has shape")


def test_duplicate_v2_inputs_and_string_binary_sizes_are_refused_clearly():
    ids = {"name": "ids", "shape": [1, 2], "datatype": "INT64", "data": [1, 2]}
    mask = {"name": "mask", "shape": [1, 2], "datatype": "BOOL", "data": [True, False]}
    _refused(_v2, [ids, mask, {**ids, "data": [3, 4]}], match="'ids' is given twice")
    raw = np.array([[1, 2]], dtype=np.int64).tobytes()
    _refused(_v2, [{**ids, "parameters": {"binary_data_size": str(len(raw))}, "data": None}, mask],
             binary=raw, match=r"binary_data_size must be a non-negative integer \(a byte count\), got str '16'")


def test_unknown_requested_outputs_are_refused_before_the_forward_pass():
    ids = {"name": "ids", "shape": [1, 2], "datatype": "INT64", "data": [1, 2]}
    mask = {"name": "mask", "shape": [1, 2], "datatype": "BOOL", "data": [True, False]}
    _refused(_v2, [ids, mask], outputs=[{"name": "nope"}], match="Requested output")
    tensors, doc = _v2([ids, mask], outputs=[{"name": "score"}])
    assert [t.dtype for t in tensors] == [np.int64, np.bool_]


def test_v2_binary_int_and_bool_inputs():
    ids = np.array([[3, 4, 5]], dtype=np.int64)
    mask = np.array([[True, False, True]])
    (t_ids, t_mask), _ = _v2([
        {"name": "ids", "shape": [1, 3], "datatype": "INT64", "parameters": {"binary_data_size": ids.nbytes}},
        {"name": "mask", "shape": [1, 3], "datatype": "BOOL", "parameters": {"binary_data_size": mask.nbytes}},
    ], binary=ids.tobytes() + mask.tobytes())
    assert t_ids.tolist() == [[3, 4, 5]] and t_mask.tolist() == [[True, False, True]]


def test_dict_outputs_keep_their_names_and_metadata_shows_dynamic_dims():
    outs = (np.ones((2, 3), np.float32), np.zeros(2, np.float32))
    body = orjson.loads(predict_response(outs, TEXT, False, "m", 1))
    assert list(body["outputs"]) == ["logits", "score"]
    one = Signature(inputs=TEXT.inputs, outputs=TEXT.outputs[:1], dims=TEXT.dims, output_kind="dict")
    assert list(orjson.loads(predict_response(outs[:1], one, False, "m", 1))["outputs"]) == ["logits"]
    data, _ = v2_response(outs, TEXT, {"outputs": [{"name": "score"}]}, "m", 1)
    assert [o["name"] for o in orjson.loads(data)["outputs"]] == ["score"]
    meta = v2_metadata("m", TEXT, [1])
    assert meta["inputs"][0]["shape"] == [-1, -1] and meta["outputs"][0]["shape"] == [-1, 3]


# The batching rule (never join different seq) is tested on the engine: tests/unit/test_engine.py.
