"""`kit validate NAME@VERSION`: run the validation gate (thin over :func:`kit.gate.run_gate`).

Exit codes: 0 the gate passed, 1 the gate ran and failed (a verdict), 2 it could not run (``kit: error``).
"""

from __future__ import annotations

from pathlib import Path

import click

from kit.cli._common import Context, emit_json, json_option, pass_kit


@click.command("validate")
@click.argument("ref", metavar="NAME@VERSION")
@click.option("--notebook", "notebooks", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Validation notebook to run (repeatable); default: kit.toml's validation, else kit's "
                   "model-agnostic default notebook.")
@click.option("-p", "--param", "params", multiple=True, metavar="KEY=VALUE",
              help="Notebook parameter (repeatable), e.g. -p min_accuracy=0.95 or -p max_p95_ms_batch1=50 (an "
                   "absolute latency budget; none by default). Values are JSON, else Python literals, else text (as "
                   "%deploy --param); they override kit.toml's [gate]. Every notebook must declare every parameter.")
@click.option("--timeout", type=float, default=None,
              help="Seconds any one cell may run (default: gate_timeout from the config, 600).")
@click.option("--kernel", "kernel_name", default=None,
              help="Jupyter kernel name; default: this very interpreter (the one environment).")
@click.option("--backend", type=click.Choice(["torch", "onnxruntime"]), default=None,
              help="The backend that will serve (service.toml [model] backend): the checks run on it and the "
                   "verdict is about it. Default: torch.")
@json_option
@pass_kit
def validate_cmd(k: Context, ref: str, notebooks: tuple[Path, ...], params: tuple[str, ...],
                 timeout: float | None, kernel_name: str | None, backend: str | None, as_json: bool) -> None:
    """Run the validation notebooks against NAME@VERSION and record the verdict beside it.

    VERSION is a number, latest, production or canary (NAME alone: production, else latest).
    The default notebook judges the version against the model's production version (another one), on this
    machine in this run, and on its own checks when there is none; each check is shown as it runs.
    The executed notebooks, report.html and result.json are kept under the version's gates/ folder;
    `kit promote` needs a passing run for that exact artifact.

    Exit status: 0 the gate passed, 1 it failed (a verdict), 2 it could not run.
    """
    from kit.gate import parse_params, render_text, run_gate
    from kit.registry import parse_ref

    values = {**k.config.gate, **parse_params(params)}  # kit.toml's [gate], then -p one by one
    reg = k.registry()
    name, sel = parse_ref(ref)
    mv = reg.get(name, sel)
    result = run_gate(
        reg, mv.name, mv.version, notebooks=list(notebooks) or list(k.config.validation) or None, params=values,
        timeout=timeout if timeout is not None else k.config.gate_timeout, kernel_name=kernel_name,
        progress=None if as_json else click.echo, backend=backend,
    )
    if as_json:
        emit_json({**result.to_dict(), "report_path": str(result.report)})
    else:
        click.echo(render_text(result))
    if not result.passed:
        click.get_current_context().exit(1)


def register(cli: click.Group) -> None:
    """Add this area's commands to ``cli``."""
    cli.add_command(validate_cmd)
