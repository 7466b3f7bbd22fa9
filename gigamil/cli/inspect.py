"""`gigamil inspect slide|store`: what a slide or a patch store holds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from gigamil.cli._common import cli_errors, err, out
from gigamil.wsi.preview import patch_montage, save_png
from gigamil.wsi.reader import open_slide
from gigamil.wsi.store import PatchStore, describe_store

app = typer.Typer(help="Show what a slide or a patch store holds.", no_args_is_help=True)


def _kv_table(title: str, info: dict[str, Any], skip: set[str]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in info.items():
        if key in skip:
            continue
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items()) or "-"
        elif isinstance(value, list):
            value = ", ".join(map(str, value)) or "-"
        table.add_row(key, "-" if value is None else str(value))
    return table


@app.command("slide")
@cli_errors
def inspect_slide(
    slide: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="A slide file.")],
    backend: Annotated[str, typer.Option(help="auto, openslide or cucim.")] = "auto",
    mpp_override: Annotated[float | None, typer.Option(help="Level-0 µm/px if the file lacks it.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Vendor, size, pyramid levels and their µm/px, objective power, backend, associated images.

    Associated images (label, macro) are listed by name only; their pixels, which
    may show patient data, are never read.
    """
    with open_slide(slide, backend, mpp_override) as s:
        info = s.describe()
    if as_json:
        out.print_json(json.dumps(info))
        return
    out.print(_kv_table(f"slide {info['file']}", info, {"levels"}))
    levels = Table("level", "width", "height", "downsample", "µm/px", title="levels", title_justify="left")
    for lv in info["levels"]:
        levels.add_row(*(str(lv[k]) for k in ("level", "width", "height", "downsample", "mpp")))
    out.print(levels)
    if info["mpp"] is None:
        err.print("[yellow]no resolution recorded[/]: extraction needs --mpp-override MPP")


@app.command("store")
@cli_errors
def inspect_store(
    store: Annotated[Path, typer.Argument(help="A patch store, e.g. data/patches/s000.lmdb.")],
    montage: Annotated[
        Path | None, typer.Option(help="Also write a PNG contact sheet of random patches here.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Patch count, µm/px, patch size, extraction parameters and package versions of a store."""
    with PatchStore(store) as s:
        info = describe_store(s)
        if montage is not None:
            save_png(montage, patch_montage(s))
    if as_json:
        out.print_json(json.dumps(info))
    else:
        out.print(_kv_table(f"store {info['file']}", info, set()))
    if montage is not None:
        err.print(f"[green]wrote[/] montage {montage}")
