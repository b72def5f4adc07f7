"""`kit models | show | verify | history | promote | canary | rollback | aliases | env`."""

from __future__ import annotations

from typing import Any

import click

from kit.cli._common import Context, emit_json, json_option, pass_kit, table
from kit.errors import KitError
from kit.registry import parse_ref, parse_weight
from kit.render import aliases_line, badges_text, model_rows, models_text, versions_text


def _version_location(reg: Any, mv: Any) -> str:
    """Where the version lives as another host names it: its folder, or its place in the bucket (not this
    host's mirror of it)."""
    return f"{reg.location}/{mv.path.relative_to(reg.root).as_posix()}"


def _version_json(reg: Any, mv: Any) -> dict[str, Any]:
    return {**mv.to_dict(), "path": _version_location(reg, mv), "size_bytes": mv.size_bytes}


@click.command("models")
@click.argument("name", required=False)
@json_option
@pass_kit
def models_cmd(k: Context, name: str | None, as_json: bool) -> None:
    """List models, or the versions of NAME."""
    reg = k.registry()
    if name is None:
        rows = model_rows(reg)
        if as_json:
            return emit_json(rows)
        if not rows:
            click.echo(f"No models in {reg.location}. Register one from a notebook with %deploy, or run `make demo`.")
            return
        click.echo(models_text(rows))
        return
    name, _ = parse_ref(name)
    if as_json:
        a = reg.aliases(name)
        return emit_json([{**_version_json(reg, mv), "aliases": badges_text(a, mv.version),
                           "gate": reg.gate_verdict(mv)[0], "backends": list(mv.backends)} for mv in reg.versions(name)])
    click.echo(versions_text(reg, name))


@click.command("show")
@click.argument("ref")
@json_option
@pass_kit
def show_cmd(k: Context, ref: str, as_json: bool) -> None:
    """Show one version: NAME, NAME@VERSION or NAME@ALIAS (production, canary, latest)."""
    reg = k.registry()
    mv = reg.resolve(ref)
    if as_json:
        return emit_json({**_version_json(reg, mv), "backends": list(mv.backends),
                          "missing_backends": mv.missing_backends(), "gates": reg.gate_results(mv.name, mv.version)})
    from kit.capture import Signature
    from kit.env import Fingerprint

    a = reg.aliases(mv.name)
    sig = Signature.from_dict(mv.signature)
    click.echo(f"{mv.ref}  {badges_text(a, mv.version)}".rstrip())
    click.echo(f"  path:       {_version_location(reg, mv)}")
    click.echo(f"  created:    {mv.created}")
    click.echo(f"  sha256:     {mv.artifact_sha256}")
    click.echo(f"  signature:  {sig.describe()}")
    missing = "".join(f"; not {b}: {why}" for b, why in mv.missing_backends().items())
    click.echo(f"  backends:   {', '.join(mv.backends) or 'none'}{missing}")
    click.echo(f"  env:        {Fingerprint.from_dict(mv.env).summary()}")
    src = mv.source
    click.echo(f"  source:     {src.get('kind')} {src.get('path') or ''} "
               f"{('git ' + src['git_commit'][:10] + (' (dirty)' if src.get('git_dirty') else '')) if src.get('git_commit') else ''}".rstrip())
    for key, val in mv.metrics.items():
        click.echo(f"  metric:     {key} = {val}")
    parity = mv.capture.get("parity", {})
    click.echo(f"  capture:    {mv.capture.get('seconds')}s, parity max |diff| {parity.get('max_abs_diff')} "
               f"at batch sizes {parity.get('batch_sizes')}")
    for g in reg.gate_results(mv.name, mv.version):
        click.echo(f"  gate:       {g.get('run_id')} {'PASS' if g.get('passed') else 'FAIL'} {g.get('report', '')}")


@click.command("verify")
@click.argument("ref", required=False)
@json_option
@pass_kit
def verify_cmd(k: Context, ref: str | None, as_json: bool) -> None:
    """Check every version (or NAME / NAME@VERSION): meta.json's signature by a trusted key, then every
    file's sha256 against meta.json. Exits 0 when all verify, 1 when any fails, 2 on an error."""
    reg = k.registry()
    name = version = None
    if ref:
        name, sel = parse_ref(ref)
        version = reg.get(name, sel).version if sel else None
    results = reg.verify(name, version)
    bad = [r for r in results if not r.ok]
    if as_json:
        emit_json([{"ref": r.ref, "ok": r.ok, "problems": list(r.problems), "signed_by": r.signed_by}
                   for r in results])
    else:
        for r in results:
            signed = f" (signed by {r.signed_by})" if r.signed_by else ""
            click.echo(f"{'ok ' if r.ok else 'BAD'} {r.ref}" + (signed if r.ok else f": {'; '.join(r.problems)}"))
        click.echo(f"{len(results) - len(bad)} of {len(results)} versions verified.")
    if bad:  # a verdict, like a failed gate: exit 1 (errors that stop the check exit 2)
        click.echo(f"kit: {len(bad)} version(s) failed verification: {', '.join(r.ref for r in bad)}. "
                   "Restore the files or register the models again.", err=True)
        click.get_current_context().exit(1)


@click.command("history")
@click.argument("name")
@json_option
@pass_kit
def history_cmd(k: Context, name: str, as_json: bool) -> None:
    """The audit log of NAME: registrations, gates, and every signed move record (promotions, canaries,
    rollbacks), each checked: SIGNED (by a trusted key), GUARD (by a delegated guard key, within its
    authority), UNSIGNED (a registry without keys) or REFUSED (with why). Exits 1 when any record is refused."""
    events = k.registry().history(parse_ref(name)[0])
    if as_json:
        return emit_json(events)
    rows = []
    for e in events:
        detail = []
        if e.get("weight") is not None:
            detail.append(f"weight={e['weight']:.0%}")
        if e.get("replaced") is not None:
            detail.append(f"replaced={e['replaced']}")
        if e.get("from_version") is not None:
            detail.append(f"from={e['from_version']}")
        if "passed" in e:
            detail.append("passed" if e["passed"] else "FAILED")
        if e.get("forced"):
            detail.append("FORCED")
        if e.get("why"):
            detail.append(f"why: {e['why']}")
        if e.get("problem"):
            detail.append(f"problem: {e['problem']}")
        rows.append([str(e.get("ts") or "")[:19].replace("T", " "), e.get("event"), e.get("version", ""),
                     e.get("user", ""), _move_mark(e), " ".join(detail)])
    click.echo(table(rows, ["WHEN (UTC)", "EVENT", "VERSION", "WHO", "RECORD", "DETAIL"]))
    refused = [e for e in events if e.get("verified") is False]
    if refused:  # a verdict: exit 1
        click.echo(f"kit: {len(refused)} move record(s) of {parse_ref(name)[0]} failed verification (serials "
                   f"{', '.join(str(e.get('serial')) for e in refused)}): services do not follow them. Remove "
                   "the files a registry writer put there, or restore them from a copy you trust.", err=True)
        click.get_current_context().exit(1)


def _move_mark(e: dict) -> str:
    """How a history line was checked: a move record's signature, or '-' for an (unsigned) event."""
    if e.get("verified") is None:
        return "-"
    if e.get("verified") is False:
        return "REFUSED"
    serial = f" #{e.get('serial')}"
    if e.get("by_guard"):
        return f"GUARD {e.get('signed_by')}{serial}"
    return (f"SIGNED {e.get('signed_by')}" if e.get("signed_by") else "UNSIGNED") + serial


_force = click.option("--force", is_flag=True, help="Skip the gate requirement (recorded as forced).")
_why = click.option("--why", default=None, help="Reason, recorded in the audit log (required with --force).")


def _moved(name: str, action: str, a: Any, **extra: Any) -> dict[str, Any]:
    """A move as ``--json`` prints it: the model, what was done, and the aliases it left."""
    return {"model": name, "action": action, "serial": a.serial, "signed_by": a.signed_by,
            "aliases": a.to_json(), **extra}


@click.command("promote")
@click.argument("ref")
@_force
@_why
@json_option
@pass_kit
def promote_cmd(k: Context, ref: str, force: bool, why: str | None, as_json: bool) -> None:
    """Move production to NAME@VERSION (needs a passing gate for that artifact unless --force)."""
    reg = k.registry()
    mv = reg.resolve(ref)
    a = reg.promote(mv.name, mv.version, force=force, why=why, user=k.config.user)
    if as_json:
        return emit_json(_moved(mv.name, "promote", a, version=mv.version, forced=force))
    click.echo(aliases_line(mv.name, a) + (" (forced)" if force else ""))


@click.command("canary")
@click.argument("ref")
@click.option("--weight", default=None, help="Share of traffic: a percentage like 10% or a fraction like 0.1 (0 ends the canary).")
@click.option("--stop", is_flag=True, help="End the canary: all traffic back to production.")
@_force
@_why
@json_option
@pass_kit
def canary_cmd(k: Context, ref: str, weight: str | None, stop: bool, force: bool, why: str | None,
               as_json: bool) -> None:
    """Give NAME@VERSION a share of traffic (--weight 10%), re-weight the canary (NAME --weight), or end it (--stop).

    There is one canary at a time: naming another version while a canary runs replaces it (the old
    canary gets no more traffic; the audit log records it). The rule: kit.traffic.
    """
    from kit.traffic import set_traffic

    name, sel = parse_ref(ref)
    if stop and weight is not None:
        raise KitError("Give --weight or --stop, not both.")
    if not stop and weight is None:
        raise KitError("Give the canary's share of traffic: --weight 10% (or 0.1); --stop ends it.")
    change = set_traffic(k.registry(), name, None if stop else sel, 0.0 if stop else parse_weight(weight or "0"),
                         force=force, why=why, user=k.config.user)
    assert change.aliases is not None
    if as_json:
        return emit_json(_moved(name, f"canary_{change.action}", change.aliases, version=change.version,
                                weight=change.weight, replaced=change.replaced, describe=change.describe()))
    click.echo(change.describe())
    click.echo(aliases_line(name, change.aliases))


@click.command("rollback")
@click.argument("name")
@_why
@json_option
@pass_kit
def rollback_cmd(k: Context, name: str, why: str | None, as_json: bool) -> None:
    """Production back to the previous production version; ends any canary. With no previous production
    but a canary running, it only ends the canary (production stays) and says so."""
    n = parse_ref(name)[0]
    reg = k.registry()
    before = reg.movelog(n).base()[1]
    a = reg.rollback(n, why=why, user=k.config.user)
    only_canary = a.production == before.production and before.canary is not None
    note = (f"no previous production to roll back to: ended the canary v{before.canary}; production stays "
            f"v{a.production}") if only_canary else None
    if as_json:
        return emit_json(_moved(n, "rollback", a, from_version=before.production, version=a.production,
                                ended_canary=before.canary, only_ended_canary=only_canary, note=note))
    if note:
        click.echo(f"{n}: {note}")
    click.echo(aliases_line(n, a))


@click.group("aliases")
def aliases_group() -> None:
    """Inspect, repair or migrate aliases.json (a signed copy of the newest move record)."""


@aliases_group.command("repair")
@click.argument("name")
@json_option
@pass_kit
def aliases_repair(k: Context, name: str, as_json: bool) -> None:
    """Rewrite NAME's aliases.json as a copy of its newest move record that verifies."""
    n = parse_ref(name)[0]
    a = k.registry().repair_aliases(n, user=k.config.user)
    if as_json:
        return emit_json(_moved(n, "aliases_repair", a))
    click.echo("repaired " + aliases_line(n, a))


@aliases_group.command("migrate")
@click.argument("name")
@click.option("--yes", is_flag=True, help="Sign without asking (after the state is shown).")
@json_option
@pass_kit
def aliases_migrate(k: Context, name: str, yes: bool, as_json: bool) -> None:
    """Sign the unsigned aliases.json of a registry written before signed moves as NAME's first move record.

    Run it where the project's signing key is (a key holder): the state it signs is what services will
    follow. It is shown first; check it (and `kit history NAME`) before you confirm."""
    n = parse_ref(name)[0]
    reg = k.registry()
    plan = reg.plan_migration(n)
    if as_json and not yes:
        raise KitError("--json cannot ask for confirmation: check the state with `kit aliases migrate "
                       f"{n}` first, then repeat with --json --yes.")
    if not as_json:
        click.echo(f"will sign, as serial {plan.serial + 1}: {aliases_line(n, plan)}"
                   + (f" (previous: {', '.join(map(str, plan.previous))})" if plan.previous else ""))
    if not yes:
        click.confirm("Sign this state with your key?", abort=True)
    a = reg.migrate_aliases(n, user=k.config.user, expect=plan)
    if as_json:
        return emit_json(_moved(n, "migrate", a))
    click.echo(f"signed by {a.signed_by}: {aliases_line(n, a)} (serial {a.serial})")


@click.group("registry")
def registry_group() -> None:
    """The registry's storage: can this machine read and write it, and does it give Kit's guarantees."""


@registry_group.command("check")
@click.option("--write", is_flag=True, help="Also check what a writer needs (creates and deletes one probe "
              "object or file; leaves nothing behind).")
@json_option
@pass_kit
def registry_check(k: Context, write: bool, as_json: bool) -> None:
    """Check the registry (--registry / KIT_REGISTRY / kit.toml): credentials, list, read, conditional GET,
    and with --write: create, conditional create, delete. Exits 1 when a check fails, naming the fix."""
    from kit.registry.preflight import FAIL, check_registry

    where = k.config.registry
    found = check_registry(where, write=write)
    failed = [f for f in found if f.status == FAIL]
    if as_json:
        emit_json({"registry": str(where), "ok": not failed, "checks": [f.as_dict() for f in found]})
    else:
        click.echo(f"registry {where}")
        click.echo(table([(f.check, f.status.upper(), f.detail) for f in found], ["check", "status", "detail"]))
        for f in found:
            if f.fix:
                click.echo(f"{f.check}: {f.fix}")
    if failed:
        raise click.exceptions.Exit(1)


@click.command("env")
@click.option("--diff", "against", metavar="NAME@VERSION", default=None,
              help="Compare this environment with the one a version was captured in.")
@click.option("--write-lock", is_flag=True, help="Write .kit/environment.lock.json (make lock).")
@json_option
@pass_kit
def env_cmd(k: Context, against: str | None, write_lock: bool, as_json: bool) -> None:
    """This environment's fingerprint and its drift from the lock, or its drift from a registered version."""
    from kit.env import Fingerprint, diff, fingerprint, read_lock
    from kit.env import write_lock as _write_lock

    if write_lock:
        click.echo(f"wrote {_write_lock(k.config.project_root)}")
        return
    here = fingerprint(k.config.project_root)
    if against is None:
        lock = read_lock(k.config.project_root)
        lock_drift = diff(lock, here) if lock is not None else None
        if as_json:
            return emit_json({**here.to_dict(), "lock_drift": None if lock_drift is None else
                              {"ok": lock_drift.ok, "items": [d.__dict__ for d in lock_drift.items]}})
        click.echo(here.summary())
        click.echo(f"  prefix:          {here.prefix}")
        click.echo(f"  packages hash:   {here.distributions_sha256[:16]}")
        click.echo(f"  environment.yml: {(here.environment_yml_sha256 or 'not found')[:16]}")
        if lock_drift is None:
            click.echo("  lock:            none (write one with `make lock`)")
        elif not lock_drift.items:
            click.echo(f"  lock:            {here.lock_sha256[:16] if here.lock_sha256 else ''} — matches this environment")
        else:
            click.echo(f"  lock:            {len(lock_drift.items)} difference(s) from this environment:")
            for d in lock_drift.items:
                click.echo(f"    {d.severity.upper():8} {d.message}")
        return
    mv = k.registry().resolve(against)
    report = diff(Fingerprint.from_dict(mv.env), here)
    if as_json:
        emit_json({"ok": report.ok, "items": [d.__dict__ for d in report.items]})
    else:
        if not report.items:
            click.echo(f"No drift: this environment matches {mv.ref}'s.")
        for d in report.items:
            click.echo(f"{d.severity.upper():8} {d.message}")
    if not report.ok:
        raise KitError(f"This environment is incompatible with {mv.ref} ({len(report.errors)} error(s) above). "
                       "Recreate it from environment.yml with `make env`.")


def register(cli: click.Group) -> None:
    for c in (models_cmd, show_cmd, verify_cmd, history_cmd, promote_cmd, canary_cmd, rollback_cmd,
              aliases_group, registry_group, env_cmd):
        cli.add_command(c)
