"""`kit cache [ls] | prune`: the local verified cache that loads map (thin over :mod:`kit.registry.cache`).

Every load (notebook, gate, service) copies a verified version into a private folder first; services prune
their own folder after each load, the library's folder (``versions/``) grows until pruned here.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import click

from kit.cli._common import Context, emit_json, json_option, pass_kit, table
from kit.errors import ConfigError
from kit.registry.cache import VersionCache, default_cache_dir

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_age(text: str) -> float:
    """``30m``, ``12h``, ``7d`` or plain seconds -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not m:
        raise ConfigError(f"--unused-for {text!r}: expected a duration such as 90s, 30m, 12h or 7d.")
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


def _size(entry: Path) -> int:
    return sum(p.stat().st_size for p in entry.iterdir() if p.is_file() and not p.is_symlink())


def _cache(service: str | None) -> VersionCache:
    return VersionCache(default_cache_dir(service))


def _rows(cache: VersionCache) -> list[dict[str, Any]]:
    now = time.time()
    return [{"entry": e.name, "artifact_sha256": e.name.split("-", 1)[0], "bytes": _size(e),
             "unused_s": round(now - e.stat().st_mtime)} for e in cache.entries()]


@click.group("cache", invoke_without_command=True)
@click.option("--service", default=None, help="A service's own cache folder (services/<name>) instead of the "
              "library's (versions/).")
@json_option
@click.pass_context
def cache_group(ctx: click.Context, service: str | None, as_json: bool) -> None:
    """The local verified cache loads read from (KIT_CACHE_DIR, else ~/.cache/kit): list it."""
    ctx.ensure_object(Context)
    ctx.meta["kit_cache_service"] = service
    if ctx.invoked_subcommand is None:
        _list(_cache(service), as_json)


def _list(cache: VersionCache, as_json: bool) -> None:
    rows = _rows(cache)
    if as_json:
        return emit_json({"cache": str(cache.root), "entries": rows, "bytes": sum(r["bytes"] for r in rows)})
    click.echo(f"{cache.root}: {len(rows)} entries, {sum(r['bytes'] for r in rows) / 2**20:.1f} MiB")
    if rows:
        click.echo(table([[r["artifact_sha256"][:12], f"{r['bytes'] / 2**20:.1f} MiB",
                           f"{r['unused_s'] / 3600:.1f} h"] for r in rows], ["ARTIFACT", "SIZE", "UNUSED FOR"]))


@cache_group.command("ls")
@json_option
@click.pass_context
def ls_cmd(ctx: click.Context, as_json: bool) -> None:
    """List the cache's entries, least recently used first."""
    _list(_cache(ctx.meta.get("kit_cache_service")), as_json)


@cache_group.command("prune")
@click.option("--unused-for", "unused_for", default="1d", show_default=True,
              help="Remove only entries no load used for this long (90s, 30m, 12h, 7d).")
@click.option("--all", "everything", is_flag=True, help="Also remove entries of versions an alias names "
              "(production, canary, rollback list): the next load copies them again.")
@json_option
@pass_kit
@click.pass_context
def prune_cmd(ctx: click.Context, k: Context, unused_for: str, everything: bool, as_json: bool) -> None:
    """Remove cache entries no alias names and no load used recently, and debris of killed loads.

    Safe while services run: a worker that mapped an entry keeps its pages."""
    age = parse_age(unused_for)
    cache = _cache(ctx.meta.get("kit_cache_service"))
    if everything:
        removed = cache.prune((), age)
    else:
        reg = k.registry()
        reg.cache = cache
        removed = reg.prune_cache(None, age)
    if as_json:
        return emit_json({"cache": str(cache.root), "removed": [p.name for p in removed]})
    click.echo(f"{cache.root}: removed {len(removed)} entr{'y' if len(removed) == 1 else 'ies'}"
               f"{' (aliased versions kept)' if not everything else ''}")


def register(cli: click.Group) -> None:
    cli.add_command(cache_group)
