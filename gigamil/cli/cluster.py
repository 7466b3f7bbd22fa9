"""`gigamil jobs` and `gigamil slurm template`, plus the submit/wait plumbing the commands share."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Column, Table

import gigamil.cli.options as opt
from gigamil.cli._common import EXIT_FAILED, cli_errors, err, out

app = typer.Typer(help="SLURM helpers: sbatch templates for users who submit by hand.",
                  no_args_is_help=True)


def cluster_options(executor: opt.ExecutorChoice, partition: str | None, account: str | None,
                    qos: str | None, constraint: str | None, time: str, cpus_per_task: int,
                    mem: str | None, nodes: int, gpus_per_node: int, tasks_per_node: int | None,
                    exclusive: bool, signal_delay: int, array_parallelism: int,
                    slides_per_job: int, wait: bool) -> Any:
    from gigamil.cluster.slurm import ClusterOptions

    return ClusterOptions(
        executor=executor.value, partition=partition, account=account, qos=qos,
        constraint=constraint, time=time, cpus_per_task=cpus_per_task, mem=mem, nodes=nodes,
        gpus_per_node=gpus_per_node, tasks_per_node=tasks_per_node, exclusive=exclusive,
        signal_delay=signal_delay, array_parallelism=array_parallelism,
        slides_per_job=slides_per_job, wait=wait)


def submitted(jobs: list[Any], target: Path, wait: bool,
              after: Callable[[list[Any]], None] | None = None) -> list[Any] | None:
    """Print what was submitted; with ``wait`` block until done and return the results."""
    from gigamil.cluster.slurm import wait_jobs

    ids = ", ".join(str(j.job_id) for j in jobs)
    err.print(f"[green]submitted[/] {len(jobs)} job(s): {ids}", highlight=False)
    if not wait:
        err.print(f"follow them with `gigamil jobs {target}`", highlight=False)
        return None
    with err.status("waiting for SLURM…") as status:
        results = wait_jobs(jobs, on_poll=lambda states: status.update(
            f"waiting for SLURM: {states.count('done')}/{len(states)} done"))
    if after is not None:
        after(results)
    return results


@cli_errors
def jobs(
    target: Annotated[Path, typer.Argument(exists=True, file_okay=False,
                                           help="A run directory or extract/embed --out.")],
) -> None:
    """The SLURM jobs behind a run or output folder: state, restarts, logs, how to cancel.

    Exit code 1 if any job failed. When every extract task is done, their manifests are
    merged into extract.csv.
    """
    from gigamil.cluster.slurm import job_report, merge_extract_manifests

    rows = job_report(target)
    table = Table("job", "kind", "state", "restarts", Column("log", overflow="fold"),
                  Column("message / cancel", overflow="fold"),
                  title=f"jobs for {target}", title_justify="left")
    colors = {"done": "green", "failed": "red", "running": "cyan", "pending": "yellow",
              "requeued": "yellow"}
    for r in rows:
        c = colors.get(r["state"], "white")
        table.add_row(r["job_id"], r["kind"], f"[{c}]{r['state']}[/]", str(r["restarts"]),
                      r["stderr"] if r["state"] == "failed" else r["stdout"],
                      r["message"] or (r["cancel"] if r["state"] in ("pending", "running",
                                                                      "requeued") else ""))
    out.print(table)
    extract = [r for r in rows if r["kind"] == "extract"]
    if extract and all(r["state"] in ("done", "failed") for r in extract):
        merged = merge_extract_manifests(target)
        if merged:
            err.print(f"manifest merged into {merged}", highlight=False)
    if any(r["state"] == "failed" for r in rows):
        raise typer.Exit(EXIT_FAILED)


@app.command("template", context_settings={"allow_extra_args": True,
                                           "ignore_unknown_options": True})
@cli_errors
def template(
    ctx: typer.Context,
    kind: Annotated[str, typer.Argument(help="train, extract, embed or infer.")],
    slides: Annotated[str | None, typer.Option(help="Slide directory (extract, infer).")] = None,
    data: Annotated[str | None, typer.Option(help="Extract output to embed (embed).")] = None,
    out_dir: Annotated[str | None, typer.Option("--out", help="Output / run directory.")] = None,
    n_tasks: Annotated[int, typer.Option(min=1, help="Array tasks (extract, embed).")] = 1,
    partition: opt.Partition = None, account: opt.Account = None, qos: opt.Qos = None,
    constraint: opt.Constraint = None, time: opt.Time = "02:00:00",
    cpus_per_task: opt.CpusPerTask = 8, mem: opt.Mem = None, nodes: opt.Nodes = 1,
    gpus_per_node: opt.GpusPerNode = 0, tasks_per_node: opt.TasksPerNode = None,
    exclusive: opt.Exclusive = False, signal_delay: opt.SignalDelay = 120,
    array_parallelism: opt.ArrayParallelism = 32,
) -> None:
    """Print an sbatch script; arguments after `--` go to the gigamil command.

    `gigamil slurm template extract --slides /data/slides --out /data/out --n-tasks 16 --
    --mpp 0.5 > extract.sbatch`, then `sbatch extract.sbatch`. Every value is shell-quoted.
    """
    from gigamil.cluster.templates import render_template
    from gigamil.errors import UsageError

    opts = cluster_options(opt.ExecutorChoice.slurm, partition, account, qos, constraint, time,
                           cpus_per_task, mem, nodes, gpus_per_node, tasks_per_node, exclusive,
                           signal_delay, array_parallelism, 1, False)
    needs = {"train": ["out_dir"], "extract": ["slides", "out_dir"], "embed": ["data"],
             "infer": ["slides", "out_dir"]}
    given = {"slides": slides, "data": data, "out_dir": out_dir}
    missing = [k for k in needs.get(kind, []) if not given[k]]
    if missing:
        raise UsageError(f"the {kind} template needs " + ", ".join(
            "--" + k.replace("_dir", "") for k in missing))
    args = list(ctx.args)
    if kind in ("train", "infer"):
        args = ["--out", str(out_dir), *args]
    paths = {k.replace("_dir", ""): v for k, v in given.items() if v}
    typer.echo(render_template(kind, opts, args=args, n_tasks=n_tasks, **paths), nl=False)
