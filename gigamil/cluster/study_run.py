"""``gigamil run``: every stage of a study, in order, through the executor seam.

    outcome = run_study(load_study("study.yaml"), start="embed", executor="slurm")

Each stage is the same :class:`~gigamil.cluster.executor.Stage` its own command runs,
so a study run equals the commands run by hand, and a rerun does only what is missing
(each stage skips finished work). A stage whose ``cluster: executor:`` is slurm is
submitted and waited for here; a study that runs wholly on SLURM is submitted at once as
a chain of dependent jobs instead (:mod:`gigamil.cluster.study_chain`). A failed stage
stops the run and says which.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

from gigamil.cluster.executor import Stage
from gigamil.cluster.stages import failed_slides
from gigamil.errors import GigamilError, UsageError
from gigamil.io import write_json
from gigamil.study import Study

__all__ = ["run_study", "infer_study", "StudyInferStage", "stages_from", "StageProgress",
           "study_stage"]


class StageProgress(Protocol):
    """Where a run here reports its progress (the CLI draws it as a bar per stage)."""

    def begin(self, stage: str, total: int | None) -> None:
        """A stage starts; ``total`` units of work (slides, epochs), if known."""

    def total(self, n: int) -> None:
        """The stage's total, once it is known."""

    def advance(self, n: int = 1, info: str = "") -> None:
        """``n`` more units done; ``info`` says what."""


def _hooks(name: str, study: Study, progress: StageProgress | None) -> dict[str, Any]:
    """The progress callbacks of stage ``name`` run here, fed into ``progress``."""
    if progress is None:
        return {}
    if name == "extract":
        progress.begin(name, None)
        return {"on_start": progress.total,
                "on_result": lambda r: progress.advance(1, f"{r.slide_id} {r.status}")}
    if name == "embed":
        progress.begin("embed (patches)", None)
        return {"on_result": lambda r: progress.advance(0, f"{r.slide_id} {r.status}"),
                "on_batch": progress.advance}
    if name == "train":
        cfg = study.train
        progress.begin(name, cfg.folds * cfg.epochs)
        return {"on_epoch": lambda e: progress.advance(
            1, f"fold {e['fold']} epoch {e['epoch']}/{e['epochs']} loss {e['train_loss']:.3f}")}
    progress.begin(name, None)
    return {"on_result": lambda r: progress.advance(1, r.describe())}


def stages_from(study: Study, start: str | None) -> list[str]:
    """The study's stages from ``start`` on (all of them without it)."""
    stages = study.stages()
    if start is not None and start not in stages:
        raise UsageError(f"--from {start}: not a stage of this study",
                         f"choose one of {', '.join(stages)}")
    return stages[stages.index(start):] if start else stages


def run_study(study: Study, start: str | None = None, executor: str | None = None,
              on_stage: Callable[[str], None] | None = None,
              progress: StageProgress | None = None) -> dict[str, Any]:
    """Run the study's stages from ``start`` (default the first); ``executor`` overrides
    every stage's ``cluster: executor:``; stages run here report to ``progress``.
    Returns each stage's outcome by name."""
    from gigamil.cluster.executor import run_stage

    todo = stages_from(study, start)
    study.out.mkdir(parents=True, exist_ok=True)
    write_json(study.out / "study.resolved.json", study.resolved())
    results: dict[str, Any] = {}
    for name in todo:
        if on_stage is not None:
            on_stage(name)
        overrides: dict[str, Any] = {"executor": executor} if executor else {}
        opts = study.cluster(name, **overrides)
        hooks = _hooks(name, study, progress) if not opts.submits else {}
        if name == "infer" and not opts.submits:
            results[name] = infer_study(study, **hooks)
            continue
        if name == "infer":
            opts = StudyInferStage.one_task(opts)
        if opts.submits:
            opts.wait = True  # the next stage needs this one's outputs
        stage = study_stage(study, name, hooks)
        outcome = run_stage(stage, opts)
        results[name] = outcome.results
        failed = failed_slides(outcome.results) if name in ("extract", "embed") else ""
        if failed:
            raise GigamilError(f"stage {name}: {failed}",
                               f"fix it, then `gigamil run {study.path.name} --from {name}`")
    return results


def study_stage(study: Study, name: str, hooks: dict[str, Any] | None = None,
                chain: bool = False, after_extract: bool = False) -> Stage[Any]:
    """Stage ``name`` of the study, as its own command would run it. In a ``chain`` of
    SLURM jobs a slide that fails fails its job (``strict``), and an embed array behind
    an extract array merges that array's manifests first."""
    from gigamil.cluster.stages import EmbedStage, ExtractStage, TrainStage

    hooks = hooks or {}
    if name == "extract":
        return ExtractStage(study.slides, study.data, study.extract, hooks=hooks, strict=chain)
    if name == "embed":
        return EmbedStage(study.data, study.embed, hooks=hooks, strict=chain,
                          after_extract=after_extract)
    if name == "train":
        return TrainStage(study.train, resume=True, on_epoch=hooks.get("on_epoch"))
    return StudyInferStage(study)


def infer_study(study: Study, on_result: Callable[[Any], None] | None = None
                ) -> dict[str, Any]:
    """The study's infer stage, here: every ``predict:`` slide without a result yet."""
    from gigamil.cluster.infer import find_inference_slides, infer_slides_where, todo
    from gigamil.io import ensure_writable
    from gigamil.mil.infer_outputs import write_outputs
    from gigamil.mil.infer_spec import InferenceSpec

    settings = study.infer
    spec = InferenceSpec.from_run(study.run_dir, settings)
    ensure_writable(study.preds)
    paths, unusable = find_inference_slides(study.predict, spec, settings, study.preds)
    remaining = todo(paths, study.preds, spec)
    failures = list(unusable)
    stats: dict[str, Any] = {}
    try:
        _, failed, stats = infer_slides_where(remaining, spec, study.preds,
                                              study.cluster("infer"), on_result)
        failures += failed
    finally:
        write_outputs(study.preds, spec, failures, stats)
    if failures:
        raise GigamilError(f"stage infer: {len(failures)} slide(s) failed, e.g. "
                           f"{failures[0].slide_id}: {failures[0].error}",
                           "see preds/failures.csv; a rerun predicts only the rest")
    return {"predicted": len(remaining), "done_before": len(paths) - len(remaining)}


def _infer_job(study: Study) -> dict[str, Any]:
    from gigamil.cluster.resources import configure_threads

    configure_threads()  # this job's --cpus-per-task, not every core of the node
    return infer_study(study)


@dataclass
class StudyInferStage(Stage[dict[str, Any]]):
    """The study's infer stage as one job (on SLURM: one task, with Ray inside it as the
    study's ``infer: cluster:`` says)."""

    kind: ClassVar[str] = "infer"
    multi_rank: ClassVar[bool] = True  # one piece of work, not an array
    study: Study

    @property
    def target(self) -> Path:
        return self.study.preds

    def job(self, shard: tuple[int, int] | None, workers: int, here: bool
            ) -> Callable[[], dict[str, Any]]:
        return functools.partial(_infer_job if not here else infer_study, self.study)

    @staticmethod
    def one_task(opts: Any) -> Any:
        """Its job's options: one task, whatever GPUs it holds (Ray shares them out)."""
        return dataclasses.replace(opts, tasks_per_node=1)
