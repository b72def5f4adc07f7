"""Signed move records: every change of production, canary and weight is one immutable, signed record.

A registry's storage is untrusted (``docs/security.md``): whoever can write its files must not be able to
move traffic. So a move is a record, modelled on TUF's metadata -- signed, with a serial that only goes
forward and a hash chain -- and the record *is* the audit entry: no move exists without it::

    <model>/moves/00000007.json   {"format": "kit-move", "record": "<the record's JSON text>",
                                   "signature": {kit.signing's signature record, or null unsigned}}
    <model>/aliases.json          a byte-for-byte copy of the newest record (what services stat and read)
    <model>/guards/<key_id>.json  a person's signed registration of a service's guard key and its plan

The record (the signed text; see :func:`new_record`) holds: ``name``, ``serial``, ``prev_sha256`` (sha256 of
the record it replaces), ``action``, ``ts``, ``user``, ``why``, the resulting ``state`` (production,
previous, canary, weight and the guard keys delegated to that canary), ``artifacts`` (the artifact sha256 of
each version the state names) and ``relies_on`` (the passing gate: run id and sha256 of its signed
result.json; or the signed force and its reason).

Each file is created exclusively (a link that fails when the name exists: two writers can never both write
serial N; an object store's ``If-None-Match: *`` does the same), behind :class:`MoveStorage`. Readers read
the bytes once, verify the signature against their trust, then parse those bytes and check the name, the
serial, the chain and, for a record a guard key signed, that it stays inside the guard's authority
(:func:`check_guard_move`).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kit._io import atomic_write_bytes, fsync_dir, read_capped, sweep_stale
from kit._types import JSONObject
from kit.errors import RegistryCorruptError, SignatureError
from kit.signing import PublicKey, SigningKey, Trust, signature_record, verify_signature

FORMAT = "kit-move"
GUARD_FORMAT = "kit-guard-key"
MAX_RECORD_BYTES = 256 << 10  # a record is ~1 KB; a bigger file is refused before it is parsed
_SERIAL_DIGITS = 8
MOVE_ACTIONS = ("promote", "canary", "canary_end", "canary_guard", "canary_step", "rollback", "migrate")
GUARD_ACTIONS = ("canary_guard", "canary_step", "promote")


@dataclass(frozen=True)
class Move:
    """One verified move record. ``sha256`` is that of the signed record text (what the next one chains to)."""

    record: JSONObject
    sha256: str
    data: bytes  # the envelope's exact bytes (aliases.json is a copy of them)
    signed_by: str | None  # the verifying key id; None when the reader checks no signatures
    by_guard: bool = False  # signed by a guard key delegated by the record before it

    @property
    def serial(self) -> int:
        return int(self.record["serial"])

    @property
    def state(self) -> JSONObject:
        return dict(self.record["state"])


@dataclass
class MoveStorage:
    """Where a model's records live. Files here; the interface is what an object store would implement
    (``create`` is ``PUT`` with ``If-None-Match: *``, ``read`` a ``GET``, ``serials`` a ``LIST``)."""

    model_dir: Path

    @property
    def folder(self) -> Path:
        return self.model_dir / "moves"

    @property
    def pointer(self) -> Path:
        return self.model_dir / "aliases.json"

    def path(self, serial: int) -> Path:
        return self.folder / f"{serial:0{_SERIAL_DIGITS}d}.json"

    def read(self, serial: int) -> bytes | None:
        return _read(self.path(serial))

    def read_pointer(self) -> bytes | None:
        return _read(self.pointer)

    def serials(self) -> list[int]:
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            return []
        return sorted(int(n[:-5]) for n in names
                      if n.endswith(".json") and len(n) == _SERIAL_DIGITS + 5 and n[:-5].isascii() and n[:-5].isdigit())

    def create(self, serial: int, data: bytes) -> bool:
        """Write ``data`` as record ``serial`` only if no record ``serial`` exists; False when one does."""
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{serial}.{secrets.token_hex(6)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, self.path(serial))  # atomic and exclusive: fails when the name exists
            except FileExistsError:
                return False
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(self.folder)
        return True

    def write_pointer(self, data: bytes) -> None:
        atomic_write_bytes(self.pointer, data)

    def remove_pointer(self) -> None:
        """Remove aliases.json (a repair of one that never held a move)."""
        self.pointer.unlink(missing_ok=True)

    def sweep(self, older_than: float = 60.0) -> int:
        """Remove temporary files of killed writers (``moves/.<serial>.*.tmp``, ``.aliases.json.*.tmp``);
        callers hold the model's lock."""
        return sweep_stale(self.folder, ".*.tmp", older_than) + sweep_stale(self.model_dir, ".aliases.json.*.tmp",
                                                                            older_than)


def _read(path: Path) -> bytes | None:
    try:
        return read_capped(path, MAX_RECORD_BYTES)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise RegistryCorruptError(f"{path} cannot be read as a move record ({exc}). A registry writer changed "
                                   "it; rebuild aliases.json with `kit aliases repair`.") from exc


# --------------------------------------------------------------------------- writing


def canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def envelope(record: JSONObject, signer: SigningKey | None, fmt: str = FORMAT) -> bytes:
    """The file bytes of ``record``: its canonical JSON text and ``signer``'s signature of exactly that text."""
    text = canonical(record)
    sig = signature_record(text, signer, fmt) if signer is not None else None
    return json.dumps({"format": fmt, "record": text.decode(), "signature": sig}, indent=1).encode() + b"\n"


def new_record(name: str, serial: int, prev: Move | None, action: str, state: JSONObject, *,
               user: str, ts: str, why: str | None, artifacts: dict[str, str], relies_on: JSONObject,
               details: JSONObject | None = None) -> JSONObject:
    return {"format": FORMAT, "schema": 1, "name": name, "serial": serial,
            "prev_sha256": prev.sha256 if prev is not None else None, "action": action, "ts": ts, "user": user,
            "why": why, "state": state, "artifacts": artifacts, "relies_on": relies_on, "details": details or {}}


# --------------------------------------------------------------------------- reading and verifying


@dataclass
class Verifier:
    """Checks records of one model against a reader's trust (None: unsigned registry, nothing checked).

    ``gate_ok(version, gate) -> problem or None`` checks a guard promotion's gate (signed, passing, for the
    artifact); ``fetch(serial) -> bytes | None`` reads an earlier record (a guard record is judged against
    the one it replaces).
    """

    name: str
    trust: Trust | None
    fetch: Callable[[int], bytes | None]
    gate_ok: Callable[[int, JSONObject, str], str | None]
    _memo: dict[str, Move] = field(default_factory=dict)

    def verify(self, data: bytes, where: str, prev: Move | None = None, depth: int = 0) -> Move:
        """Verify the envelope ``data`` (read once by the caller) and parse what was verified."""
        text, sig = _open_envelope(data, where, FORMAT)
        digest = hashlib.sha256(text).hexdigest()
        if digest in self._memo:  # verified before: the same bytes verify the same way
            return self._memo[digest]
        fix = (f"Do not follow it; a key holder rebuilds aliases.json with `kit aliases repair {self.name}`, or "
               "adds the signer's public key to the trusted keys if it is theirs.")
        signed_by, by_guard, guard_pub = None, False, None
        if self.trust is not None:
            if sig is None:
                raise SignatureError(f"{where} is not signed (trusted keys: {', '.join(self.trust.key_ids) or 'none'}). "
                                     f"{fix}", key_id=None)
            key_id = str(sig.get("key_id")) if isinstance(sig, dict) else None
            if key_id is not None and self.trust.get(key_id) is None:
                prev = prev if prev is not None else self._previous(text, where, depth)
                guard_pub = _delegated(prev, key_id)
            trust = Trust((guard_pub,)) if guard_pub is not None else self.trust
            signed_by = verify_signature(text, canonical(sig), trust, where, fix, where=where)
            by_guard = guard_pub is not None
        rec = _parse_record(text, where)
        if rec["name"] != self.name:
            raise SignatureError(f"{where} is a move of model {rec['name']!r}, not {self.name!r}: a record copied "
                                 f"from elsewhere. {fix}", key_id=signed_by)
        move = Move(rec, digest, data, signed_by, by_guard)
        if by_guard:
            assert prev is not None
            problem = check_guard_move(prev, move, self.gate_ok)
            if problem:
                raise SignatureError(f"{where} (serial {move.serial}) is signed by guard key {signed_by}, "
                                     f"which may not {problem}. {fix}", key_id=signed_by)
        self._memo[digest] = move
        return move

    def _previous(self, text: bytes, where: str, depth: int) -> Move | None:
        """The record a possibly guard-signed record replaces, verified (guards judge from it)."""
        if depth > 64:
            raise SignatureError(f"{where}: more than 64 guard records in a row; a person's record must start "
                                 "each canary.", key_id=None)
        try:
            serial = int(json.loads(text)["serial"])  # only to find the predecessor; verified before use
        except (ValueError, KeyError, TypeError):
            return None
        data = self.fetch(serial - 1)
        if data is None:
            return None
        return self.verify(data, f"move record {serial - 1} of {self.name}", depth=depth + 1)

    def follows(self, prev: Move, nxt: Move) -> str | None:
        """Why ``nxt`` does not extend ``prev`` (serial + 1 and the hash chain), or None."""
        if nxt.serial != prev.serial + 1:
            return f"serial {nxt.serial} does not follow {prev.serial}"
        if nxt.record.get("prev_sha256") != prev.sha256:
            return f"serial {nxt.serial} names another record before it (the chain is broken)"
        return None


def _delegated(prev: Move | None, key_id: str) -> PublicKey | None:
    guards = (prev.state.get("canary") or {}).get("guards", {}) if prev is not None else {}
    g = guards.get(key_id) if isinstance(guards, dict) else None
    try:
        return PublicKey.from_text(str(g["public_key"])) if isinstance(g, dict) else None
    except Exception:
        return None


def _open_envelope(data: bytes, where: str, fmt: str) -> tuple[bytes, object]:
    try:
        env = json.loads(data)
        if not isinstance(env, dict) or env.get("format") != fmt or not isinstance(env.get("record"), str):
            raise ValueError(f"not a {fmt} envelope")
        return env["record"].encode(), env.get("signature")
    except (ValueError, UnicodeError) as exc:
        raise RegistryCorruptError(f"{where} is not a {fmt} record ({exc}). Rebuild aliases.json from the signed "
                                   "records with `kit aliases repair`.") from exc


def is_envelope(data: bytes) -> bool:
    try:
        env = json.loads(data)
    except ValueError:
        return False
    return isinstance(env, dict) and env.get("format") == FORMAT


def _parse_record(text: bytes, where: str) -> JSONObject:
    try:
        rec = json.loads(text)
        if not isinstance(rec, dict) or rec.get("format") != FORMAT:
            raise ValueError("not a move record")
        if not isinstance(rec["serial"], int) or rec["serial"] < 1 or rec["action"] not in MOVE_ACTIONS:
            raise ValueError(f"serial {rec['serial']!r}, action {rec['action']!r}")
        if not isinstance(rec["state"], dict) or not isinstance(rec["name"], str):
            raise ValueError("no state")
    except (ValueError, KeyError, TypeError) as exc:
        raise RegistryCorruptError(f"{where} is malformed ({exc}). Rebuild aliases.json with `kit aliases repair`.") from exc
    return rec


# --------------------------------------------------------------------------- the guard's authority


def next_step(steps: list[float], weight: float) -> float | None:
    return min((s for s in steps if s > weight + 1e-9), default=None)


def check_guard_move(prev: Move, move: Move, gate_ok: Callable[[int, JSONObject, str], str | None]) -> str | None:
    """Why a guard key's ``move`` is outside its authority over ``prev``'s canary, or None when inside it.

    A guard key delegated by the running canary may only end that canary, step its weight to the next value
    of its plan, or -- when the next value is 100% -- promote it relying on a signed passing gate.
    """
    before, after, rec = prev.state, move.state, move.record
    canary = before.get("canary") or {}
    if not canary:
        return "move anything: no canary is running"
    key = move.signed_by or ""
    steps = [float(s) for s in canary.get("guards", {}).get(key, {}).get("steps", [])]
    same_prod = (after.get("production"), after.get("previous")) == (before.get("production"), before.get("previous"))
    if rec["prev_sha256"] != prev.sha256 or move.serial != prev.serial + 1:
        return "move anything but the record it judged (the chain does not follow)"
    if rec["action"] == "canary_guard":
        return None if same_prod and after.get("canary") is None else "do anything but end the canary when it ends one"
    nxt = next_step(steps, float(canary.get("weight", 0.0)))
    if rec["action"] == "canary_step":
        a = after.get("canary") or {}
        ok = (same_prod and nxt is not None and nxt < 1.0 and a.get("version") == canary.get("version")
              and abs(float(a.get("weight", -1)) - nxt) < 1e-9 and a.get("guards") == canary.get("guards"))
        return None if ok else f"step the canary anywhere but the next value of its plan ({nxt})"
    if rec["action"] == "promote":
        prod = before.get("production")
        previous = [*before.get("previous", []), prod][-20:] if prod is not None else list(before.get("previous", []))
        if nxt is None or nxt < 1.0 - 1e-9:
            return "promote before the plan reaches 100%"
        if (after.get("production"), after.get("previous"), after.get("canary")) != (canary.get("version"), previous, None):
            return "promote anything but the canary it judged"
        gate = rec.get("relies_on", {}).get("gate")
        version = int(canary["version"])
        problem = gate_ok(version, gate, str(prev.record.get("artifacts", {}).get(str(version), ""))) \
            if isinstance(gate, dict) else "no gate named"
        return None if problem is None else f"promote without a signed passing gate ({problem})"
    return f"{rec['action']}"


# --------------------------------------------------------------------------- guard key registrations


def guard_registration(name: str, public_key: str, service: str, steps: list[float], *, user: str,
                       ts: str) -> JSONObject:
    return {"format": GUARD_FORMAT, "schema": 1, "name": name, "public_key": public_key, "service": service,
            "steps": sorted(float(s) for s in steps), "user": user, "ts": ts}


def read_guard_registration(data: bytes, name: str, trust: Trust | None, where: str) -> JSONObject:
    """A guard key registration, verified against ``trust`` (a person's key) and bound to ``name``."""
    text, sig = _open_envelope(data, where, GUARD_FORMAT)
    if trust is not None:
        if sig is None:
            raise SignatureError(f"{where} is not signed; a key holder registers guard keys.", key_id=None)
        verify_signature(text, canonical(sig), trust, where, "Register the service's guard key again where a "
                         "trusted key is (`kit service new`).", where=where)
    rec = json.loads(text)
    if not isinstance(rec, dict) or rec.get("name") != name:
        raise SignatureError(f"{where} registers a guard for another model.", key_id=None)
    PublicKey.from_text(str(rec.get("public_key")), where)
    return rec
