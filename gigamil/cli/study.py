"""`gigamil init`, `gigamil run` and `gigamil status`: a whole study from one YAML file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import Progress, TaskID
from rich.table import Table

from gigamil.cli._common import EXIT_FAILED, cli_errors, err, out, progress_bar

StudyFile = Annotated[Path, typer.Argument(exists=True, dir_okay=False,
                                           help="The study file (`gigamil init` writes one).")]


@cli_errors
def init(
    path: Annotated[Path, typer.Argument(dir_okay=False, help="Where to write the study file.")],
    force: Annotated[bool, typer.Option(help="Overwrite an existing file.")] = False,
) -> None:
    """Write a commented study file with every option and its default."""
    from gigamil.errors import UsageError
    from gigamil.io import atomic_open
    from gigamil.study import study_template

    if path.exists() and not force:
        raise UsageError(f"{path} exists", "choose another name, or --force to overwrite it")
    with atomic_open(path, "w", encoding="utf-8") as fh:
        fh.write(study_template())
    err.print(f"wrote {path}: set slides, labels and out, then `gigamil run {path}`")


@cli_errors
def run(
    study_file: StudyFile,
    start: Annotated[str | None, typer.Option(
        "--from", help="Start at this stage (extract, embed, train, infer); finished work "
                       "is skipped as always.")] = None,
    executor: Annotated[str | None, typer.Option(
        help="Run every stage with this executor (local, debug, slurm) instead of each "
             "stage's `cluster: executor:`.")] = None,
    wait: Annotated[bool, typer.Option(
        help="On SLURM, block until the chain has ended (done, failed or cancelled), "
             "then exit as `gigamil status` does.")] = False,
) -> None:
    """Run every stage of the study in order: extract → embed → train (→ infer).

    Each stage is what its own command does with the study's options, so a study run
    equals the commands run by hand and a rerun does only what is missing.

    On SLURM (--executor slurm, or every stage's `cluster: executor: slurm`) the stages
    are submitted at once as a chain of jobs: extract array → embed array → train →
    infer, each with `--dependency=afterok` on the one before, so the chain runs while
    you are logged out and a failed stage cancels the rest. This returns at once;
    `gigamil status STUDY` says where it stands. Run it again after a fix: only what is
    missing is submitted. The resolved study (every default filled in, package
    versions) is saved as OUT/study.resolved.json.
    """
    from gigamil.cluster.study_chain import runs_on_slurm, submit_chain, wait_chain
    from gigamil.cluster.study_run import run_study
    from gigamil.study import load_study

    study = load_study(study_file)
    if not runs_on_slurm(study, start, executor):
        with progress_bar() as bar:
            run_study(study, start, executor, progress=_Bars(bar),
                      on_stage=lambda name: err.print(f"[bold]── {name}[/]", highlight=False))
        err.print(f"[green]study done[/]: `gigamil status {study_file}`", highlight=False)
        return
    links = submit_chain(study, start)
    if not links:
        err.print(f"every stage is done: `gigamil status {study_file}`")
        return
    table = Table("stage", "jobs", "after", title="submitted", title_justify="left")
    for link in links:
        jobs = link.jobs[0] if len(link.jobs) == 1 else f"{link.array_ids[0]} " \
            f"({len(link.jobs)} tasks)"
        table.add_row(link.stage, jobs, " ".join(link.after) or "-")
    err.print(table)
    if not wait:
        err.print(f"follow it with `gigamil status {study_file}`; cancel it with "
                  f"`scancel {' '.join(i for link in links for i in link.array_ids)}`",
                  highlight=False)
        return
    with err.status("waiting for the chain") as spinner:
        wait_chain(links, on_poll=lambda n: spinner.update(f"waiting for {n} job(s)"))
    status(study_file, as_json=False)


class _Bars:
    """One progress bar per stage run here."""

    def __init__(self, bar: Progress) -> None:
        self.bar = bar
        self.task: TaskID | None = None

    def begin(self, stage: str, total: int | None) -> None:
        self.task = self.bar.add_task(stage, total=total, info="")

    def total(self, n: int) -> None:
        if self.task is not None:
            self.bar.update(self.task, total=n)

    def advance(self, n: int = 1, info: str = "") -> None:
        if self.task is not None:
            if info:
                self.bar.update(self.task, advance=n, info=info)
            else:
                self.bar.update(self.task, advance=n)


@cli_errors
def status(
    study_file: StudyFile,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead.")] = False,
) -> None:
    """Where the study stands, per stage: state (not started, pending, running, partly
    done, done, failed, cancelled), slides or folds done of all, a rough ETA while it
    runs, failures with their messages, and the logs of failed jobs. Exit 1 if a stage
    failed or was cancelled."""
    from gigamil.study import load_study
    from gigamil.study_status import format_eta, study_status

    report = study_status(load_study(study_file))
    if as_json:
        out.print_json(json.dumps(report))
    else:
        table = Table("stage", "state", "done", "eta", "notes", title=str(study_file),
                      title_justify="left")
        for r in report:
            eta = format_eta(r["eta_s"]) if r["state"] == "running" else "-"
            table.add_row(r["stage"], r["state"], f"{r['done']}/{r['total']}", eta,
                          "\n".join(r["notes"][:4]) or "-")
        out.print(table)
    if any(r["state"] in ("failed", "cancelled") for r in report):
        raise typer.Exit(EXIT_FAILED)
