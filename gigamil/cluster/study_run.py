"""``gigamil run``: every stage of a study, in order, through the executor seam.

    outcome = run_study(load_study("study.yaml"), start="embed", executor="slurm")

Each stage is the same :class:`~gigamil.cluster.executor.Stage` its own command runs,
so a study run equals the commands run by hand, and a rerun does only what is missing
(each stage skips finished work). On SLURM each stage is submitted and waited for in
turn (``--wait``); a failed stage stops the chain and says which.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gigamil.errors import GigamilError, UsageError
from gigamil.io import write_json
from gigamil.study import Study

__all__ = ["run_study"]


def run_study(study: Study, start: str | None = None, executor: str | None = None,
              on_stage: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the study's stages from ``start`` (default the first); ``executor`` overrides
    every stage's ``cluster: executor:``. Returns each stage's outcome by name."""
    from gigamil.cluster.executor import run_stage
    from gigamil.cluster.stages import EmbedStage, ExtractStage, TrainStage

    stages = study.stages()
    if start is not None and start not in stages:
        raise UsageError(f"--from {start}: not a stage of this study",
                         f"choose one of {', '.join(stages)}")
    todo = stages[stages.index(start):] if start else stages
    study.out.mkdir(parents=True, exist_ok=True)
    write_json(study.out / "study.resolved.json", study.resolved())
    results: dict[str, Any] = {}
    for name in todo:
        if on_stage is not None:
            on_stage(name)
        if name == "infer":
            results[name] = _infer(study)
            continue
        overrides: dict[str, Any] = {"executor": executor} if executor else {}
        opts = study.cluster(name, **overrides)
        if opts.submits:
            opts.wait = True  # the next stage needs this one's outputs
        stage: Any = {"extract": lambda: ExtractStage(study.slides, study.data, study.extract),
                      "embed": lambda: EmbedStage(study.data, study.embed),
                      "train": lambda: TrainStage(study.train, resume=True)}[name]()
        outcome = run_stage(stage, opts)
        results[name] = outcome.results
        failed = _failed(name, outcome.results)
        if failed:
            raise GigamilError(f"stage {name}: {failed}",
                               f"fix it, then `gigamil run {study.path.name} --from {name}`")
    return results


def _failed(name: str, results: Any) -> str:
    """What failed in a stage's results (slides that failed), or ""."""
    if name == "train" or not results:
        return ""
    rows = [r for part in results for r in (part if isinstance(part, list) else [part])]
    bad = [r for r in rows if getattr(r, "status", "") == "failed"]
    if not bad:
        return ""
    first = bad[0]
    return (f"{len(bad)} of {len(rows)} slides failed, e.g. {first.slide_id}: "
            f"{getattr(first, 'error', '')}")


def _infer(study: Study) -> dict[str, Any]:
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
                                              study.cluster("infer"))
        failures += failed
    finally:
        write_outputs(study.preds, spec, failures, stats)
    if failures:
        raise GigamilError(f"stage infer: {len(failures)} slide(s) failed, e.g. "
                           f"{failures[0].slide_id}: {failures[0].error}",
                           "see preds/failures.csv; a rerun predicts only the rest")
    return {"predicted": len(remaining), "done_before": len(paths) - len(remaining)}
