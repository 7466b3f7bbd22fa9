"""`gigamil embed` and `gigamil encoders`: patch stores → feature bags (HDF5)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

import gigamil.cli.options as opt
from gigamil.cli._common import EXIT_FAILED, cli_errors, err, out, progress_bar
from gigamil.cli.cluster import cluster_options, submitted
from gigamil.errors import UsageError


class PrecisionChoice(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


@cli_errors
def embed(
    data: Annotated[Path, typer.Argument(exists=True, help="The --out of `gigamil extract` "
                                         "(holds patches/), or slides with --from-slides.")],
    encoder: Annotated[str, typer.Option(help="A preset (see `gigamil encoders`) or any timm "
                                              "model name, or hf-hub:org/name.")] = "resnet50",
    weights: Annotated[Path | None, typer.Option(
        exists=True, dir_okay=False,
        help="Local weights: .safetensors, or a .pth/.bin state_dict (loaded weights_only).")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Patches per forward pass.")] = 256,
    workers: Annotated[int, typer.Option(min=0, help="DataLoader processes decoding patches.")] = 4,
    precision: Annotated[PrecisionChoice, typer.Option(
        help="auto = bf16 on GPU, fp32 on CPU.")] = PrecisionChoice.auto,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    shard: Annotated[str | None, typer.Option(
        help="Take share k of n of the slides (sorted, k from 0), e.g. $SLURM_ARRAY_TASK_ID/16.")] = None,
    compile_model: Annotated[bool, typer.Option("--compile", help="torch.compile the encoder.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Redo slides that already have features.")] = False,
    out_dir: Annotated[Path | None, typer.Option(
        "--out", help="Where features/<encoder>/ goes (default: DATA).")] = None,
    stain_norm: Annotated[str | None, typer.Option(
        help="macenko or reinhard: normalize stain, fitted once per slide.")] = None,
    stain_reference: Annotated[Path | None, typer.Option(
        exists=True, dir_okay=False, help="Reference image for --stain-norm.")] = None,
    from_slides: Annotated[bool, typer.Option(
        help="DATA holds slides: cut patches on the fly (tissue, grid, QC), store none.")] = False,
    mpp: Annotated[float, typer.Option(help="With --from-slides: target µm/px.")] = 0.5,
    patch_size: Annotated[int, typer.Option(help="With --from-slides: patch px.")] = 256,
    min_tissue: Annotated[float, typer.Option(help="With --from-slides: min tissue.")] = 0.5,
    backend: Annotated[str, typer.Option(help="With --from-slides: auto, openslide, cucim.")] = "auto",
    mpp_override: Annotated[float | None, typer.Option(
        help="With --from-slides: level-0 µm/px for slides that lack it.")] = None,
    executor: opt.Executor = opt.ExecutorChoice.local,
    partition: opt.Partition = None, account: opt.Account = None, qos: opt.Qos = None,
    constraint: opt.Constraint = None, time: opt.Time = "04:00:00",
    cpus_per_task: opt.CpusPerTask = 8, mem: opt.Mem = None, nodes: opt.Nodes = 1,
    gpus_per_job: opt.GpusPerNode = 0, tasks_per_node: opt.TasksPerNode = None,
    exclusive: opt.Exclusive = False, signal_delay: opt.SignalDelay = 120,
    array_parallelism: opt.ArrayParallelism = 32, slides_per_job: opt.SlidesPerJob = 20,
    wait: opt.Wait = False,
) -> None:
    """Turn every patch store in DATA/patches into DATA/features/<encoder>/<slide_id>.h5.

    The files hold `features` (N, D) float32 and `coords` (N, 2) with TRIDENT's
    attributes, so CLAM and TRIDENT readers open them. Each slide is written as
    soon as it is done; a rerun skips finished slides. Corrupt patches are
    skipped and counted in features/<encoder>/embed.csv. Under torchrun each rank
    takes its share of the slides.
    """
    from gigamil.cluster.distributed import dist_env
    from gigamil.mil.embed import EmbedConfig, embed_stores

    env = dist_env()
    cfg = EmbedConfig(rank=env.rank, world_size=env.world_size, local_rank=env.local_rank,
                      encoder=encoder, weights=str(weights) if weights else None,
                      batch_size=batch_size, workers=workers, precision=precision.value,
                      device=device, shard=opt.parse_shard(shard), compile=compile_model,
                      overwrite=overwrite, stain_norm=stain_norm,
                      stain_reference=str(stain_reference) if stain_reference else None)
    copts = cluster_options(executor, partition, account, qos, constraint, time, cpus_per_task,
                            mem, nodes, gpus_per_job, tasks_per_node, exclusive, signal_delay,
                            array_parallelism, slides_per_job, wait)
    if copts.is_slurm:
        from gigamil.cluster.slurm import submit_embed

        if from_slides:
            raise UsageError("--from-slides runs locally only",
                             "extract with --executor slurm, then embed the stores")
        submitted(submit_embed(data, cfg, copts, out_dir), Path(out_dir or data), wait)
        return
    with progress_bar() as bar:
        task = bar.add_task("embed", total=None, info="")
        on_result = lambda r: bar.update(task, info=f"{r.slide_id} {r.status}")  # noqa: E731
        on_batch = lambda n: bar.update(task, advance=n)  # noqa: E731
        if from_slides:
            from gigamil.mil.embed import embed_slides
            from gigamil.wsi.extract import ExtractConfig

            if out_dir is None:
                raise UsageError("--from-slides needs --out", "e.g. --out data/")
            extract = ExtractConfig(mpp=mpp, patch_size=patch_size, min_tissue=min_tissue,
                                    backend=backend, mpp_override=mpp_override,
                                    stain_norm=stain_norm,
                                    stain_reference=cfg.stain_reference)
            results = embed_slides([data], out_dir, cfg, extract, on_result, on_batch)
        else:
            results = embed_stores(data, cfg, out_dir, on_result=on_result, on_batch=on_batch)
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
