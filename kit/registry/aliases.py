"""The alias moves: promote, canary (start, re-weight, end, the canary guard's judged end and progressive
step), rollback and repair.

Each move takes the model's lock, rewrites ``aliases.json`` atomically with ``serial`` bumped, and appends
an audit event carrying the resulting alias snapshot (what ``repair_aliases`` rebuilds from). Promoting and
starting a canary need a passing gate for the artifact unless forced with a reason; forcing overrides the
gate, never integrity.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from kit._io import atomic_write_json
from kit.errors import IntegrityError, PromotionRefusedError, SignatureError
from kit.registry.integrity import CheckedStore
from kit.registry.names import check_weight
from kit.registry.records import Aliases, ModelVersion, utcnow

log = logging.getLogger(__name__)


class AliasMoves(CheckedStore):
    """A :class:`CheckedStore` whose aliases move: the gate rule and integrity checks before each move."""

    def _check_gate(self, mv: ModelVersion, force: bool, why: str | None, action: str) -> dict[str, Any] | None:
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
                f"{mv.short_sha}. Validate it first, or force it with a reason (audited as forced).",
                remedy="validate", subject=mv.ref,
            )
        return gate

    def _check_integrity_for(self, mv: ModelVersion, action: str) -> None:
        try:
            self.check_integrity(mv)
        except SignatureError as exc:
            raise SignatureError(f"Refusing to {action} {mv.ref} (forcing overrides the gate, never integrity): "
                                 f"{exc}", key_id=exc.key_id) from exc
        except IntegrityError as exc:
            raise IntegrityError(f"Refusing to {action} {mv.ref} (forcing overrides the gate, never integrity): "
                                 f"{exc}") from exc

    def _write_aliases(self, name: str, new: Aliases) -> Aliases:
        new = dataclasses.replace(new, serial=new.serial + 1, updated=utcnow())
        atomic_write_json(self.aliases_path(name), new.to_json())
        return new

    def promote(self, name: str, version: int | str, *, force: bool = False, why: str | None = None,
                user: str | None = None, expect_serial: int | None = None) -> Aliases:
        """Move ``production`` to ``version``. Needs a passing gate for this artifact unless forced.

        Promoting the current canary ends the canary. ``expect_serial``: refuse if the aliases moved since
        (the canary guard promotes what it judged, once).
        """
        mv = self.get(name, version)
        self._check_integrity_for(mv, "promote")  # --force overrides the gate, never integrity
        with self.lock(name):
            gate = self._check_gate(mv, force, why, "promote")
            cur = self.aliases(name)
            if expect_serial is not None and cur.serial != expect_serial:
                raise PromotionRefusedError(f"{name}'s aliases moved (serial {cur.serial}, expected {expect_serial}); "
                                            "nothing was promoted.", remedy="refresh", subject=name)
            previous = cur.previous
            if cur.production is not None and cur.production != mv.version:
                previous = (*cur.previous, cur.production)[-20:]
            canary, weight = (cur.canary, cur.canary_weight) if cur.canary != mv.version else (None, 0.0)
            new = self._write_aliases(name, dataclasses.replace(
                cur, production=mv.version, previous=previous, canary=canary, canary_weight=weight))
            self._event(name, "promote", version=mv.version, from_version=cur.production, forced=force,
                        why=why, user=user, gate=(gate or {}).get("run_id"), aliases=new.to_json())
        log.info("%s production -> %d", name, mv.version)
        return new

    def set_canary(self, name: str, version: int | str, weight: float, *, force: bool = False,
                   why: str | None = None, user: str | None = None) -> Aliases:
        """Start, re-weight or replace the canary: ``weight`` of traffic (0 < weight <= 1) goes to ``version``.

        Faces call :func:`kit.traffic.set_traffic`, which states the rule and plans the move first.
        """
        weight = check_weight(weight)
        mv = self.get(name, version)
        if self.aliases(name).canary != mv.version:  # re-weighting a running canary re-hashes nothing
            self._check_integrity_for(mv, "start a canary of")
        with self.lock(name):
            cur = self.aliases(name)
            if cur.production is None:
                raise PromotionRefusedError(
                    f"Model {name!r} has no production version to split traffic with. Promote one first."
                )
            if mv.version == cur.production:
                raise PromotionRefusedError(f"{mv.ref} is already production; a canary must be another version.")
            gate = None
            if not (cur.canary == mv.version):  # re-weighting a running canary needs no new gate
                gate = self._check_gate(mv, force, why, "start a canary of")
            new = self._write_aliases(name, dataclasses.replace(cur, canary=mv.version, canary_weight=weight))
            replaced = cur.canary if cur.canary not in (None, mv.version) else None  # kit.traffic's rule
            self._event(name, "canary", version=mv.version, weight=weight, forced=force, why=why, user=user,
                        gate=(gate or {}).get("run_id"), replaced=replaced, aliases=new.to_json())
        return new

    def set_canary_weight(self, name: str, weight: float, *, why: str | None = None,
                          user: str | None = None) -> Aliases:
        weight = check_weight(weight)
        cur = self.aliases(name)
        if cur.canary is None:
            raise PromotionRefusedError(f"Model {name!r} has no canary to re-weight. Name the version to start one with.",
                                        remedy="start_canary", subject=name)
        return self.set_canary(name, cur.canary, weight, why=why, user=user)

    def end_canary(self, name: str, *, why: str | None = None, user: str | None = None) -> Aliases:
        """Send all traffic back to production."""
        self._require_model(name)
        with self.lock(name):
            cur = self.aliases(name)
            if cur.canary is None:
                return cur
            new = self._write_aliases(name, dataclasses.replace(cur, canary=None, canary_weight=0.0))
            self._event(name, "canary_end", version=cur.canary, why=why, user=user, aliases=new.to_json())
        return new

    def end_judged_canary(self, name: str, version: int, serial: int, evidence: dict[str, Any], *,
                          why: str | None = None, user: str | None = None) -> Aliases | None:
        """End canary ``version`` only if the aliases are still at ``serial`` (what the canary guard judged:
        any move since makes its evidence stale), audited as ``canary_guard`` with ``evidence``.
        None when nothing was done."""
        self._require_model(name)
        with self.lock(name):
            cur = self.aliases(name)
            if (cur.canary, cur.serial) != (version, serial):
                return None
            new = self._write_aliases(name, dataclasses.replace(cur, canary=None, canary_weight=0.0))
            self._event(name, "canary_guard", version=version, why=why, user=user, evidence=evidence,
                        aliases=new.to_json())
        return new

    def step_canary(self, name: str, version: int, serial: int, weight: float, evidence: dict[str, Any], *,
                    why: str | None = None, user: str | None = None) -> Aliases | None:
        """Re-weight canary ``version`` to ``weight`` only if the aliases are still at ``serial`` (the canary
        guard's progressive step), audited as ``canary_step`` with ``evidence``. None when nothing was done."""
        weight = check_weight(weight)
        self._require_model(name)
        with self.lock(name):
            cur = self.aliases(name)
            if (cur.canary, cur.serial) != (version, serial):
                return None
            new = self._write_aliases(name, dataclasses.replace(cur, canary_weight=weight))
            self._event(name, "canary_step", version=version, weight=weight, why=why, user=user, evidence=evidence,
                        aliases=new.to_json())
        return new

    def rollback(self, name: str, *, why: str | None = None, user: str | None = None) -> Aliases:
        """Production back to the previous production version; any canary is ended."""
        self._require_model(name)
        with self.lock(name):
            cur = self.aliases(name)
            if not cur.previous:
                raise PromotionRefusedError(
                    f"Model {name!r} has no previous production version to roll back to "
                    f"(production is {cur.production}). Promote a specific version instead."
                )
            target = cur.previous[-1]
            new = self._write_aliases(name, dataclasses.replace(
                cur, production=target, previous=cur.previous[:-1], canary=None, canary_weight=0.0))
            self._event(name, "rollback", version=target, from_version=cur.production, why=why, user=user,
                        ended_canary=cur.canary, aliases=new.to_json())
        log.info("%s rolled back %s -> %d", name, cur.production, target)
        return new

    def repair_aliases(self, name: str, *, user: str | None = None) -> Aliases:
        """Rebuild aliases.json from the newest alias snapshot in the audit log."""
        self._require_model(name)
        with self.lock(name):
            snap = None
            for ev in self.history(name):
                if "aliases" in ev:
                    snap = ev["aliases"]
            new = Aliases.from_json(snap, "audit log") if snap else Aliases()
            atomic_write_json(self.aliases_path(name), new.to_json())
            self._event(name, "aliases_repair", user=user, aliases=new.to_json())
        return new

