"""The alias moves: promote, canary (start, re-weight, end, the canary guard's judged end and progressive
step), rollback, repair and migration -- each one a signed move record (:mod:`kit.registry.moves`).

Each move takes the model's lock, reads the newest record that verifies (never ``aliases.json``), and creates
the next record exclusively, signed by the registry's key (or, for the canary guard's moves, by the
service's guard key, whose authority the canary's record delegated); ``aliases.json`` is then rewritten
as a copy of it. The record is the audit entry. Promoting and starting a canary need a passing gate for
the artifact unless forced with a reason; forcing overrides the gate, never integrity.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kit import evidence as gate_evidence
from kit._io import atomic_write_bytes, read_capped, storage_errors
from kit._types import JSONObject
from kit.errors import IntegrityError, KitError, PromotionRefusedError, SignatureError
from kit.registry.integrity import CheckedStore
from kit.registry.movelog import aliases_of
from kit.registry.moves import MAX_RECORD_BYTES, Move, envelope, guard_registration, read_guard_registration
from kit.registry.names import check_weight
from kit.registry.records import Aliases, ModelVersion, utcnow
from kit.signing import PublicKey, SigningKey, sig_path, verify_bytes

log = logging.getLogger(__name__)

_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


class AliasMoves(CheckedStore):
    """A :class:`CheckedStore` whose aliases move: the gate rule and integrity checks before each move."""

    def _check_gate(self, mv: ModelVersion, force: bool, why: str | None, action: str) -> JSONObject | None:
        if force:
            if not why or not why.strip():
                raise PromotionRefusedError(
                    f"A forced {action} of {mv.ref} needs a reason (why=...); it is recorded in the audit log.",
                    remedy="why",
                )
            return None
        gate = self.passing_gate(mv)
        if self.require_gate and gate is None:
            raise PromotionRefusedError(
                f"Refusing to {action} {mv.ref}: no passing gate recorded for its artifact sha256 "
                f"{mv.short_sha}.{self._gate_detail(mv)} Validate it first, or force it with a reason "
                "(audited as forced).",
                remedy="validate", subject=mv.ref,
            )
        return gate

    def _gate_detail(self, mv: ModelVersion) -> str:
        """The newest gate of ``mv``'s artifact: its failed checks with their figures, and its report."""
        return gate_evidence.refusal_detail(self.root, self.version_dir(mv.name, mv.version),
                                            self.gate_results(mv.name, mv.version), mv.artifact_sha256)

    def _check_integrity_for(self, mv: ModelVersion, action: str) -> None:
        try:
            self.check_integrity(mv)
        except SignatureError as exc:
            raise SignatureError(f"Refusing to {action} {mv.ref} (forcing overrides the gate, never integrity): "
                                 f"{exc}", key_id=exc.key_id) from exc
        except IntegrityError as exc:
            raise IntegrityError(f"Refusing to {action} {mv.ref} (forcing overrides the gate, never integrity): "
                                 f"{exc}") from exc

    # ---- what a record relies on and points at
    def _relies_on(self, mv: ModelVersion, gate: JSONObject | None, force: bool, why: str | None) -> JSONObject:
        if force:
            return {"force": {"version": mv.version, "why": why}}
        if gate is None:
            return {}
        run_id = str(gate.get("run_id"))
        path = gate_evidence.gates_dir(mv.path) / run_id / gate_evidence.RESULT_FILE
        digest = hashlib.sha256(read_capped(path, MAX_RECORD_BYTES * 16)).hexdigest() if path.is_file() else None
        return {"gate": {"version": mv.version, "run_id": run_id, "result_sha256": digest}}

    def _artifacts(self, name: str, state: Aliases, known: dict[str, str]) -> dict[str, str]:
        out = {}
        for v in [state.production, state.canary, *state.previous]:
            if v is None:
                continue
            out[str(v)] = known.get(str(v)) or self._read_version(name, v).artifact_sha256
        return out

    def _gate_problem(self, name: str, version: int, gate: JSONObject, artifact_sha256: str) -> str | None:
        """Why ``gate`` (a record's ``relies_on.gate``) is not a signed passing gate of ``artifact_sha256``."""
        run_id = str(gate.get("run_id", ""))
        if not _RUN_ID.fullmatch(run_id) or ".." in run_id or gate.get("version") != version:
            return f"gate {run_id!r} of version {gate.get('version')!r} is not a gate of v{version}"
        path = gate_evidence.gates_dir(self.version_dir(name, version)) / run_id / gate_evidence.RESULT_FILE
        try:
            data = read_capped(path, MAX_RECORD_BYTES * 16)
            if hashlib.sha256(data).hexdigest() != gate.get("result_sha256"):
                return f"gate {run_id}'s result.json is not the one the record names"
            trust = self.trust()
            if trust is not None:
                verify_bytes(data, sig_path(path), trust, f"gate result {run_id}", "Run the gate again.")
            d = json.loads(data)
        except (OSError, ValueError, KitError) as exc:
            return f"gate {run_id}: {exc}"
        if not (isinstance(d, dict) and d.get("passed") is True and d.get("artifact_sha256") == artifact_sha256):
            return f"gate {run_id} did not pass for artifact {artifact_sha256[:12]}"
        return None

    def _state(self, name: str) -> Aliases:
        """The state a writer plans from: its newest valid record's (never aliases.json, which anyone can edit)."""
        return self.movelog(name).base()[1]

    def _signer(self, signer: SigningKey | None) -> SigningKey | None:
        if signer is not None:
            return signer
        if self.keyring is None:
            return None  # an unsigned registry (tests, Registry(path)): its readers check no signatures
        return self.keyring.signer()  # SigningKeyError for a registry that only verifies (a service)

    def _move(self, name: str, action: str, change: Callable[[Move | None, Aliases], Aliases | None], *, user: str | None, why: str | None,
              signer: SigningKey | None = None, relies_on: JSONObject | None = None,
              details: JSONObject | None = None, known: dict[str, str] | None = None) -> Aliases:
        """Under the lock: ``change(head_move, current) -> Aliases | None`` (None: nothing to do), then the record."""
        key = self._signer(signer)
        with storage_errors(self.model_dir(name), f"a move of {name!r}"), self.lock(name):
            ml = self.movelog(name)
            ml.storage.sweep()  # what killed moves left
            head, cur = ml.base()
            after = change(head, cur)
            if after is None:
                return cur
            if after.canary is None:
                after = _replace(after, guards={})
            return ml.commit(head, action, after, key, user=user or self.user, why=why,
                             artifacts=self._artifacts(name, after, {**cur.artifacts, **(known or {})}),
                             relies_on=relies_on or {}, details=details or {})

    # ---- the moves
    def promote(self, name: str, version: int | str, *, force: bool = False, why: str | None = None,
                user: str | None = None, expect_serial: int | None = None,
                signer: SigningKey | None = None) -> Aliases:
        """Move ``production`` to ``version``. Needs a passing gate for this artifact unless forced.

        Promoting the current canary ends the canary. ``expect_serial``: refuse if the aliases moved since
        (the canary guard promotes what it judged, once, signing with its guard key ``signer``).
        """
        mv = self.get(name, version)
        self._check_integrity_for(mv, "promote")  # --force overrides the gate, never integrity
        gate = self._check_gate(mv, force, why, "promote")
        info: JSONObject = {}

        def change(head: Move | None, cur: Aliases) -> Aliases:
            if expect_serial is not None and cur.serial != expect_serial:
                raise PromotionRefusedError(f"{name}'s aliases moved (serial {cur.serial}, expected {expect_serial}); "
                                            "nothing was promoted.", remedy="refresh", subject=name)
            previous = cur.previous
            if cur.production is not None and cur.production != mv.version:
                previous = (*cur.previous, cur.production)[-20:]
            canary, weight = (cur.canary, cur.canary_weight) if cur.canary != mv.version else (None, 0.0)
            info["from"] = cur.production
            return _replace(cur, production=mv.version, previous=previous, canary=canary, canary_weight=weight)

        new = self._move(name, "promote", change, user=user, why=why, signer=signer,
                         relies_on=self._relies_on(mv, gate, force, why), known={str(mv.version): mv.artifact_sha256},
                         details={"version": mv.version, "forced": force, "gate": (gate or {}).get("run_id")})
        log.info("%s production -> %d", name, mv.version)
        return new

    def set_canary(self, name: str, version: int | str, weight: float, *, force: bool = False,
                   why: str | None = None, user: str | None = None) -> Aliases:
        """Start, re-weight or replace the canary: ``weight`` of traffic (0 < weight <= 1) goes to ``version``.

        Starting or replacing delegates to the model's registered guard keys (:meth:`register_guard_key`)
        the authority to end this canary or step it along their plans. Faces call
        :func:`kit.traffic.set_traffic`, which states the rule and plans the move first.
        """
        weight = check_weight(weight)
        mv = self.get(name, version)
        reweight = self._state(name).canary == mv.version
        if not reweight:  # re-weighting a running canary re-hashes nothing and needs no new gate
            self._check_integrity_for(mv, "start a canary of")
        gate = None if reweight else self._check_gate(mv, force, why, "start a canary of")
        guards = {} if reweight else self.guard_keys(name)

        def change(head: Move | None, cur: Aliases) -> Aliases:
            if cur.production is None:
                raise PromotionRefusedError(
                    f"Model {name!r} has no production version to split traffic with. Promote one first.")
            if mv.version == cur.production:
                raise PromotionRefusedError(f"{mv.ref} is already production; a canary must be another version.")
            if cur.canary == mv.version:
                return _replace(cur, canary_weight=weight)
            if reweight:
                raise PromotionRefusedError(f"{name}'s canary moved while this re-weight was prepared; nothing "
                                            "was changed. Look again and repeat.", remedy="refresh", subject=name)
            return _replace(cur, canary=mv.version, canary_weight=weight, guards=guards)

        replaced = self._state(name).canary
        return self._move(name, "canary", change, user=user, why=why,
                          relies_on=self._relies_on(mv, gate, force, why) if not reweight else {},
                          known={str(mv.version): mv.artifact_sha256},
                          details={"version": mv.version, "weight": weight, "forced": force,
                                   "gate": (gate or {}).get("run_id"),
                                   "replaced": replaced if replaced not in (None, mv.version) else None})

    def set_canary_weight(self, name: str, weight: float, *, why: str | None = None,
                          user: str | None = None) -> Aliases:
        weight = check_weight(weight)
        cur = self._state(name)
        if cur.canary is None:
            raise PromotionRefusedError(f"Model {name!r} has no canary to re-weight. Name the version to start one with.",
                                        remedy="start_canary", subject=name)
        return self.set_canary(name, cur.canary, weight, why=why, user=user)

    def end_canary(self, name: str, *, why: str | None = None, user: str | None = None) -> Aliases:
        """Send all traffic back to production."""
        self._require_model(name)
        info: JSONObject = {}

        def change(head: Move | None, cur: Aliases) -> Aliases | None:
            info["version"] = cur.canary
            return None if cur.canary is None else _replace(cur, canary=None, canary_weight=0.0)

        return self._move(name, "canary_end", change, user=user, why=why, details=info)

    def end_judged_canary(self, name: str, version: int, serial: int, evidence: JSONObject, *,
                          why: str | None = None, user: str | None = None,
                          signer: SigningKey | None = None) -> Aliases | None:
        """End canary ``version`` only if the aliases are still at ``serial`` (what the canary guard judged:
        any move since makes its evidence stale), recorded as ``canary_guard`` with ``evidence`` and signed by
        the guard key ``signer`` (or the registry's key). None when nothing was done."""
        return self._if_still_at(name, "canary_guard", version, serial, {"canary": None, "canary_weight": 0.0},
                                 {"version": version, "evidence": evidence}, why=why, user=user, signer=signer)

    def step_canary(self, name: str, version: int, serial: int, weight: float, evidence: JSONObject, *,
                    why: str | None = None, user: str | None = None,
                    signer: SigningKey | None = None) -> Aliases | None:
        """Re-weight canary ``version`` to ``weight`` only if the aliases are still at ``serial`` (the canary
        guard's progressive step), recorded as ``canary_step`` with ``evidence``. None when nothing was done."""
        weight = check_weight(weight)
        return self._if_still_at(name, "canary_step", version, serial, {"canary_weight": weight},
                                 {"version": version, "weight": weight, "evidence": evidence},
                                 why=why, user=user, signer=signer)

    def _if_still_at(self, name: str, kind: str, version: int, serial: int, fields: JSONObject,
                     details: JSONObject, *, why: str | None, user: str | None,
                     signer: SigningKey | None) -> Aliases | None:
        """The move ``kind`` setting ``fields``, only while canary ``version`` is at ``serial`` (what the
        guard judged); None when the aliases moved since and nothing was done."""
        self._require_model(name)
        done: list[bool] = []

        def change(head: Move | None, cur: Aliases) -> Aliases | None:
            if (cur.canary, cur.serial) != (version, serial):
                return None
            done.append(True)
            return _replace(cur, **fields)

        new = self._move(name, kind, change, user=user, why=why, signer=signer, details=details)
        return new if done else None

    def rollback(self, name: str, *, why: str | None = None, user: str | None = None) -> Aliases:
        """Production back to the previous production version; any canary is ended."""
        self._require_model(name)
        info: JSONObject = {}

        def change(head: Move | None, cur: Aliases) -> Aliases:
            if not cur.previous and cur.canary is not None:  # an incident: at least stop the canary's traffic
                info.update(version=cur.production, from_version=cur.production, ended_canary=cur.canary,
                            only_ended_canary=True)
                return _replace(cur, canary=None, canary_weight=0.0)
            if not cur.previous:
                raise PromotionRefusedError(
                    f"Model {name!r} has no previous production version to roll back to "
                    f"(production is {cur.production}). Promote a specific version instead."
                )
            info.update(version=cur.previous[-1], from_version=cur.production, ended_canary=cur.canary)
            return _replace(cur, production=cur.previous[-1], previous=cur.previous[:-1], canary=None,
                            canary_weight=0.0)

        new = self._move(name, "rollback", change, user=user, why=why, details=info)
        if info.get("only_ended_canary"):
            log.warning("%s has no previous production to roll back to: ended the canary of version %s; production "
                        "stays %s", name, info.get("ended_canary"), info.get("version"))
        else:
            log.info("%s rolled back %s -> %s", name, info.get("from_version"), info.get("version"))
        return new

    # ---- repair, migration, guard keys
    def repair_aliases(self, name: str, *, user: str | None = None) -> Aliases:
        """Rewrite aliases.json as a copy of the newest move record that verifies (nothing is signed anew)."""
        self._require_model(name)
        with self.lock(name):
            ml = self.movelog(name)
            head = ml.head()
            pointer = ml.storage.read_pointer()
            if head is None and not ml.storage.serials() and pointer is not None and not _parses(pointer):
                ml.storage.remove_pointer()  # never moved, and the file is garbage: no state at all
                self._event(name, "aliases_repair", user=user, serial=0)
                return Aliases()
            if head is None:
                raise SignatureError(f"No move record of {name} verifies, so aliases.json cannot be rebuilt from "
                                     f"one. A key holder signs the state to serve: `kit aliases migrate {name}` "
                                     "(an unsigned aliases.json) or `kit promote`.", key_id=None)
            ml.storage.write_pointer(head.data)
            self._event(name, "aliases_repair", user=user, serial=head.serial)
        return aliases_of(head)

    def plan_migration(self, name: str) -> Aliases:
        """The state :meth:`migrate_aliases` would sign: the unsigned aliases.json, read without a signature
        check (show it to the key holder first). Refused when the model already has move records."""
        self._require_model(name)
        ml = self.movelog(name)
        if ml.storage.serials():
            raise PromotionRefusedError(f"{name} already has signed move records (`kit history {name}`); nothing "
                                        "to migrate.", subject=name)
        data = ml.storage.read_pointer()
        if data is None:
            return Aliases()
        try:
            return Aliases.from_json(json.loads(data), str(ml.storage.pointer))
        except ValueError as exc:
            raise PromotionRefusedError(f"{ml.storage.pointer} is not valid JSON ({exc}); promote a version "
                                        "instead of migrating.", subject=name) from exc

    def migrate_aliases(self, name: str, *, user: str | None = None, expect: Aliases | None = None) -> Aliases:
        """Sign an old registry's unsigned aliases.json state as the first move record (serial: its old serial
        + 1, so serials still only go forward). ``expect``: the state shown to the key holder; refused if the
        file changed since. Needs the registry's signing key."""
        key = self._signer(None)
        with self.lock(name):
            plan = self.plan_migration(name)
            if expect is not None and plan != expect:
                raise PromotionRefusedError(f"{name}'s aliases.json changed since it was shown; nothing was signed. "
                                            "Look again.", remedy="refresh", subject=name)
            return self.movelog(name).commit(None, "migrate", plan, key, user=user or self.user,
                                             why="signed the unsigned aliases.json of an older registry",
                                             artifacts=self._artifacts(name, plan, {}), relies_on={},
                                             details={"version": plan.production}, serial=plan.serial + 1)

    def register_guard_key(self, name: str, public_key: str, *, service: str, steps: list[float],
                           user: str | None = None) -> Path:
        """Record (signed by this registry's key) that ``service``'s guard key may act on ``name``'s future
        canaries: end them, or step them along ``steps`` (fractions; 1.0 promotes, with a signed passing gate).
        Canaries started after this delegate to it."""
        pub = PublicKey.from_text(public_key, f"the guard key of service {service!r}")
        steps = sorted({check_weight(s) for s in steps})
        rec = guard_registration(name, pub.text(), service, steps, user=user or self.user, ts=utcnow())
        path = self.model_dir(name) / "guards" / f"{pub.key_id}.json"
        atomic_write_bytes(path, envelope(rec, self._signer(None), fmt="kit-guard-key"))
        log.info("%s: guard key %s of service %s registered (plan %s)", name, pub.key_id, service, steps)
        return path

    def guard_keys(self, name: str) -> JSONObject:
        """The registered guard keys of ``name`` that verify: key id -> {public_key, steps, service}."""
        out: JSONObject = {}
        folder = self.model_dir(name) / "guards"
        for p in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            try:
                rec = read_guard_registration(read_capped(p, MAX_RECORD_BYTES), name, self.trust(), str(p))
            except (OSError, ValueError, KitError) as exc:
                log.warning("%s: guard key registration %s not used: %s", name, p.name, exc)
                continue
            pub = PublicKey.from_text(rec["public_key"])
            out[pub.key_id] = {"public_key": pub.text(), "steps": rec["steps"], "service": rec.get("service")}
        return out


def _replace(a: Aliases, **changes: Any) -> Aliases:
    import dataclasses

    return dataclasses.replace(a, **changes)


def _parses(data: bytes) -> bool:
    try:
        json.loads(data)
    except ValueError:
        return False
    return True
