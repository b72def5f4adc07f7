"""A model's chain of signed move records, as a reader and a writer see it (:mod:`kit.registry.moves` holds
the record format and the checks).

- Readers (:meth:`MoveLog.current`, what ``Registry.aliases`` and every service watcher call) read
  ``aliases.json`` once, verify it, and follow any newer records (a move killed after its record was created
  but before ``aliases.json`` was rewritten is still the truth; an older record put back in ``aliases.json``
  is overtaken by the newer ones). A reader never goes back: a serial older than one it accepted is refused.
- Writers (:meth:`MoveLog.head`, :meth:`MoveLog.commit`) work from the newest record that verifies, never
  from ``aliases.json``, create serial head + 1 exclusively and then copy it to ``aliases.json``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from kit._io import ensure_free_space, storage_errors
from kit._types import JSONObject
from kit.errors import KitError, PromotionRefusedError, RegistryCorruptError, SignatureError
from kit.registry.moves import Move, MoveStorage, Verifier, canonical, envelope, is_envelope, new_record
from kit.registry.records import Aliases, utcnow
from kit.signing import SigningKey, Trust

log = logging.getLogger(__name__)


def aliases_of(move: Move) -> Aliases:
    rec = move.record
    return Aliases.from_state(rec["state"], move.serial, rec.get("ts"), f"move record {move.serial} of {rec['name']}",
                              signed_by=move.signed_by, action=rec.get("action"), artifacts=rec.get("artifacts"))


@dataclass
class MoveLog:
    """One model's move records for one registry object. ``floor`` is the newest serial this reader accepted."""

    name: str
    storage: MoveStorage
    trust: Callable[[], Trust | None]
    gate_ok: Callable[[int, JSONObject, str], str | None]
    floor: int = 0
    memo: dict[str, Move] = field(default_factory=dict)

    def verifier(self) -> Verifier:
        return Verifier(self.name, self.trust(), self.storage.read, self.gate_ok, self.memo)

    # ---- readers
    def current(self) -> Aliases:
        """The state services follow: ``aliases.json`` verified, then any newer valid records."""
        data = self.storage.read_pointer()
        if data is None:
            head = self.head() if self.storage.serials() else None
            return self._accept(head) if head is not None else Aliases()
        if not is_envelope(data):
            return self._legacy(data)
        ver = self.verifier()
        cur = ver.verify(data, f"aliases.json of {self.name}")
        while (nxt := self.storage.read(cur.serial + 1)) is not None:
            try:
                m = ver.verify(nxt, f"move record {cur.serial + 1} of {self.name}", prev=cur)
            except KitError as exc:
                log.warning("%s: not following: %s", self.name, exc)
                break
            if ver.follows(cur, m) is not None:
                break
            cur = m
        return self._accept(cur)

    def _accept(self, move: Move) -> Aliases:
        if move.serial < self.floor:
            raise SignatureError(
                f"aliases.json of {self.name} serial {move.serial} refused: this reader already followed serial "
                f"{self.floor}, and serials only go forward (an older record was put back: a rollback attempt). "
                f"Still serving serial {self.floor}'s state; a key holder runs `kit aliases repair {self.name}`.",
                key_id=move.signed_by)
        self.floor = move.serial
        return aliases_of(move)

    def _legacy(self, data: bytes) -> Aliases:
        where = str(self.storage.pointer)
        if self.trust() is not None and self.storage.serials():  # no old registry's file: an edited one
            raise RegistryCorruptError(
                f"{where} is not a signed move record (edited or truncated by someone without a key), so it is not "
                f"followed. A key holder rebuilds it from the newest valid record: `kit aliases repair {self.name}`.")
        if self.trust() is not None and _json_object(data):
            raise SignatureError(
                f"{where} is in the unsigned format of registries written before signed moves, so it is not "
                f"followed. A key holder signs its state with `kit aliases migrate {self.name}`.", key_id=None)
        import json

        try:
            return Aliases.from_json(json.loads(data), where)
        except ValueError as exc:
            raise RegistryCorruptError(f"{where} is not valid JSON ({exc}). Rebuild it with "
                                       f"`kit aliases repair {self.name}`.") from exc

    def history(self) -> list[tuple[int, Move | None, str | None]]:
        """Every record in serial order: (serial, the verified move or None, why it fails or None)."""
        ver = self.verifier()
        out: list[tuple[int, Move | None, str | None]] = []
        prev: Move | None = None
        for s in self.storage.serials():
            try:
                data = self.storage.read(s)
                if data is None:
                    continue
                m = ver.verify(data, f"move record {s} of {self.name}", prev=prev)
            except KitError as exc:
                out.append((s, None, str(exc)))
                continue
            problem = ver.follows(prev, m) if prev is not None else (
                None if m.record.get("prev_sha256") is None or not out else "the record before it is missing")
            out.append((s, m, problem))
            prev = m
        return out

    # ---- writers (callers hold the model's lock)
    def head(self, serials: list[int] | None = None) -> Move | None:
        """The newest record that verifies (what the next move replaces); None for a model never moved.
        ``serials``: the listing to search (one listing, so a record made meanwhile is judged consistently)."""
        ver = self.verifier()
        for s in reversed(self.storage.serials() if serials is None else serials):
            try:
                data = self.storage.read(s)
                if data is not None:
                    return ver.verify(data, f"move record {s} of {self.name}")
            except KitError as exc:
                log.warning("%s: skipping move record %d: %s", self.name, s, exc)
        return None

    def base(self) -> tuple[Move | None, Aliases]:
        """What a writer's move replaces: the head record and its state. An unsigned aliases.json with no
        records must be migrated first (its state would be lost otherwise). One listing decides: a record another
        writer makes after it is found when this writer's create of the same serial fails (remedy "refresh")."""
        serials = self.storage.serials()
        head = self.head(serials)
        if head is not None:
            return head, aliases_of(head)
        data = self.storage.read_pointer()
        if data is not None and not is_envelope(data):
            raise PromotionRefusedError(
                f"{self.storage.pointer} is in the unsigned format of registries written before signed moves. "
                f"Sign its state first with `kit aliases migrate {self.name}` (a key holder), then move.")
        if serials:
            raise SignatureError(f"No move record of {self.name} verifies, so nothing can follow them. A key holder "
                                 f"checks them with `kit history {self.name}`.", key_id=None)
        return None, Aliases()

    def commit(self, head: Move | None, action: str, after: Aliases, signer: SigningKey | None, *, user: str,
               why: str | None, artifacts: dict[str, str], relies_on: JSONObject,
               details: JSONObject, serial: int | None = None) -> Aliases:
        """Create the record of ``action`` (state ``after``) as serial head + 1, then copy it to aliases.json."""
        serial = serial if serial is not None else (head.serial if head is not None else 0) + 1
        rec = new_record(self.name, serial, head, action, after.state(), user=user, ts=utcnow(), why=why,
                         artifacts=artifacts, relies_on=relies_on, details=details)
        data = envelope(rec, signer)
        if self.trust() is not None:  # what readers will check, checked first (a guard key beyond its authority)
            move = self.verifier().verify(data, f"the new move record {serial} of {self.name}", prev=head)
        else:
            move = Move(rec, hashlib.sha256(canonical(rec)).hexdigest(), data, None)
        where, what = self.storage.model_dir, f"{self.name}'s move record {serial}"
        ensure_free_space(where, 2 * len(data), what)  # the record and aliases.json: refused whole, not half-made
        with storage_errors(where, what, 2 * len(data)):
            created = self.storage.create(serial, data)
        if not created:
            raise PromotionRefusedError(
                f"{self.name}'s move serial {serial} was taken by another writer first (or a file a registry writer "
                f"put at {self.storage.path(serial)}); nothing was moved. Look again (`kit history {self.name}`) "
                "and repeat the move.", remedy="refresh", subject=self.name)
        try:
            self.storage.write_pointer(data)  # a kill before this leaves the record, which readers follow
        except OSError as exc:  # the move is made (readers follow the record); only the copy is stale
            log.warning("%s: move record %d is written but aliases.json could not be rewritten (%s); readers "
                        "follow the record. Run `kit aliases repair %s` when %s is writable again.",
                        self.name, serial, exc, self.name, where)
        self.floor = max(self.floor, serial)
        return aliases_of(move)


def move_event(name: str, serial: int, move: Move | None, problem: str | None) -> JSONObject:
    """A move record as an audit event (``kit history``, the panel, the guard's /readyz note)."""
    if move is None:
        return {"event": "move", "name": name, "serial": serial, "verified": False, "problem": problem}
    rec = move.record
    ev: JSONObject = {**rec.get("details", {}), "ts": rec.get("ts"), "event": rec["action"], "name": name,
                          "user": rec.get("user"), "why": rec.get("why"), "serial": serial,
                          "relies_on": rec.get("relies_on"), "signed_by": move.signed_by, "by_guard": move.by_guard,
                          "verified": problem is None, "aliases": aliases_of(move).to_json()}
    if problem is not None:
        ev["problem"] = problem
    return ev


def _json_object(data: bytes) -> bool:
    import json

    try:
        return isinstance(json.loads(data), dict)
    except ValueError:
        return False
