"""`gigamil extract`: slides → one LMDB patch store per slide."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from gigamil.cli import options as opt
from gigamil.cli._common import EXIT_FAILED, cli_errors, err, progress_bar
from gigamil.cli.cluster import run_stage_here_or_submit
from gigamil.cluster.executor import ClusterOptions
from gigamil.cluster.stages import ExtractStage
from gigamil.wsi.extract_config import ExtractConfig, SlideResult, StainMethod
from gigamil.wsi.store_format import Encoding


@cli_errors
@opt.cluster_options("extract")
def extract(
    inputs: Annotated[list[Path], typer.Argument(
        help="Slide files, folders of slides (searched recursively; a DICOM series folder is "
             "one slide), or slide lists: a .csv with a `path` column (optional `slide_id`) "
             "or a .txt with one path a line.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory (patches/, extract.csv).")],
    mpp: opt.Mpp = opt.DEFAULT_MPP,
    patch_size: opt.PatchSize = opt.EXTRACT.patch_size,
    overlap: opt.Overlap = opt.EXTRACT.overlap,
    min_tissue: opt.MinTissue = opt.EXTRACT.min_tissue,
    workers: Annotated[int, typer.Option(
        min=1, help="CPU workers: slides run in parallel processes; with fewer slides than "
                    "workers, each slide is read with several threads.")] = 1,
    fmt: Annotated[Encoding, typer.Option("--format", help="Patch encoding in the store.")
                   ] = opt.EXTRACT.encoding,
    jpeg_quality: Annotated[int, typer.Option(min=1, max=100, help="JPEG quality.")] = opt.EXTRACT.jpeg_quality,
    backend: opt.Backend = opt.EXTRACT.backend,
    mpp_override: opt.MppOverride = None,
    allow_upsample: opt.AllowUpsample = opt.EXTRACT.allow_upsample,
    tissue_mpp: opt.TissueMpp = opt.EXTRACT.tissue_mpp,
    tissue_detector: opt.TissueDetector = opt.EXTRACT.tissue_detector,
    tissue_param: opt.TissueParam = None,
    coords_h5: Annotated[
        bool, typer.Option(help="Also write coords/<slide_id>.h5 in the CLAM/TRIDENT layout.")
    ] = False,
    qc_background_max: opt.QcBackground = opt.qc_default(opt.QC.background_max, 1.0),
    qc_pen_max: opt.QcPen = opt.qc_default(opt.QC.pen_max, 1.0),
    qc_blur_min: opt.QcBlur = opt.qc_default(opt.QC.blur_min, 0.0),
    stain_norm: Annotated[
        StainMethod | None, typer.Option(help="Normalize stain, fitted once per slide.")
    ] = None,
    stain_reference: Annotated[
        Path | None, typer.Option(exists=True, dir_okay=False,
                                  help="Reference H&E image for --stain-norm (default: built-in).")
    ] = None,
    previews: Annotated[
        bool, typer.Option(help="Write previews/<slide_id>.png: tissue, kept and rejected patches.")
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Redo slides that are already complete.")] = False,
    record_paths: Annotated[
        bool, typer.Option(help="Store full source paths in the metadata (off: file names only).")
    ] = False,
    shard: Annotated[str | None, typer.Option(
        help="Take share k of n of the slides (sorted), e.g. 3/16 for a SLURM array task.")] = None,
    recursive: Annotated[bool, typer.Option(
        help="Search input folders recursively.", rich_help_panel="Slides")] = True,
    mpp_csv: Annotated[Path | None, typer.Option(
        exists=True, dir_okay=False, rich_help_panel="Slides",
        help="CSV `slide_id,mpp`: level-0 µm/px of slides that do not record it.")] = None,
    mpp_from_magnification: Annotated[bool, typer.Option(
        rich_help_panel="Slides",
        help="Without a recorded mpp, take 10 / objective power (40x → 0.25), with a warning "
             "in the manifest.")] = False,
    pseudonymize: opt.Pseudonymize = False,
    pseudonym_map: opt.PseudonymMap = None,
    roi: Annotated[Path | None, typer.Option(
        exists=True, file_okay=False, rich_help_panel="QuPath",
        help="Folder of <slide_id>.geojson annotations exported from QuPath: keep only the "
             "patches inside them.")] = None,
    roi_class: Annotated[list[str] | None, typer.Option(
        rich_help_panel="QuPath", help="Only annotations of this class (repeatable).")] = None,
    roi_min_fraction: Annotated[float, typer.Option(
        min=0.01, max=1.0, rich_help_panel="QuPath",
        help="Part of a patch's area inside the ROI to keep it.")] = opt.EXTRACT.roi_min_fraction,
    geojson: Annotated[bool, typer.Option(
        rich_help_panel="QuPath",
        help="Write geojson/<slide_id>.geojson: tissue contours and kept patches, which QuPath "
             "imports (File → Import objects).")] = False,
    stage_dir: Annotated[Path | None, typer.Option(
        file_okay=False, rich_help_panel="Slides",
        help="Copy the next slides to this local folder (e.g. $TMPDIR on a compute node) "
             "ahead of reading them; each copy is removed when its slide is done.")] = None,
    stage_gb: Annotated[float, typer.Option(
        min=0.1, rich_help_panel="Slides",
        help="At most this many GB staged at once.")] = opt.EXTRACT.stage_gb,
    config: opt.ConfigFile = None,
    *,
    cluster: ClusterOptions,
) -> None:
    """Detect tissue, cut patches at an exact µm/px and store them, one LMDB file per slide.

    Outputs in OUT: patches/<slide_id>.lmdb, extract.csv (one row per slide:
    ok / skipped / failed, patch count, seconds, error, QC rejections by reason),
    extract_config.json, and with --previews previews/<slide_id>.png.

    Patch QC rejects glass, marker ink and blur; tune the thresholds by looking at
    `gigamil inspect slide S --preview p.png` with the same options.
    A rerun skips slides already extracted with the same parameters and redoes
    interrupted or changed ones. Exit code 1 if any slide failed.
    """
    cfg = ExtractConfig(
        mpp=opt.parse_mpps(mpp), patch_size=patch_size, overlap=overlap, min_tissue=min_tissue,
        allow_upsample=allow_upsample, encoding=fmt, jpeg_quality=jpeg_quality,
        backend=backend, mpp_override=mpp_override, tissue_mpp=tissue_mpp,
        tissue_detector=tissue_detector,
        tissue_params=opt.parse_key_values(tissue_param, "tissue option"),
        qc=opt.qc_config(qc_background_max, qc_pen_max, qc_blur_min),
        stain_norm=stain_norm,
        stain_reference=str(stain_reference) if stain_reference else None,
        coords_h5=coords_h5, previews=previews, record_paths=record_paths,
        recursive=recursive, pseudonymize=pseudonymize,
        pseudonym_map=str(pseudonym_map) if pseudonym_map else None,
        mpp_csv=str(mpp_csv) if mpp_csv else None,
        mpp_from_magnification=mpp_from_magnification,
        roi_dir=str(roi) if roi else None, roi_classes=tuple(roi_class or ()),
        roi_min_fraction=roi_min_fraction, geojson=geojson,
        stage_dir=str(stage_dir) if stage_dir else None, stage_gb=stage_gb,
    )
    counts = {"patches": 0}
    with progress_bar() as bar:
        task = bar.add_task("extract", total=None, info="")

        def on_result(res: SlideResult) -> None:
            bar.update(task, advance=1, info=f"{counts['patches']} patches read · "
                                             f"{res.slide_id} {res.status}")

        def on_patches(n: int) -> None:  # every patch read, kept or rejected, all scales
            counts["patches"] += n
            bar.update(task, info=f"{counts['patches']} patches read")

        stage = ExtractStage(inputs, out, cfg, workers=workers, overwrite=overwrite,
                             shard=opt.parse_shard(shard), hooks={
                                 "on_start": lambda n: bar.update(task, total=n),
                                 "on_result": on_result, "on_patches": on_patches})
        jobs = run_stage_here_or_submit(stage, cluster, bar, task)
    if jobs is None:
        return
    results = [r for job in jobs for r in job]
    _summary(results, out)
    if any(r.status == "failed" for r in results):
        raise typer.Exit(EXIT_FAILED)


def _summary(results: list[SlideResult], out: Path) -> None:
    by = {s: [r for r in results if r.status == s] for s in ("ok", "skipped", "failed")}
    n_patches = sum(r.n_patches for r in results)
    err.print(
        f"[green]{len(by['ok'])} ok[/], {len(by['skipped'])} skipped, "
        f"[{'red' if by['failed'] else 'green'}]{len(by['failed'])} failed[/] — "
        f"{n_patches} patches in {out / 'patches'}; manifest {out / 'extract.csv'}",
        highlight=False,
    )
    notes = [r for r in results if r.note and r.status == "ok"]
    if by["failed"] or notes:
        table = Table("slide", "status", "message", title_justify="left")
        for r in by["failed"] + notes:
            table.add_row(r.slide_id, r.status, r.error or r.note)
        err.print(table)
