"""What every ``kit`` command shares: config, error translation, tables, JSON output."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Any

import click

from kit.config import KitConfig, load_config
from kit.errors import KitError
from kit.render import table  # noqa: F401  (re-exported for the command modules)

# The library's errors describe the next step as an action (KitError.remedy); the CLI names its command.
_HINTS = {
    "validate": "Run `kit validate {subject}`, or add --force --why '...' to this command.",
    "why": "Add --why '...'.",
    "force": "Add --force to this command.",
    "no_check_model": "Add --no-check-model.",
    "promote": "Run `kit promote {subject}@N`.",
    "start_canary": "Run `kit canary {subject}@N --weight 10%`.",
}


def error_line(exc: KitError) -> str:
    """``kit: error: <message> <the CLI's hint for its remedy>``: one line."""
    hint = _HINTS.get(exc.remedy or "", "")
    if hint:
        hint = " " + hint.format(subject=exc.subject or "NAME")
    return f"kit: error: {exc}{hint}"


class KitGroup(click.Group):
    """Turns every KitError into one line, ``kit: error: ...``, and exit code 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KitError as exc:
            click.echo(error_line(exc), err=True)
            ctx.exit(2)


@dataclass
class Context:
    registry_override: str | None = None
    _config: KitConfig | None = field(default=None, repr=False)

    @property
    def config(self) -> KitConfig:
        if self._config is None:
            self._config = load_config(registry=self.registry_override)
        return self._config

    def registry(self) -> Any:
        from kit.registry import Registry

        return Registry.from_config(self.config)


pass_kit = click.make_pass_decorator(Context, ensure=True)




def emit_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")


json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output.")
