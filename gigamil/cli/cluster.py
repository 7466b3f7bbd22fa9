"""`gigamil jobs` and `gigamil slurm template`, plus the submit/wait plumbing the commands share."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.progress import Progress, TaskID
from rich.table import Column, Table

import gigamil.cli.options as opt
from gigamil.cli._common import EXIT_FAILED, cli_errors, err, out
from gigamil.cluster.executor import ClusterOptions, Stage, run_stage

R = TypeVar("R")

app = typer.Typer(help="SLURM helpers: sbatch templates for users who submit by hand.",
                  no_args_is_help=True)


def run_stage_here_or_submit(stage: Stage[R], cluster: ClusterOptions,
                             bar: Progress | None = None, task: TaskID | None = None
                             ) -> list[R] | None:
    """Run ``stage`` where ``--executor`` says; print what was submitted, and under
    ``--wait`` show the jobs' states on the command's progress bar (or a spinner). The
    results, one per job (None: submitted, not waited for)."""

    def on_submit(jobs: list[Any]) -> None:
        ids = ", ".join(str(j.job_id) for j in jobs)
        err.print(f"[green]submitted[/] {len(jobs)} job(s): {ids}", highlight=False)
        if not cluster.wait:
            err.print(f"follow them with `gigamil jobs {stage.target}`", highlight=False)

    def waiting(states: list[str]) -> str:
        return f"waiting for SLURM: {states.count('done')}/{len(states)} done"

    if not (cluster.submits and cluster.wait):
        return run_stage(stage, cluster, on_submit).results
    if bar is not None and task is not None:
        return run_stage(stage, cluster, on_submit, on_poll=lambda states: bar.update(
            task, info=waiting(states))).results
    with err.status("waiting for SLURM…") as status:
        return run_stage(stage, cluster, on_submit,
                         on_poll=lambda states: status.update(waiting(states))).results


@cli_errors
def jobs(
    target: Annotated[Path, typer.Argument(exists=True, file_okay=False,
                                           help="A run directory or extract/embed --out.")],
) -> None:
    """The SLURM jobs behind a run or output folder: state, restarts, logs, how to cancel.

    Exit code 1 if any job failed. When every extract task is done, their manifests are
    merged into extract.csv.
    """
    from gigamil.cluster.extract_cohort import merge_extract_manifests
    from gigamil.cluster.slurm import job_report

    rows = job_report(target)
    # an 80-column login-node terminal must show each state and log path whole: the table
    # keeps the short columns, and the paths follow on lines of their own (never cut)
    table = Table("job", "kind", Column("state", no_wrap=True, min_width=8), "restarts",
                  Column("message / cancel", overflow="fold"),
                  title=f"jobs for {target}", title_justify="left")
    colors = {"done": "green", "failed": "red", "running": "cyan", "pending": "yellow",
              "requeued": "yellow"}
    for r in rows:
        c = colors.get(r.state, "white")
        table.add_row(r.job_id, r.kind, f"[{c}]{r.state}[/]", str(r.restarts),
                      r.message or (r.cancel if r.active else ""))
    out.print(table)
    for r in rows:
        out.print(f"log {r.job_id} ({r.state}): {r.log}", highlight=False, soft_wrap=True,
                  overflow="ignore", crop=False)
    extract = [r for r in rows if r.kind == "extract"]
    if extract and all(r.state in ("done", "failed") for r in extract):
        merged = merge_extract_manifests(target)
        if merged:
            err.print(f"manifest merged into {merged}", highlight=False)
    if any(r.state == "failed" for r in rows):
        raise typer.Exit(EXIT_FAILED)


@app.command("template", context_settings={"allow_extra_args": True,
                                           "ignore_unknown_options": True})
@cli_errors
@opt.from_config(ClusterOptions, "cluster", panel="SLURM",
                 exclude=("executor", "slides_per_job", "wait"))
def template(
    ctx: typer.Context,
    kind: Annotated[str, typer.Argument(help="train, extract, embed or infer.")],
    slides: Annotated[str | None, typer.Option(help="Slide directory (extract, infer).")] = None,
    data: Annotated[str | None, typer.Option(help="Extract output to embed (embed).")] = None,
    out_dir: Annotated[str | None, typer.Option("--out", help="Output / run directory.")] = None,
    n_tasks: Annotated[int, typer.Option(min=1, help="Array tasks (extract, embed).")] = 1,
    *,
    cluster: ClusterOptions,
) -> None:
    """Print an sbatch script; arguments after `--` go to the gigamil command.

    `gigamil slurm template extract --slides /data/slides --out /data/out --n-tasks 16 --
    --mpp 0.5 > extract.sbatch`, then `sbatch extract.sbatch`. Every value is shell-quoted.
    """
    from gigamil.cluster.templates import render_template
    from gigamil.errors import UsageError

    opts = dataclasses.replace(cluster, executor="slurm", slides_per_job=1)
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
