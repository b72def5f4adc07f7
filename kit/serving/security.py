"""Who may call a service: API keys (stored as sha256, compared in constant time), bearer JWTs
(``[auth.jwt]``: HS* with a secret, RS*/PS*/ES*/EdDSA with a public key or a JWKS file), and a per-client
token-bucket rate limit. :class:`Authenticator` turns a request's credentials into an :class:`Identity`
or an :class:`Unauthorized` (401) whose message says why without echoing a token or a secret."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import jwt

from kit.errors import ServiceError, ServingError
from kit.registry.names import is_sha256_hex
from kit.serving.config import JwtSettings

if TYPE_CHECKING:
    from jwt.algorithms import AllowedPublicKeys

    _Key = bytes | AllowedPublicKeys  # a shared secret (HS*) or a public key

log = logging.getLogger(__name__)


def hash_key(key: str) -> str:
    """The sha256 hex digest stored for an API key (``service.toml`` or a keys file)."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def read_keys_file(path: Path) -> tuple[str, ...]:
    """One sha256 hex digest per line; blank lines and ``#`` comments are ignored."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise ServiceError(f"Cannot read the API keys file {path} ({exc}). Create it with one sha256 "
                           "hex digest per line, or remove [auth] keys_file.") from exc
    out = []
    for n, line in enumerate(lines, 1):
        s = line.split("#", 1)[0].strip().lower()
        if not s:
            continue
        if not is_sha256_hex(s):
            raise ServiceError(f"{path}:{n}: {s[:20]!r} is not a sha256 hex digest (64 hex characters).")
        out.append(s)
    return tuple(out)


class ApiKeys:
    """Checks presented keys against stored hashes. A keys file is re-read when it changes."""

    def __init__(self, hashes: tuple[str, ...] = (), keys_file: Path | None = None):
        self._static = tuple(h.lower() for h in hashes)
        self.keys_file = keys_file
        self._file_hashes: tuple[str, ...] = ()
        self._file_key: tuple[int, int] | None = None
        self._checked = 0.0
        self._lock = threading.Lock()
        if keys_file is not None:
            self._file_hashes = read_keys_file(keys_file)
            self._file_key = self._stat()

    @property
    def enabled(self) -> bool:
        return bool(self._static) or self.keys_file is not None

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.keys_file)  # type: ignore[arg-type]
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if self.keys_file is None or now - self._checked < 1.0:
            return
        with self._lock:
            self._checked = now
            key = self._stat()
            if key != self._file_key:
                try:
                    self._file_hashes = read_keys_file(self.keys_file)
                    self._file_key = key
                    log.info("API keys reloaded from %s (%d keys)", self.keys_file, len(self._file_hashes))
                except ServiceError as exc:  # keep the old keys; say so
                    log.error("keeping the previous API keys: %s", exc)

    def check(self, presented: str | None) -> bool:
        """True when ``presented`` hashes to a stored key; every stored hash is compared (constant time)."""
        if not presented:
            return False
        return self.check_digest(hash_key(presented))

    def check_digest(self, digest: str) -> bool:
        """True when the sha256 hex ``digest`` of a presented key is stored (for callers that hashed it once)."""
        self._maybe_reload()
        ok = False
        for h in self._static + self._file_hashes:
            ok |= hmac.compare_digest(digest, h)
        return ok


class RateLimiter:
    """Token buckets per client key: ``rate`` requests/second, bursts up to ``burst``. Per worker."""

    def __init__(self, rate: float, burst: int = 0, max_clients: int = 10_000):
        self.rate = float(rate)
        self.burst = float(burst or max(1.0, rate))
        self.max_clients = max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def allow(self, client: str) -> tuple[bool, float]:
        """(allowed, seconds until the next token)."""
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.pop(client, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            ok = tokens >= 1.0
            if ok:
                tokens -= 1.0
            self._buckets[client] = (tokens, now)
            if len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)
        return ok, 0.0 if ok else (1.0 - tokens) / self.rate


# --------------------------------------------------------------------------- JWT and the request's identity


class Unauthorized(ServingError, PermissionError):
    """A 401 (:data:`kit.serving.http.STATUS`): the message says why (never echoing a token or a secret);
    ``challenge`` is what WWW-Authenticate says."""

    def __init__(self, message: str, challenge: str = "Bearer"):
        super().__init__(message)
        self.challenge = challenge


@dataclass(frozen=True)
class Identity:
    """Who called: ``client`` keys rate limits; ``user`` (a JWT's client claim) keys sticky routing."""

    client: str | None = None
    user: str | None = None


ANONYMOUS = Identity()
_MIN_SECRET_BYTES = 32  # RFC 7518 3.2: an HS256 key at least as long as the hash output


def _read_text(path: Path, what: str) -> str:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ServiceError(f"Cannot read the {what} {path} ({type(exc).__name__}: {exc}). Fix [auth.jwt] or "
                           "the file's permissions.") from exc


class JwtVerifier:
    """Checks bearer JWTs against ``[auth.jwt]``. Key files are re-read when they change (key rotation)."""

    def __init__(self, settings: JwtSettings):
        self.settings = settings
        self._file = settings.secret_file or settings.public_key_file or settings.jwks_file
        self._lock = threading.Lock()
        self._checked = 0.0
        self._stamp = _stat(self._file)
        self._keys = self._load()  # kid (or None) -> (key, alg pinned by the JWK or None)
        # Tokens that passed every check with the current keys -> (identity, exp, nbf). A client sends the
        # same token until it expires; PyJWT takes ~190 us per HS256 token, a hit ~5 us. Cleared on key reload.
        self._verified: OrderedDict[str, tuple[Identity, float, float]] = OrderedDict()

    # ---- key material
    def _load(self) -> dict[str | None, tuple[_Key, str | None]]:
        s = self.settings
        if s.hmac:
            if s.secret_file is not None:
                secret = _read_text(s.secret_file, "JWT secret file").rstrip("\r\n")
            elif s.secret:
                secret = s.secret
            else:
                raise ServiceError(f"[auth.jwt] secret_env names {s.secret_env}, which is not set in the service's "
                                   f"environment. Export it (e.g. from your secret store) before starting.")
            if len(secret.encode()) < _MIN_SECRET_BYTES:
                raise ServiceError(f"The [auth.jwt] {s.algorithms[0]} secret is {len(secret.encode())} bytes; use at "
                                   f"least {_MIN_SECRET_BYTES} random bytes (e.g. `openssl rand -hex 32`).")
            return {None: (secret.encode(), None)}
        if s.public_key_file is not None:
            return {None: (self._pem_key(s.public_key_file), None)}
        return self._jwks(s.jwks_file)  # type: ignore[arg-type]

    def _pem_key(self, path: Path) -> AllowedPublicKeys:
        from cryptography.hazmat.primitives.serialization import load_pem_public_key

        text = _read_text(path, "JWT public key file")
        try:
            key = load_pem_public_key(text.encode())
        except ValueError as exc:
            raise ServiceError(f"{path} is not a PEM public key (-----BEGIN PUBLIC KEY-----): {exc}.") from exc
        for alg in self.settings.algorithms:
            try:
                jwt.get_algorithm_by_name(alg).prepare_key(key)
            except (jwt.InvalidKeyError, TypeError, ValueError) as exc:
                raise ServiceError(f"{path} holds a {type(key).__name__}, which cannot check {alg} tokens "
                                   f"([auth.jwt] algorithms = {list(self.settings.algorithms)}).") from exc
        return cast("AllowedPublicKeys", key)  # every algorithm's prepare_key took it

    def _jwks(self, path: Path) -> dict[str | None, tuple[_Key, str | None]]:
        try:
            doc = json.loads(_read_text(path, "JWKS file"))
        except ValueError as exc:
            raise ServiceError(f"{path} is not JSON ({exc}); a JWKS document is {{\"keys\": [...]}}.") from exc
        entries = doc.get("keys") if isinstance(doc, dict) else None
        if not isinstance(entries, list):
            raise ServiceError(f"{path} is not a JWKS document ({{\"keys\": [...]}}).")
        keys: dict[str | None, tuple[_Key, str | None]] = {}
        for n, d in enumerate(entries):
            if not isinstance(d, dict) or d.get("use", "sig") != "sig":
                continue
            alg = d.get("alg")
            if alg is not None and alg not in self.settings.algorithms:
                continue  # a key for another algorithm: never let it check ours
            try:
                keys[d.get("kid")] = (jwt.PyJWK(d, alg or self.settings.algorithms[0]).key, alg)
            except jwt.PyJWTError as exc:
                log.warning("%s: skipping key %d (kid %r): %s", path, n, d.get("kid"), exc)
        if not keys:
            raise ServiceError(f"{path} holds no signing key usable with {list(self.settings.algorithms)}.")
        return keys

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if self._file is None or now - self._checked < 1.0:
            return
        with self._lock:
            self._checked = now
            stamp = _stat(self._file)
            if stamp == self._stamp:
                return
            try:
                self._keys = self._load()
                self._stamp = stamp
                self._verified = OrderedDict()
                log.info("JWT keys reloaded from %s (%d keys)", self._file, len(self._keys))
            except ServiceError as exc:  # keep the old keys; say so
                log.error("keeping the previous JWT keys: %s", exc)

    def _key_for(self, header: dict[str, Any]) -> _Key:
        keys = self._keys
        kid = header.get("kid")
        if kid is not None and kid in keys:
            entry = keys[kid]
        elif len(keys) == 1 and (kid is None or None in keys):
            entry = next(iter(keys.values()))
        elif kid is None:
            raise Unauthorized(f"The token names no key id (kid) and this service trusts {len(keys)} keys; the "
                               "issuer must set kid.", _challenge("invalid_token"))
        else:
            raise Unauthorized("The token's key id (kid) names no key this service trusts (was the issuer's key "
                               "rotated? update [auth.jwt] jwks_file).", _challenge("invalid_token"))
        key, pinned = entry
        if pinned is not None and header.get("alg") != pinned:
            raise Unauthorized(f"The token is signed with {header.get('alg')!r} but its key is for {pinned}.",
                               _challenge("invalid_token"))
        return key

    # ---- tokens
    def verify(self, token: str) -> dict[str, Any]:
        """The token's claims, or :class:`Unauthorized` saying why it was refused."""
        s = self.settings
        self._maybe_reload()
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise Unauthorized("The bearer token is not a well-formed JWT (its header does not decode).",
                               _challenge("invalid_token")) from exc
        if header.get("alg") not in s.algorithms:
            alg = header.get("alg")
            raise Unauthorized(f"The token's algorithm {str(alg)[:16]!r} is not accepted here (accepted: "
                               f"{', '.join(s.algorithms)}).", _challenge("invalid_token"))
        try:
            claims: dict[str, Any] = jwt.decode(token, self._key_for(header), algorithms=list(s.algorithms),
                                                audience=list(s.audience) or None, issuer=s.issuer or None,
                                                leeway=s.leeway, options={"require": list(s.required_claims)})
        except jwt.PyJWTError as exc:
            raise Unauthorized(self._why(exc, token), _challenge("invalid_token")) from exc
        for name in _TIME_CLAIMS:  # PyJWT takes int("1796...") for these; a numeric string would be cached forever
            if name in claims and not _is_number(claims[name]):
                raise Unauthorized(f"The token's {name!r} claim is not a number (a JSON NumericDate, seconds since "
                                   "1970, not a string); the issuer must send it as one.", _challenge("invalid_token"))
        return claims

    def _why(self, exc: Exception, token: str) -> str:
        s = self.settings
        if isinstance(exc, jwt.ExpiredSignatureError):
            exp = _claim(token, "exp")
            when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(exp)) if isinstance(exp, (int, float)) else "?"
            return f"The token has expired (exp {when}, leeway {s.leeway:g} s); get a new one."
        if isinstance(exc, jwt.ImmatureSignatureError):
            return (f"The token is not valid yet (nbf or iat is more than {s.leeway:g} s in the future); check the "
                    "issuer's clock.")
        if isinstance(exc, jwt.MissingRequiredClaimError):
            return f"The token lacks the required {exc.claim!r} claim."
        if isinstance(exc, jwt.InvalidAudienceError):
            if not s.audience:
                return ("The token names an audience (aud) but this service has no [auth.jwt] audience; set "
                        "audience to this service's identifier.")
            return f"Wrong audience: the token's aud does not include {', '.join(map(repr, s.audience))}."
        if isinstance(exc, jwt.InvalidIssuerError):
            return f"Wrong issuer: the token's iss is not {s.issuer!r}."
        if isinstance(exc, jwt.InvalidSignatureError):
            return "Bad signature: the token does not verify against this service's key(s)."
        if isinstance(exc, jwt.InvalidIssuedAtError):
            return "The token's iat claim is not a number."
        if isinstance(exc, jwt.DecodeError):
            return "The bearer token is not a well-formed JWT (a part does not decode)."
        return f"The token was refused ({type(exc).__name__})."

    def authenticate(self, token: str) -> Identity:
        """The identity a valid ``token`` names (cached until its exp), or :class:`Unauthorized`."""
        self._maybe_reload()
        now, leeway = time.time(), self.settings.leeway
        hit = self._verified.get(token)
        if hit is not None and hit[2] - leeway <= now <= hit[1] + leeway:
            return hit[0]
        claims = self.verify(token)
        who = self.identity(claims)
        exp, nbf = _number(claims.get("exp"), float("inf")), _number(claims.get("nbf"), float("-inf"))
        with self._lock:
            self._verified[token] = (who, exp, nbf)
            while len(self._verified) > 4096:
                self._verified.popitem(last=False)
        return who

    def identity(self, claims: dict[str, Any]) -> Identity:
        name = self.settings.client_claim
        value = claims.get(name)
        if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
            raise Unauthorized(f"The token has no usable {name!r} claim ([auth.jwt] client_claim): it names the "
                               "client for rate limits and routing.", _challenge("invalid_token"))
        user = str(value)
        return Identity(client="jwt:" + hash_key(user)[:16], user=user)


_TIME_CLAIMS = ("exp", "nbf", "iat")


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x  # not NaN


def _number(x: Any, default: float) -> float:
    """A time claim :meth:`JwtVerifier.verify` checked is a number (absent: ``default``)."""
    return float(x) if _is_number(x) else default


def _challenge(error: str) -> str:
    return f'Bearer error="{error}"'


def _claim(token: str, name: str) -> Any:
    """One claim of a token whose signature was already checked (for the message only)."""
    try:
        return jwt.decode(token, options={"verify_signature": False}).get(name)
    except jwt.PyJWTError:
        return None


def _stat(path: Path | None) -> tuple[int, int] | None:
    try:
        st = os.stat(path)  # type: ignore[arg-type]
    except (OSError, TypeError):
        return None
    return (st.st_mtime_ns, st.st_size)


def _looks_like_jwt(token: str) -> bool:
    return token.count(".") == 2 and token[:2] == "ey"  # base64url of '{"' opens every JWT header


class Authenticator:
    """API keys and/or JWTs: a request passes if any credential it presents is valid."""

    def __init__(self, keys: ApiKeys, verifier: JwtVerifier | None = None):
        self.keys = keys
        self.jwt = verifier

    @property
    def enabled(self) -> bool:
        return self.keys.enabled or self.jwt is not None

    def identify(self, api_key: str | None, authorization: str | None) -> Identity:
        """The caller's identity from the ``X-API-Key`` and ``Authorization`` header values (either may be
        None), or :class:`Unauthorized` naming what was wrong. Every credential presented must be valid:
        a wrong key is refused even next to a valid token (a wrong credential is never ignored)."""
        if not self.enabled:
            return ANONYMOUS
        auth = authorization or ""
        bearer = auth[7:].strip() if auth[:7].lower() == "bearer " else None
        who = None
        if api_key is not None:
            who = self._key(api_key, "the X-API-Key is not a known key")
        if bearer is not None:
            if self.jwt is not None and _looks_like_jwt(bearer):
                token_who = self.jwt.authenticate(bearer)
            else:
                token_who = self._key(bearer, "the bearer token is not a known API key" + (
                    " nor a JWT" if self.jwt is not None else "") if self.keys.enabled else
                    "the bearer token is not a JWT")
            who = who or token_who
        if who is None:
            raise Unauthorized(f"Unauthorized: no credentials. {self._hint()}", "Bearer")
        return who

    def _key(self, presented: str, why: str) -> Identity:
        digest = hash_key(presented)
        if self.keys.enabled and self.keys.check_digest(digest):
            return Identity(client="key:" + digest[:16])
        raise Unauthorized(f"Unauthorized: {why}. {self._hint()}", _challenge("invalid_token"))

    def _hint(self) -> str:
        ways = [x for x, on in (("'X-API-Key: KEY'", self.keys.enabled),
                                ("'Authorization: Bearer KEY'", self.keys.enabled),
                                ("'Authorization: Bearer JWT'", self.jwt is not None)) if on]
        return "Send " + " or ".join(ways) + "."
