"""``deploy()``: capture -> register -> gate -> alias move -> service generation, as one library call.

The pipeline behind ``%deploy`` (and usable from any script): it stops at the first failure with a
:class:`kit.errors.DeployError` naming the step, the reason and the gate report, and reports each finished
:class:`Step` (time, verdict, where the result is) through an optional callback.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kit import backends
from kit.errors import DeployError, InvalidNameError, KitError, SigningKeyError
from kit.progress import Say, Steps
from kit.registry import Aliases, ModelVersion, Registry, validate_name
from kit.registry.names import check_weight
from kit.render import aliases_line, gate_summary
from kit.traffic import require_production, set_traffic
from kit.version_files import check_backend

if TYPE_CHECKING:
    import torch

    from kit.capture import CapturedModel
    from kit.gate import GateResult

log = logging.getLogger(__name__)

STEPS = ("capture", "register", "gate", "alias", "service")


@dataclass(frozen=True)
class Step:
    """One finished step of a deploy: what ran, how long, and where its result is. ``parts``: the seconds
    of its own steps (capture: ``torch.export``, ``parity``, ``onnx``; register: ``save``, ``hash``,
    ``upload`` for a bucket, ``publish``), as :mod:`kit.progress` timed them."""

    name: str
    seconds: float
    ok: bool
    detail: str
    where: str | None = None
    parts: Mapping[str, float] = field(default_factory=dict, compare=False)

    def line(self, index: int, total: int = len(STEPS)) -> str:
        secs = f"{self.seconds:6.1f}s" if self.seconds >= 0 else "      -"
        mark = "ok " if self.ok else "FAIL"
        s = f"[{index}/{total}] {self.name:<8} {secs}  {mark} {self.detail}"
        if self.parts:
            s += " (" + ", ".join(f"{k} {v:.1f}s" for k, v in self.parts.items()) + ")"
        return s + (f"  -> {self.where}" if self.where else "")


@dataclass
class DeployResult:
    """What a deploy produced; ``result = %deploy ...`` keeps it."""

    name: str
    steps: list[Step] = field(default_factory=list)
    version: ModelVersion | None = None
    gate: GateResult | None = None
    aliases: Aliases | None = None
    service_dir: Path | None = None

    @property
    def ref(self) -> str:
        return self.version.ref if self.version else self.name

    @property
    def seconds(self) -> float:
        return sum(max(s.seconds, 0.0) for s in self.steps)

    def __repr__(self) -> str:
        where = f", service={str(self.service_dir)!r}" if self.service_dir else ""
        alias = ""
        if self.aliases is not None:
            alias = f", production={self.aliases.production}"
            if self.aliases.canary is not None:
                alias += f", canary={self.aliases.canary}@{self.aliases.canary_weight:.0%}"
        return f"DeployResult({self.ref}{alias}{where}, {self.seconds:.1f}s)"


def deploy(
    registry: Registry,
    model: torch.nn.Module,
    example_inputs: Any,
    name: str,
    *,
    notebooks: Sequence[str | Path] | None = None,
    params: Mapping[str, Any] | None = None,
    canary: float | None = None,
    promote: bool = False,
    service: str | None = None,
    services_dir: Path = Path("services"),
    metrics: Mapping[str, Any] | None = None,
    tags: Mapping[str, Any] | None = None,
    source: Mapping[str, Any] | None = None,
    project_root: Path | None = None,
    gate_timeout: float = 600.0,
    user: str | None = None,
    on_step: Callable[[int, Step], None] | None = None,
    progress: Say | bool | None = None,
    dynamic: Mapping[Any, Mapping[int, str]] | None = None,
    dims: Mapping[str, tuple[int, int]] | None = None,
    backend: str = backends.DEFAULT,
    onnx: bool = True,
) -> DeployResult:
    """capture -> register -> gate -> alias move -> service generation; stop at the first failure.

    Parameters
    ----------
    canary : start a canary of the new version at this weight (0 < w <= 1); needs a production version.
    promote : make the new version production. Neither ``canary`` nor ``promote``: no alias moves.
    service : generate ``services_dir/<service>/`` serving ``name`` (kit.servicegen.generate).
    dynamic, dims : named dynamic dims and their ranges, passed to :func:`kit.capture.capture`
        (e.g. ``dynamic={"ids": {1: "seq"}, "mask": {1: "seq"}}``, ``dims={"seq": (2, 512)}``).
    on_step : called with (index, Step) as each step ends.
    progress : where the steps inside capture, register and the gate are said as they run (:mod:`kit.progress`):
        a callable gets every line (``%deploy`` shows them in the running step's line); None: capture's and
        register's steps one line each on stderr as they end; False: nothing. Their seconds are each
        step's ``parts`` either way.
    backend : the backend that will serve (one of :func:`kit.backends.names`): the gate runs on it and the
        generated service's ``[model] backend`` says it.
    onnx : export ``model.onnx`` at capture (needed for ``backend="onnxruntime"``).

    Raises
    ------
    DeployError : a step failed (``.step``, ``.report`` with the gate report's path, ``.result`` so far).
    KitError : bad arguments, found before any work is done.
    """
    _check_arguments(registry, name, canary=canary, promote=promote, service=service, backend=backend, onnx=onnx)
    run = _Run(name, DeployResult(name=name), on_step)
    captured = _capture(run, model, example_inputs, dynamic=dynamic, dims=dims, onnx=onnx, progress=progress)
    mv = _register(run, registry, captured, metrics=metrics, tags=tags, source=source, project_root=project_root,
                   progress=progress)
    _gate(run, registry, mv, notebooks=notebooks, params=params, timeout=gate_timeout,
          progress=progress if callable(progress) else None, backend=backend)
    _move(run, registry, mv, promote=promote, canary=canary, user=user)
    if service is None:
        run.finish(Step("service", -1.0, True, "none asked for (name a service to generate one)"))
    else:
        _service(run, registry, service, services_dir=services_dir, backend=backend, user=user)
    return run.result


def _check_arguments(registry: Registry, name: str, *, canary: float | None, promote: bool, service: str | None,
                     backend: str, onnx: bool) -> None:
    """Every argument checked before any work is done (:class:`KitError` naming the one to change)."""
    validate_name(name)
    if canary is not None and promote:
        raise InvalidNameError("Choose one of a canary and a promotion, not both.")
    if (canary is not None or promote) and (registry.keyring is None or not registry.keyring.can_sign()):
        # Checked before any work: services that trust a key refuse an unsigned version (unready for good).
        how = "is unsigned (opened with keyring=None)" if registry.keyring is None else "holds no signing key"
        raise SigningKeyError(
            f"The registry at {registry.location} {how}, so the version this deploy would "
            f"{'promote' if promote else 'start as a canary'} would be unsigned and every service that trusts a "
            f"key would refuse it. Open the registry with your key, Registry({registry.location!r}) or "
            "Registry.from_config(load_config()), or deploy without moving an alias.")
    if canary is not None:
        check_weight(canary)
        # Checked before any work: a canary splits traffic with production, so one must exist.
        require_production(registry, name)
    if service is not None:
        validate_name(service, "service name")
    try:
        check_backend(backend)
    except ValueError as exc:
        raise InvalidNameError(f"{exc} It is the backend the service will run.") from None
    row = backends.get(backend)
    if row.export is not None and not onnx:  # that backend serves what capture exports beside the program
        raise InvalidNameError(f"backend {row.name!r} serves {row.artifact}: deploy without onnx=False.")


@dataclass
class _Run:
    """One deploy as its steps end: the result so far, one log line per step, the caller's ``on_step``."""

    name: str
    result: DeployResult
    on_step: Callable[[int, Step], None] | None
    total: int = len(STEPS)

    def finish(self, step: Step) -> None:
        self.result.steps.append(step)
        log.info("deploy %s: %s", self.name, step.line(len(self.result.steps), self.total))
        if self.on_step is not None:
            self.on_step(len(self.result.steps), step)

    def fail(self, step_name: str, t0: float, why: str, report: Path | None = None, where: Path | None = None
             ) -> DeployError:
        """Record ``step_name`` as failed; the :class:`DeployError` to raise (with the result so far)."""
        self.finish(Step(step_name, time.perf_counter() - t0, False, why, str(where or report or "") or None))
        msg = f"deploy stopped at step {len(self.result.steps)}/{self.total} ({step_name}): {why}"
        if report is not None:
            msg += f" Report: {report}"
        return DeployError(msg, step=step_name, report=report, result=self.result)


def _capture(run: _Run, model: torch.nn.Module, example_inputs: Any, *, dynamic: Mapping[Any, Mapping[int, str]] | None,
             dims: Mapping[str, tuple[int, int]] | None, onnx: bool, progress: Say | bool | None) -> CapturedModel:
    from kit.capture import capture

    t0 = time.perf_counter()
    try:
        captured = capture(model, example_inputs, dynamic=dynamic, dims=dims, onnx=onnx, progress=progress)
    except KitError as exc:
        raise run.fail("capture", t0, str(exc)) from exc
    run.finish(Step("capture", time.perf_counter() - t0, True,
                    f"{captured.model_class.rsplit('.', 1)[-1]} {captured.signature.describe()}, "
                    f"parity max|diff| {captured.parity.max_abs_diff:.2g}, {_onnx_line(captured)}",
                    parts=dict(captured.steps)))
    return captured


def _register(run: _Run, registry: Registry, captured: CapturedModel, *, metrics: Mapping[str, Any] | None,
              tags: Mapping[str, Any] | None, source: Mapping[str, Any] | None,
              project_root: Path | None, progress: Say | bool | None) -> ModelVersion:
    t0 = time.perf_counter()
    steps = Steps(progress, f"register {run.name}")  # register says its steps here: their seconds are the parts
    try:
        mv = registry.register(run.name, captured, metrics=metrics, tags=tags, source=source,
                               project_root=project_root, progress=steps)
    except KitError as exc:
        raise run.fail("register", t0, str(exc)) from exc
    run.result.version = mv
    run.finish(Step("register", time.perf_counter() - t0, True, f"{mv.ref} sha256 {mv.short_sha}", str(mv.path),
                    parts=dict(steps.seconds)))
    return mv


def _gate(run: _Run, registry: Registry, mv: ModelVersion, *, notebooks: Sequence[str | Path] | None,
          params: Mapping[str, Any] | None, timeout: float, progress: Callable[[str], None] | None,
          backend: str) -> None:
    t0 = time.perf_counter()
    try:
        from kit.gate import run_gate
    except ImportError as exc:
        raise run.fail("gate", t0, f"kit.gate is not available ({exc}); this checkout has no validation gate.") from exc
    try:
        gate = run_gate(registry, run.name, mv.version, notebooks=list(notebooks) if notebooks else None,
                        params=dict(params) if params else None, timeout=timeout, progress=progress,
                        backend=backend)
    except KitError as exc:
        raise run.fail("gate", t0, f"the gate could not run: {exc}") from exc
    run.result.gate = gate
    n_ok = sum(1 for c in gate.checks if getattr(c, "passed", False))
    if not gate.passed:
        raise run.fail("gate", t0, gate_summary(gate) + ".", report=gate.report)
    run.finish(Step("gate", time.perf_counter() - t0, True, f"passed {n_ok}/{len(gate.checks)} checks on {backend}",
                    str(gate.report)))


def _move(run: _Run, registry: Registry, mv: ModelVersion, *, promote: bool, canary: float | None,
          user: str | None) -> None:
    name = run.name
    t0 = time.perf_counter()
    try:
        if promote:
            before = registry.aliases(name).production
            run.result.aliases = registry.promote(name, mv.version, user=user, why="deploy: promote")
            detail = f"production {before if before is not None else '-'} -> {mv.version}"
        elif canary is not None:
            change = set_traffic(registry, name, mv.version, canary, user=user, why="deploy: canary")
            run.result.aliases = change.aliases
            detail = change.describe()
        else:
            run.result.aliases = registry.aliases(name)
            detail = f"none asked for (neither promote nor a canary); {aliases_line(name, run.result.aliases)}"
    except KitError as exc:
        raise run.fail("alias", t0, str(exc), where=registry.aliases_path(name)) from exc
    run.finish(Step("alias", time.perf_counter() - t0, True, detail, str(registry.aliases_path(name))))


def _service(run: _Run, registry: Registry, service: str, *, services_dir: Path, backend: str,
             user: str | None) -> None:
    name = run.name
    t0 = time.perf_counter()
    try:
        from kit.servicegen import generate
    except ImportError as exc:
        raise run.fail("service", t0, f"kit.servicegen is not available ({exc}).") from exc
    target = Path(services_dir).resolve() / service
    existing = _service_model(target) if target.exists() else None
    if target.exists() and existing != name:
        raise run.fail("service", t0, f"{target} already exists and serves model {existing!r}, not {name!r}. "
                       "Choose another service name, or remove that folder.")
    try:
        # Re-deploying to the same service rewrites its generated files (a notebook run twice works).
        out = generate(service, name, registry=registry.location, out_dir=Path(services_dir),
                       force=target.exists(), backend=backend,  # [trust]: the key this registry signs with
                       trusted_keys=registry.keyring.service_keys() if registry.keyring is not None else ())
        guard = _register_guard(registry, Path(out), user)
    except KitError as exc:
        raise run.fail("service", t0, str(exc)) from exc
    run.result.service_dir = Path(out)
    run.finish(Step("service", time.perf_counter() - t0, True,
                    f"{service!r} serves {name}@production (start: kit.servicegen.start_service); {guard}",
                    str(out)))


def _onnx_line(captured: CapturedModel) -> str:
    rec = captured.onnx.record if captured.onnx is not None else {}
    if rec.get("exported"):
        return f"ONNX parity max|diff| {rec['parity']['max_abs_diff']:.2g}"
    return f"no ONNX ({rec.get('reason', 'not exported')})"


def _register_guard(registry: Registry, service_dir: Path, user: str | None) -> str:
    """Delegate the new service's canary guard to its key (as `kit service new` does), so the guard may end
    or step the canaries started from here; an unsigned registry has no trust to delegate."""
    if registry.keyring is None:
        return "canary guard: not registered (the registry is unsigned)"
    from kit.traffic import register_service_guard

    key_id = register_service_guard(registry, service_dir, user=user)
    return f"canary guard key {key_id} registered" if key_id else "canary guard off"


def _service_model(service_dir: Path) -> str | None:
    from kit.service_settings import read_service_toml

    try:
        return str(read_service_toml(service_dir)["model"]["name"])
    except KitError:
        return None
