"""[auth.jwt]: service.toml parsing, and tokens made by PyJWT checked by kit.serving.security (no processes;
tests/e2e/test_service_auth.py sends them through real gunicorn)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from kit.errors import ServiceError
from kit.servicegen import render
from kit.serving.config import JwtSettings, load_service_config
from kit.serving.openapi import build_openapi, leaf_schema
from kit.serving.security import ApiKeys, Authenticator, JwtVerifier, Unauthorized, hash_key

SECRET = "s3cret-" + "x" * 40
NOW = int(time.time())  # parametrize values only (collected once); tests take now()


def now() -> int:
    return int(time.time())


def _hs(claims: dict, secret: str = SECRET, **kw) -> str:
    return jwt.encode({"sub": "alice", "exp": now() + 3600, **claims}, secret, algorithm="HS256", **kw)


def _auth(settings: JwtSettings, keys: tuple[str, ...] = ()) -> Authenticator:
    return Authenticator(ApiKeys(keys), JwtVerifier(settings))


def _bearer(token: str) -> tuple[None, str]:
    return None, f"Bearer {token}"


def _refused(auth: Authenticator, token: str) -> str:
    with pytest.raises(Unauthorized) as e:
        auth.identify(*_bearer(token))
    msg = str(e.value)
    assert token not in msg and SECRET not in msg and token.split(".")[1] not in msg
    assert e.value.challenge == 'Bearer error="invalid_token"'
    return msg


@pytest.fixture
def hs() -> Authenticator:
    return _auth(JwtSettings(secret_env="KIT_JWT_SECRET", secret=SECRET, issuer="https://idp.example",
                             audience=("kit-svc",), leeway=5))


def test_a_good_token_names_the_client(hs):
    who = hs.identify(*_bearer(_hs({"iss": "https://idp.example", "aud": "kit-svc"})))
    assert who.user == "alice" and who.client == "jwt:" + hash_key("alice")[:16]


@pytest.mark.parametrize("claims, why", [
    ({"exp": NOW - 60}, "The token has expired (exp "),
    ({"nbf": NOW + 7200}, "not valid yet"),
    ({"aud": "other"}, "Wrong audience: the token's aud does not include 'kit-svc'"),
    ({"iss": "https://evil.example"}, "Wrong issuer"),
    ({"exp": None}, "lacks the required 'exp' claim"),
    ({"aud": None}, "lacks the required 'aud' claim"),
    ({"sub": None}, "no usable 'sub' claim"),
])
def test_refusals_say_why_without_echoing_secrets(hs, claims, why):
    body = {"sub": "alice", "exp": now() + 3600, "iss": "https://idp.example", "aud": "kit-svc", **claims}
    token = jwt.encode({k: v for k, v in body.items() if v is not None}, SECRET, algorithm="HS256")
    assert why in _refused(hs, token)


def test_leeway_admits_small_clock_skew(hs):
    token = _hs({"iss": "https://idp.example", "aud": "kit-svc", "exp": now() - 2})
    assert hs.identify(*_bearer(token)).user == "alice"


def test_bad_signature_none_algorithm_and_garbage(hs):
    good = {"iss": "https://idp.example", "aud": "kit-svc"}
    assert "Bad signature" in _refused(hs, _hs(good, secret="another-secret-" + "y" * 40))
    unsigned = jwt.encode({"sub": "alice", "exp": now() + 3600, **good}, None, algorithm="none")
    assert "algorithm 'none' is not accepted" in _refused(hs, unsigned)
    assert "not a well-formed JWT" in _refused(hs, "eyJhbGciOi.broken.token")


def test_hs_secret_rules(tmp_path):
    with pytest.raises(ServiceError, match="KIT_JWT_SECRET, which is not set"):
        JwtVerifier(JwtSettings(secret_env="KIT_JWT_SECRET"))
    with pytest.raises(ServiceError, match="at least 32"):
        JwtVerifier(JwtSettings(secret_env="S", secret="short"))
    f = tmp_path / "secret"
    f.write_text(SECRET + "\n")
    auth = _auth(JwtSettings(secret_file=f))
    assert auth.identify(*_bearer(_hs({}))).user == "alice"


def _rsa() -> tuple[rsa.RSAPrivateKey, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key, key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_rs256_public_key_and_algorithm_confusion(tmp_path):
    key, pem = _rsa()
    (tmp_path / "pub.pem").write_bytes(pem)
    auth = _auth(JwtSettings(algorithms=("RS256",), public_key_file=tmp_path / "pub.pem"))
    token = jwt.encode({"sub": "bob", "exp": now() + 3600}, key, algorithm="RS256")
    assert auth.identify(*_bearer(token)).user == "bob"
    # The classic attack: sign HS256 with the public key as the HMAC secret.
    forged = jwt.api_jws.PyJWS(algorithms=["HS256"])
    forged._algorithms["HS256"].prepare_key = lambda k: k  # PyJWT itself refuses PEM secrets; an attacker's code does not
    token = forged.encode(json.dumps({"sub": "bob", "exp": now() + 3600}).encode(), pem, algorithm="HS256")
    assert "algorithm 'HS256' is not accepted" in _refused(auth, token)
    ec_pem = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "ec.pem").write_bytes(ec_pem)
    with pytest.raises(ServiceError, match="cannot check RS256 tokens"):
        JwtVerifier(JwtSettings(algorithms=("RS256",), public_key_file=tmp_path / "ec.pem"))


def _jwks(path: Path, *keys: tuple[str, ec.EllipticCurvePrivateKey]) -> None:
    jwks = []
    for kid, k in keys:
        d = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(k.public_key()))
        jwks.append({**d, "kid": kid, "alg": "ES256", "use": "sig"})
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"keys": jwks}))
    os.replace(tmp, path)


def test_es256_jwks_by_kid_and_rotation(tmp_path, monkeypatch):
    k1, k2 = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "jwks.json"
    _jwks(path, ("k1", k1))
    auth = _auth(JwtSettings(algorithms=("ES256",), jwks_file=path, client_claim="client_id",
                             required_claims=("exp", "client_id")))
    t1 = jwt.encode({"client_id": "svc-a", "exp": now() + 3600}, k1, algorithm="ES256", headers={"kid": "k1"})
    t2 = jwt.encode({"client_id": "svc-b", "exp": now() + 3600}, k2, algorithm="ES256", headers={"kid": "k2"})
    assert auth.identify(*_bearer(t1)).user == "svc-a"
    assert "key id (kid) names no key" in _refused(auth, t2)
    _jwks(path, ("k2", k2))  # the issuer rotates: k1 retired, k2 in
    os.utime(path, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    auth.jwt._checked = 0.0  # the 1 s re-stat interval, without sleeping
    assert auth.identify(*_bearer(t2)).user == "svc-b"
    assert "key id (kid) names no key" in _refused(auth, t1)
    _jwks(path, ("k1", k1), ("k2", k2))
    os.utime(path, ns=(time.time_ns() + 2 * 10**9, time.time_ns() + 2 * 10**9))
    auth.jwt._checked = 0.0
    no_kid = jwt.encode({"client_id": "svc-a", "exp": now() + 3600}, k1, algorithm="ES256")
    assert "names no key id (kid) and this service trusts 2 keys" in _refused(auth, no_kid)
    assert auth.identify(*_bearer(t1)).user == "svc-a"


def test_api_keys_and_jwt_both_on(hs):
    auth = Authenticator(ApiKeys((hash_key("k-123"),)), hs.jwt)
    assert auth.identify("k-123", None).client == "key:" + hash_key("k-123")[:16]
    assert auth.identify(None, "Bearer k-123").user is None
    assert auth.identify(None, "Bearer " + _hs({"iss": "https://idp.example", "aud": "kit-svc"})).user == "alice"
    with pytest.raises(Unauthorized, match="no credentials. Send 'X-API-Key: KEY' or 'Authorization: Bearer KEY' "
                                           "or 'Authorization: Bearer JWT'"):
        auth.identify(None, None)
    with pytest.raises(Unauthorized, match="not a known API key nor a JWT") as e:
        auth.identify(None, "Bearer nope")
    assert "nope" not in str(e.value)
    good_jwt = "Bearer " + _hs({"iss": "https://idp.example", "aud": "kit-svc"})
    with pytest.raises(Unauthorized, match="the X-API-Key is not a known key"):
        auth.identify("wrong", good_jwt)  # a wrong credential is never ignored, even beside a valid one
    with pytest.raises(Unauthorized, match="Bad signature"):
        auth.identify("k-123", "Bearer " + _hs({"iss": "https://idp.example", "aud": "kit-svc"}, secret="n" * 40))
    assert auth.identify("k-123", good_jwt).client.startswith("key:")
    jwt_only = Authenticator(ApiKeys(()), hs.jwt)
    with pytest.raises(Unauthorized, match="the bearer token is not a JWT. Send 'Authorization: Bearer JWT'."):
        jwt_only.identify(None, "Bearer k-123")


TOML = """
[service]
name = "s"
[model]
name = "m"
registry = "reg"
[auth.jwt]
enabled = true
{body}
"""


@pytest.mark.parametrize("body, err", [
    ('algorithms = ["none"]', "'none' is never accepted"),
    ('algorithms = ["HS256", "RS256"]\nsecret_env = "S"', "mixes shared-secret"),
    ('algorithms = ["RS256"]\nsecret_env = "S"', "need exactly one of public_key_file or jwks_file"),
    ('secret_env = "S"\nsecret_file = "f"', "need exactly one of secret_env or secret_file"),
    ('secret_env = "S"\nleeway = 9000', "between 0 and 300"),
    ('secret_env = "S"\nalgorithm = "HS256"', "unknown key 'algorithm'"),
    ('secret_env = "S"\naudience = [1]', "list of non-empty strings"),
])
def test_config_refusals(tmp_path, body, err):
    (tmp_path / "service.toml").write_text(TOML.format(body=body))
    with pytest.raises(ServiceError, match=err):
        load_service_config(tmp_path, {})


def test_config_reads_the_secret_from_the_given_environment_only(tmp_path):
    (tmp_path / "service.toml").write_text(TOML.format(body='secret_env = "MY_SECRET"\naudience = "svc"'))
    cfg = load_service_config(tmp_path, {"MY_SECRET": SECRET})
    assert cfg.jwt is not None and cfg.jwt.secret == SECRET and cfg.jwt.audience == ("svc",)
    assert SECRET not in repr(cfg) and cfg.auth_enabled
    assert load_service_config(tmp_path, {}).jwt.secret is None  # refused when the app starts (above)


def test_generated_service_toml_round_trips(tmp_path):
    files = render("svc", "m", registry="reg")
    (tmp_path / "service.toml").write_text(files["service.toml"])
    assert load_service_config(tmp_path, {}).jwt is None  # off by default
    files = render("svc", "m", registry="reg", jwt=True, jwt_audience=["svc"], jwt_issuer="https://idp")
    (tmp_path / "service.toml").write_text(files["service.toml"])
    cfg = load_service_config(tmp_path, {"KIT_JWT_SECRET": SECRET})
    assert cfg.jwt == JwtSettings(secret_env="KIT_JWT_SECRET", secret=SECRET, audience=("svc",),
                                  issuer="https://idp")
    with pytest.raises(ServiceError, match="quote"):
        render("svc", "m", registry="reg", jwt=True, jwt_issuer='a"b')


def test_openapi_states_ranges_and_bearer_jwt():
    assert leaf_schema("float32") == {"type": "number", "format": "float", "minimum": -3.4028234663852886e38,
                                      "maximum": 3.4028234663852886e38}
    assert leaf_schema("int8")["minimum"] == -128 and leaf_schema("uint8")["maximum"] == 255
    assert leaf_schema("int64")["format"] == "int64" and leaf_schema("bool") == {"type": "boolean"}

    class Spec:
        name, dtype, shape = "x", "float32", ["batch", "seq", 4]

    class Sig:
        inputs = [Spec()]
        dims = {"batch": (1, 4096), "seq": (2, 16)}

    doc = build_openapi("s", "m", Sig(), auth=True, jwt=True, max_batch=64, version_header="", user_header="")
    x, row = doc["components"]["schemas"]["PredictRequest"]["properties"]["inputs"]["anyOf"]
    assert (row["minItems"], row["maxItems"]) == (2, 16) and row["items"]["maxItems"] == 4  # one row, unbatched
    assert (x["minItems"], x["maxItems"]) == (1, 64)
    assert (x["items"]["minItems"], x["items"]["maxItems"]) == (2, 16)
    assert x["items"]["items"]["items"]["maximum"] == 3.4028234663852886e38
    assert doc["components"]["securitySchemes"]["Bearer"]["bearerFormat"] == "JWT"
    name = doc["paths"]["/v2/models/{model_name}/infer"]["post"]["parameters"][0]
    assert name["schema"]["enum"] == ["m"]


def test_a_cached_token_still_expires():
    auth = _auth(JwtSettings(secret_env="S", secret=SECRET, leeway=0))
    token = jwt.encode({"sub": "alice", "exp": int(time.time()) + 1}, SECRET, algorithm="HS256")
    assert auth.identify(*_bearer(token)).user == "alice"
    assert auth.identify(*_bearer(token)).user == "alice"  # from the cache of verified tokens
    exp = jwt.decode(token, SECRET, algorithms=["HS256"])["exp"]
    while time.time() <= exp + 1:  # PyJWT's clock has whole seconds: poll until exp is past, then ask once
        time.sleep(0.05)
    assert "has expired" in _refused(auth, token)


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
def test_time_claims_must_be_numbers(claim):
    """PyJWT takes a numeric string for exp ("1796...", int() of it); the cache then read a string exp as
    'never expires' and kept the token past its exp (issue 17, class 8). Now it is a 401 before caching."""
    auth = _auth(JwtSettings(secret_env="S", secret=SECRET, leeway=0))
    t = now() + 2 if claim == "exp" else now() - 2
    token = jwt.encode({"sub": "alice", "exp": now() + 3600, claim: str(t)}, SECRET, algorithm="HS256")
    assert f"{claim!r} claim is not a number" in _refused(auth, token)
    assert token not in auth.jwt._verified


def test_a_cached_token_is_never_kept_past_its_numeric_exp():
    auth = _auth(JwtSettings(secret_env="S", secret=SECRET, leeway=0))
    token = jwt.encode({"sub": "alice", "exp": now() + 3600}, SECRET, algorithm="HS256")
    assert auth.identify(*_bearer(token)).user == "alice"
    assert auth.jwt._verified[token][1] == jwt.decode(token, SECRET, algorithms=["HS256"])["exp"]
