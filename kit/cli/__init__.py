"""The ``kit`` command: a thin click shell over the library.

Each area registers its commands from its own module (``registry_cmds``, ``gate_cmds``,
``service_cmds``, ``pack_cmds``, ``fleet_cmds``); they share the error handling and table helpers in ``_common``.
"""

from __future__ import annotations

import logging
import sys

import click

from kit.cli._common import Context, KitGroup


@click.group(cls=KitGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--registry", envvar="KIT_REGISTRY", type=click.Path(file_okay=False), default=None,
              help="Registry folder or s3://bucket/prefix (default ./registry, or [tool.kit] registry, or "
                   "KIT_REGISTRY).")
@click.option("-v", "--verbose", count=True, help="More log output (-v INFO, -vv DEBUG).")
@click.version_option(package_name="kit")
@click.pass_context
def cli(ctx: click.Context, registry: str | None, verbose: int) -> None:
    """Kit: capture, validate, serve and ship PyTorch models from one environment.

    Models are registered where they live, in Python: `%deploy model --example x --name NAME` in a notebook,
    or `Registry.from_config(load_config()).register(NAME, model, example)` in a script (a model is Python
    code, so there is no `kit register`). Everything after that is here.
    """
    if verbose:
        logging.basicConfig(level=logging.DEBUG if verbose > 1 else logging.INFO, stream=sys.stderr,
                            format="%(levelname)s %(name)s: %(message)s")
    ctx.obj = Context(registry_override=registry)


def _register_all() -> None:
    from kit.cli import (
        cache_cmds,
        fleet_cmds,
        gate_cmds,
        init_cmds,
        key_cmds,
        pack_cmds,
        registry_cmds,
        replay_cmds,
        service_cmds,
    )

    for mod in (registry_cmds, gate_cmds, service_cmds, pack_cmds, fleet_cmds, key_cmds, init_cmds, replay_cmds,
                cache_cmds):
        mod.register(cli)


_register_all()


def main() -> None:
    cli(prog_name="kit")
