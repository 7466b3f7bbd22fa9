"""`gigamil synth`: a synthetic cohort of pyramidal slides with labels and masks."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gigamil.cli._common import cli_errors, err, parse_size, progress_bar
from gigamil.synth.slides import make_cohort


@cli_errors
def synth(
    out: Annotated[Path, typer.Argument(help="Directory for the slides, labels.csv and masks/.")],
    n: Annotated[int, typer.Option("--n", min=1, help="Number of slides.")] = 6,
    size: Annotated[str, typer.Option(help="Level-0 size WIDTHxHEIGHT in px.")] = "20000x16000",
    mpp: Annotated[float, typer.Option(min=0.05, max=10.0, help="Level-0 µm per pixel (0.25 = 40x).")] = 0.25,
    seed: Annotated[int, typer.Option(help="Everything is deterministic from the seed.")] = 0,
    positive_fraction: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Fraction of slides with a planted tumour.")
    ] = 0.5,
    pen_marks: Annotated[bool, typer.Option(help="Draw blue, green and black ink marks.")] = False,
    blur: Annotated[bool, typer.Option(help="Plant out-of-focus regions.")] = False,
    n_empty: Annotated[int, typer.Option(min=0, help="The last N slides have no tissue.")] = 0,
    workers: Annotated[int, typer.Option(min=1, help="Slides written in parallel.")] = 2,
) -> None:
    """Write synthetic H&E-like slides (Aperio-style .svs) plus labels.csv and ground-truth masks.

    Positive slides (label `tumor`) carry a planted tumour region with denser,
    larger nuclei; masks/<slide_id>.npz holds the tissue, tumour, pen and blur
    masks at 8 µm/px and masks/<slide_id>.png shows them. Existing slides with
    the same settings are kept, so an interrupted run can simply be repeated.
    """
    width, height = parse_size(size)
    with progress_bar() as bar:
        task = bar.add_task("synth", total=n, info="")
        make_cohort(
            out, n=n, width=width, height=height, mpp=mpp, seed=seed,
            positive_fraction=positive_fraction, pen_marks=pen_marks, blur=blur,
            n_empty=n_empty, workers=workers, progress=lambda sid: bar.update(task, advance=1, info=sid),
        )
    err.print(f"[green]wrote[/] {n} slides, labels.csv and masks/ to {out}")
