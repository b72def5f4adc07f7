"""IPython magics: the researcher's front door. ``%load_ext kit`` registers them.

    %deploy MODEL --example X --name NAME [--validate NB ...] [--canary 10% | --promote] [--service NAME]
    %models [NAME]              models, or one model's versions with gate verdicts and aliases
    %promote NAME@VERSION       production (needs a passing gate for that exact artifact)
    %canary NAME@VERSION 10%    give VERSION 10% of traffic: starts a canary, or replaces the running one
    %canary NAME 25%            re-weight the canary;   %canary NAME --stop (or 0%) ends it  (kit.traffic)
    %rollback NAME              production back to the previous version, ends any canary
    %registry [NAME]            the registry panel (kit.widgets.RegistryPanel)

``%deploy`` is a thin shell over :func:`deploy`, which runs capture -> register -> gate -> alias move ->
service generation and reports one line per step. Every magic resolves the configuration once
(:func:`kit.config.load_config`) and turns a :class:`kit.errors.KitError` into IPython's ``UsageError``:
one clear line, no traceback.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from kit import backends
from kit._types import JSONObject
from kit.config import KitConfig, load_config
from kit.deploy import STEPS, DeployResult, Step, deploy
from kit.errors import KitError
from kit.registry import Aliases, Registry, detect_source, parse_ref, parse_weight
from kit.render import aliases_line, model_rows, models_text, versions_text
from kit.traffic import set_traffic

if TYPE_CHECKING:
    import torch
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.display import DisplayHandle

    from kit.widgets import RegistryPanel

# The magics' words for a library error's remedy (kit.errors.KitError.remedy).
_HINTS = {
    "validate": "Validate it with %registry (the Validate button) or `!kit validate {subject}`; "
                "forcing is for the command line (`!kit promote ... --force --why '...'`).",
    "why": "Give a reason: --why '...'.",
    "promote": "Promote a version: %promote {subject}@N, or %deploy ... --promote.",
    "start_canary": "Start one: %canary {subject}@N 10%.",
}


def usage_error(exc: KitError) -> UsageError:
    """A library error as IPython's one-line UsageError, with the magics' hint for its remedy."""
    hint = _HINTS.get(exc.remedy or "", "")
    return UsageError(f"{exc} {hint.format(subject=exc.subject or 'NAME')}".rstrip())

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- the magics


class _StepPrinter:
    """One line per step. In a notebook the running step's line updates in place with that step's progress
    (capture: torch.export, parity, onnx; register: save, hash, upload, publish; the gate's checks)."""

    def __init__(self, shell: InteractiveShell | None):
        self.live = getattr(shell, "kernel", None) is not None
        self.handle: DisplayHandle | None = None
        self.started = time.perf_counter()
        self.current = STEPS[0]  # the step running now, whose line the progress updates

    def _show(self, text: str) -> None:
        from IPython.display import display

        bundle = {"text/plain": text}
        if self.handle is None:
            self.handle = display(bundle, raw=True, display_id=True)
        else:
            self.handle.update(bundle, raw=True)

    def progress(self, msg: str) -> None:
        if self.live:
            self._show(f"      {self.current:<8} {time.perf_counter() - self.started:6.1f}s  ... {msg.strip()}")

    def step(self, index: int, step: Step) -> None:
        line = step.line(index)
        if self.live and self.handle is not None:
            self._show(line)
            self.handle = None
        else:
            print(line, flush=True)
        self.started = time.perf_counter()
        self.current = STEPS[index] if index < len(STEPS) else ""


@magics_class
class KitMagics(Magics):
    """Kit's magics. The configuration resolves once, on first use, unless given."""

    def __init__(self, shell: InteractiveShell | None = None, config: KitConfig | None = None):
        super().__init__(shell)
        self._config = config

    @property
    def kit_config(self) -> KitConfig:
        if self._config is None:
            try:
                self._config = load_config()
            except KitError as exc:
                raise usage_error(exc) from None
        return self._config

    def _registry(self) -> Registry:
        return Registry.from_config(self.kit_config)

    def _eval(self, expr: str, what: str) -> Any:
        if self.shell is None:
            raise UsageError(f"%deploy needs an IPython shell to evaluate {what} {expr!r}.")
        try:
            return self.shell.ev(expr)
        except Exception as exc:  # the user's expression: any error is theirs to fix
            raise UsageError(f"%deploy: could not evaluate {what} {expr!r}: {type(exc).__name__}: {exc}. "
                             "Define it in a cell first.") from None

    # ---- %deploy
    @magic_arguments()
    @argument("model", metavar="MODEL", help="the torch.nn.Module to deploy (a variable or expression)")
    @argument("--example", "-e", metavar="X", required=True,
              help="example input: a tensor, numpy array, tuple of them, or dict of names to them (batch first)")
    @argument("--name", "-n", metavar="NAME", required=True, help="model name in the registry")
    @argument("--validate", metavar="NB", nargs="+", default=None,
              help="validation notebook(s) for the gate (default: kit.toml's validation, else kit's default)")
    @argument("--param", "-p", metavar="KEY=VALUE", action="append", default=[],
              help="a parameter for the validation notebooks (repeatable)")
    @argument("--canary", metavar="WEIGHT", default=None,
              help="start a canary of the new version at WEIGHT (10%% or 0.1); needs a production version")
    @argument("--promote", action="store_true", help="make the new version production")
    @argument("--service", metavar="NAME", default=None, help="generate services/NAME serving this model")
    @argument("--metrics", metavar="DICT", default=None, help="a dict of metrics to record (variable name)")
    @argument("--tags", metavar="DICT", default=None, help="a dict of tags to record (variable name)")
    @argument("--dynamic", metavar="INPUT:DIM=NAME", action="append", default=[],
              help="a dynamic dim besides the batch, e.g. ids:1=seq (optional range: ids:1=seq:2..512; repeatable)")
    @argument("--backend", choices=list(backends.names()), default=backends.DEFAULT,
              help="the backend that will serve: the gate runs on it, the service's [model] backend says it")
    @argument("--no-onnx", action="store_true", help="do not export model.onnx at capture (torch backend only)")
    @line_magic
    def deploy(self, line: str) -> DeployResult:
        """Capture, register, validate, move an alias and generate a service, one line per step.

        Stops at the first failure with the reason and the gate report's path. Example::

            %deploy model --example x_test[:8] --name digits --promote --service digits
        """
        args = parse_argstring(self.deploy, line)
        if args.canary is not None and args.promote:
            raise UsageError("%deploy: choose one of --canary WEIGHT and --promote, not both.")
        row = backends.get(args.backend)
        if args.no_onnx and row.export is not None:
            raise UsageError(f"%deploy: --backend {row.name} serves {row.artifact}; drop --no-onnx.")
        cfg = self.kit_config
        model = self._eval(args.model, "MODEL")
        example = _as_example(self._eval(args.example, "--example"), args.example)
        try:
            import torch

            if not isinstance(model, torch.nn.Module):
                raise UsageError(f"%deploy: MODEL {args.model!r} is a {type(model).__name__}; "
                                 "expected a torch.nn.Module.")
            metrics = self._eval_dict(args.metrics, "--metrics")
            tags = self._eval_dict(args.tags, "--tags")
            params = {**cfg.gate, **_parse_params(args.param)}  # kit.toml's [gate], then --param
            from kit.signature import parse_dynamic

            dynamic, dims = parse_dynamic(args.dynamic)
            weight = parse_weight(args.canary) if args.canary is not None else None
            if weight == 0.0:
                raise UsageError("%deploy: --canary 0% would send no traffic to the new version; give a weight > 0.")
            notebooks = ([_resolve_nb(_unquote(nb) or nb, cfg) for nb in args.validate] if args.validate
                         else [str(p) for p in cfg.validation] or None)
            source = dict(detect_source(cwd=cfg.project_root))
            session = self.shell.user_ns.get("__session__") if self.shell is not None else None
            if session:
                source.update(kind="notebook", path=str(session))
            source["via"] = "%deploy"
            printer = _StepPrinter(self.shell)
            return deploy(
                self._registry(), model, example, args.name, notebooks=notebooks, params=params,
                canary=weight, promote=args.promote, service=args.service, dynamic=dynamic or None, dims=dims or None,
                services_dir=cfg.services or cfg.project_root / "services", metrics=metrics, tags=tags, source=source,
                project_root=cfg.project_root, gate_timeout=cfg.gate_timeout, user=cfg.user,
                on_step=printer.step, progress=printer.progress, backend=args.backend, onnx=not args.no_onnx,
            )
        except KitError as exc:
            raise usage_error(exc) from None

    def _eval_dict(self, expr: str | None, what: str) -> dict[str, Any] | None:
        if expr is None:
            return None
        value = self._eval(expr, what)
        if not isinstance(value, Mapping):
            raise UsageError(f"%deploy: {what} {expr!r} is a {type(value).__name__}; expected a dict.")
        return dict(value)

    # ---- %models
    @magic_arguments()
    @argument("name", nargs="?", default=None, help="a model name: list its versions")
    @line_magic
    def models(self, line: str) -> None:
        """List the registry's models, or one model's versions with gate verdicts and aliases."""
        args = parse_argstring(self.models, line)
        reg = self._registry()
        try:
            if args.name is None:
                rows = model_rows(reg)
                print(models_text(rows) if rows else f"No models in {reg.location}. Deploy one with %deploy.")
                return
            print(versions_text(reg, parse_ref(args.name)[0]))
        except KitError as exc:
            raise usage_error(exc) from None

    # ---- %promote
    @magic_arguments()
    @argument("ref", metavar="NAME@VERSION", help="the version to make production")
    @argument("--why", default=None, help="a reason, recorded in the audit log")
    @line_magic
    def promote(self, line: str) -> None:
        """Move production to NAME@VERSION. Needs a passing gate recorded for that exact artifact."""
        args = parse_argstring(self.promote, line)
        try:
            name, sel = parse_ref(args.ref)
            if sel is None:
                raise UsageError(f"%promote: say which version, e.g. %promote {name}@2.")
            reg = self._registry()
            a = reg.promote(name, sel, why=_unquote(args.why), user=self.kit_config.user)
            _moved(reg, name, a)
        except KitError as exc:
            raise usage_error(exc) from None

    # ---- %canary
    @magic_arguments()
    @argument("ref", metavar="NAME[@VERSION]",
              help="NAME@VERSION starts a canary or replaces the running one; NAME re-weights or stops it")
    @argument("weight", metavar="WEIGHT", nargs="?", default=None, help="share of traffic: 10%% or 0.1; 0%% stops")
    @argument("--stop", action="store_true", help="end the canary: all traffic back to production")
    @argument("--why", default=None, help="a reason, recorded in the audit log")
    @line_magic
    def canary(self, line: str) -> None:
        """Start, replace, re-weight or stop a canary (:func:`kit.traffic.set_traffic`, one rule for every face).

        Writes aliases.json: running services follow within seconds.
        """
        args = parse_argstring(self.canary, line)
        try:
            name, sel = parse_ref(args.ref)
            if args.stop and args.weight is not None:
                raise UsageError("%canary: give a WEIGHT or --stop, not both.")
            if not args.stop and args.weight is None:
                raise UsageError(f"%canary: give a weight, e.g. %canary {args.ref} 10%, or --stop.")
            reg = self._registry()
            change = set_traffic(reg, name, None if args.stop else sel,
                                 0.0 if args.stop else parse_weight(args.weight), why=_unquote(args.why),
                                 user=self.kit_config.user)
            print(change.describe())
            _moved(reg, name, change.aliases or reg.aliases(name))
        except KitError as exc:
            raise usage_error(exc) from None

    # ---- %rollback
    @magic_arguments()
    @argument("name", metavar="NAME", help="the model to roll back")
    @argument("--why", default=None, help="a reason, recorded in the audit log")
    @line_magic
    def rollback(self, line: str) -> None:
        """Production back to the previous production version; any canary ends."""
        args = parse_argstring(self.rollback, line)
        try:
            name, _ = parse_ref(args.name)
            reg = self._registry()
            a = reg.rollback(name, why=_unquote(args.why), user=self.kit_config.user)
            _moved(reg, name, a)
        except KitError as exc:
            raise usage_error(exc) from None

    # ---- %registry
    @magic_arguments()
    @argument("name", metavar="NAME", nargs="?", default=None,
              help="the model to show (default: the only model in the registry)")
    @line_magic
    def registry(self, line: str) -> RegistryPanel:
        """Show the registry panel: versions, gate verdicts, aliases; validate, promote, rollback, canary."""
        args = parse_argstring(self.registry, line)
        from kit.widgets import RegistryPanel

        reg = self._registry()
        name = args.name
        try:
            if name is None:
                names = reg.models()
                if len(names) != 1:
                    raise UsageError(f"%registry: name a model ({', '.join(names) or 'the registry is empty'}).")
                name = names[0]
            cfg = self.kit_config  # the gate the panel runs: the same notebooks and [gate] as %deploy's
            return RegistryPanel(reg, name, gate_timeout=cfg.gate_timeout, user=cfg.user,
                                 notebooks=list(cfg.validation) or None, params=dict(cfg.gate) or None)
        except KitError as exc:
            raise usage_error(exc) from None


# --------------------------------------------------------------------------- helpers


def _moved(reg: Registry, name: str, a: Aliases) -> None:
    """Where the traffic goes now, and the file running services follow."""
    print(f"{aliases_line(name, a)}  -> {reg.aliases_path(name)}")


def _as_example(value: object, expr: str) -> torch.Tensor | tuple[torch.Tensor, ...] | dict[str, torch.Tensor]:
    import numpy as np
    import torch

    def one(v: object) -> torch.Tensor:
        if isinstance(v, torch.Tensor):
            return v
        if isinstance(v, np.ndarray):
            return torch.from_numpy(np.ascontiguousarray(v))
        raise UsageError(f"%deploy: --example {expr!r} holds a {type(v).__name__}; expected a torch tensor, "
                         "a numpy array, a tuple of them, or a dict of parameter names to them (batch first).")

    if isinstance(value, Mapping) and value:  # passed by keyword (a tokenizer's BatchEncoding too)
        return {str(k): one(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)) and value:
        return tuple(one(v) for v in value)
    return one(value)


def _unquote(s: str | None) -> str | None:
    """IPython splits magic lines without removing quotes (non-posix): ``--why 'a reason'``."""
    if s is not None and len(s) >= 2 and s[0] == s[-1] and s[0] in "'\"":
        return s[1:-1]
    return s


def _parse_params(items: Sequence[str]) -> JSONObject:
    """The library's one rule (kit.gate.params.parse_params); its GateError becomes a UsageError."""
    from kit.gate.params import parse_params

    try:
        return parse_params([_unquote(i) or "" for i in items])
    except KitError as exc:
        raise UsageError(f"%deploy: --param: {exc}") from None


def _resolve_nb(nb: str, cfg: KitConfig) -> str:
    p = Path(nb).expanduser()
    if p.is_file():
        return str(p.resolve())
    alt = cfg.project_root / nb
    if alt.is_file():
        return str(alt)
    raise UsageError(f"%deploy: validation notebook {nb!r} not found (looked in {Path.cwd()} and {cfg.project_root}).")


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext kit``: register the magics."""
    ipython.register_magics(KitMagics(ipython))
