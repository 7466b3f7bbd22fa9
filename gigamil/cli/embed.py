"""`gigamil embed` and `gigamil encoders`: patch stores → feature bags (HDF5)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

import gigamil.cli.options as opt
from gigamil.cli._common import EXIT_FAILED, cli_errors, err, out, progress_bar
from gigamil.cli.cluster import run_stage_here_or_submit
from gigamil.cluster.executor import ClusterOptions
from gigamil.cluster.stages import EmbedStage
from gigamil.errors import UsageError
from gigamil.mil.embed_config import EmbedConfig, Precision, Scales
from gigamil.wsi.extract_config import ExtractConfig, StainMethod

#: The defaults of every embedding option: read from the config, never restated here.
E = EmbedConfig()


@cli_errors
@opt.cluster_options("embed", gpus_per_node="--gpus-per-job")
def embed(
    data: Annotated[Path, typer.Argument(exists=True, help="The --out of `gigamil extract` "
                                         "(holds patches/), or slides with --from-slides.")],
    encoder: Annotated[str, typer.Option(help="A preset (see `gigamil encoders`) or any timm "
                                              "model name, or hf-hub:org/name.")] = E.encoder,
    weights: Annotated[Path | None, typer.Option(
        exists=True, dir_okay=False,
        help="Local weights: .safetensors, or a .pth/.bin state_dict (loaded weights_only).")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Patches per forward pass.")] = E.batch_size,
    workers: Annotated[int, typer.Option(min=0, help="DataLoader processes decoding patches.")] = E.workers,
    precision: Annotated[Precision, typer.Option(
        help="auto = bf16 on GPU, fp32 on CPU.")] = E.precision,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = E.device,
    shard: Annotated[str | None, typer.Option(
        help="Take share k of n of the slides (sorted, k from 0), e.g. $SLURM_ARRAY_TASK_ID/16.")] = None,
    compile_model: Annotated[bool, typer.Option("--compile", help="torch.compile the encoder.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Redo slides that already have features.")] = False,
    out_dir: Annotated[Path | None, typer.Option(
        "--out", help="Where features/<encoder>/ goes (default: DATA).")] = None,
    stain_norm: Annotated[StainMethod | None, typer.Option(
        help="Normalize stain, fitted once per slide.")] = E.stain_norm,
    stain_reference: Annotated[Path | None, typer.Option(
        exists=True, dir_okay=False, help="Reference image for --stain-norm.")] = None,
    scales: Annotated[Scales, typer.Option(
        help="Of a multi-scale store (extract --mpp 0.5,2.0): primary embeds the first scale; "
        "all embeds every scale, with each primary patch's parent in each coarser scale "
        "(what hier_abmil trains on).")] = E.scales,
    from_slides: Annotated[bool, typer.Option(
        help="DATA holds slides: cut patches on the fly (tissue, grid, QC), store none.")] = False,
    mpp: opt.Mpp = opt.DEFAULT_MPP,
    patch_size: opt.PatchSize = opt.EXTRACT.patch_size,
    min_tissue: opt.MinTissue = opt.EXTRACT.min_tissue,
    backend: opt.Backend = opt.EXTRACT.backend,
    mpp_override: opt.MppOverride = None,
    pseudonymize: opt.Pseudonymize = False,
    pseudonym_map: opt.PseudonymMap = None,
    config: opt.ConfigFile = None,
    *,
    cluster: ClusterOptions,
) -> None:
    """Turn every patch store in DATA/patches into DATA/features/<encoder>/<slide_id>.h5.

    The files hold `features` (N, D) float32 and `coords` (N, 2) with TRIDENT's
    attributes, so CLAM and TRIDENT readers open them. Each slide is written as
    soon as it is done; a rerun skips finished slides. Corrupt patches are
    skipped and counted in features/<encoder>/embed.csv. Under torchrun each rank
    takes its share of the slides.
    """
    from gigamil.cluster.distributed import dist_env

    env = dist_env()
    cfg = EmbedConfig(rank=env.rank, world_size=env.world_size, local_rank=env.local_rank,
                      encoder=encoder, weights=str(weights) if weights else None,
                      batch_size=batch_size, workers=workers, precision=precision,
                      device=device, shard=opt.parse_shard(shard), compile=compile_model,
                      overwrite=overwrite, stain_norm=stain_norm, scales=scales,
                      stain_reference=str(stain_reference) if stain_reference else None)
    from_slides_cfg = None
    if from_slides:
        mpps = opt.parse_mpps(mpp)
        if len(mpps) != 1:
            raise UsageError("--from-slides embeds one scale", "give one --mpp, e.g. 0.5")
        if scales != "primary":
            raise UsageError("--from-slides embeds one scale",
                             "extract a multi-scale store first, then embed it with --scales all")
        from_slides_cfg = ExtractConfig(
            mpp=mpps[0], patch_size=patch_size, min_tissue=min_tissue, backend=backend,
            mpp_override=mpp_override, stain_norm=stain_norm, stain_reference=cfg.stain_reference,
            pseudonymize=pseudonymize, pseudonym_map=str(pseudonym_map) if pseudonym_map else None)
    elif pseudonymize:
        raise UsageError("--pseudonymize belongs to `gigamil extract`, or to embed --from-slides",
                         "the stores of `extract --pseudonymize` hold pseudonyms already")
    with progress_bar() as bar:
        task = bar.add_task("embed", total=None, info="")
        stage = EmbedStage(data, cfg, out_dir, from_slides=from_slides_cfg, hooks={
            "on_result": lambda r: bar.update(task, info=f"{r.slide_id} {r.status}"),
            "on_batch": lambda n: bar.update(task, advance=n)})
        jobs = run_stage_here_or_submit(stage, cluster, bar, task)
    if jobs is None:
        return
    results = [r for job in jobs for r in job]
    failed = [r for r in results if r.status == "failed"]
    err.print(f"[green]{sum(r.status == 'ok' for r in results)} embedded[/], "
              f"{sum(r.status == 'skipped' for r in results)} skipped, "
              f"[{'red' if failed else 'green'}]{len(failed)} failed[/]", highlight=False)
    for r in failed + [r for r in results if r.n_bad]:
        err.print(f"  {r.slide_id}: {r.error}", highlight=False)
    if failed:
        raise typer.Exit(EXIT_FAILED)


@cli_errors
def encoders() -> None:
    """Registered encoders: architecture, feature size, input size, normalization, weights."""
    from gigamil.mil.encoders import list_encoders

    table = Table("name", "dim", "input", "timm architecture", "mean / std", "expected weights",
                  title="encoders (any timm model name works too)", title_justify="left")
    for spec in list_encoders():
        norm = f"{tuple(round(m, 3) for m in spec.mean)} / {tuple(round(s, 3) for s in spec.std)}"
        table.add_row(spec.name, str(spec.feature_dim or "?"), str(spec.input_size), spec.arch,
                      norm, spec.weights or "-")
    out.print(table)
