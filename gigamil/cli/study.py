"""`gigamil init`, `gigamil run` and `gigamil status`: a whole study from one YAML file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from gigamil.cli._common import EXIT_FAILED, cli_errors, err, out

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
) -> None:
    """Run every stage of the study in order: extract → embed → train (→ infer).

    Each stage is what its own command does with the study's options, so a study run
    equals the commands run by hand and a rerun does only what is missing. With the
    slurm executor each stage is submitted in turn and waited for. The resolved study
    (every default filled in, package versions) is saved as OUT/study.resolved.json.
    """
    from gigamil.cluster.study_run import run_study
    from gigamil.study import load_study

    study = load_study(study_file)
    run_study(study, start, executor,
              on_stage=lambda name: err.print(f"[bold]── {name}[/]", highlight=False))
    err.print(f"[green]study done[/]: `gigamil status {study_file}`", highlight=False)


@cli_errors
def status(
    study_file: StudyFile,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead.")] = False,
) -> None:
    """Where the study stands, per stage: state, what is done of what, failures with
    their messages, and the SLURM jobs with their logs. Exit 1 if a stage failed."""
    from gigamil.study import load_study
    from gigamil.study_status import study_status

    report = study_status(load_study(study_file))
    if as_json:
        out.print_json(json.dumps(report))
    else:
        table = Table("stage", "state", "done", "failures / jobs", title=str(study_file),
                      title_justify="left")
        for r in report:
            notes = [f"{f['slide_id']}: {f['error']}" for f in r["failures"][:3]]
            notes += [f"job {j['job_id']} {j['state']} {j['message']}".strip()
                      for j in r["jobs"]]
            table.add_row(r["stage"], r["state"], f"{r['done']}/{r['total']}",
                          "\n".join(notes) or "-")
        out.print(table)
    if any(r["state"] == "failed" for r in report):
        raise typer.Exit(EXIT_FAILED)
