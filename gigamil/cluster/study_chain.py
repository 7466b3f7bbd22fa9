"""``gigamil run STUDY --executor slurm``: the whole study as a chain of SLURM jobs.

    links = submit_chain(load_study("study.yaml"))      # returns once every job is queued
    [(link.stage, link.jobs, link.after) for link in links]

extract array → embed array → train (one multi-rank job) → infer (one job), submitted at
once: each later stage with ``--dependency=afterok`` on every job of the stage before
and ``--kill-on-invalid-dep=yes``, so the chain runs while its user is logged out, and a
stage that fails cancels everything after it. A stage's job fails (after writing its
manifest) when one of its slides fails, so later stages never run on part of a cohort;
``gigamil status`` names the slide and why.

A rerun submits only what is missing: leading stages that are done are left out, and
every stage after the first one submitted is submitted too (its jobs skip finished work).
A study whose jobs are still queued or running is not submitted twice. The chain is
recorded in ``OUT/chain.json``.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from gigamil.errors import UsageError
from gigamil.io import write_json
from gigamil.study import Study

__all__ = ["ChainLink", "submit_chain", "wait_chain", "runs_on_slurm"]


@dataclass
class ChainLink:
    """One stage of a submitted chain: its job ids and the jobs it waits for."""

    stage: str
    jobs: list[str]
    after: list[str] = field(default_factory=list)

    @property
    def array_ids(self) -> list[str]:
        """The ids a dependency names: an array's own id (``123`` for ``123_0``…)."""
        return sorted({j.split("_")[0] for j in self.jobs})


def runs_on_slurm(study: Study, start: str | None, executor: str | None) -> bool:
    """True when every stage from ``start`` is to run on SLURM: then it is one chain."""
    from gigamil.cluster.study_run import stages_from

    names = stages_from(study, start)
    overrides = {"executor": executor} if executor else {}
    return bool(names) and all(study.cluster(n, **overrides).submits for n in names)


def submit_chain(study: Study, start: str | None = None) -> list[ChainLink]:
    """Submit what the study still needs, from ``start``, as dependent SLURM jobs."""
    from gigamil.cluster.executor import SlurmExecutor
    from gigamil.cluster.study_run import StudyInferStage, stages_from
    from gigamil.study_status import study_status

    names = stages_from(study, start)
    report = {r["stage"]: r for r in study_status(study)}
    busy = [r for r in report.values() if r["state"] in ("pending", "running")]
    if busy:
        queued = " ".join(sorted({j["job_id"].split("_")[0] for r in busy for j in r["jobs"]}))
        raise UsageError(f"the study's {busy[0]['stage']} jobs are still {busy[0]['state']}",
                         f"wait for them (`gigamil status {study.path.name}`), or cancel "
                         f"them first: scancel {queued}")
    while names and report.get(names[0], {}).get("state") == "done":
        names.pop(0)  # done before: not submitted again
    if not names:
        return []
    study.out.mkdir(parents=True, exist_ok=True)
    write_json(study.out / "study.resolved.json", study.resolved())
    links: list[ChainLink] = []
    n_slides: int | None = None
    for name in names:
        opts = study.cluster(name, executor="slurm", wait=False)
        stage, n_jobs = _stage(study, name, opts, n_slides)
        if name == "extract":
            n_slides = stage.n_slides
        if name == "infer":
            opts = StudyInferStage.one_task(opts)
        after = links[-1].array_ids if links else []
        jobs = SlurmExecutor(opts).submit(stage, after, n_jobs, extra={"chain": True})
        links.append(ChainLink(name, [str(j.job_id) for j in jobs], after))
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    write_json(study.out / "chain.json", {"submitted": now,
                                          "stages": [asdict(link) for link in links]})
    return links


def _stage(study: Study, name: str, opts: Any, n_slides: int | None) -> tuple[Any, int | None]:
    """The stage ``name`` of a chain, and its number of array tasks where that cannot be
    counted yet (embed behind an extract array: one task per ``slides_per_job`` slides)."""
    from gigamil.cluster.study_run import study_stage

    behind = name == "embed" and n_slides is not None
    stage = study_stage(study, name, chain=True, after_extract=behind)
    if behind and n_slides is not None:
        return stage, max(1, -(-n_slides // opts.slides_per_job))
    return stage, None


def wait_chain(links: list[ChainLink], on_poll: Callable[[int], None] | None = None,
               poll: float = 5.0) -> None:
    """Block until no job of the chain is queued or running (done, failed or cancelled)."""
    from gigamil.cluster.slurm import active_jobs

    ids = [j for link in links for j in link.array_ids]
    while True:
        active = active_jobs(ids)
        if active is not None and not active:
            return
        if on_poll is not None and active is not None:
            on_poll(len(active))
        time.sleep(poll)
