"""[auth]: API keys and JWTs (tokens made by PyJWT) through a real gunicorn service (2 workers) on 127.0.0.1:
why a 401, the JWT's sub as the client for sticky canary routing and rate limits, and
405s that carry Allow. The HS256 secret reaches the service only through its environment (KIT_JWT_SECRET).

Promotions use force=True, why="test": gates are another area's job (tested there).
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from typing import Any

import jwt
import pytest
import torch
from torch import nn

from kit.registry import Registry
from kit.servicegen import generate, start_service
from kit.serving.router import user_bucket
from kit.serving.security import hash_key

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

MODEL = "auth-mlp"
SECRET = "e2e-" + os.urandom(24).hex()
KEY = "k-" + os.urandom(8).hex()
AUD = "kit-auth-e2e"
ISS = "https://idp.test"


def token(sub: str, _secret: str = SECRET, **claims) -> str:
    body = {"sub": sub, "aud": AUD, "iss": ISS, "exp": int(time.time()) + 300, **claims}
    return jwt.encode(body, _secret, algorithm="HS256")


@pytest.fixture(scope="module")
def svc(tmp_path_factory):
    root = tmp_path_factory.mktemp("auth")
    reg = Registry(root / "registry", require_gate=True, user="e2e")
    for seed in (1, 2):
        torch.manual_seed(seed)
        reg.register(MODEL, nn.Sequential(nn.Linear(4, 3)), torch.randn(2, 4))
    reg.promote(MODEL, 1, force=True, why="test")
    reg.set_canary(MODEL, 2, 0.5, force=True, why="test")
    d = generate("auth", MODEL, registry=reg.root, out_dir=root / "services", workers=2,
                 api_keys_sha256=(hash_key(KEY),), rate_limit=2.0, rate_burst=6,
                 jwt=True, jwt_audience=[AUD], jwt_issuer=ISS, jwt_leeway=5)
    env = {**os.environ, "KIT_JWT_SECRET": SECRET}
    with start_service(d, timeout=90, env=env) as running:
        yield running
        assert SECRET not in running.logs()
    assert not running.alive()


def call(url: str, headers: dict[str, str] | None = None, method: str = "POST") -> tuple[int, dict, Any]:
    """(status, JSON body, response headers: case-insensitive; uvicorn sends lowercase names)"""
    data = json.dumps({"inputs": [[0.5, 0.1, 0.2, 0.3]]}).encode() if method == "POST" else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read()), r.headers
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), exc.headers


def bearer(t: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {t}"}


def test_a_valid_jwt_and_an_api_key_both_pass(svc):
    status, body, headers = call(svc.url + "/predict", bearer(token("alice")))
    assert status == 200 and body["model_version"] in (1, 2), body
    assert call(svc.url + "/predict", {"X-API-Key": KEY})[0] == 200
    assert call(svc.url + "/v2/models/auth-mlp/infer", bearer(token("alice2")))[0] in (200, 400)


# header factories: tokens are made when the test runs (the suite may reach this file long after collection)
@pytest.mark.parametrize("make, why", [
    (lambda: {}, "no credentials"),
    (lambda: bearer(token("bob", exp=int(time.time()) - 120)), "The token has expired"),
    (lambda: bearer(token("bob", _secret="another-" + "z" * 40)), "Bad signature"),
    (lambda: bearer(token("bob", aud="someone-else")), "Wrong audience"),
    (lambda: bearer(token("bob", iss="https://evil.test")), "Wrong issuer"),
    (lambda: bearer(jwt.encode({"sub": "bob", "aud": AUD, "exp": int(time.time()) + 600}, None, algorithm="none")),
     "algorithm 'none' is not accepted"),
    (lambda: {"X-API-Key": "wrong"}, "the X-API-Key is not a known key"),
    (lambda: {"X-API-Key": "wrong", **bearer(token("bob"))}, "the X-API-Key is not a known key"),
])
def test_401s_say_why_without_echoing_secrets(svc, make, why):
    headers = make()
    status, body, resp_headers = call(svc.url + "/predict", headers)
    assert status == 401 and why in body["error"], body
    assert resp_headers["WWW-Authenticate"].startswith("Bearer")
    text = json.dumps(body)
    assert SECRET not in text and KEY not in text
    for v in headers.values():
        assert v.split()[-1] not in text


def test_the_sub_claim_is_the_sticky_routing_key(svc):
    subs = [f"user-{i}" for i in range(8)]
    want = {s: (2 if user_bucket(MODEL, s) < 0.5 else 1) for s in subs}
    assert set(want.values()) == {1, 2}  # both sides of the 50% canary are exercised
    for s in subs:
        got = {call(svc.url + "/predict", {**bearer(token(s)), "X-Kit-User": "ignored"})[1]["model_version"]
               for _ in range(3)}
        assert got == {want[s]}, (s, got)


def test_rate_limits_are_per_jwt_client(svc):
    t = token("greedy")
    codes = [call(svc.url + "/predict", bearer(t))[0] for _ in range(30)]
    assert codes.count(429) >= 10 and set(codes) <= {200, 429}, codes  # burst 6 per worker, 2 workers
    assert call(svc.url + "/predict", bearer(token("patient")))[0] == 200


def test_405_carries_allow(svc):
    status, body, headers = call(svc.url + "/predict", method="GET")
    assert status == 405 and headers["Allow"] == "POST", (body, headers)
    status, _, headers = call(svc.url + "/healthz", {"X-API-Key": KEY}, method="POST")
    assert status == 405 and "GET" in headers["Allow"]
