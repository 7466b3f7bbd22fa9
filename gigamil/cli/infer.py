"""`gigamil infer`, `gigamil export` and `gigamil heatmap`: a trained run → predictions."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

import gigamil.cli.options as opt
from gigamil.cli._common import EXIT_FAILED, cli_errors, err, out, progress_bar
from gigamil.cluster.infer import RayOptions
from gigamil.mil.infer_config import InferConfig

if TYPE_CHECKING:
    from gigamil.mil.infer_outputs import SlideFailure, SlideOutcome

RunDir = Annotated[Path, typer.Option("--run", exists=True, file_okay=False,
                                      help="The run directory of `gigamil train`.")]


@cli_errors
@opt.from_config(RayOptions, "where", panel="Where it runs (Ray)")
@opt.from_config(InferConfig, "settings")
def infer(
    slides: Annotated[list[Path], typer.Argument(help="Slide files or directories.")],
    run: RunDir,
    preds_out: Annotated[Path, typer.Option("--out", help="Where predictions go.")],
    config: opt.ConfigFile = None,
    *,
    where: RayOptions,
    settings: InferConfig,
) -> None:
    """Predict new slides with a trained run: patches, encoder and MIL models, per slide.

    On Ray, CPU tasks read and QC the patches in chunks while the predictor actors run
    the encoder (batching across slides) and the MIL models.

    Writes OUT/predictions.csv (class, per-class probability, uncertainty, patches, QC
    rejections, model id), OUT/failures.csv, and per slide OUT/slides/<id>.json and .npz
    (coords, attention, and per-patch probabilities with --heatmap-values probability). A
    rerun skips finished slides; exit code 1 if any slide failed.
    """
    from gigamil.cluster.infer import find_inference_slides, infer_slides_where, todo
    from gigamil.io import ensure_writable
    from gigamil.mil.infer_outputs import write_outputs
    from gigamil.mil.infer_spec import InferenceSpec

    spec = InferenceSpec.from_run(run, settings)
    ensure_writable(preds_out)  # a read-only or full --out: one error, before any work
    paths, unusable = find_inference_slides(slides, spec, settings, preds_out)
    remaining = todo(paths, preds_out, spec)
    failures: list[SlideFailure] = list(unusable)
    stats: dict[str, Any] = {}
    with progress_bar() as bar:
        task = bar.add_task("infer", total=len(paths), completed=len(paths) - len(remaining),
                            info="")

        def on_result(res: SlideOutcome) -> None:
            bar.update(task, advance=1, info=res.describe())

        try:
            _, failed, stats = infer_slides_where(remaining, spec, preds_out, where, on_result)
            failures += failed
        finally:  # Ctrl-C too: the finished slides are kept and listed
            preds_out.mkdir(parents=True, exist_ok=True)
            pred_csv, fail_csv = write_outputs(preds_out, spec, failures, stats)
    err.print(f"[green]{len(paths) - len(remaining)} already done, "
              f"{len(remaining) - len(failures) + len(unusable)} predicted[/], "
              f"[{'red' if failures else 'green'}]{len(failures)} failed[/] → {pred_csv}",
              highlight=False)
    for f in failures:
        err.print(f"  {f.slide_id}: {f.error}", highlight=False)
    if failures:
        raise typer.Exit(EXIT_FAILED)


@cli_errors
def export(
    run: Annotated[Path, typer.Argument(exists=True, file_okay=False, help="A run directory.")],
    onnx_path: Annotated[Path, typer.Option("--onnx", help="The .onnx file to write.")],
    fold: Annotated[int, typer.Option(help="Which fold's model.")] = 0,
) -> None:
    """Export a fold's MIL model to ONNX with a dynamic bag length (parity-checked)."""
    from gigamil.mil.export import export_run

    report = export_run(run, fold, onnx_path)
    out.print(f"wrote {onnx_path}: max |onnx − torch| = {report['max_abs_diff']:.1e} on bags "
              f"of {report['lengths']} instances")


@cli_errors
@opt.from_config(InferConfig, "settings",
                 exclude=("engine", "heatmaps", "geojson", "top_patches"))
def heatmap(
    slide: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="A slide.")],
    run: RunDir,
    png: Annotated[Path, typer.Option("--out", help="The PNG to write.")],
    *,
    settings: InferConfig,
) -> None:
    """Attention, or per-patch probability, of the run's model(s) over the slide's
    thumbnail, with a colour bar."""
    from gigamil.mil.infer import SlidePredictor
    from gigamil.mil.infer_outputs import headline, slide_heatmap
    from gigamil.mil.infer_spec import InferenceSpec
    from gigamil.wsi.preview import save_png

    predictor = SlidePredictor(InferenceSpec.from_run(run, settings))
    row, coords, scores, work = predictor.predict(slide)
    save_png(png, slide_heatmap(predictor.spec, slide, coords, scores, work.patch_size_level0,
                                title=f"{row['slide_id']}: {headline(row)}"))
    out.print(f"{row['slide_id']}: {headline(row)} "
              + " ".join(f"{k[5:]}={v:.3f}" for k, v in row.items() if k.startswith("prob_"))
              + f" → {png}")
