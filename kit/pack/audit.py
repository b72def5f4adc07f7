"""The import audit of ``kit pack --verify``: what the packed service imports, and where from.

In the unpacked archive, the archive's own interpreter (``python -I -B``: no user site, no PYTHONPATH, no
bytecode written) does what a worker does before it answers: import the service's app module (``app``,
or ``wsgi`` in a folder an older Kit generated), build the worker's app (which loads and checks the served
versions on the service's backend), then reports every imported module's file. The audit fails, naming the module, when an import is missing (a distribution the
service needs was left out) or when a module comes from outside the archive and the interpreter's standard
library. Only the standard library and kit's light modules are imported on this side.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kit.errors import PackError

# Run by the archive's interpreter in the unpacked folder; argv: root, the app module. Prints one JSON line.
_AUDIT = r"""
import importlib, json, os, sys, sysconfig
root = sys.argv[1]
service = os.path.join(root, "service")
sys.path.insert(0, service)
out = {"missing": None, "error": None, "modules": {}}
try:
    from kit.serving import load_service_config
    from kit.serving.asgi import create_asgi_app
    importlib.import_module(sys.argv[2])  # what gunicorn imports
    create_asgi_app(load_service_config(service, {"KIT_REGISTRY": os.path.join(root, "registry")}), watch=False)
except ModuleNotFoundError as exc:
    out["missing"] = exc.name or str(exc)
    out["error"] = f"{type(exc).__name__}: {exc}"
except BaseException as exc:
    out["error"] = f"{type(exc).__name__}: {exc}"
stdlib = {os.path.realpath(sysconfig.get_paths()[k]) for k in ("stdlib", "platstdlib")}
for name, mod in list(sys.modules.items()):
    f = getattr(mod, "__file__", None)
    if isinstance(f, str):
        out["modules"][name] = os.path.realpath(f)
out["stdlib"] = sorted(stdlib)
sys.stdout.write(json.dumps(out) + "\n")
sys.stdout.flush()
os._exit(0)  # the app's threads (reload watcher, inference) need no orderly stop here
"""


@dataclass(frozen=True)
class AuditReport:
    modules: int  # imported modules that have a file
    from_env: int  # of which inside the archive's env/
    from_stdlib: int  # of which from the interpreter's standard library (outside the archive for a venv)

    def to_dict(self) -> dict[str, Any]:
        return {"modules": self.modules, "from_env": self.from_env, "from_stdlib": self.from_stdlib}


def missing_message(module: str, manifest: dict[str, Any]) -> str:
    """What a missing import means: the left-out distribution that provides it (from the manifest), and
    the fix."""
    top = module.split(".", 1)[0]
    left = (manifest.get("selection") or {}).get("left_out", {})
    owner = next((n for n, d in sorted(left.items()) if top in d.get("modules", ())), None)
    if owner is not None:
        why = left[owner]["reason"]
        return (f"the packed service imports {module}, which the archive does not hold: distribution {owner} "
                f"was left out ({why}). Add it to [pack] include in the service's pack.toml (or remove it from "
                f"exclude; `kit pack --include {owner}`) and pack again.")
    return (f"the packed service imports {module}, which is not in the archive's environment. Install the "
            f"distribution that provides it where you pack and add it to [pack] include in pack.toml.")


def audit(root: Path, manifest: dict[str, Any], env: dict[str, str], timeout: float = 300.0) -> AuditReport:
    """Run the audit in the unpacked archive at ``root`` (after run.sh has checked and relocated it);
    :class:`PackError` naming the missing module, or the first module imported from outside."""
    from kit.servicegen import app_target

    py = root / "env" / "bin" / "python"
    module = app_target(root / "service").split(":", 1)[0]
    try:
        res = subprocess.run([str(py), "-I", "-B", "-c", _AUDIT, str(root), module], capture_output=True, text=True,
                             timeout=timeout, env=env, cwd=str(root / "service"), check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PackError(f"the import audit of {root.name} could not run ({exc}).") from exc
    try:
        out = json.loads(res.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError) as exc:
        raise PackError(f"the import audit of {root.name} printed no report (exit {res.returncode}): "
                        f"{res.stderr.strip()[-800:]}") from exc
    if out.get("missing"):
        raise PackError(missing_message(str(out["missing"]), manifest))
    if out.get("error"):
        raise PackError(f"the packed service failed to build its app in the import audit: {out['error']}")
    env_dir = os.path.realpath(root / "env")
    inside = (os.path.realpath(root / "service"), env_dir)
    stdlib = tuple(out.get("stdlib", ()))
    n_env = n_std = 0
    for name, f in sorted(out["modules"].items()):
        if f.startswith(env_dir + os.sep):
            n_env += 1
        elif any(f.startswith(p + os.sep) and "site-packages" not in f for p in stdlib):
            n_std += 1
        elif not any(f.startswith(p + os.sep) for p in inside):
            raise PackError(f"the packed service imports {name} from {f}, outside the archive and the "
                            "interpreter's standard library: the archive depends on this machine. Make sure "
                            "the environment holds it and pack again.")
    return AuditReport(modules=len(out["modules"]), from_env=n_env, from_stdlib=n_std)
