"""The service's OpenAPI 3.0 description (served at ``/openapi.json``).

Input schemas state what the service accepts: the dtype's range (a float32 input takes finite numbers
within +-3.4028234663852886e38; beyond that a value becomes infinite and is refused), integer bounds,
booleans, and each dimension's length (fixed, a named dynamic range, or 1 to ``max_batch`` rows).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from kit._types import JSONObject

if TYPE_CHECKING:
    from kit.signature import Signature, TensorSpec

# Largest finite value of each float dtype (what a JSON number may be and stay finite after conversion).
FLOAT_MAX = {"float16": 65504.0, "bfloat16": 3.3895313892515355e38, "float32": 3.4028234663852886e38,
             "float64": 1.7976931348623157e308}


def leaf_schema(dtype: str) -> JSONObject:
    """The JSON schema of one element of a ``dtype`` tensor (torch dtype names without "torch.")."""
    if dtype == "bool":
        return {"type": "boolean"}
    if dtype in FLOAT_MAX:
        m = FLOAT_MAX[dtype]
        return {"type": "number", "format": "double" if dtype == "float64" else "float", "minimum": -m, "maximum": m}
    try:
        info = np.iinfo(np.dtype(dtype))
    except TypeError:  # complex or another kind JSON cannot carry: say number, the service says the rest
        return {"type": "number"}
    return {"type": "integer", "format": "int64" if info.bits == 64 else "int32",
            "minimum": int(info.min), "maximum": int(info.max)}


def _nested(spec: TensorSpec, dims: dict[str, Any], max_batch: int | None) -> JSONObject:
    schema = leaf_schema(spec.dtype)
    for d in reversed(spec.shape):
        schema = {"type": "array", "items": schema}
        if isinstance(d, int):
            schema.update(minItems=d, maxItems=d)
            continue
        lo, hi = _range(dims.get(d))
        if d == "batch" and max_batch:
            hi = min(hi, max_batch) if hi else max_batch
        schema["minItems"] = lo
        if hi:
            schema["maxItems"] = hi
    return schema


def _rows_or_row(spec: TensorSpec, dims: dict[str, Any], max_batch: int | None) -> JSONObject:
    """/predict takes a batch, or one row without the batch dimension (answered without it too)."""
    batched = _nested(spec, dims, max_batch)
    if not spec.shape or spec.shape[0] != "batch":
        return batched
    one = type("Row", (), {"dtype": spec.dtype, "shape": list(spec.shape[1:])})()
    return {"anyOf": [batched, _nested(one, dims, max_batch)]}


def _range(r: object) -> tuple[int, int | None]:
    """A dim's (min, max) from Signature.dims: a (min, max) pair or {"min": .., "max": ..}; default (1, None)."""
    if isinstance(r, dict):
        return int(r.get("min", 1)), r.get("max")
    if isinstance(r, (tuple, list)) and len(r) == 2:
        return int(r[0]), int(r[1])
    return 1, None


def build_openapi(name: str, model: str, sig: Signature | None, *, auth: bool, version_header: str,
                  user_header: str, jwt: bool = False, max_batch: int | None = None) -> JSONObject:
    err = {"description": "Client error; the message names what was expected.",
           "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    dims = dict(getattr(sig, "dims", None) or {})
    if sig is not None and len(sig.inputs) == 1:
        inputs: JSONObject = _rows_or_row(sig.inputs[0], dims, max_batch)
    elif sig is not None:
        inputs = {"type": "object", "properties": {s.name: _rows_or_row(s, dims, max_batch) for s in sig.inputs},
                  "required": [s.name for s in sig.inputs], "additionalProperties": False}
    else:
        inputs = {}
    headers = []
    if version_header:
        headers.append({"name": version_header, "in": "header", "required": False,
                        "schema": {"type": "string"}, "description": "production, canary or a version number"})
    if user_header:
        headers.append({"name": user_header, "in": "header", "required": False, "schema": {"type": "string"},
                        "description": "sticky routing key: the same user always gets the same version"})
    sec: list[dict[str, list[str]]] = [{"ApiKey": []}, {"Bearer": []}] if auth else []

    def infer_op(summary: str, schema: str, params: list[JSONObject]) -> JSONObject:
        responses = {"200": {"description": "Outputs, and the version that served them.",
                             "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}Response"}}}},
                     "400": err, "404": err, "413": err, "429": err, "503": err}
        if auth:
            responses["401"] = err
        return {"post": {"summary": summary, "parameters": params + headers, "security": sec,
                         "requestBody": {"required": True, "content": {"application/json": {
                             "schema": {"$ref": f"#/components/schemas/{schema}Request"}}}},
                         "responses": responses}}

    def get_op(summary: str, params: list[JSONObject] | None = None, codes: tuple[str, ...] = ("200",)) -> JSONObject:
        op: JSONObject = {"summary": summary,
                              "responses": {c: {"description": summary} for c in codes}}
        if params:
            op["parameters"] = params
        return {"get": op}

    # one model per service; other names are a 404 (documented), versions are ASCII digits
    model_param = [{"name": "model_name", "in": "path", "required": True,
                    "schema": {"type": "string", "enum": [model]}}]
    version_param = [{"name": "model_version", "in": "path", "required": True,
                      "schema": {"type": "string", "pattern": "^[1-9][0-9]{0,8}$"}}]
    v2_tensor = {"type": "object", "required": ["name", "shape", "datatype"], "properties": {
        "name": {"type": "string"}, "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "datatype": {"type": "string"}, "data": {"type": "array"}, "parameters": {"type": "object"}}}
    doc: JSONObject = {
        "openapi": "3.0.3",
        "info": {"title": f"{name} (Kit service for model {model})", "version": "1",
                 "description": "Kit serving runtime: simple JSON /predict and the Open Inference Protocol v2."},
        "paths": {
            "/predict": infer_op("Predict with simple JSON", "Predict", []),
            "/v2/models/{model_name}/infer": infer_op("Open Inference Protocol v2 inference", "V2Infer", model_param),
            "/v2/models/{model_name}/versions/{model_version}/infer": infer_op(
                "v2 inference on one served version", "V2Infer", model_param + version_param),
            "/v2": get_op("Server metadata"),
            "/v2/health/live": get_op("Liveness"),
            "/v2/health/ready": get_op("Readiness", codes=("200", "503")),
            "/v2/models/{model_name}": get_op("Model metadata", model_param, ("200", "404")),
            "/v2/models/{model_name}/ready": get_op("Model readiness", model_param, ("200", "404", "503")),
            "/healthz": get_op("Liveness"),
            "/readyz": get_op("Readiness (and the last reload error)", codes=("200", "503")),
            "/metrics": get_op("Prometheus metrics"),
            "/v1/models": get_op("Served versions and the canary weight"),
            "/openapi.json": get_op("This document"),
        },
        "components": {
            "schemas": {
                "Error": {"type": "object", "properties": {"error": {"type": "string"}}},
                "PredictRequest": {"type": "object", "required": ["inputs"], "properties": {"inputs": inputs}},
                "PredictResponse": {"type": "object", "properties": {
                    "outputs": {}, "model": {"type": "string"}, "model_version": {"type": "integer"}}},
                "V2InferRequest": {"type": "object", "required": ["inputs"], "properties": {
                    "id": {"type": "string"}, "inputs": {"type": "array", "items": v2_tensor},
                    "outputs": {"type": "array", "items": {"type": "object"}}, "parameters": {"type": "object"}}},
                "V2InferResponse": {"type": "object", "properties": {
                    "model_name": {"type": "string"}, "model_version": {"type": "string"},
                    "outputs": {"type": "array", "items": v2_tensor}}},
            },
        },
    }
    if auth:
        doc["components"]["securitySchemes"] = {
            "ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            "Bearer": {"type": "http", "scheme": "bearer", **({"bearerFormat": "JWT"} if jwt else {}),
                       "description": "an API key" + (" or a JWT" if jwt else "")}}
    return doc
