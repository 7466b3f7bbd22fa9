"""`gigamil inspect slide|store`: what a slide or a patch store holds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from gigamil.cli import options as opt
from gigamil.cli._common import cli_errors, err, out
from gigamil.wsi.extract import preview_slide
from gigamil.wsi.extract_config import ExtractConfig
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
    slide: Annotated[Path, typer.Argument(
        exists=True, help="A slide file, or a DICOM series folder.")],
    backend: opt.Backend = opt.EXTRACT.backend,
    mpp_override: opt.MppOverride = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    preview: Annotated[Path | None, typer.Option(
        help="Write a PNG of what `extract` would do with the options below: tissue contour, "
             "kept patches, rejected patches coloured by reason. Nothing is extracted.")] = None,
    mpp: opt.Mpp = opt.DEFAULT_MPP,
    patch_size: opt.PatchSize = opt.EXTRACT.patch_size,
    overlap: opt.Overlap = opt.EXTRACT.overlap,
    min_tissue: opt.MinTissue = opt.EXTRACT.min_tissue,
    allow_upsample: opt.AllowUpsample = opt.EXTRACT.allow_upsample,
    tissue_mpp: opt.TissueMpp = opt.EXTRACT.tissue_mpp,
    tissue_detector: opt.TissueDetector = opt.EXTRACT.tissue_detector,
    tissue_param: opt.TissueParam = None,
    qc_background_max: opt.QcBackground = opt.qc_default(opt.QC.background_max, 1.0),
    qc_pen_max: opt.QcPen = opt.qc_default(opt.QC.pen_max, 1.0),
    qc_blur_min: opt.QcBlur = opt.qc_default(opt.QC.blur_min, 0.0),
) -> None:
    """Format, backend, vendor, size, pyramid levels and their µm/px, objective power,
    associated images.

    Associated images (label, macro) are listed by name only; their pixels, which
    may show patient data, are never read. With --preview, also draws what
    extraction with the given options would keep and reject: the picture to tune
    --min-tissue and the QC thresholds on.
    """
    with open_slide(slide, backend, mpp_override) as s:
        info = s.describe()
    if preview is not None:
        cfg = ExtractConfig(
            mpp=opt.parse_mpps(mpp)[:1], patch_size=patch_size, overlap=overlap,
            min_tissue=min_tissue, allow_upsample=allow_upsample, backend=backend,
            mpp_override=mpp_override, tissue_mpp=tissue_mpp,
            tissue_detector=tissue_detector,
            tissue_params=opt.parse_key_values(tissue_param, "tissue option"),
            qc=opt.qc_config(qc_background_max, qc_pen_max, qc_blur_min),
        )
        image, counts = preview_slide(slide, cfg)
        save_png(preview, image)
        info["preview"] = counts
    if as_json:
        out.print_json(json.dumps(info))
        return
    out.print(_kv_table(f"slide {info['file']}", info, {"levels", "preview"}))
    levels = Table("level", "width", "height", "downsample", "µm/px", title="levels", title_justify="left")
    for lv in info["levels"]:
        levels.add_row(*(str(lv[k]) for k in ("level", "width", "height", "downsample", "mpp")))
    out.print(levels)
    if info["mpp"] is None:
        err.print("[yellow]no resolution recorded[/]: extraction needs --mpp-override MPP")
    if preview is not None:
        err.print(f"[green]wrote[/] preview {preview}: " +
                  ", ".join(f"{k} {v}" for k, v in info["preview"].items()), highlight=False)


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
