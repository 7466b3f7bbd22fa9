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
    n: Annotated[int, typer.Option("--n", min=4, help="Slides in the training cohort.")] = 12,
    heldout: Annotated[int, typer.Option(min=2, help="New slides to predict.")] = 6,
    size: Annotated[str, typer.Option(help="Slide size WIDTHxHEIGHT at 0.25 µm/px.")] = "6144x4864",
    workers: Annotated[int, typer.Option(min=1, help="Parallel workers.")] = 2,
    folds: Annotated[int, typer.Option(min=2, help="Cross-validation folds.")] = 3,
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs.")] = 25,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic cohort.")] = 0,
) -> None:
    """The whole pipeline on synthetic slides with planted tumour, in minutes on a laptop.

    synth → extract → embed (random-init tiny CNN) → train (k-fold abmil) → infer on
    held-out slides (Ray) → AUROC on them, attention-vs-tumour-mask AUROC, heatmaps.
    Outputs in OUT: slides/, heldout/, data/, run/, preds/ (predictions.csv, heatmaps/),
    montage.png, demo_summary.json. Reruns reuse what is already there.
    """
    width, height = parse_size(size)
    cfg = DemoConfig(out=out_dir, n_slides=n, n_heldout=heldout, width=width, height=height,
                     workers=workers, seed=seed, folds=folds, epochs=epochs)
    summary = run_demo(cfg, on_stage=lambda msg: err.print(f"[bold cyan]▶[/] {msg}", highlight=False))
    table = Table("what", "value", title="demo", title_justify="left")
    cv = summary["cv_auroc"]
    if cv:
        table.add_row("cross-validated AUROC (training cohort)",
                      f"{cv['value']:.3f} (95% CI {cv['ci95'][0]:.2f}–{cv['ci95'][1]:.2f})")
    table.add_row(f"held-out AUROC ({heldout} new slides)", f"{summary['heldout_auroc']:.3f}")
    table.add_row("held-out accuracy", f"{summary['heldout_accuracy']:.3f}")
    att = summary["attention_auroc"]["mean"]
    table.add_row("attention vs planted tumour (AUROC)", "n/a" if att is None else f"{att:.3f}")
    table.add_row("heatmaps", summary["heatmaps"])
    table.add_row("seconds", ", ".join(f"{k[:-2]} {v:.0f}" for k, v in summary["timings"].items()))
    out.print(table)
    if summary["n_failed"]:
        raise typer.Exit(EXIT_FAILED)
