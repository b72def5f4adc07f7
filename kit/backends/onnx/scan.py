"""Check a ``model.onnx`` before onnxruntime opens it: which files its tensors would read.

An ONNX tensor may keep its bytes in an external file named by a path inside the model
(``external_data`` ``location``); onnxruntime resolves it against the model's folder. A crafted model
could name ``../../etc/shadow`` or a huge device file. :func:`check_onnx` walks the protobuf wire format
(no onnx, no torch: a worker serving with onnxruntime imports neither) and refuses every external
location but ``model.onnx.data``, offsets and lengths past that file's end, and sizes over the limit.
:func:`generator_problem` bounds the nodes that make a tensor from sizes (``ConstantOfShape``, ``Expand``,
``Tile``, ``Range``, ``Resize``, ``Upsample``, ``Pad``, ``RandomNormal``/``RandomUniform``) when those sizes
are constants of the model (initializers, ``Constant`` nodes, attributes): a 100-byte model asking for
``ConstantOfShape([20000, 20000])`` is refused before onnxruntime opens it. Sizes the graph computes from
its inputs' shapes at run time (``Shape`` -> ``Concat`` -> ``Expand``, as torch.onnx writes for a dynamic
batch) are not bounded here: onnxruntime computes them from request shapes, which the signature bounds.

Messages walked (field numbers from onnx.proto3): ModelProto.graph 7, .functions 25; GraphProto.node 1,
.initializer 5, .sparse_initializer 15; FunctionProto.node 7; NodeProto.attribute 5; AttributeProto.t 5,
.g 6, .tensors 10, .graphs 11, .sparse_tensor 22, .sparse_tensors 23; SparseTensorProto.values 1,
.indices 2; TensorProto.external_data 13 (StringStringEntryProto key 1, value 2), .data_location 14.
For sizes: NodeProto.input 1, .output 2, .op_type 4; AttributeProto.name 1, .t 5, .ints 8; TensorProto.dims 1,
.data_type 2, .float_data 4, .int32_data 5, .int64_data 7, .name 8, .raw_data 9.
"""

from __future__ import annotations

import math
import mmap
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kit.backends.checks import Limits, tensor_limit
from kit.errors import UnsafeArtifactError
from kit.version_files import ONNX_DATA_FILE

_MAX_DEPTH = 64
_FIX = "Register the model again with kit (capture writes model.onnx itself)."

# message kind -> {field number: child kind}; "tensor" is a leaf handled by _tensor
_CHILDREN = {
    "model": {7: "graph", 25: "function"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "function": {7: "node"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
}


class _Bad(Exception):
    pass


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Bad("a truncated or overlong varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf: memoryview, pos: int, end: int) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value or (start, stop) of a length-delimited field) of one message."""
    while pos < end:
        key, pos = _varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos, end)
            yield field, wire, value
        elif wire == 2:
            n, pos = _varint(buf, pos, end)
            if pos + n > end:
                raise _Bad("a field runs past its message")
            yield field, wire, (pos, pos + n)
            pos += n
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
            if pos > end:
                raise _Bad("a fixed-size field runs past its message")
        else:
            raise _Bad(f"wire type {wire} (groups are not ONNX)")


def _tensor(buf: memoryview, start: int, stop: int) -> tuple[bool, dict[str, str]]:
    """(data_location is EXTERNAL, external_data entries) of one TensorProto."""
    external, entries = False, {}
    for field, wire, value in _fields(buf, start, stop):
        if field == 14 and wire == 0:
            external = value == 1
        elif field == 13 and wire == 2:
            kv = {f: bytes(buf[v[0]:v[1]]).decode("utf-8", "replace")
                  for f, w, v in _fields(buf, *value) if w == 2 and f in (1, 2)}
            entries[kv.get(1, "")] = kv.get(2, "")
    return external, entries


def _walk(buf: memoryview, kind: str, start: int, stop: int, depth: int, found: list[dict[str, str]]) -> None:
    if depth > _MAX_DEPTH:
        raise _Bad(f"subgraphs nested deeper than {_MAX_DEPTH}")
    children = _CHILDREN[kind]
    for field, wire, value in _fields(buf, start, stop):
        child = children.get(field)
        if child is None or wire != 2:
            continue
        if child == "tensor":
            external, entries = _tensor(buf, *value)
            if external or entries:
                found.append(entries)
        else:
            _walk(buf, child, value[0], value[1], depth + 1, found)


# op_type -> positions of its inputs that hold sizes; "count": a Range's (start, limit, delta)
_SIZE_INPUTS = {"ConstantOfShape": (0,), "Expand": (1,), "Tile": (1,), "Pad": (1,), "Resize": (2, 3),
                "Upsample": (1,), "Range": (0, 1, 2)}
_SHAPE_ATTRIBUTE = frozenset({"RandomNormal", "RandomUniform"})
_MAX_SIZE_VALUES = 64  # a size tensor longer than this is no shape


def _ints(buf: memoryview, wire: int, value: Any) -> list[int]:
    """A repeated int field's values: packed (wire 2) or one (wire 0); two's complement int64."""
    if wire == 0:
        raw = [int(value)]
    else:
        raw, pos, stop = [], value[0], value[1]
        while pos < stop:
            v, pos = _varint(buf, pos, stop)
            raw.append(v)
    return [v - (1 << 64) if v >= 1 << 63 else v for v in raw]


def _text(buf: memoryview, span: tuple[int, int]) -> str:
    return bytes(buf[span[0]:span[1]]).decode("utf-8", "replace")


def _tensor_values(buf: memoryview, start: int, stop: int) -> tuple[str, list[float] | None]:
    """(name, values) of a small numeric TensorProto; values None when it is not one Kit can read here."""
    name, dtype, raw = "", 1, None
    nums: list[float] = []
    for field, wire, value in _fields(buf, start, stop):
        if field == 8 and wire == 2:
            name = _text(buf, value)
        elif field == 2 and wire == 0:
            dtype = value
        elif field == 9 and wire == 2:
            raw = bytes(buf[value[0]:value[1]])
        elif field in (5, 7) and wire in (0, 2):
            nums += _ints(buf, wire, value)
        elif field == 4 and wire == 2:
            nums += struct.unpack(f"<{(value[1] - value[0]) // 4}f", buf[value[0]:value[0] + (value[1] - value[0]) // 4 * 4])
    fmt = {1: "f", 6: "i", 7: "q", 11: "d"}.get(dtype)
    if raw is not None:
        if fmt is None or len(raw) > 8 * _MAX_SIZE_VALUES:
            return name, None
        nums = list(struct.unpack(f"<{len(raw) // struct.calcsize(fmt)}{fmt}", raw[:len(raw) // struct.calcsize(fmt) * struct.calcsize(fmt)]))
    return name, nums if len(nums) <= _MAX_SIZE_VALUES else None


def _node(buf: memoryview, start: int, stop: int) -> tuple[str, list[str], list[str], dict[str, list[float] | None]]:
    """(op_type, inputs, outputs, {attribute: values}) of a NodeProto (attributes: tensor values, ints)."""
    op, inputs, outputs = "", [], []
    attrs: dict[str, list[float] | None] = {}
    for field, wire, value in _fields(buf, start, stop):
        if wire == 2 and field == 1:
            inputs.append(_text(buf, value))
        elif wire == 2 and field == 2:
            outputs.append(_text(buf, value))
        elif wire == 2 and field == 4:
            op = _text(buf, value)
        elif field == 5 and wire == 2:
            name, vals = "", None
            for f, w, v in _fields(buf, *value):
                if f == 1 and w == 2:
                    name = _text(buf, v)
                elif f == 5 and w == 2:
                    vals = _tensor_values(buf, *v)[1]
                elif f == 8:
                    vals = (vals or []) + _ints(buf, w, v)
            attrs[name] = vals
    return op, inputs, outputs, attrs


def _elements(op: str, sizes: list[list[float]]) -> float:
    if op == "Range":
        start, limit, delta = (s[0] if s else 0 for s in sizes)
        return abs(limit - start) / abs(delta) + 1 if delta else 1.0
    if op == "Pad":
        return math.prod(abs(v) + 1 for s in sizes for v in s)
    return math.prod(max(abs(v), 1) for s in sizes for v in s)


def generator_problem(path: Path, limit: int) -> str | None:
    """Why a node of ``path`` would make a tensor over ``limit`` bytes from constant sizes, or None."""
    constants: dict[str, list[float] | None] = {}
    generators: list[tuple[str, list[str], dict[str, list[float] | None]]] = []
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        buf = memoryview(mm)
        try:
            graphs = [v for field, wire, v in _fields(buf, 0, len(buf)) if field == 7 and wire == 2]
            while graphs:
                for field, wire, value in _fields(buf, *graphs.pop()):
                    if wire != 2:
                        continue
                    if field == 5:
                        name, vals = _tensor_values(buf, *value)
                        constants[name] = vals
                    elif field == 1:
                        op, ins, outs, attrs = _node(buf, *value)
                        if op == "Constant" and outs:
                            constants[outs[0]] = attrs.get("value", attrs.get("value_ints"))
                        if op in _SIZE_INPUTS or op in _SHAPE_ATTRIBUTE:
                            generators.append((op, ins, attrs))
                        graphs += list(_node_subgraphs(buf, *value))
        except _Bad as exc:
            raise UnsafeArtifactError(f"Refusing to load {path}: it is not a well-formed ONNX model ({exc}). {_FIX}") from None
        finally:
            buf.release()
    for op, ins, attrs in generators:
        if op in _SHAPE_ATTRIBUTE:
            sizes = [attrs.get("shape")]
        else:
            sizes = [constants.get(ins[i]) if i < len(ins) and ins[i] else [] for i in _SIZE_INPUTS[op]]
        if any(s is None for s in sizes):
            continue  # computed at run time from the inputs' shapes
        n = _elements(op, sizes) * 4  # type: ignore[arg-type]
        if n > limit:
            return f"its {op} node would make a tensor of about {n:.3g} bytes from sizes in the model, over the limit of {limit}"
    return None


def _node_subgraphs(buf: memoryview, start: int, stop: int) -> Iterator[tuple[int, int]]:
    """The span of every subgraph (If/Loop/Scan bodies) in a NodeProto's attributes."""
    for field, wire, value in _fields(buf, start, stop):
        if field == 5 and wire == 2:
            yield from (v for f, w, v in _fields(buf, *value) if f in (6, 11) and w == 2)


def external_tensors(path: Path) -> list[dict[str, str]]:
    """The ``external_data`` entries (``location``, ``offset``, ``length``) of every external tensor."""
    found: list[dict[str, str]] = []
    with open(path, "rb") as f:
        if Path(path).stat().st_size == 0:
            raise UnsafeArtifactError(f"Refusing to load {path}: it is empty. {_FIX}")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            buf = memoryview(mm)
            try:
                _walk(buf, "model", 0, len(buf), 0, found)
            except _Bad as exc:
                raise UnsafeArtifactError(f"Refusing to load {path}: it is not a well-formed ONNX model "
                                          f"({exc}). {_FIX}") from None
            finally:
                buf.release()
    return found


def check_onnx(path: Path, limits: Limits) -> list[Path]:
    """Refuse a ``model.onnx`` that would read any file but ``model.onnx.data`` beside it, or more than
    ``limits.max_bytes``; returns the files onnxruntime will read."""
    path = Path(path)
    data = path.parent / ONNX_DATA_FILE
    files = [path]
    size = path.stat().st_size
    entries = external_tensors(path)
    data_size = data.stat().st_size if entries and data.is_file() else 0
    for e in entries:
        where = e.get("location", "")
        if where != ONNX_DATA_FILE:
            raise UnsafeArtifactError(
                f"Refusing to load {path}: a tensor keeps its data in {where!r}; the only external data "
                f"file Kit allows is {ONNX_DATA_FILE!r} beside it. {_FIX}")
        try:
            offset, length = int(e.get("offset", "0")), int(e.get("length", str(data_size)))
        except ValueError:
            raise UnsafeArtifactError(f"Refusing to load {path}: an external tensor has offset "
                                      f"{e.get('offset')!r} / length {e.get('length')!r}. {_FIX}") from None
        if offset < 0 or length < 0 or offset + length > data_size:
            raise UnsafeArtifactError(
                f"Refusing to load {path}: an external tensor reads bytes {offset}..{offset + length} of "
                f"{ONNX_DATA_FILE} ({data_size} bytes{'' if data.is_file() else ', missing'}). {_FIX}")
    if entries:
        files.append(data)
        size += data_size
    if size > limits.max_bytes:
        raise UnsafeArtifactError(
            f"Refusing to load {path}: {size} bytes of ONNX model exceed the limit of {limits.max_bytes}. "
            "Raise [model] max_artifact_bytes if the model is that large.")
    problem = generator_problem(path, tensor_limit(limits, size))
    if problem:
        raise UnsafeArtifactError(f"Refusing to load {path}: {problem}. Raise [model] max_tensor_bytes (0 derives "
                                  "it from the model's size) if the model needs that.")
    return files
