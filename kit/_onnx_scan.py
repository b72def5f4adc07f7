"""Check a ``model.onnx`` before onnxruntime opens it: which files its tensors would read.

An ONNX tensor may keep its bytes in an external file named by a path inside the model
(``external_data`` ``location``); onnxruntime resolves it against the model's folder. A crafted model
could name ``../../etc/shadow`` or a huge device file. :func:`check_onnx` walks the protobuf wire format
(no onnx, no torch: a worker serving with onnxruntime imports neither) and refuses every external
location but ``model.onnx.data``, offsets and lengths past that file's end, and sizes over the limit.

Messages walked (field numbers from onnx.proto3): ModelProto.graph 7, .functions 25; GraphProto.node 1,
.initializer 5, .sparse_initializer 15; FunctionProto.node 7; NodeProto.attribute 5; AttributeProto.t 5,
.g 6, .tensors 10, .graphs 11, .sparse_tensor 22, .sparse_tensors 23; SparseTensorProto.values 1,
.indices 2; TensorProto.external_data 13 (StringStringEntryProto key 1, value 2), .data_location 14.
"""

from __future__ import annotations

import mmap
from pathlib import Path

from kit.artifacts import Limits
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


def _fields(buf: memoryview, pos: int, end: int):
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
    return files
