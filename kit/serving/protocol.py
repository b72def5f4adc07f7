"""Request and response bodies: Kit's simple JSON, and the Open Inference Protocol v2 (KServe/Triton)
with its binary tensor data extension. Everything a client sends is checked against the model's
signature here; a mismatch is a :class:`RequestError` (a 400) whose message names what was expected.

Requests become numpy arrays (the signature's dtype, C-contiguous) and responses are built from numpy
arrays, whichever backend serves (torch or onnxruntime): this module never imports torch. What a check
needs from a signature (dtypes, static dims, integer bounds, named-dim ranges, names, the texts of the
error messages) is prepared once per loaded version by :func:`compile_signature`; a request only reads it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from kit._types import JSONObject
from kit.backends import BACKENDS, DEFAULT
from kit.errors import ServingError
from kit.signature import Signature, TensorSpec

V2_TO_NUMPY = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
}
NUMPY_TO_V2 = {np.dtype(v).name: k for k, v in V2_TO_NUMPY.items()}
BINARY_HEADER = "Inference-Header-Content-Length"


class RequestError(ServingError):
    """A request the service cannot take (a client error: :data:`kit.serving.http.STATUS`); the message says
    what was expected."""


def np_dtype(spec_dtype: str) -> np.dtype:
    """The numpy dtype a request's values take: float32 for a dtype numpy lacks (bfloat16 and friends),
    converted by the backend's forward -- also once ml_dtypes (which onnx imports) has taught numpy the name."""
    try:
        dt = np.dtype(spec_dtype)
    except TypeError:
        return np.dtype("float32")
    return dt if dt.type.__module__ == "numpy" else np.dtype("float32")


def v2_datatype(spec_dtype: str) -> str:
    return NUMPY_TO_V2.get(np_dtype(spec_dtype).name, "FP32")


def shape_text(spec: TensorSpec) -> str:
    return "[" + ", ".join(str(s) for s in spec.shape) + "]"


def expected(sig: Signature) -> str:
    ranges = [f"{k} {lo}..{hi}" for k, (lo, hi) in getattr(sig, "dims", {}).items() if k != "batch"]
    return ("inputs " + ", ".join(f"{s.name}: {s.dtype}{shape_text(s)}" for s in sig.inputs)
            + (f" ({', '.join(ranges)})" if ranges else ""))


def predict_example(sig: Signature) -> str:
    if len(sig.inputs) == 1:
        return '{"inputs": [[...], ...]}'
    return '{"inputs": {' + ", ".join(f'"{s.name}": [[...]]' for s in sig.inputs) + "}}"


def output_names(sig: Signature, n: int) -> list[str]:
    return [s.name for s in sig.outputs] if len(sig.outputs) == n else [f"output_{i}" for i in range(n)]


# which value kinds each dtype kind accepts: ints for floats, never bools for numbers or numbers for bools
_OK_KINDS = {"f": "fiu", "i": "iu", "u": "iu", "b": "b"}


def _fits(kind: str, want: np.dtype) -> bool:
    return kind in _OK_KINDS.get(want.kind, want.kind)


@dataclass(frozen=True)
class InputPlan:
    """One input, prepared once: what a request's array is checked against."""

    spec: TensorSpec
    dtype: np.dtype  # what the backend receives
    kinds: str  # value kinds accepted (numpy dtype kinds)
    rank: int
    static: tuple[tuple[int, int], ...]  # (dim index, size) of every fixed dim
    batched: bool  # dim 0 is "batch" (a request may then leave it out on /predict)
    bounds: tuple[int, int] | None  # integer dtypes: the range a value must lie in
    text: str  # the shape as the error messages write it


@dataclass(frozen=True)
class CompiledSignature:
    """A signature prepared once per loaded version (:func:`compile_signature`), so that parsing a request
    does no name->spec lookups and builds no message text unless it refuses the request."""

    sig: Signature
    inputs: tuple[InputPlan, ...]
    index: dict[str, int]  # input name -> position
    names: list[str]  # input names in signature order
    batched: tuple[int, ...]  # positions of the inputs whose dim 0 is "batch"
    named: tuple[tuple[int, int, str, int, int], ...]  # (input, dim, name, lo, hi) of every named dim
    expected: str  # "inputs x: float32[batch, 64]": what every refusal names
    example: str  # the /predict body for this model
    outputs: list[str]  # output names in signature order
    unwrap_single: bool  # one output and not a dict model: /predict answers a bare array


def _plan(spec: TensorSpec) -> InputPlan:
    want = np_dtype(spec.dtype)
    bounds = (int(np.iinfo(want).min), int(np.iinfo(want).max)) if want.kind in "iu" else None
    return InputPlan(spec=spec, dtype=want, kinds=_OK_KINDS.get(want.kind, want.kind), rank=len(spec.shape),
                     static=tuple((i, d) for i, d in enumerate(spec.shape) if not isinstance(d, str)),
                     batched=bool(spec.shape) and spec.shape[0] == "batch", bounds=bounds, text=shape_text(spec))


def compile_signature(sig: Signature | CompiledSignature) -> CompiledSignature:
    """Prepare ``sig`` for the request path (done once per loaded version, off the request path)."""
    if isinstance(sig, CompiledSignature):
        return sig
    named = tuple((i, d, name, *sig.dim_range(name)) for i, spec in enumerate(sig.inputs)
                  for d, name in spec.named_dims())
    return CompiledSignature(
        sig=sig, inputs=tuple(_plan(s) for s in sig.inputs), index={s.name: i for i, s in enumerate(sig.inputs)},
        names=[s.name for s in sig.inputs],
        batched=tuple(i for i, s in enumerate(sig.inputs) if s.shape and s.shape[0] == "batch"),
        named=named, expected=expected(sig), example=predict_example(sig), outputs=output_names(sig, len(sig.outputs)),
        unwrap_single=len(sig.outputs) == 1 and getattr(sig, "output_kind", "tuple") != "dict")


def check_array(arr: np.ndarray, p: InputPlan, cs: CompiledSignature, *, allow_unbatched: bool
                ) -> tuple[np.ndarray, bool]:
    """Check kind, rank, static dims, integer range and finiteness; cast to the input's dtype (C-contiguous).
    Returns (array, was_unbatched). Named dims (batch, seq, ...) are checked across inputs by ``check_dims``."""
    spec = p.spec
    kind = arr.dtype.kind
    if kind not in p.kinds:
        got = {"b": "true/false", "f": "non-integer"}.get(kind, arr.dtype.name if kind not in "OUS" else "non-numeric")
        hint = " (send true/false)" if p.dtype.kind == "b" else ""
        raise RequestError(f"Input {spec.name!r} has {got} values; expected {spec.dtype}{hint}. "
                           f"The model takes {cs.expected}.")
    unbatched = False
    if allow_unbatched and p.batched and arr.ndim == p.rank - 1:
        arr = arr[None]
        unbatched = True
    shape = arr.shape
    if len(shape) != p.rank or any(shape[i] != d for i, d in p.static):
        raise RequestError(f"Input {spec.name!r} has shape {list(shape)}; expected {p.text} "
                           f"(the model takes {cs.expected}).")
    if arr.dtype != p.dtype:
        if p.bounds is not None and arr.size and (arr.min() < p.bounds[0] or arr.max() > p.bounds[1]):
            raise RequestError(f"Input {spec.name!r} has values outside the range of {spec.dtype} "
                               f"({p.bounds[0]} to {p.bounds[1]}).")
        with np.errstate(all="ignore"):
            arr = arr.astype(p.dtype)
    if p.dtype.kind == "f" and not np.isfinite(arr).all():
        raise RequestError(f"Input {spec.name!r} holds NaN or infinite values (after conversion to "
                           f"{spec.dtype}); send finite numbers. The model takes {cs.expected}.")
    if not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr)
    return arr, unbatched


def check_dims(arrays: list[np.ndarray], cs: CompiledSignature, max_rows: int) -> None:
    """Every named dim (batch, seq, ...) agrees across inputs and lies in its range (400 naming it)."""
    rows = -1
    for i in cs.batched:
        n = arrays[i].shape[0]
        if rows == -1:
            rows = n
        elif n != rows:
            raise RequestError(f"Inputs have different row counts {[arrays[j].shape[0] for j in cs.batched]}; "
                               f"every input needs the same batch size ({cs.expected}).")
    if rows != -1 and not 1 <= rows <= max_rows:
        raise RequestError(f"The request has {rows} rows; send 1 to {max_rows} rows per request.")
    seen: dict[str, int] = {}
    for i, d, name, lo, hi in cs.named:
        v = arrays[i].shape[d]
        if seen.setdefault(name, v) != v or not lo <= v <= hi:
            try:  # the signature's own check words the refusal (which dim, which inputs, the range)
                cs.sig.dim_values([a.shape for a in arrays])
            except ValueError as exc:
                raise RequestError(f"{exc} (the model takes {cs.expected}).") from exc
            raise RequestError(f"Input {cs.names[i]!r} dim {d} ({name}) is {v}; the model takes {cs.expected}.")


def _has_bool(value: Any) -> bool:
    """True when a nested list holds a JSON true/false anywhere (numpy would read it as 1/0)."""
    stack = [value]
    while stack:
        lst = stack.pop()
        for x in lst:
            if type(x) is bool:
                return True
            if type(x) is list:
                stack.append(x)
    return False


def _nested_to_array(value: Any, p: InputPlan, cs: CompiledSignature, bools: bool = False) -> np.ndarray:
    """``bools``: the body has a true/false somewhere, so look for them mixed into numbers."""
    spec = p.spec
    if not isinstance(value, list):
        raise RequestError(f"Input {spec.name!r} must be a nested list of numbers; expected {p.text} "
                           f"{spec.dtype} (the model takes {cs.expected}).")
    try:
        with np.errstate(all="ignore"):
            arr = np.asarray(value)
    except (ValueError, TypeError, OverflowError) as exc:
        raise RequestError(f"Input {spec.name!r} is not a regular nested list of numbers ({str(exc)[:120]}); "
                           f"expected {p.text} {spec.dtype}.") from exc
    if arr.dtype.kind not in "biuf":
        raise RequestError(f"Input {spec.name!r} holds non-numeric or ragged values; expected "
                           f"{p.text} {spec.dtype} (the model takes {cs.expected}).")
    if bools and arr.dtype.kind != "b" and _has_bool(value):
        raise RequestError(f"Input {spec.name!r} mixes true/false with numbers; send only numbers for "
                           f"{spec.dtype} (the model takes {cs.expected}).")
    return arr


def loads(body: bytes, cs: CompiledSignature, example: str) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise RequestError(f"The body is not valid JSON ({str(exc)[:160]}). Expected {example}; "
                           f"the model takes {cs.expected}.") from exc


def parse_predict(body: bytes, sig: Signature | CompiledSignature, max_rows: int) -> tuple[tuple[np.ndarray, ...], bool]:
    """``{"inputs": nested list}`` (or ``{"inputs": {name: nested list}}``) -> arrays, unbatched flag.
    ``sig``: a :class:`CompiledSignature` (a plain signature is compiled first, for callers off the hot path)."""
    cs = compile_signature(sig)
    doc = loads(body, cs, cs.example)
    if not isinstance(doc, dict) or "inputs" not in doc:
        raise RequestError(f"Expected a JSON object {cs.example}; the model takes {cs.expected}.")
    inputs = doc["inputs"]
    if isinstance(inputs, dict):
        if len(inputs) != len(cs.names) or any(n not in cs.index for n in inputs):
            raise RequestError(f"Inputs named {sorted(inputs)[:8]}; expected exactly {cs.names} "
                               f"(the model takes {cs.expected}).")
        values = [inputs[n] for n in cs.names]
    elif len(cs.names) == 1:
        values = [inputs]
    else:
        raise RequestError(f"This model has {len(cs.names)} inputs: send {cs.example}.")
    arrays, unbatched = [], True
    bools = b"true" in body or b"false" in body
    for p, value in zip(cs.inputs, values):
        arr, unb = check_array(_nested_to_array(value, p, cs, bools), p, cs, allow_unbatched=True)
        arrays.append(arr)
        unbatched = unbatched and unb
    check_dims(arrays, cs, max_rows)
    return tuple(arrays), unbatched


def predict_response(outputs: tuple[np.ndarray, ...], sig: Signature | CompiledSignature, unbatched: bool, model: str,
                     version: int) -> bytes:
    """``{"outputs": ...}``: one array for one output, else ``{name: array}`` (always so for dict models)."""
    cs = compile_signature(sig)
    arrays = [a[0] for a in outputs] if unbatched else list(outputs)
    arrays = [a if a.flags.c_contiguous else np.ascontiguousarray(a) for a in arrays]
    if len(arrays) == 1 and cs.unwrap_single:
        out: np.ndarray | dict[str, np.ndarray] = arrays[0]
    else:
        names = cs.outputs if len(cs.outputs) == len(arrays) else output_names(cs.sig, len(arrays))
        out = dict(zip(names, arrays))
    return orjson.dumps({"outputs": out, "model": model, "model_version": version},
                        option=orjson.OPT_SERIALIZE_NUMPY)


# --------------------------------------------------------------------------- Open Inference Protocol v2


def _v2_header(body: bytes, header_length: str | None, cs: CompiledSignature) -> tuple[Any, bytes]:
    if header_length is None:
        return loads(body, cs, '{"inputs": [{"name", "shape", "datatype", "data"}]}'), b""
    try:
        n = int(header_length)
    except ValueError as exc:
        raise RequestError(f"{BINARY_HEADER} must be an integer, got {header_length[:20]!r}.") from exc
    if not 0 <= n <= len(body):
        raise RequestError(f"{BINARY_HEADER} is {n} but the body has {len(body)} bytes.")
    return loads(body[:n], cs, "a JSON inference header"), body[n:]


def parse_v2_infer(body: bytes, header_length: str | None, sig: Signature | CompiledSignature, max_rows: int
                   ) -> tuple[tuple[np.ndarray, ...], JSONObject]:
    """A v2 inference request -> (arrays in signature order, request doc). Everything is checked before
    the forward pass, requested output names included. Binary tensor data stays a read-only view of the
    body when its dtype is already the input's (the backend's forward copes: see kit.serving.slots)."""
    cs = compile_signature(sig)
    doc, binary = _v2_header(body, header_length, cs)
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list):
        raise RequestError('Expected a v2 inference request {"inputs": [{"name", "shape", "datatype", "data"}]}; '
                           f"the model takes {cs.expected}.")
    requested_outputs(doc, cs)
    arrays: list[Any] = [None] * len(cs.inputs)
    offset = 0
    bools = b"true" in body or b"false" in body
    for i, inp in enumerate(doc["inputs"]):
        if not isinstance(inp, dict):
            raise RequestError(f"inputs[{i}] must be an object with name, shape, datatype and data.")
        name = inp.get("name")
        k = cs.index.get(name) if isinstance(name, str) else None
        if k is None:
            raise RequestError(f"inputs[{i}] is named {str(name)[:40]!r}; expected {sorted(cs.names)} "
                               f"(the model takes {cs.expected}).")
        if arrays[k] is not None:
            raise RequestError(f"Input {name!r} is given twice; send each of {sorted(cs.names)} once.")
        arr, size = _v2_input(inp, cs.inputs[k], cs, binary, offset, bools)
        offset += size
        arrays[k] = check_array(arr, cs.inputs[k], cs, allow_unbatched=False)[0]
    if offset != len(binary):
        raise RequestError(f"{len(binary) - offset} bytes of binary data are not claimed by any input's "
                           "binary_data_size.")
    missing = [n for n, a in zip(cs.names, arrays) if a is None]
    if missing:
        raise RequestError(f"Missing input(s) {missing}; the model takes {cs.expected}.")
    check_dims(arrays, cs, max_rows)
    return tuple(arrays), doc


def _v2_input(inp: JSONObject, p: InputPlan, cs: CompiledSignature, binary: bytes, offset: int, bools: bool
              ) -> tuple[np.ndarray, int]:
    """One v2 input -> (array, binary bytes it used). The shape is checked against the signature before
    anything is sized from it (a shape whose product overflows int64 is a 400, not a 500)."""
    spec = p.spec
    name, shape, dt = spec.name, inp.get("shape"), inp.get("datatype")
    if (not isinstance(shape, list) or len(shape) > 8
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in shape)):
        raise RequestError(f"Input {name!r}: shape must be a list of non-negative integers; expected {p.text}.")
    if len(shape) != p.rank or any(shape[i] != d for i, d in p.static):
        raise RequestError(f"Input {name!r} has shape {shape}; expected {p.text} (the model takes {cs.expected}).")
    if dt not in V2_TO_NUMPY:
        raise RequestError(f"Input {name!r}: datatype {str(dt)[:20]!r} is not supported; expected "
                           f"{v2_datatype(spec.dtype)} ({spec.dtype}).")
    npdt = np.dtype(V2_TO_NUMPY[dt])
    count = math.prod(shape)  # exact (Python ints): bounded below by the body's size or the data's length
    params = inp.get("parameters") or {}
    if not isinstance(params, dict):
        raise RequestError(f"Input {name!r}: parameters must be an object.")
    size = params.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise RequestError(f"Input {name!r}: binary_data_size must be a non-negative integer (a byte count), "
                               f"got {type(size).__name__} {str(size)[:20]!r}.")
        if offset + size > len(binary):
            raise RequestError(f"Input {name!r}: binary_data_size {size} does not fit the "
                               f"{len(binary) - offset} binary bytes left in the body.")
        if size != count * npdt.itemsize:
            raise RequestError(f"Input {name!r}: binary_data_size is {size} bytes but shape {shape} of "
                               f"{dt} needs {count * npdt.itemsize}.")
        return np.frombuffer(binary, dtype=npdt, count=count, offset=offset).reshape(shape), size
    data = inp.get("data")
    if not isinstance(data, list):
        raise RequestError(f"Input {name!r}: needs \"data\" (a flat or nested list) or binary data.")
    arr = _nested_to_array(data, p, cs, bools)
    if arr.size != count:
        raise RequestError(f"Input {name!r}: {arr.size} values for shape {shape} (needs {count}).")
    if arr.size and not _fits(arr.dtype.kind, npdt):
        raise RequestError(f"Input {name!r}: datatype {dt} but the data holds "
                           f"{'true/false' if arr.dtype.kind == 'b' else arr.dtype.name} values.")
    try:
        with np.errstate(all="ignore"):
            return arr.astype(npdt).reshape(shape), 0
    except (ValueError, TypeError, OverflowError) as exc:
        raise RequestError(f"Input {name!r}: cannot read the data as {dt} ({str(exc)[:80]}).") from exc


def _binary_output_default(doc: JSONObject) -> bool:
    raw = doc.get("parameters")
    return bool(raw.get("binary_data_output", False)) if isinstance(raw, dict) else False


def requested_outputs(doc: JSONObject, sig: Signature | CompiledSignature) -> dict[str, bool] | None:
    """``{output name: binary?}`` for the outputs a v2 request names (None: all); unknown names are a 400."""
    if not isinstance(doc.get("outputs"), list):
        return None
    names = compile_signature(sig).outputs
    all_binary = _binary_output_default(doc)
    requested: dict[str, bool] = {}
    for o in doc["outputs"]:
        if not isinstance(o, dict) or o.get("name") not in names:
            raise RequestError(f"Requested output {str(o)[:60]} is not one of {names}.")
        raw_p = o.get("parameters")
        p: JSONObject = raw_p if isinstance(raw_p, dict) else {}
        requested[o["name"]] = bool(p.get("binary_data", all_binary))
    return requested


def v2_response(outputs: tuple[np.ndarray, ...], sig: Signature | CompiledSignature, doc: JSONObject, model: str,
                version: int) -> tuple[bytes, int | None]:
    """The v2 response body and, when any output is binary, the JSON header length."""
    cs = compile_signature(sig)
    names = cs.outputs if len(cs.outputs) == len(outputs) else output_names(cs.sig, len(outputs))
    all_binary = _binary_output_default(doc)
    requested = requested_outputs(doc, cs)
    outs, blobs = [], []
    for name, arr in zip(names, outputs):
        if requested is not None and name not in requested:
            continue
        if not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr)
        entry: JSONObject = {"name": name, "datatype": NUMPY_TO_V2.get(arr.dtype.name, "FP32"),
                                 "shape": list(arr.shape)}
        if (requested or {}).get(name, all_binary):
            raw = arr.tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = arr.reshape(-1)
        outs.append(entry)
    resp: JSONObject = {"model_name": model, "model_version": str(version), "outputs": outs}
    if isinstance(doc.get("id"), str):
        resp["id"] = doc["id"]
    head = orjson.dumps(resp, option=orjson.OPT_SERIALIZE_NUMPY)
    if blobs:
        return head + b"".join(blobs), len(head)
    return head, None


PLATFORMS = {b.name: b.platform for b in BACKENDS.values()}  # as Triton names them


def v2_metadata(model: str, sig: Signature, versions: list[int], backend: str = DEFAULT) -> JSONObject:
    """v2 model metadata: every dynamic dim (batch, seq, an expression of them) is -1."""
    def spec(s: TensorSpec) -> JSONObject:
        return {"name": s.name, "datatype": v2_datatype(s.dtype),
                "shape": [-1 if isinstance(d, str) else d for d in s.shape]}

    return {"name": model, "versions": [str(v) for v in versions], "platform": PLATFORMS.get(backend, backend),
            "inputs": [spec(s) for s in sig.inputs], "outputs": [spec(s) for s in sig.outputs]}
