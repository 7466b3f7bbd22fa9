"""The `gigamil` command: one Typer app, one module per command."""

from __future__ import annotations

from typing import Annotated

import typer

from gigamil.cli import (
    cluster,
    convert,
    demo,
    embed,
    extract,
    infer,
    inspect,
    models,
    study,
    synth,
    train,
)
from gigamil.cli._common import err, setup_logging
from gigamil.versions import gigamil_version

app = typer.Typer(
    name="gigamil",
    help=(
        "Computational pathology on laptops and SLURM clusters: whole-slide images → "
        "patches → features → attention-MIL models → predictions.\n\n"
        "Start with `gigamil demo`, or `gigamil synth slides/` then "
        "`gigamil extract slides/ --out data/`."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"gigamil {gigamil_version()}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: Annotated[
        int, typer.Option("--verbose", "-v", count=True, help="-v for progress logs, -vv for debug.")
    ] = 0,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    setup_logging(verbose)


app.command("synth")(synth.synth)
app.command("extract")(extract.extract)
app.command("convert")(convert.convert)
app.command("embed")(embed.embed)
app.command("encoders")(embed.encoders)
app.command("models")(models.models)
app.command("train")(train.train)
app.command("eval")(train.evaluate)
app.command("demo")(demo.demo)
app.command("infer")(infer.infer)
app.command("export")(infer.export)
app.command("heatmap")(infer.heatmap)
app.command("jobs")(cluster.jobs)
app.command("init")(study.init)
app.command("run")(study.run)
app.command("status")(study.status)
app.add_typer(inspect.app, name="inspect")
app.add_typer(cluster.app, name="slurm")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:  # pragma: no cover - outside a command
        err.print("[yellow]interrupted[/]")
        raise SystemExit(130) from None
