"""`gigamil convert`: a slide or a flat TIFF → a tiled, pyramidal JPEG TIFF."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gigamil.cli import options as opt
from gigamil.cli._common import cli_errors, err, progress_bar
from gigamil.wsi.convert import (
    DEFAULT_DOWNSAMPLE,
    DEFAULT_QUALITY,
    DEFAULT_TILE,
    DOWNSAMPLES,
    convert_slide,
)

__all__ = ["convert"]


@cli_errors
def convert(
    src: Annotated[Path, typer.Argument(
        help="A slide (any file `gigamil inspect slide` opens) or a flat TIFF without pyramid.")],
    dst: Annotated[Path, typer.Argument(help="The output TIFF, e.g. out/slide.tif.")],
    mpp: Annotated[float | None, typer.Option(
        help="Level-0 µm/px to record when the source has none (a recorded value is kept).")
    ] = None,
    tile: Annotated[int, typer.Option(help="Tile side in px (a multiple of 16).")] = DEFAULT_TILE,
    quality: Annotated[int, typer.Option(help="JPEG quality, 1–100.")] = DEFAULT_QUALITY,
    downsample: Annotated[int, typer.Option(
        help=f"Downsample between levels: {' or '.join(map(str, DOWNSAMPLES))} "
             "(4 is the Aperio layout, slightly smaller).")] = DEFAULT_DOWNSAMPLE,
    backend: opt.Backend = opt.EXTRACT.backend,
    overwrite: Annotated[bool, typer.Option(help="Replace DST if it exists.")] = False,
) -> None:
    """Write SRC as a tiled pyramidal JPEG TIFF that openslide, cuCIM and tifffile open.

    The resolution is kept (Aperio `MPP` in the description and TIFF resolution
    tags); label, macro and thumbnail images are never copied. Memory stays at
    about one row of tiles whatever the slide size. The output appears only when
    complete. With --backend auto a TIFF without pyramid is read directly, in
    bands of rows; other sources go through the chosen slide reader.
    """
    with progress_bar() as bar:
        task = bar.add_task("convert", total=None, info=src.name)

        def on_progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        res = convert_slide(src, dst, mpp=mpp, tile=tile, quality=quality, backend=backend,
                            downsample=downsample, overwrite=overwrite, on_progress=on_progress)
    if mpp is not None and res.mpp_source == "source" and abs(res.mpp - mpp) > 1e-3 * mpp:
        err.print(f"[yellow]note[/]: {src.name} records {res.mpp:g} µm/px; kept it, not --mpp "
                  f"{mpp:g}", highlight=False)
    sizes = " → ".join(f"{w}x{h}" for w, h in (res.levels[0], res.levels[-1]))
    err.print(
        f"[green]wrote[/] {res.dst}: {len(res.levels)} levels ({sizes}), {res.mpp:g} µm/px, "
        f"{res.bytes / 1e6:.1f} MB in {res.seconds:.1f} s",
        highlight=False,
    )
