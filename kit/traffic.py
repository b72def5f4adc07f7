"""One rule for splitting a model's traffic between production and a canary, for every face.

``kit canary``, ``%canary``, the registry panel's slider and :func:`kit.deploy.deploy` all call
:func:`set_traffic`; what it would do is known before it does it (:func:`plan_traffic`), so a face can say
so first. The rule:

- ``set_traffic(registry, name, version, weight)`` gives ``version`` that share of the traffic (0 < weight
  <= 1); production serves the rest.
- There is at most one canary. Naming another version while a canary runs **replaces** it: the new version
  becomes the canary at ``weight`` and the old canary gets no more traffic. The audit event (``canary``)
  records the replaced version (``replaced``).
- Naming the running canary, or no version at all, **re-weights** it. With no canary running, naming no
  version is refused (which version would it be?).
- Weight 0 **stops** the canary when it names the canary or no version: all traffic back to production.
  Weight 0 for a version that gets no traffic changes nothing.
- Starting or replacing needs a passing gate for the new version (or ``force`` with a reason, audited as
  forced); re-weighting needs none. Production cannot also be the canary, and without a production
  version there is nothing to split traffic with.

Every move goes through :meth:`kit.registry.Registry.set_canary` / ``end_canary``, which hold the model's
lock, re-check the state and append the audit event. A face that showed a state before acting (the panel)
passes it as ``shown``: if production or the canary moved since (another notebook, the CLI), the request is
refused rather than applied to a split the person did not see.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from kit.errors import PromotionRefusedError
from kit.registry import Aliases, Registry
from kit.registry.names import check_weight
from kit.signing import SigningKey

Action = Literal["start", "replace", "reweight", "stop", "none"]


@dataclass(frozen=True)
class TrafficChange:
    """What a traffic request does (from :func:`plan_traffic`) or did (from :func:`set_traffic`)."""

    name: str
    action: Action
    version: int | None  # the version the request is about (the canary after start/replace/re-weight)
    weight: float  # its share of traffic afterwards
    production: int | None
    replaced: int | None = None  # the canary that stops getting traffic (replace, stop)
    needs_gate: bool = False  # start and replace need a passing gate for ``version``
    aliases: Aliases | None = None  # after the move (set_traffic); None for a plan

    def describe(self) -> str:
        """One sentence a person reads before (or after) the move: the same words in every face."""
        v, w, prod = self.version, f"{self.weight:.0%}", self.production
        if self.action == "start":
            return f"start a canary: v{v} gets {w} of {self.name}'s traffic, production v{prod} the rest"
        if self.action == "replace":
            return (f"replace canary v{self.replaced} with v{v} at {w}: v{self.replaced} gets no more traffic, "
                    f"production v{prod} the rest")
        if self.action == "reweight":
            return f"re-weight canary v{v} to {w}, production v{prod} the rest"
        if self.action == "stop":
            return f"end canary v{self.replaced}: all of {self.name}'s traffic to production v{prod}"
        return f"no change: v{v} gets no traffic" if v is not None else f"no change: {self.name} has no canary"


def require_production(registry: Registry, name: str) -> int:
    """The production version ``name`` splits traffic with; refused (with the next step) when there is none."""
    prod = registry.aliases(name).production if name in registry.models() else None
    if prod is None:
        raise PromotionRefusedError(
            f"Model {name!r} has no production version, so a canary has nothing to split traffic with. "
            "Promote a version first.", remedy="promote", subject=name,
        )
    return prod


def plan_traffic(registry: Registry, name: str, version: int | str | None, weight: float, *,
                 shown: Aliases | None = None) -> TrafficChange:
    """What :func:`set_traffic` would do now, without doing it. Raises what it would raise (gate aside)."""
    weight = check_weight(weight, allow_zero=True)
    target = registry.get(name, version).version if version is not None else None
    if target is None:
        registry.versions(name)  # ModelNotFoundError names the models there are
    cur = registry.aliases(name)
    _check_shown(name, cur, shown)
    if weight == 0.0:
        if cur.canary is None or (target is not None and target != cur.canary):
            return TrafficChange(name, "none", target, 0.0, cur.production)
        return TrafficChange(name, "stop", None, 0.0, cur.production, replaced=cur.canary)
    prod = require_production(registry, name)
    if target is None:
        if cur.canary is None:
            raise PromotionRefusedError(
                f"Model {name!r} has no canary to re-weight. Name the version to start one with.",
                remedy="start_canary", subject=name,
            )
        target = cur.canary
    if target == prod:
        raise PromotionRefusedError(
            f"{name}@{target} is production already; a canary must be another version."
        )
    if cur.canary == target:
        return TrafficChange(name, "reweight", target, weight, prod)
    if cur.canary is None:
        return TrafficChange(name, "start", target, weight, prod, needs_gate=True)
    return TrafficChange(name, "replace", target, weight, prod, replaced=cur.canary, needs_gate=True)


def set_traffic(
    registry: Registry,
    name: str,
    version: int | str | None,
    weight: float,
    *,
    force: bool = False,
    why: str | None = None,
    user: str | None = None,
    shown: Aliases | None = None,
) -> TrafficChange:
    """Give ``version`` (default: the running canary) ``weight`` of ``name``'s traffic, by the rule above.

    Returns the change made, with the resulting aliases. Raises :class:`PromotionRefusedError` when the
    rule refuses (no production, production named, no canary to re-weight, no passing gate, or the split
    differs from ``shown``) and :class:`InvalidNameError` for a weight outside [0, 1].
    """
    change = plan_traffic(registry, name, version, weight, shown=shown)
    if change.action == "none":
        return _with_aliases(change, registry.aliases(name))
    if change.action == "stop":
        return _with_aliases(change, registry.end_canary(name, why=why, user=user))
    assert change.version is not None
    after = registry.set_canary(name, change.version, change.weight, force=force, why=why, user=user)
    return _with_aliases(change, after)


def stop_traffic(registry: Registry, name: str, *, why: str | None = None, user: str | None = None,
                 shown: Aliases | None = None) -> TrafficChange:
    """End the canary (if any): all traffic back to production."""
    return set_traffic(registry, name, None, 0.0, why=why, user=user, shown=shown)


def guard_stop(registry: Registry, name: str, version: int, serial: int, evidence: dict[str, Any], *,
               user: str | None = None, signer: SigningKey | None = None) -> TrafficChange | None:
    """The canary guard's move: end canary ``version`` if the aliases are still at ``serial`` (what the
    guard judged), recorded as ``canary_guard`` with ``evidence``. None when they moved (nothing done).

    ``signer``: the service's guard key (:func:`kit.guard_key.load_or_create_guard_key`). Readers accept the
    record only if the canary's own signed record delegated that key (ending a canary is within its
    authority); without it the registry signs with its own key, when it has one."""
    after = registry.end_judged_canary(name, version, serial, evidence, user=user, signer=signer,
                                       why=f"canary guard: {evidence.get('detail', 'worse than production')}")
    if after is None:
        return None
    return TrafficChange(name, "stop", None, 0.0, after.production, replaced=version, aliases=after)


def guard_step(registry: Registry, name: str, version: int, serial: int, weight: float, evidence: dict[str, Any], *,
               user: str | None = None, signer: SigningKey | None = None) -> TrafficChange | None:
    """The canary guard's progressive promotion: canary ``version`` to ``weight`` (recorded ``canary_step``), or
    at 1.0 promoted to production -- which needs a passing gate for it, as every promotion does, whatever the
    caller's registry requires. Only if the aliases are still at ``serial``; None when they moved.

    ``signer`` (the guard key) may only step to the next value of the plan its registration declared, or
    promote at 100% relying on a signed passing gate (:func:`kit.registry.moves.check_guard_move`)."""
    why = f"canary guard: healthy for {evidence.get('hold_s', '?')}s at {evidence.get('from_weight', 0):.0%}"
    if weight < 1.0:
        after = registry.step_canary(name, version, serial, weight, evidence, why=why, user=user, signer=signer)
        return None if after is None else TrafficChange(name, "reweight", version, weight, after.production,
                                                        aliases=after)
    mv = registry.get(name, version)
    if registry.passing_gate(mv) is None:
        raise PromotionRefusedError(
            f"{mv.ref} stayed healthy at every step but has no passing gate, so it was not promoted "
            "(the canary keeps its share). Validate it, then promote it.", remedy="validate", subject=mv.ref)
    try:
        after = registry.promote(name, version, why=why, user=user, expect_serial=serial, signer=signer)
    except PromotionRefusedError:
        if registry.aliases(name).serial != serial:  # another worker promoted it first, or a person moved it
            return None
        raise
    return TrafficChange(name, "stop", None, 0.0, after.production, replaced=version, aliases=after)


def _check_shown(name: str, cur: Aliases, shown: Aliases | None) -> None:
    if shown is not None and (shown.production, shown.canary) != (cur.production, cur.canary):
        raise PromotionRefusedError(
            f"{name}'s traffic changed since it was shown (now {_split(cur)}, shown {_split(shown)}); "
            "nothing was changed. Look again and repeat the request.", remedy="refresh", subject=name,
        )


def _split(a: Aliases) -> str:
    prod = f"production v{a.production}" if a.production is not None else "no production"
    return prod + (f", canary v{a.canary}" if a.canary is not None else ", no canary")


def _with_aliases(change: TrafficChange, aliases: Aliases) -> TrafficChange:
    return replace(change, aliases=aliases)


def register_service_guard(registry: Registry, service_dir: Path | str, *, user: str | None = None) -> str | None:
    """Delegate to a generated service's canary guard: register its guard key (``guard.key``) with the
    registry, signed by the registry's key, with the plan of its ``[canary_guard] steps``. Canaries started
    afterwards let that key end them or step them along the plan (never promote without a signed passing
    gate). Returns the guard key id; None when the service's guard is off."""
    from kit.guard_key import load_or_create_guard_key
    from kit.service_settings import read_service_toml

    doc = read_service_toml(service_dir)
    guard = doc.get("canary_guard", {})
    if not guard.get("enabled", False):
        return None
    key = load_or_create_guard_key(service_dir)
    steps = [float(s) / 100 for s in guard.get("steps", [])]
    registry.register_guard_key(doc["model"]["name"], key.public.text(), service=Path(service_dir).name,
                                steps=steps, user=user)
    return key.key_id
