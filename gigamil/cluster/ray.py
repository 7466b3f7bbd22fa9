# cohesive: one Ray pipeline (its scheduler, stages and cluster start-up) read top to bottom
"""Batch inference over slide directories on Ray: CPU tasks read, model actors predict.

    rows, failures = infer_slides(paths, spec, "preds/", ray_address="local", workers=1)

The driver streams every slide through the stages of :mod:`gigamil.mil.infer`:

    plan        CPU task   tissue, grid and stain fit of the slide
    read        CPU tasks  one per chunk of ~``spec.chunk_patches`` patches: read, QC, stain
    encode      actor      the encoder (on a GPU with ``gpus_per_worker``); each call takes the
                           chunks that are ready, from any slides, so batches cross slides
    MIL         actor      every fold model over the slide's features
    write       CPU task   the slide's .npz, heatmap and .json, each atomically

Memory is bounded: at most ``cpus + 2 * workers`` chunks of patches exist at once (being
read, waiting, or being encoded), and a local object store is sized for them. Results
live on disk, not in the object store.

Faults: Ray re-runs a read task whose worker process dies, and restarts a predictor actor
that dies and retries its calls (every stage is a pure function of its inputs). Each
slide's result is written once, atomically, so a slide appears exactly once. A slide that
fails for its own reasons (corrupt, no tissue) goes to failures.csv and the rest go on.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gigamil.cluster.infer import Outcome, failure_message, slide_failure
from gigamil.cluster.resources import configure_threads
from gigamil.errors import NoPatchesError
from gigamil.memory import retain_freed_memory
from gigamil.mil.infer import (
    SlidePredictor,
    SlideScores,
    SlideWork,
    merge_rejected,
    plan_inference,
    read_chunk,
)
from gigamil.mil.infer_outputs import SlideFailure, SlideOutcome, prediction_row, write_slide
from gigamil.mil.infer_spec import InferenceSpec

__all__ = ["infer_slides", "object_store_bytes"]

log = logging.getLogger(__name__)

MIN_OBJECT_STORE_BYTES = 256 * 1024**2
ENCODE_CALLS_PER_ACTOR = 2  # one running, one queued: an actor never waits for work



def _set_threads(threads: int) -> None:
    import torch  # noqa: F401 - imported first, so that configure_threads sizes it

    configure_threads(threads)


def _warm_up() -> int:
    """Import the slide readers now, so a worker's first slide costs what the others do."""
    import importlib

    for name in ("gigamil.wsi.extract", "openslide", "cucim", "cv2", "tifffile"):
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - optional backends may be missing
            pass
    return os.getpid()


class _Predictor:
    """A Ray actor around :class:`SlidePredictor`: the encoder and the fold models."""

    def __init__(self, spec: InferenceSpec) -> None:
        retain_freed_memory()
        _set_threads(spec.threads)
        self.predictor = SlidePredictor(spec)
        self.predictor.warm_up()

    def encode(self, *chunks: np.ndarray) -> np.ndarray | tuple[np.ndarray, ...]:
        feats = self.predictor.encode(chunks)
        return feats[0] if len(feats) == 1 else tuple(feats)

    def mil(self, *feats: np.ndarray) -> SlideScores:
        return self.predictor.mil(feats)

    def pid(self) -> int:
        return os.getpid()

    def peak_rss_mb(self) -> float:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _read(work: SlideWork, k: int, extract: Any
          ) -> tuple[np.ndarray, tuple[np.ndarray, dict[str, int]]]:
    """A read task: (patches for the actor, (coords, QC rejections) for the driver)."""
    retain_freed_memory()
    chunk = read_chunk(work, k, extract)
    return chunk.patches, (chunk.coords, chunk.rejected)


# ---- on Ray ------------------------------------------------------------------------


@dataclass
class _Slide:
    path: str
    t0: float
    work: SlideWork | None = None
    work_ref: Any = None  # ObjectRef of ``work``, as the plan task left it in the store
    meta: dict[int, tuple[np.ndarray, dict[str, int]]] = field(default_factory=dict)
    feats: dict[int, Any] = field(default_factory=dict)  # chunk → features ref (None: empty)
    alive: int = 0  # chunks of patches held for this slide (counted against the bound)
    failed: bool = False

    @property
    def encoded(self) -> bool:
        return self.work is not None and len(self.feats) == len(self.work.chunks)


@dataclass
class _Chunk:
    slide: _Slide
    k: int
    patches: Any  # ObjectRef of the (n, H, W, 3) patches
    n: int


class _Pipeline:
    """The driver's scheduler: keeps the readers and the actors busy within the bounds."""

    def __init__(self, spec: InferenceSpec, out: Path, actors: list[Any], cpus: int,
                 on_result: Callable[[SlideOutcome], None] | None) -> None:
        import ray

        self.ray = ray
        self.spec, self.out, self.actors = spec, out, actors
        self.on_result = on_result
        self.max_chunks = cpus + ENCODE_CALLS_PER_ACTOR * len(actors)
        self.max_slides = cpus + len(actors) + 1
        # Ray's remote handles are typed per arity; the pipeline treats them as Any
        self.plan: Any = ray.remote(num_cpus=1, max_retries=3)(plan_inference)
        self.read: Any = ray.remote(num_cpus=1, max_retries=3, num_returns=2)(_read)
        self.write: Any = ray.remote(num_cpus=1, max_retries=3)(write_slide)
        self.pending: dict[Any, Callable[[Any, BaseException | None], None]] = {}
        self.slides: list[_Slide] = []  # in flight, oldest first
        self.reads: deque[tuple[_Slide, int]] = deque()
        self.ready: deque[_Chunk] = deque()
        self.busy = {id(a): 0 for a in actors}
        self.alive = 0
        self.stats: dict[str, Any] = {"engine": "ray", "cpus": cpus, "predictors": len(actors),
                      "max_chunks_held": self.max_chunks, "peak_chunks_held": 0,
                      "chunks_read": 0, "encode_calls": 0, "patches_encoded": 0,
                      "encode_calls_across_slides": 0}
        self.rows: list[dict[str, Any]] = []
        self.failures: list[SlideFailure] = []

    def run(self, paths: Sequence[Path]) -> Outcome:
        queue = deque(str(p) for p in paths)
        while queue or self.slides:
            while queue and len(self.slides) < self.max_slides:
                self._start(queue.popleft())
            self._dispatch()
            if not self.pending:  # cannot happen while slides are in flight; never hang
                raise RuntimeError("inference pipeline stalled: no work in flight")
            done, _ = self.ray.wait(list(self.pending), num_returns=1)
            step = self.pending.pop(done[0])
            try:
                value, error = self.ray.get(done[0]), None
            except Exception as exc:  # noqa: BLE001 - the step decides whose failure it is
                value, error = None, exc
            step(value, error)
        calls = max(1, self.stats["encode_calls"])
        self.stats["patches_per_encode_call"] = round(self.stats["patches_encoded"] / calls, 1)
        return self.rows, self.failures, self.stats

    # ---- stages
    def _start(self, path: str) -> None:
        slide = _Slide(path, time.perf_counter())
        self.slides.append(slide)
        ref = self.plan.remote(path, self.spec.extract, self.spec.chunk_patches,
                               self.spec.slide_id(path))
        self.pending[ref] = lambda v, e: self._planned(slide, ref, v, e)

    def _planned(self, slide: _Slide, ref: Any, work: SlideWork | None,
                 error: BaseException | None) -> None:
        if error is not None or work is None:
            return self._fail(slide, error)
        if not work.chunks:
            return self._fail(slide, NoPatchesError(work.sid))
        slide.work, slide.work_ref = work, ref
        self.reads.extend((slide, k) for k in range(len(work.chunks)))

    def _dispatch(self) -> None:
        while self.reads and self.alive < self.max_chunks:
            slide, k = self.reads.popleft()
            if slide.failed:
                continue
            patches, meta = self.read.remote(slide.work_ref, k, self.spec.extract)
            slide.alive += 1
            self.alive += 1
            self.stats["chunks_read"] += 1
            self.stats["peak_chunks_held"] = max(self.stats["peak_chunks_held"], self.alive)
            self.pending[meta] = functools.partial(self._read_done, slide, k, patches)
        for actor in sorted(self.actors, key=lambda a: self.busy[id(a)]):
            if self.ready and self.busy[id(actor)] < ENCODE_CALLS_PER_ACTOR:
                self._encode(actor)

    def _read_done(self, slide: _Slide, k: int, patches: Any,
                   meta: tuple[np.ndarray, dict[str, int]] | None, error: BaseException | None
                   ) -> None:
        if slide.failed:
            return
        if error is not None or meta is None:
            return self._fail(slide, error)
        slide.meta[k] = meta
        if len(meta[0]):
            self.ready.append(_Chunk(slide, k, patches, len(meta[0])))
            return
        self._release(slide)
        slide.feats[k] = None
        self._maybe_mil(slide)

    def _encode(self, actor: Any) -> None:
        """Send the actor the ready chunks (oldest first) up to one chunk's worth of patches."""
        batch: list[_Chunk] = []
        size = 0
        while self.ready and (not batch or size + self.ready[0].n <= self.spec.chunk_patches):
            chunk = self.ready.popleft()
            if chunk.slide.failed:
                continue
            batch.append(chunk)
            size += chunk.n
        if not batch:
            return
        refs = actor.encode.options(num_returns=len(batch)).remote(*[c.patches for c in batch])
        refs = refs if isinstance(refs, list) else [refs]
        self.busy[id(actor)] += 1
        self.stats["encode_calls"] += 1
        self.stats["patches_encoded"] += size
        self.stats["encode_calls_across_slides"] += len({id(c.slide) for c in batch}) > 1
        self.pending[refs[0]] = lambda v, e: self._encoded(actor, batch, refs, e)

    def _encoded(self, actor: Any, batch: list[_Chunk], refs: list[Any],
                 error: BaseException | None) -> None:
        self.busy[id(actor)] -= 1
        for chunk, ref in zip(batch, refs):
            if chunk.slide.failed:
                continue
            if error is not None:
                self._fail(chunk.slide, error)
                continue
            self._release(chunk.slide)
            chunk.slide.feats[chunk.k] = ref
            self._maybe_mil(chunk.slide)

    def _maybe_mil(self, slide: _Slide) -> None:
        if not slide.encoded:
            return
        order = sorted(slide.feats)
        feats = [slide.feats[k] for k in order if slide.feats[k] is not None]
        if not feats:
            return self._fail(slide, NoPatchesError(slide.work.sid))  # type: ignore[union-attr]
        actor = min(self.actors, key=lambda a: self.busy[id(a)])
        self.busy[id(actor)] += 1
        ref = actor.mil.remote(*feats)

        def done(value: Any, error: BaseException | None) -> None:
            self.busy[id(actor)] -= 1
            self._scored(slide, value, error)

        self.pending[ref] = done

    def _scored(self, slide: _Slide, value: Any, error: BaseException | None) -> None:
        if slide.failed:
            return
        if error is not None:
            return self._fail(slide, error)
        work = slide.work
        assert work is not None
        metas = [slide.meta[k] for k in sorted(slide.meta)]
        coords = np.concatenate([m[0] for m in metas if len(m[0])])
        row = prediction_row(self.spec, work.sid, value, merge_rejected([m[1] for m in metas]),
                             time.perf_counter() - slide.t0)
        slide.feats.clear()
        ref = self.write.remote(self.spec, str(self.out), slide.path, row, coords, value,
                                work.patch_size_level0)
        self.pending[ref] = lambda v, e: self._written(slide, v, e)

    def _written(self, slide: _Slide, row: dict[str, Any] | None, error: BaseException | None
                 ) -> None:
        if error is not None or row is None:
            return self._fail(slide, error)
        self.slides.remove(slide)
        self.rows.append(row)
        if self.on_result is not None:
            self.on_result(SlideOutcome(row=row))

    # ---- bookkeeping
    def _release(self, slide: _Slide) -> None:
        slide.alive -= 1
        self.alive -= 1

    def _fail(self, slide: _Slide, error: BaseException | None) -> None:
        if slide.failed:
            return
        slide.failed = True
        self.alive -= slide.alive
        slide.alive = 0
        slide.feats.clear()
        self.slides.remove(slide)
        message = failure_message(error, slide.path, self.spec) if error is not None else "unknown error"
        self.failures.append(slide_failure(slide.path, message, self.spec))
        if self.on_result is not None:
            self.on_result(SlideOutcome(failure=self.failures[-1]))


def object_store_bytes(spec: InferenceSpec, cpus: int, workers: int) -> int:
    """Room for every chunk of patches the pipeline may hold, three times over."""
    ps = spec.extract.patch_size
    chunk = spec.chunk_patches * ps * ps * 3
    return max(MIN_OBJECT_STORE_BYTES, 3 * (cpus + ENCODE_CALLS_PER_ACTOR * workers) * chunk)


def infer_slides(paths: Sequence[Path], spec: InferenceSpec, out: str | os.PathLike[str],
                 ray_address: str = "local", workers: int | None = None,
                 gpus_per_worker: float = 0,
                 cpus: int | None = None,
                 on_result: Callable[[SlideOutcome], None] | None = None,
                 on_workers: Callable[[list[Any]], None] | None = None,
                 ) -> Outcome:
    """Predict ``paths`` on Ray: ``workers`` predictor actors, reading on ``cpus`` cores.

    ``ray_address="local"`` starts a cluster here with ``cpus`` (default: every core);
    anything else joins that cluster and reads on all of its CPUs. ``workers`` defaults to
    one predictor per ``gpus_per_worker`` GPUs of the cluster, or on CPUs to one per
    ``spec.threads`` cores (the encoder is then most of the work). Returns (rows,
    failures, pipeline stats: chunks held at peak against the bound, encoder calls, patches
    per call, calls that batched patches of several slides).
    """
    if ray_address != "local":
        _use_cluster_token()  # before Ray is imported: it reads its auth mode then
    import ray

    started = False
    if not ray.is_initialized():
        if ray_address == "local":  # a new cluster, even if `ray start` left one running here
            from gigamil.cluster.resources import allocated_cpus

            cpus = cpus or allocated_cpus()  # in a SLURM job: its CPUs, not the node's
            store_bytes = object_store_bytes(spec, cpus, workers or cpus)
            ray.init(address="local", num_cpus=cpus, include_dashboard=False,
                     log_to_driver=False, object_store_memory=store_bytes,
                     configure_logging=False)
        else:
            ray.init(address=ray_address, log_to_driver=False, configure_logging=False)
        started = True
    try:
        resources = ray.cluster_resources()
        cpus = int(resources.get("CPU", 1))
        if workers is None:
            workers = int(resources.get("GPU", 0) // gpus_per_worker) if gpus_per_worker \
                else cpus // max(1, spec.threads)
        # actors hold no CPU slot: the slots are for reading, which must never starve
        actor: Any = ray.remote(num_cpus=0, num_gpus=gpus_per_worker, max_restarts=-1,
                           max_task_retries=3)(_Predictor)
        actors = [actor.remote(spec) for _ in range(max(1, workers))]
        warm: Any = ray.remote(num_cpus=1)(_warm_up)
        ray.get([warm.remote() for _ in range(cpus)] + [a.pid.remote() for a in actors])
        if on_workers is not None:
            on_workers(actors)
        rows, failures, stats = _Pipeline(spec, Path(out).resolve(), actors, cpus,
                                          on_result).run(paths)
        store = ray.available_resources().get("object_store_memory")
        return rows, failures, {**stats, "ray_address": ray_address,
                                "object_store_bytes": int(store) if store else None}
    finally:
        if started:
            ray.shutdown()


def _use_cluster_token() -> None:
    """Send the cluster's auth token when joining one that ``ray start`` made.

    ``ray start --head`` turns token authentication on and saves the token (by default in
    ``~/.ray/auth_token``, which a cluster's shared home gives every node), but Ray 2.60's
    ``ray.init(address=...)`` sends it only with ``RAY_AUTH_MODE=token`` set before ``ray``
    is imported. An explicit ``RAY_AUTH_MODE`` is left alone.
    """
    if "RAY_AUTH_MODE" in os.environ:
        return
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    if os.environ.get("RAY_AUTH_TOKEN") or os.path.isfile(path):
        os.environ["RAY_AUTH_MODE"] = "token"
