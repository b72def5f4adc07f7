"""`kit init [DIR]`: set Kit up in an existing project (thin over :func:`kit.project.init_project`)."""

from __future__ import annotations

from pathlib import Path

import click

from kit.cli._common import emit_json, json_option


@click.command("init")
@click.argument("directory", required=False, default=".", type=click.Path(file_okay=False, path_type=Path))
@click.option("--ci", "ci", type=click.Choice(["github", "gitlab"]), default=None,
              help="Also write a pipeline that gates a version of the shared registry on every push with the CI's "
                   "own key, keeps report.html and promotes on a pass (ci/kit-gate.sh; kit.ci).")
@json_option
def init_cmd(directory: Path, ci: str | None, as_json: bool) -> None:
    """Set Kit up in the project at DIRECTORY (default: here).

    Writes kit.toml (registry, services folder, validation notebooks), a copy of the default validation
    notebook under notebooks/validation/ to edit, and .gitignore lines for the registry and dist/; checks
    that environment.yml or pyproject.toml names kit. Never overwrites a file.
    """
    from kit.project import init_project

    result = init_project(directory)
    ci_written: list[Path] = []
    ci_kept: list[Path] = []
    if ci is not None:
        from kit.ci import write_ci

        ci_written, ci_kept = write_ci(result.root, ci)
    if as_json:
        emit_json({"root": str(result.root), "written": [str(p) for p in [*result.written, *ci_written]],
                   "kept": [str(p) for p in [*result.kept, *ci_kept]], "gitignore_added": list(result.gitignore_added),
                   "warnings": list(result.warnings)})
        return
    for line in result.lines():
        click.echo(line, err=line.startswith("warning:"))
    for p in ci_written:
        click.echo(f"wrote {p}")
    for p in ci_kept:
        click.echo(f"kept {p} (exists; not overwritten)")
    click.echo(f"Kit is set up in {result.root}. Next: capture and register a model (%deploy in a notebook, "
               "or Registry.register), then `kit validate NAME@latest`.")


def register(cli: click.Group) -> None:
    """Add this area's commands to ``cli``."""
    cli.add_command(init_cmd)
