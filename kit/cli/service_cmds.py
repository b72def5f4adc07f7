"""`kit service ...`: generate, check and run services (thin over kit.servicegen)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from kit.backends import names as backend_names
from kit.cli._common import Context, emit_json, json_option, pass_kit


@click.group("service")
def service() -> None:
    """Generate and check Gunicorn services (services/<name>/)."""


@service.command("new")
@click.argument("name")
@click.option("--model", "-m", required=True, help="Registered model the service serves.")
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder that holds services (default: kit.toml's services, else ./services).")
@click.option("--force", is_flag=True, help="Rewrite the generated files of an existing service.")
@click.option("--bind", default=None, help="host:port (default 127.0.0.1:8000; KIT_BIND overrides at run time).")
@click.option("--workers", type=int, default=None, help="Gunicorn workers (default: min(cores, 4)).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None, help="Where the model runs.")
@click.option("--api-key", "api_keys", multiple=True, help="Require this API key on inference (stored as sha256).")
@click.option("--no-check-model", is_flag=True, help="Generate even if the registry lacks the model.")
@click.option("--backend", type=click.Choice(backend_names()), default=None,
              help="What runs the model: torch (model.pt2, default) or onnxruntime (model.onnx; workers never "
                   "import torch).")
@json_option
@pass_kit
def new(kit: Context, name: str, model: str, out_dir: Path | None, force: bool, bind: str | None, workers: int | None,
        device: str | None, api_keys: tuple[str, ...], no_check_model: bool, backend: str | None,
        as_json: bool) -> None:
    """Render services/NAME/ (app.py, gunicorn.conf.py, service.toml, README.md, start.sh)."""
    from kit.servicegen import backend_warnings, generate
    from kit.serving.security import hash_key

    options: dict[str, Any] = {k: v for k, v in {"bind": bind, "workers": workers, "device": device,
                                                 "backend": backend}.items() if v is not None}
    if backend and not no_check_model and model in kit.registry().models():
        for line in backend_warnings(kit.config.registry, model, backend):  # refuses a production without ONNX
            click.echo(f"kit: warning: {line}", err=True)
    if api_keys:
        options["api_keys_sha256"] = tuple(hash_key(k) for k in api_keys)
    # [trust]: the project's signing key (made on first use) and kit.toml's trusted_keys
    options["trusted_keys"] = kit.config.keyring().service_keys()
    out_dir = out_dir or kit.config.services or Path("services")
    path = generate(name, model, registry=kit.config.registry, out_dir=out_dir, force=force,
                    check_model=not no_check_model, **options)
    from kit.traffic import register_service_guard

    guard = register_service_guard(kit.registry(), path, user=kit.config.user)  # signed by the project's key
    if as_json:
        emit_json({"service": name, "model": model, "path": str(path), "guard_key": guard})
    else:
        click.echo(f"generated {path} (model {model}); start it with {path}/start.sh")
        if guard:
            click.echo(f"registered its canary guard key {guard}: canaries started from now on may be ended or "
                       "stepped along [canary_guard] steps by it")


@service.command("check")
@click.argument("name_or_dir")
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder that holds services (default: kit.toml's services, else ./services).")
@pass_kit
def check(kit: Context, name_or_dir: str, out_dir: Path | None) -> None:
    """Run `gunicorn --check-config` on a service (loads the model once)."""
    from kit.servicegen import check_config

    d = Path(name_or_dir)
    if not (d / "gunicorn.conf.py").exists():
        d = (out_dir or kit.config.services or Path("services")) / name_or_dir
    check_config(d)
    click.echo(f"{d}: gunicorn --check-config ok")


@service.command("hash-key")
@click.argument("key")
def hash_key_cmd(key: str) -> None:
    """Print the sha256 digest to put in [auth] api_keys_sha256 or a keys file."""
    from kit.serving.security import hash_key

    click.echo(hash_key(key))


def register(cli: click.Group) -> None:
    """Add this area's commands to ``cli``."""
    cli.add_command(service)
