"""Request and response bodies: Kit's simple JSON, and the Open Inference Protocol v2 (KServe/Triton)
with its binary tensor data extension. Everything a client sends is checked against the model's
signature here; a mismatch is a :class:`RequestError` (4xx) whose message names what was expected.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import orjson
import torch

from kit.errors import ServingError

V2_TO_NUMPY = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
}
NUMPY_TO_V2 = {np.dtype(v).name: k for k, v in V2_TO_NUMPY.items()}
BINARY_HEADER = "Inference-Header-Content-Length"


class RequestError(ServingError):
    """A client error: ``status`` is the HTTP status, the message says what was expected."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def np_dtype(spec_dtype: str) -> np.dtype:
    try:
        return np.dtype(spec_dtype)
    except TypeError:  # bfloat16 and friends: send float32, converted after
        return np.dtype("float32")


def v2_datatype(spec_dtype: str) -> str:
    return NUMPY_TO_V2.get(np_dtype(spec_dtype).name, "FP32")


def shape_text(spec: Any) -> str:
    return "[" + ", ".join(str(s) for s in spec.shape) + "]"


def expected(sig: Any) -> str:
    ranges = [f"{k} {lo}..{hi}" for k, (lo, hi) in getattr(sig, "dims", {}).items() if k != "batch"]
    return ("inputs " + ", ".join(f"{s.name}: {s.dtype}{shape_text(s)}" for s in sig.inputs)
            + (f" ({', '.join(ranges)})" if ranges else ""))


# which value kinds each dtype kind accepts: ints for floats, never bools for numbers or numbers for bools
_OK_KINDS = {"f": "fiu", "i": "iu", "u": "iu", "b": "b"}


def _fits(kind: str, want: np.dtype) -> bool:
    return kind in _OK_KINDS.get(want.kind, want.kind)


def _static_shape_ok(shape: Any, spec: Any) -> bool:
    return len(shape) == len(spec.shape) and all(isinstance(s, str) or s == d for s, d in zip(spec.shape, shape))


def check_array(arr: np.ndarray, spec: Any, sig: Any, max_rows: int, *, allow_unbatched: bool) -> tuple[np.ndarray, bool]:
    """Check kind, rank, static dims, integer range and finiteness; cast to the spec dtype.
    Returns (array, was_unbatched). Named dims (batch, seq, ...) are checked across inputs by ``check_dims``."""
    want = np_dtype(spec.dtype)
    kind = arr.dtype.kind
    if not _fits(kind, want):
        got = {"b": "true/false", "f": "non-integer"}.get(kind, arr.dtype.name if kind not in "OUS" else "non-numeric")
        hint = " (send true/false)" if want.kind == "b" else ""
        raise RequestError(f"Input {spec.name!r} has {got} values; expected {spec.dtype}{hint}. "
                           f"The model takes {expected(sig)}.")
    unbatched = False
    shape = spec.shape
    if allow_unbatched and arr.ndim == len(shape) - 1 and shape and shape[0] == "batch":
        arr = arr[None]
        unbatched = True
    if not _static_shape_ok(arr.shape, spec):
        raise RequestError(f"Input {spec.name!r} has shape {list(arr.shape)}; expected {shape_text(spec)} "
                           f"(the model takes {expected(sig)}).")
    if want.kind in "iu" and arr.dtype != want and arr.size:
        info = np.iinfo(want)
        if arr.min() < info.min or arr.max() > info.max:
            raise RequestError(f"Input {spec.name!r} has values outside the range of {spec.dtype} "
                               f"({info.min} to {info.max}).")
    with np.errstate(all="ignore"):
        arr = arr.astype(want, copy=False)
    if want.kind == "f" and not np.isfinite(arr).all():
        raise RequestError(f"Input {spec.name!r} holds NaN or infinite values (after conversion to "
                           f"{spec.dtype}); send finite numbers. The model takes {expected(sig)}.")
    return arr, unbatched


def to_tensor(arr: np.ndarray, spec: Any) -> torch.Tensor:
    arr = np.ascontiguousarray(arr)
    if not arr.flags.writeable:  # a view of the request body (binary data): torch wants its own copy
        arr = arr.copy()
    t = torch.from_numpy(arr)
    want = getattr(torch, spec.dtype, None)
    if isinstance(want, torch.dtype) and t.dtype != want:
        t = t.to(want)
    return t


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


def _nested_to_array(value: Any, spec: Any, sig: Any, bools: bool = False) -> np.ndarray:
    """``bools``: the body has a true/false somewhere, so look for them mixed into numbers."""
    if not isinstance(value, list):
        raise RequestError(f"Input {spec.name!r} must be a nested list of numbers; expected {shape_text(spec)} "
                           f"{spec.dtype} (the model takes {expected(sig)}).")
    try:
        with np.errstate(all="ignore"):
            arr = np.asarray(value)
    except (ValueError, TypeError, OverflowError) as exc:
        raise RequestError(f"Input {spec.name!r} is not a regular nested list of numbers ({str(exc)[:120]}); "
                           f"expected {shape_text(spec)} {spec.dtype}.") from exc
    if arr.dtype.kind not in "biuf":
        raise RequestError(f"Input {spec.name!r} holds non-numeric or ragged values; expected "
                           f"{shape_text(spec)} {spec.dtype} (the model takes {expected(sig)}).")
    if bools and arr.dtype.kind != "b" and _has_bool(value):
        raise RequestError(f"Input {spec.name!r} mixes true/false with numbers; send only numbers for "
                           f"{spec.dtype} (the model takes {expected(sig)}).")
    return arr


def loads(body: bytes, sig: Any, example: str) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise RequestError(f"The body is not valid JSON ({str(exc)[:160]}). Expected {example}; "
                           f"the model takes {expected(sig)}.") from exc


def predict_example(sig: Any) -> str:
    if len(sig.inputs) == 1:
        return '{"inputs": [[...], ...]}'
    return '{"inputs": {' + ", ".join(f'"{s.name}": [[...]]' for s in sig.inputs) + "}}"


def parse_predict(body: bytes, sig: Any, max_rows: int) -> tuple[tuple[torch.Tensor, ...], bool]:
    """``{"inputs": nested list}`` (or ``{"inputs": {name: nested list}}``) -> tensors, unbatched flag."""
    doc = loads(body, sig, predict_example(sig))
    if not isinstance(doc, dict) or "inputs" not in doc:
        raise RequestError(f"Expected a JSON object {predict_example(sig)}; the model takes {expected(sig)}.")
    inputs = doc["inputs"]
    if isinstance(inputs, dict):
        names = [s.name for s in sig.inputs]
        if sorted(inputs) != sorted(names):
            raise RequestError(f"Inputs named {sorted(inputs)[:8]}; expected exactly {names} "
                               f"(the model takes {expected(sig)}).")
        values = [inputs[n] for n in names]
    elif len(sig.inputs) == 1:
        values = [inputs]
    else:
        raise RequestError(f"This model has {len(sig.inputs)} inputs: send {predict_example(sig)}.")
    arrays, flags = [], []
    bools = b"true" in body or b"false" in body
    for spec, value in zip(sig.inputs, values):
        arr, unb = check_array(_nested_to_array(value, spec, sig, bools), spec, sig, max_rows, allow_unbatched=True)
        arrays.append(arr)
        flags.append(unb)
    check_dims(arrays, sig, max_rows)
    return tuple(to_tensor(a, s) for a, s in zip(arrays, sig.inputs)), all(flags)


def check_dims(arrays: list[np.ndarray], sig: Any, max_rows: int) -> None:
    """Every named dim (batch, seq, ...) agrees across inputs and lies in its range (400 naming it)."""
    batched = [a for a, s in zip(arrays, sig.inputs) if s.shape and s.shape[0] == "batch"]
    if len({a.shape[0] for a in batched}) > 1:
        raise RequestError(f"Inputs have different row counts {[a.shape[0] for a in batched]}; every input "
                           f"needs the same batch size ({expected(sig)}).")
    if batched and not 1 <= batched[0].shape[0] <= max_rows:
        raise RequestError(f"The request has {batched[0].shape[0]} rows; send 1 to {max_rows} rows per request.")
    try:
        sig.dim_values([a.shape for a in arrays])
    except ValueError as exc:
        raise RequestError(f"{exc} (the model takes {expected(sig)}).") from exc


def output_names(sig: Any, n: int) -> list[str]:
    return [s.name for s in sig.outputs] if len(sig.outputs) == n else [f"output_{i}" for i in range(n)]


def predict_response(outputs: tuple[torch.Tensor, ...], sig: Any, unbatched: bool, model: str,
                     version: int) -> bytes:
    """``{"outputs": ...}``: one array for one output, else ``{name: array}`` (always so for dict models)."""
    arrays = [o.detach().cpu().numpy() for o in outputs]
    if unbatched:
        arrays = [a[0] for a in arrays]
    if len(arrays) == 1 and getattr(sig, "output_kind", "tuple") != "dict":
        out: Any = arrays[0]
    else:
        out = dict(zip(output_names(sig, len(arrays)), arrays))
    return orjson.dumps({"outputs": out, "model": model, "model_version": version},
                        option=orjson.OPT_SERIALIZE_NUMPY)


# --------------------------------------------------------------------------- Open Inference Protocol v2


def _v2_header(body: bytes, header_length: str | None, sig: Any) -> tuple[Any, bytes]:
    if header_length is None:
        return loads(body, sig, '{"inputs": [{"name", "shape", "datatype", "data"}]}'), b""
    try:
        n = int(header_length)
    except ValueError as exc:
        raise RequestError(f"{BINARY_HEADER} must be an integer, got {header_length[:20]!r}.") from exc
    if not 0 <= n <= len(body):
        raise RequestError(f"{BINARY_HEADER} is {n} but the body has {len(body)} bytes.")
    return loads(body[:n], sig, "a JSON inference header"), body[n:]


def parse_v2_infer(body: bytes, header_length: str | None, sig: Any, max_rows: int
                   ) -> tuple[tuple[torch.Tensor, ...], dict[str, Any]]:
    """A v2 inference request -> (tensors in signature order, request doc). Everything is checked before
    the forward pass, requested output names included."""
    doc, binary = _v2_header(body, header_length, sig)
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list):
        raise RequestError('Expected a v2 inference request {"inputs": [{"name", "shape", "datatype", "data"}]}; '
                           f"the model takes {expected(sig)}.")
    requested_outputs(doc, sig)
    by_name: dict[str, np.ndarray] = {}
    offset = 0
    specs = {s.name: s for s in sig.inputs}
    bools = b"true" in body or b"false" in body
    for i, inp in enumerate(doc["inputs"]):
        if not isinstance(inp, dict):
            raise RequestError(f"inputs[{i}] must be an object with name, shape, datatype and data.")
        name = inp.get("name")
        if not isinstance(name, str) or name not in specs:
            raise RequestError(f"inputs[{i}] is named {str(name)[:40]!r}; expected {sorted(specs)} "
                               f"(the model takes {expected(sig)}).")
        if name in by_name:
            raise RequestError(f"Input {name!r} is given twice; send each of {sorted(specs)} once.")
        arr, size = _v2_input(inp, specs[name], sig, binary, offset, bools)
        offset += size
        by_name[name] = check_array(arr, specs[name], sig, max_rows, allow_unbatched=False)[0]
    if offset != len(binary):
        raise RequestError(f"{len(binary) - offset} bytes of binary data are not claimed by any input's "
                           "binary_data_size.")
    missing = [n for n in specs if n not in by_name]
    if missing:
        raise RequestError(f"Missing input(s) {missing}; the model takes {expected(sig)}.")
    arrays = [by_name[s.name] for s in sig.inputs]
    check_dims(arrays, sig, max_rows)
    return tuple(to_tensor(a, s) for a, s in zip(arrays, sig.inputs)), doc


def _v2_input(inp: dict[str, Any], spec: Any, sig: Any, binary: bytes, offset: int, bools: bool
              ) -> tuple[np.ndarray, int]:
    """One v2 input -> (array, binary bytes it used). The shape is checked against the signature before
    anything is sized from it (a shape whose product overflows int64 is a 400, not a 500)."""
    name, shape, dt = spec.name, inp.get("shape"), inp.get("datatype")
    if (not isinstance(shape, list) or len(shape) > 8
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in shape)):
        raise RequestError(f"Input {name!r}: shape must be a list of non-negative integers; "
                           f"expected {shape_text(spec)}.")
    if not _static_shape_ok(shape, spec):
        raise RequestError(f"Input {name!r} has shape {shape}; expected {shape_text(spec)} "
                           f"(the model takes {expected(sig)}).")
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
    arr = _nested_to_array(data, spec, sig, bools)
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


def requested_outputs(doc: dict[str, Any], sig: Any) -> dict[str, bool] | None:
    """``{output name: binary?}`` for the outputs a v2 request names (None: all); unknown names are a 400."""
    if not isinstance(doc.get("outputs"), list):
        return None
    names = output_names(sig, len(sig.outputs))
    raw_params = doc.get("parameters")
    all_binary = bool(raw_params.get("binary_data_output", False)) if isinstance(raw_params, dict) else False
    requested: dict[str, bool] = {}
    for o in doc["outputs"]:
        if not isinstance(o, dict) or o.get("name") not in names:
            raise RequestError(f"Requested output {str(o)[:60]} is not one of {names}.")
        raw_p = o.get("parameters")
        p: dict[str, Any] = raw_p if isinstance(raw_p, dict) else {}
        requested[o["name"]] = bool(p.get("binary_data", all_binary))
    return requested


def v2_response(outputs: tuple[torch.Tensor, ...], sig: Any, doc: dict[str, Any], model: str,
                version: int) -> tuple[bytes, int | None]:
    """The v2 response body and, when any output is binary, the JSON header length."""
    names = output_names(sig, len(outputs))
    raw_params = doc.get("parameters")
    all_binary = bool(raw_params.get("binary_data_output", False)) if isinstance(raw_params, dict) else False
    requested = requested_outputs(doc, sig)
    outs, blobs = [], []
    for name, t in zip(names, outputs):
        if requested is not None and name not in requested:
            continue
        arr = np.ascontiguousarray(t.detach().cpu().numpy())
        entry: dict[str, Any] = {"name": name, "datatype": NUMPY_TO_V2.get(arr.dtype.name, "FP32"),
                                 "shape": list(arr.shape)}
        if (requested or {}).get(name, all_binary):
            raw = arr.tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = arr.reshape(-1)
        outs.append(entry)
    resp: dict[str, Any] = {"model_name": model, "model_version": str(version), "outputs": outs}
    if isinstance(doc.get("id"), str):
        resp["id"] = doc["id"]
    head = orjson.dumps(resp, option=orjson.OPT_SERIALIZE_NUMPY)
    if blobs:
        return head + b"".join(blobs), len(head)
    return head, None


def v2_metadata(model: str, sig: Any, versions: list[int]) -> dict[str, Any]:
    """v2 model metadata: every dynamic dim (batch, seq, an expression of them) is -1."""
    def spec(s: Any) -> dict[str, Any]:
        return {"name": s.name, "datatype": v2_datatype(s.dtype),
                "shape": [-1 if isinstance(d, str) else d for d in s.shape]}

    return {"name": model, "versions": [str(v) for v in versions], "platform": "pytorch_torch_export",
            "inputs": [spec(s) for s in sig.inputs], "outputs": [spec(s) for s in sig.outputs]}
