"""Request and response bodies: Kit's simple JSON, and the Open Inference Protocol v2 (KServe/Triton)
with its binary tensor data extension. Everything a client sends is checked against the model's
signature here; a mismatch is a :class:`RequestError` (4xx) whose message names what was expected.
"""

from __future__ import annotations

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
    return "inputs " + ", ".join(f"{s.name}: {s.dtype}{shape_text(s)}" for s in sig.inputs)


def check_array(arr: np.ndarray, spec: Any, sig: Any, max_rows: int, *, allow_unbatched: bool) -> tuple[np.ndarray, bool]:
    """Check kind, shape and finiteness; cast to the spec dtype. Returns (array, was_unbatched)."""
    want = np_dtype(spec.dtype)
    kind = arr.dtype.kind
    ok_kinds = {"f": "fiu", "i": "iu", "u": "u", "b": "b"}.get(want.kind, want.kind)
    if kind not in ok_kinds or (want.kind in "iu" and kind == "b"):
        raise RequestError(f"Input {spec.name!r} has {arr.dtype.name if kind not in 'OUS' else 'non-numeric'} "
                           f"values; expected {spec.dtype}. The model takes {expected(sig)}.")
    unbatched = False
    shape = spec.shape
    if allow_unbatched and arr.ndim == len(shape) - 1 and shape and shape[0] == "batch":
        arr = arr[None]
        unbatched = True
    if arr.ndim != len(shape) or any(s != "batch" and s != d for s, d in zip(shape, arr.shape)):
        raise RequestError(f"Input {spec.name!r} has shape {list(arr.shape)}; expected {shape_text(spec)} "
                           f"(the model takes {expected(sig)}).")
    if shape and shape[0] == "batch" and not 1 <= arr.shape[0] <= max_rows:
        raise RequestError(f"Input {spec.name!r} has {arr.shape[0]} rows; send 1 to {max_rows} rows per request.")
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


def _nested_to_array(value: Any, spec: Any, sig: Any) -> np.ndarray:
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
    for spec, value in zip(sig.inputs, values):
        arr, unb = check_array(_nested_to_array(value, spec, sig), spec, sig, max_rows, allow_unbatched=True)
        arrays.append(arr)
        flags.append(unb)
    _same_rows(arrays, sig)
    return tuple(to_tensor(a, s) for a, s in zip(arrays, sig.inputs)), all(flags)


def _same_rows(arrays: list[np.ndarray], sig: Any) -> None:
    if len({a.shape[0] for a in arrays}) > 1:
        raise RequestError(f"Inputs have different row counts {[a.shape[0] for a in arrays]}; every input "
                           f"needs the same batch size ({expected(sig)}).")


def predict_response(outputs: tuple[torch.Tensor, ...], sig: Any, unbatched: bool, model: str,
                     version: int) -> bytes:
    arrays = [o.detach().cpu().numpy() for o in outputs]
    if unbatched:
        arrays = [a[0] for a in arrays]
    if len(arrays) == 1:
        out: Any = arrays[0]
    else:
        names = [s.name for s in sig.outputs] if len(sig.outputs) == len(arrays) else [f"output_{i}" for i in range(len(arrays))]
        out = dict(zip(names, arrays))
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
    """A v2 inference request -> (tensors in signature order, request doc)."""
    doc, binary = _v2_header(body, header_length, sig)
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list):
        raise RequestError('Expected a v2 inference request {"inputs": [{"name", "shape", "datatype", "data"}]}; '
                           f"the model takes {expected(sig)}.")
    by_name: dict[str, np.ndarray] = {}
    offset = 0
    specs = {s.name: s for s in sig.inputs}
    for i, inp in enumerate(doc["inputs"]):
        if not isinstance(inp, dict):
            raise RequestError(f"inputs[{i}] must be an object with name, shape, datatype and data.")
        name, shape, dt = inp.get("name"), inp.get("shape"), inp.get("datatype")
        if not isinstance(name, str) or name not in specs:
            raise RequestError(f"inputs[{i}] is named {str(name)[:40]!r}; expected {sorted(specs)} "
                               f"(the model takes {expected(sig)}).")
        spec = specs[name]
        if (not isinstance(shape, list) or len(shape) > 8
                or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in shape)):
            raise RequestError(f"Input {name!r}: shape must be a list of non-negative integers; "
                               f"expected {shape_text(spec)}.")
        if dt not in V2_TO_NUMPY:
            raise RequestError(f"Input {name!r}: datatype {str(dt)[:20]!r} is not supported; expected "
                               f"{v2_datatype(spec.dtype)} ({spec.dtype}).")
        npdt = np.dtype(V2_TO_NUMPY[dt])
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        params = inp.get("parameters") or {}
        if not isinstance(params, dict):
            raise RequestError(f"Input {name!r}: parameters must be an object.")
        size = params.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(binary):
                raise RequestError(f"Input {name!r}: binary_data_size {str(size)[:20]} does not fit the "
                                   f"{len(binary) - offset} binary bytes left in the body.")
            if size != count * npdt.itemsize:
                raise RequestError(f"Input {name!r}: binary_data_size is {size} bytes but shape {shape} of "
                                   f"{dt} needs {count * npdt.itemsize}.")
            arr = np.frombuffer(binary, dtype=npdt, count=count, offset=offset).reshape(shape)
            offset += size
        else:
            data = inp.get("data")
            if not isinstance(data, list):
                raise RequestError(f"Input {name!r}: needs \"data\" (a flat or nested list) or binary data.")
            arr = _nested_to_array(data, spec, sig)
            if arr.size != count:
                raise RequestError(f"Input {name!r}: {arr.size} values for shape {shape} (needs {count}).")
            try:
                with np.errstate(all="ignore"):
                    arr = arr.astype(npdt).reshape(shape)
            except (ValueError, TypeError, OverflowError) as exc:
                raise RequestError(f"Input {name!r}: cannot read the data as {dt} ({str(exc)[:80]}).") from exc
        by_name[name] = check_array(arr, spec, sig, max_rows, allow_unbatched=False)[0]
    if offset != len(binary):
        raise RequestError(f"{len(binary) - offset} bytes of binary data are not claimed by any input's "
                           "binary_data_size.")
    missing = [n for n in specs if n not in by_name]
    if missing:
        raise RequestError(f"Missing input(s) {missing}; the model takes {expected(sig)}.")
    arrays = [by_name[s.name] for s in sig.inputs]
    _same_rows(arrays, sig)
    return tuple(to_tensor(a, s) for a, s in zip(arrays, sig.inputs)), doc


def v2_response(outputs: tuple[torch.Tensor, ...], sig: Any, doc: dict[str, Any], model: str,
                version: int) -> tuple[bytes, int | None]:
    """The v2 response body and, when any output is binary, the JSON header length."""
    names = [s.name for s in sig.outputs] if len(sig.outputs) == len(outputs) else [f"output_{i}" for i in range(len(outputs))]
    raw_params = doc.get("parameters")
    params: dict[str, Any] = raw_params if isinstance(raw_params, dict) else {}
    all_binary = bool(params.get("binary_data_output", False))
    requested: dict[str, bool] | None = None
    if isinstance(doc.get("outputs"), list):
        requested = {}
        for o in doc["outputs"]:
            if not isinstance(o, dict) or o.get("name") not in names:
                raise RequestError(f"Requested output {str(o)[:60]} is not one of {names}.")
            raw_p = o.get("parameters")
            p: dict[str, Any] = raw_p if isinstance(raw_p, dict) else {}
            requested[o["name"]] = bool(p.get("binary_data", all_binary))
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
    def spec(s: Any) -> dict[str, Any]:
        return {"name": s.name, "datatype": v2_datatype(s.dtype),
                "shape": [-1 if d == "batch" else d for d in s.shape]}

    return {"name": model, "versions": [str(v) for v in versions], "platform": "pytorch_torch_export",
            "inputs": [spec(s) for s in sig.inputs], "outputs": [spec(s) for s in sig.outputs]}
