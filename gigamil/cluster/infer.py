"""Inference over many slides: in this process, or on Ray, picked by ``--ray-address``.

    where = RayOptions(ray_address="local", workers=2)
    rows, failures, stats = infer_slides_where(todo(paths, out), spec, out, where)

``ray_address="none"`` runs the stages of :mod:`gigamil.mil.infer` here, one slide after
another; anything else runs them as the Ray pipeline of :mod:`gigamil.cluster.ray`. Either
way every slide's result is written atomically, a bad slide is a row of ``failures`` (the
rest go on), and a rerun predicts only the slides without a result (:func:`todo`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gigamil.cluster.executor import ClusterOptions
from gigamil.config import option
from gigamil.wsi.extract import safe_message
from gigamil.wsi.metadata import slide_id

if TYPE_CHECKING:  # the CLI imports this module for RayOptions: no torch at start-up
    from gigamil.mil.infer_config import InferConfig
    from gigamil.mil.infer_outputs import SlideFailure, SlideOutcome
    from gigamil.mil.infer_spec import InferenceSpec

__all__ = ["RayOptions", "InferJobOptions", "Outcome", "infer_slides_where", "infer_slides_local", "todo",
           "failure_message", "slide_failure", "find_inference_slides"]

#: (prediction rows, failures, pipeline stats)
Outcome = tuple[list[dict[str, Any]], list["SlideFailure"], dict[str, Any]]


@dataclass
class RayOptions:
    """Where ``gigamil infer`` runs (the CLI derives its options from these fields)."""

    ray_address: str = option("local", "local: start Ray here; auto or host:port: join a cluster "
                            "(see `gigamil slurm template infer`); none: no Ray, one process.")
    workers: int | None = option(None, "Predictor actors: each holds the encoder and the MIL "
                               "models (on --gpus-per-worker GPUs) [default: one per GPU share; "
                               "on CPUs, one per --threads cores, as the encoder is then most "
                               "of the work].", min=1)
    cpus: int | None = option(None, "CPUs of a local Ray for reading patches [default: every "
                            "core].", min=1)
    gpus_per_worker: float = option(0.0, "GPUs per predictor.", min=0)


@dataclass
class InferJobOptions(ClusterOptions, RayOptions):
    """A study's ``infer: cluster:``: how inference uses Ray (:class:`RayOptions`) and,
    when the study runs on SLURM, the job it runs in (:class:`ClusterOptions`)."""


def failure_message(exc: BaseException, path: str, spec: InferenceSpec | None = None) -> str:
    """What went wrong with a slide, without its directory (paths may hold patient data),
    nor its file name when ``spec`` is pseudonymized."""
    cause = getattr(exc, "cause", None) or exc
    if not isinstance(cause, BaseException):
        cause = exc
    text = safe_message(cause, Path(path))
    text = text.splitlines()[0] if text else cause.__class__.__name__
    if spec is not None and spec.pseudonymized:
        p, sid = Path(path), spec.slide_id(path)
        for w in sorted({str(p.resolve()), str(p), p.name, p.stem}, key=len, reverse=True):
            text = text.replace(w, sid)
    return text


def slide_failure(path: str, error: str, spec: InferenceSpec | None = None) -> SlideFailure:
    """The failure of the slide at ``path`` (its id and file name: no directory)."""
    from gigamil.mil.infer_outputs import SlideFailure

    if spec is None:
        return SlideFailure(slide_id(Path(path)), Path(path).name, error)
    return SlideFailure(spec.slide_id(path), spec.shown_name(path), error)


def find_inference_slides(inputs: Sequence[str | os.PathLike[str]], spec: InferenceSpec,
                          settings: InferConfig, out: str | os.PathLike[str]
                          ) -> tuple[list[Path], list[SlideFailure]]:
    """The slides of ``inputs`` (files, folders, lists, DICOM series), their ids set in
    ``spec`` (pseudonymized when asked: the mapping saved, mode 0600), and a failure for
    every input that is not a usable slide."""
    from gigamil.layout import PredictionsDir
    from gigamil.mil.infer_outputs import SlideFailure
    from gigamil.wsi.discovery import Pseudonyms, find_slides

    pseudonyms = None
    if settings.pseudonymize:
        pseudonyms = Pseudonyms(Path(settings.pseudonym_map) if settings.pseudonym_map
                                else PredictionsDir(out).pseudonyms)
    found = find_slides(inputs, True, pseudonyms)
    if pseudonyms is not None:
        pseudonyms.save()
    spec.slide_ids = {str(s.path): s.slide_id for s in found.slides
                      if s.slide_id != slide_id(s.path)}
    failures = [SlideFailure(r.slide_id, r.file,
                             r.error or "not a usable slide") for r in found.failed]
    return [s.path for s in found.slides], failures


def todo(paths: Sequence[Path], out: str | os.PathLike[str],
         spec: InferenceSpec | None = None) -> list[Path]:
    """The slides without a finished result (a rerun does only these); temporary files a
    killed run left over an hour ago are removed."""
    from gigamil.io import sweep_stale_temps
    from gigamil.layout import PredictionsDir
    from gigamil.mil.infer_outputs import slide_done

    layout = PredictionsDir(out)
    for sub in (layout.root, layout.slides, layout.heatmaps):
        sweep_stale_temps(sub)

    ids = spec.slide_id if spec is not None else (lambda p: slide_id(Path(p)))
    return [p for p in paths if not slide_done(Path(out), ids(p), spec)]


def infer_slides_local(paths: Sequence[Path], spec: InferenceSpec, out: str | os.PathLike[str],
                       on_result: Callable[[SlideOutcome], None] | None = None) -> Outcome:
    """The same stages in this process, one slide after another (no Ray):
    (rows, failures, pipeline stats)."""
    import torch  # noqa: F401 - imported first, so that configure_threads sizes it

    from gigamil.cluster.resources import configure_threads
    from gigamil.memory import retain_freed_memory
    from gigamil.mil.infer import SlidePredictor
    from gigamil.mil.infer_outputs import SlideOutcome

    retain_freed_memory()
    configure_threads(spec.threads, export=False)  # the caller's environment stays as it was
    predictor = SlidePredictor(spec)
    predictor.warm_up()
    rows: list[dict[str, Any]] = []
    failures: list[SlideFailure] = []
    for p in paths:
        try:
            res = SlideOutcome(row=predictor.predict_to(p, out))
            rows.append(res.row)  # type: ignore[arg-type]  # set just above
        except Exception as exc:  # noqa: BLE001 - one bad slide never stops the batch
            failures.append(slide_failure(str(p), failure_message(exc, str(p), spec), spec))
            res = SlideOutcome(failure=failures[-1])
        if on_result is not None:
            on_result(res)
    return rows, failures, {"engine": "one process", "slides": len(paths)}


def infer_slides_where(paths: Sequence[Path], spec: InferenceSpec, out: str | os.PathLike[str],
                       where: RayOptions,
                       on_result: Callable[[SlideOutcome], None] | None = None
                       ) -> Outcome:
    """Predict ``paths`` where ``where.ray_address`` says (nothing to do: nothing runs)."""
    if not paths:
        return [], [], {}
    if where.ray_address == "none":
        return infer_slides_local(paths, spec, out, on_result)
    from gigamil.cluster.ray import infer_slides

    return infer_slides(paths, spec, out, where.ray_address, where.workers,
                        where.gpus_per_worker, where.cpus, on_result)
