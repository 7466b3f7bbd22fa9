"""`gigamil demo`: the whole pipeline on a synthetic cohort, in minutes on a laptop."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from gigamil.cli._common import EXIT_FAILED, cli_errors, err, out, parse_size
from gigamil.demo import DemoConfig, run_demo


@cli_errors
def demo(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Where the demo writes everything.")] = Path(
        "gigamil-demo"
    ),
    n: Annotated[int, typer.Option("--n", min=2, help="Number of synthetic slides.")] = 6,
    size: Annotated[str, typer.Option(help="Slide size WIDTHxHEIGHT at 0.25 µm/px.")] = "12000x9600",
    workers: Annotated[int, typer.Option(min=1, help="Parallel slide workers.")] = 2,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic cohort.")] = 0,
) -> None:
    """Synthetic cohort → extract → summary, with a patch montage to look at.

    Reruns reuse what is already there. Outputs: OUT/slides (slides, labels.csv,
    masks), OUT/data (patch stores, extract.csv), OUT/montage.png and
    OUT/demo_summary.json.
    """
    width, height = parse_size(size)
    cfg = DemoConfig(out=out_dir, n_slides=n, width=width, height=height, workers=workers, seed=seed)
    summary = run_demo(cfg, on_stage=lambda msg: err.print(f"[bold cyan]▶[/] {msg}", highlight=False))
    table = Table("slide", "status", "patches", "seconds", "note", title="demo", title_justify="left")
    for row in summary["slides"]:
        table.add_row(row["slide_id"], row["status"], str(row["n_patches"]), str(row["seconds"]),
                      row["error"] or row["note"])
    out.print(table)
    out.print(f"timings: {summary['timings']}  •  montage: {out_dir / 'montage.png'}", highlight=False)
    if summary["n_failed"]:
        raise typer.Exit(EXIT_FAILED)
