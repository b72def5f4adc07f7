"""`kit pack`: a thin shell over :func:`kit.pack.pack` and :func:`kit.pack.verify_archive`."""

from __future__ import annotations

from pathlib import Path

import click

from kit.cli._common import Context, emit_json, json_option, pass_kit


@click.command("pack")
@click.argument("target", type=click.Path(exists=True, path_type=Path))
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("dist"),
              show_default=True, help="Where the archive is written.")
@click.option("--force", is_flag=True,
              help="Pack despite clobbered conda files or an incompatible model environment (recorded).")
@click.option("--env", "env_prefix", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Environment to pack (default: the one running kit).")
@click.option("--platform", "target_platform", default=None, help="Refuse unless the environment is for this "
              "platform, e.g. linux-x86_64.")
@click.option("--include", "include", multiple=True, metavar="DIST",
              help="Also ship this installed distribution (and what it requires); repeatable. Adds to pack.toml.")
@click.option("--exclude", "exclude", multiple=True, metavar="DIST",
              help="Leave this distribution out even if the service requires it; repeatable (--verify then "
                   "names what breaks).")
@click.option("--compress-level", "compresslevel", type=click.IntRange(1, 9), default=4, show_default=True)
@click.option("--compress", "compression", type=click.Choice(["gzip", "zstd"]), default="gzip", show_default=True,
              help="gzip: .tar.gz, any server unpacks it; zstd: .tar.zst, every core, ~9x faster to pack and "
                   "~15x to unpack, smaller; the server needs zstd (docs/pack.md).")
@click.option("--verify", "do_verify", is_flag=True,
              help="Then unpack into a temporary folder, start it on a free port, check /readyz and the stored "
                   "example, stop it. With an archive as TARGET: only verify it.")
@click.option("--image", "image", is_flag=True,
              help="Also write a Containerfile next to the archive's contents (dist/<archive>.image/) and, where "
                   "buildah or podman is installed, build dist/<archive>.image.tar. With an archive as TARGET: "
                   "only that.")
@click.option("--base", "image_base", default=None, help="Base image for --image (default debian:bookworm-slim "
              "for a conda archive; a venv archive needs one with its Python at the same path).")
@click.option("--builder", type=click.Choice(["buildah", "podman"]), default=None,
              help="Image builder for --image (default: the first installed).")
@json_option
@pass_kit
def pack_cmd(kit_ctx: Context, target: Path, out_dir: Path, force: bool, env_prefix: Path | None,
             target_platform: str | None, include: tuple[str, ...], exclude: tuple[str, ...],
             compresslevel: int, compression: str, do_verify: bool, image: bool,
             image_base: str | None, builder: str | None, as_json: bool) -> None:
    """Pack services/NAME with what it runs of its environment (docs/pack.md) and its models into
    dist/NAME-<version>-<platform>.tar.gz (.tar.zst with --compress zstd)."""
    from kit.pack import pack, verify_archive
    from kit.pack.integrity import ship_text

    say = (lambda msg: click.echo(msg, err=True))
    result: dict[str, object] = {}
    archive = target
    if target.is_dir():
        registry = kit_ctx.config.registry if kit_ctx.registry_override else None  # a folder or s3://...
        res = pack(target, out_dir=out_dir, force=force, progress=say, env_prefix=env_prefix,
                   registry=registry, target_platform=target_platform, compresslevel=compresslevel,
                   keyring=kit_ctx.config.keyring(), include=include, exclude=exclude, compression=compression)
        result["pack"] = res.to_dict()
        archive = res.archive
        if not as_json:
            click.echo(f"{res.archive}  {res.size_bytes / 1e6:.1f} MB  {res.kind}  {res.backend}  "
                       f"{', '.join(f'{m}@{v}' for m, vs in res.models.items() for v in vs)}  {res.seconds:.1f}s")
            if res.kind == "venv":
                click.echo("note: venv fallback; the server needs the same Python at the same path "
                           "(run.sh checks it first). A conda environment packs its interpreter.")
            click.echo(ship_text(res.archive, res.root, res.signed_by))
    elif not (do_verify or image):
        raise click.UsageError(f"{target} is a file; pass a service folder (services/NAME), or --verify to "
                               "verify an archive.")
    if do_verify:
        # run.sh checks the archive's signature against this project's keys, as a server that trusts them
        trusted = tuple(k.text() for k in kit_ctx.config.keyring().trust().keys)
        rep = verify_archive(archive, progress=say, trusted_keys=trusted)
        result["verify"] = rep.to_dict()
        if not as_json:
            click.echo(f"verified {Path(rep.archive).name}: ready in {rep.ready_seconds:.1f}s, {rep.model}@"
                       f"{rep.version} matched its reference (max diff {rep.max_abs_diff:.2g}); import audit: "
                       f"{(rep.audit or {}).get('modules', 0)} modules, none missing")
    if image:
        from kit.pack.image import build_image

        img = build_image(archive, base=image_base, builder=builder, progress=say)
        result["image"] = img.to_dict()
        if not as_json:
            click.echo(f"{img.containerfile}" + (f"\n{img.image_archive}  {img.tag}  (podman load / docker load -i)"
                                                 if img.image_archive else f"\nimage not built: {img.skipped}"))
    if as_json:
        emit_json(result)


def register(cli: click.Group) -> None:
    """Add this area's commands to ``cli``."""
    cli.add_command(pack_cmd)
