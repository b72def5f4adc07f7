"""`kit replay NAME@VERSION --capture DIR`: captured production traffic through a candidate (thin over
:func:`kit.replay.replay`; the table is :func:`kit.render.replay_text`)."""

from __future__ import annotations

from pathlib import Path

import click

from kit.cli._common import Context, emit_json, json_option, pass_kit


@click.command("replay")
@click.argument("ref", metavar="NAME@VERSION")
@click.option("--capture", "capture", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="A service's capture folder ([capture] folder in its service.toml).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Replay at most N captured requests.")
@click.option("--atol", type=float, default=1e-4, show_default=True, help="Absolute tolerance (non-classifiers).")
@click.option("--rtol", type=float, default=1e-3, show_default=True, help="Relative tolerance (non-classifiers).")
@json_option
@pass_kit
def replay_cmd(k: Context, ref: str, capture: Path, limit: int | None, atol: float, rtol: float,
               as_json: bool) -> None:
    """Run captured requests through NAME@VERSION in-process and compare with what production answered:
    agreement (argmax for classifiers, else within tolerance), deviation, errors, latency."""
    from kit.registry import parse_ref
    from kit.render import replay_text
    from kit.replay import replay

    name, sel = parse_ref(ref)
    report = replay(k.registry(), name, sel, capture, limit=limit, atol=atol, rtol=rtol)
    if as_json:
        emit_json(report.to_dict())
    else:
        click.echo(replay_text(report))


def register(cli: click.Group) -> None:
    """Add this area's commands to ``cli``."""
    cli.add_command(replay_cmd)
