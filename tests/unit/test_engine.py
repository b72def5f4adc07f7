"""The ASGI engine's pieces without a server: the inference thread and its batching, the table of HTTP statuses,
body reading, and route dispatch. Real numpy arrays (what both backends' forwards
take) and a real event loop; no mocks."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import orjson
import pytest

from kit.errors import ServingError
from kit.serving.control import find
from kit.serving.engine import InferenceEngine
from kit.serving.http import (
    STATUS,
    BodyTooLarge,
    ClientGone,
    MethodNotAllowed,
    NotReady,
    RateLimited,
    error_response,
    read_body,
    respond_to,
)
from kit.serving.protocol import RequestError
from kit.serving.router import RouteError
from kit.serving.security import Unauthorized


class Gated:
    """forward(x) = 2x, held until ``release`` is set; ``started`` says a call is running. Records the thread
    and the rows of every call. The tests wait for these events, never for a fixed time."""

    def __init__(self, *, held: bool = True):
        self.calls: list[int] = []
        self.threads: set[str] = set()
        self.started = threading.Event()
        self.release = threading.Event()
        if not held:
            self.release.set()

    def __call__(self, inputs):
        self.threads.add(threading.current_thread().name)
        self.calls.append(int(inputs[0].shape[0]))
        self.started.set()
        assert self.release.wait(30), "the test never released the forward pass"
        return (inputs[0] * 2,)

    async def running(self) -> None:
        """Wait (off the loop) until a forward pass is running."""
        assert await asyncio.to_thread(self.started.wait, 30), "no forward pass started"


def _run(coro):
    return asyncio.run(coro)


def test_requests_arriving_during_a_forward_pass_share_the_next_one():
    fwd = Gated()
    engine = InferenceEngine(max_batch=64)

    async def main():
        first = engine.submit(fwd, (np.full((1, 3), 1.0, np.float32),))
        await fwd.running()  # the first forward pass is running now
        rest = [engine.submit(fwd, (np.full((2, 3), float(i), np.float32),)) for i in range(2, 12)]
        fwd.release.set()
        return await first, await asyncio.gather(*rest), threading.current_thread().name

    (out1, rows1), rest, loop_thread = _run(main())
    engine.stop()
    assert rows1 == 1 and np.array_equal(out1[0], np.full((1, 3), 2.0, np.float32))
    assert fwd.calls == [1, 20]  # the ten waiting requests ran as one forward pass of 20 rows
    for i, (out, rows) in zip(range(2, 12), rest):
        assert rows == 20 and np.array_equal(out[0], np.full((2, 3), 2.0 * i, np.float32))  # each got its own rows back
    assert loop_thread not in fwd.threads and all(t.startswith("kit-infer") for t in fwd.threads)


def test_different_non_batch_dims_or_versions_are_never_concatenated_and_max_rows_holds():
    a, b = Gated(), Gated(held=False)
    engine = InferenceEngine(max_batch=64)

    async def main():
        busy = engine.submit(a, (np.zeros((1, 4), np.float32),))
        await a.running()
        futs = [engine.submit(a, (np.zeros((1, 4), np.float32),)),
                engine.submit(a, (np.zeros((1, 5), np.float32),)),  # seq 4 vs 5
                engine.submit(b, (np.zeros((1, 4), np.float32),)),  # another version
                engine.submit(a, (np.zeros((1, 4), np.float32),)), engine.submit(a, (np.zeros((1, 4), np.float64),))]
        capped = [engine.submit(a, (np.zeros((3, 4), np.float32),), max_rows=4) for _ in range(2)]
        a.release.set()
        await busy
        return await asyncio.gather(*futs), await asyncio.gather(*capped)

    outs, capped = _run(main())
    engine.stop()
    assert [r for _, r in outs] == [2, 1, 1, 2, 1]  # only the two same-shape, same-version requests joined
    assert [o[0].shape[1] for o, _ in outs] == [4, 5, 4, 4, 4] and outs[4][0][0].dtype == np.float64
    assert [r for _, r in capped] == [3, 3]  # 3 + 3 rows exceed the version's 4-row limit: two passes
    assert b.calls == [1]


def test_a_failing_forward_pass_fails_every_request_in_it_and_the_engine_goes_on():
    calls = []

    def broken(inputs):
        calls.append(inputs[0].shape[0])
        if len(calls) == 1:
            raise RuntimeError("boom")
        return (inputs[0],)

    engine = InferenceEngine()

    async def main():
        with pytest.raises(RuntimeError, match="boom"):
            await engine.submit(broken, (np.zeros((1, 2), np.float32),))
        return await engine.submit(broken, (np.ones((2, 2), np.float32),))

    out, rows = _run(main())
    engine.stop()
    assert rows == 2 and np.array_equal(out[0], np.ones((2, 2), np.float32))


def test_max_wait_collects_more_rows_before_running():
    fwd = Gated(held=False)
    # a window far longer than the test: the thread runs once the batch is full (4 rows), not on a timer
    engine = InferenceEngine(max_batch=4, max_wait_ms=60_000)

    async def main():
        futs = [engine.submit(fwd, (np.zeros((1, 2), np.float32),))]
        await asyncio.to_thread(lambda: None)  # the engine's thread takes the first request and waits
        futs += [engine.submit(fwd, (np.zeros((1, 2), np.float32),)) for _ in range(3)]
        return await asyncio.gather(*futs)

    outs = _run(main())
    engine.stop()
    assert fwd.calls == [4] and all(r == 4 for _, r in outs)


def test_one_table_maps_error_types_to_statuses():
    cases = [(RequestError("bad"), 400, {}), (BodyTooLarge("big"), 413, {}), (RouteError("gone"), 404, {}),
             (Unauthorized("who", 'Bearer error="invalid_token"'), 401,
              {"WWW-Authenticate": 'Bearer error="invalid_token"'}),
             (MethodNotAllowed("no", allow="POST"), 405, {"Allow": "POST"}),
             (RateLimited("slow down", retry_after=0.2), 429, {"Retry-After": "1"}),
             (NotReady("loading"), 503, {})]
    for exc, status, headers in cases:
        assert not hasattr(exc, "status"), "errors carry no HTTP status"
        resp = error_response(exc)
        assert resp is not None and (resp.status, resp.headers) == (status, headers), exc
        assert orjson.loads(resp.body) == {"error": str(exc)} and resp.close == (status == 413)
    assert set(STATUS) == {type(e) for e, _, _ in cases}
    assert error_response(ValueError("bug")) is None and error_response(ServingError("slot")) is None
    try:
        raise KeyError("secret detail")
    except KeyError as exc:
        resp = respond_to(exc, "rid-1", "/predict")
    assert resp.status == 500 and b"KeyError" in resp.body and b"rid-1" in resp.body and b"secret" not in resp.body


def test_read_body_limits_and_disconnects():
    def receiver(*messages):
        it = iter(messages)

        async def receive():
            return next(it)
        return receive

    chunks = receiver({"type": "http.request", "body": b"ab", "more_body": True},
                      {"type": "http.request", "body": b"cd", "more_body": False})
    assert _run(read_body(chunks, 4, 10)) == b"abcd"
    with pytest.raises(BodyTooLarge, match="10 bytes"):
        _run(read_body(receiver(), 11, 10))  # refused from Content-Length alone
    with pytest.raises(BodyTooLarge):
        _run(read_body(receiver({"type": "http.request", "body": b"x" * 11, "more_body": False}), None, 10))
    with pytest.raises(ClientGone):
        _run(read_body(receiver({"type": "http.request", "body": b"x", "more_body": True},
                                {"type": "http.disconnect"}), 5, 10))


def test_control_routes_dispatch():
    assert find("/readyz")[0].__name__ == "readyz"
    assert find("/v2/models/m")[0].__name__ == "v2_model"
    assert find("/v2/models/m/versions/2")[0].__name__ == "v2_model"
    assert find("/v2/models/m/ready")[0].__name__ == "v2_model_ready"
    assert find("/v2/models/m/versions/2/ready")[0].__name__ == "v2_model_ready"
    assert find("/v2/models/m/versions") is None and find("/nope") is None


def test_the_signature_is_compiled_once_and_parsing_gives_contiguous_numpy():
    from kit.serving.protocol import compile_signature, parse_predict, parse_v2_infer, predict_response
    from kit.signature import Signature, TensorSpec

    sig = Signature(inputs=(TensorSpec("ids", "int64", ("batch", "seq")), TensorSpec("x", "float32", ("batch", 2))),
                    outputs=(TensorSpec("y", "float32", ("batch",)),), dims={"batch": (1, 64), "seq": (1, 8)})
    cs = compile_signature(sig)
    assert compile_signature(cs) is cs and cs.index == {"ids": 0, "x": 1} and cs.unwrap_single
    (ids, x), unbatched = parse_predict(b'{"inputs": {"x": [[1, 2]], "ids": [[1, 2, 3]]}}', cs, 64)
    assert ids.dtype == np.int64 and x.dtype == np.float32 and x.flags.c_contiguous and not unbatched
    raw = np.arange(4, dtype=np.float32).reshape(2, 2)
    head = orjson.dumps({"inputs": [
        {"name": "x", "shape": [2, 2], "datatype": "FP32", "parameters": {"binary_data_size": raw.nbytes}},
        {"name": "ids", "shape": [2, 1], "datatype": "INT64", "data": [5, 6]}]})
    (ids, x), _ = parse_v2_infer(head + raw.tobytes(), str(len(head)), cs, 64)
    assert not x.flags.writeable and np.array_equal(x, raw)  # a view of the body: no copy for onnxruntime
    body = orjson.loads(predict_response((np.array([0.5, 1.5], np.float32)[::2],), cs, False, "m", 1))
    assert body["outputs"] == [0.5]  # a non-contiguous output is serialised too


def test_the_torch_forward_takes_and_gives_numpy_even_read_only_views():
    import torch

    from kit.backends.pt2.serve import torch_forward as _torch_forward
    from kit.signature import Signature, TensorSpec

    class Two(torch.nn.Module):
        def forward(self, x):
            return {"b": x.sum(1), "a": x * 2}

    sig = Signature(inputs=(TensorSpec("x", "float32", ("batch", 3)),),
                    outputs=(TensorSpec("a", "float32", ("batch", 3)), TensorSpec("b", "float32", ("batch",))),
                    output_kind="dict")
    fwd = _torch_forward(Two(), "cpu", sig)
    view = np.frombuffer(np.ones((2, 3), np.float32).tobytes(), np.float32).reshape(2, 3)
    a, b = fwd((view,))  # read-only (a v2 binary body): copied for torch.from_numpy, without a warning
    assert isinstance(a, np.ndarray) and np.array_equal(a, np.full((2, 3), 2.0)) and np.array_equal(b, [3.0, 3.0])


def test_the_torch_forward_casts_dtypes_numpy_lacks():
    import torch

    from kit.backends.pt2.serve import torch_forward as _torch_forward
    from kit.signature import Signature, TensorSpec

    class Half(torch.nn.Module):
        def forward(self, x):
            assert x.dtype == torch.bfloat16  # sent as float32 (numpy has no bfloat16), cast by the forward
            return x * 2

    sig = Signature(inputs=(TensorSpec("x", "bfloat16", ("batch", 2)),),
                    outputs=(TensorSpec("y", "bfloat16", ("batch", 2)),))
    (y,) = _torch_forward(Half(), "cpu", sig)((np.ones((1, 2), np.float32),))
    assert y.dtype == np.float32 and np.array_equal(y, [[2.0, 2.0]])


def test_access_lines_of_one_loop_pass_are_written_together():
    """kit.serving.logs.AccessLog: every request line whole and in order, one write per event-loop pass."""
    import asyncio
    import io
    import json
    import logging

    from kit.serving.logs import AccessLog

    class Counting(io.StringIO):
        writes = 0

        def write(self, s: str) -> int:
            Counting.writes += 1
            return super().write(s)

    stream = Counting()
    log = AccessLog(logging.StreamHandler(stream))

    async def burst() -> None:
        for i in range(50):
            log.write({"request_id": f"r{i}", "status": 200})
        assert Counting.writes == 0  # nothing written until the loop pass ends
        await asyncio.sleep(0)
        assert Counting.writes == 1
        log.write({"request_id": "late", "status": 404})
        await asyncio.sleep(0)

    asyncio.run(burst())
    docs = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [d["request_id"] for d in docs] == [f"r{i}" for i in range(50)] + ["late"]
    assert Counting.writes == 2
    assert all(d["logger"] == "kit.serving.access" and d["msg"] == "request" and d["ts"].endswith("Z")
               for d in docs)
    log.write({"request_id": "outside a loop"})  # no running loop: written at once
    assert stream.getvalue().splitlines()[-1].endswith('"request_id":"outside a loop"}')


def test_bfloat16_travels_as_float32_even_once_ml_dtypes_is_imported():
    """onnx imports ml_dtypes, which registers "bfloat16" with numpy; the wire dtype must not change with it."""
    import ml_dtypes  # noqa: F401  (onnx, a declared dependency, imports it)

    from kit.serving.protocol import np_dtype

    assert np_dtype("bfloat16") == np.float32 and np_dtype("int64") == np.int64 and np_dtype("bool") == np.bool_
