"""Batch inference over slide directories on Ray: one predictor actor per worker.

    rows, failures = infer_slides(paths, spec, "preds/", ray_address="local", workers=2)

Each actor holds the encoder and the fold models (on a GPU with ``gpus_per_worker``)
and predicts whole slides: reading, tissue, grid, QC, encoder, MIL, heatmap. A worker
process that dies mid-slide is restarted and the slide retried, and since each slide's
result is written atomically it appears exactly once. A slide that fails for its own
reasons (corrupt, no tissue) goes to failures.csv and the rest go on. Results live on
disk, not in the object store, whose size is capped.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gigamil.errors import GigamilError
from gigamil.mil.infer import InferenceSpec, SlidePredictor, slide_done

__all__ = ["infer_slides", "infer_slides_local"]

log = logging.getLogger(__name__)

OBJECT_STORE_BYTES = 256 * 1024**2


class _Worker:
    """A Ray actor around :class:`SlidePredictor` (errors come back as values, not raises)."""

    def __init__(self, spec: InferenceSpec, out: str) -> None:
        import cv2
        import torch

        # a worker uses its share of the cores: torch, OpenCV and the readers alike
        torch.set_num_threads(max(1, spec.threads))
        cv2.setNumThreads(max(1, spec.threads))
        self.predictor = SlidePredictor(spec)
        self.out = out
        _warm_up()



    def run(self, path: str) -> dict[str, Any]:
        try:
            return {"ok": True, "row": self.predictor.predict_to(path, self.out)}
        except GigamilError as exc:
            return {"ok": False, "file": Path(path).name, "error": str(exc)}
        except Exception as exc:  # noqa: BLE001 - one bad slide never stops the batch
            return {"ok": False, "file": Path(path).name,
                    "error": f"{exc.__class__.__name__}: {exc}"}

    def pid(self) -> int:
        return os.getpid()

    def peak_rss_mb(self) -> float:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _warm_up() -> None:
    """Import the slide readers now, so a worker's first slide costs what the others do."""
    import importlib

    for name in ("openslide", "cucim", "cv2", "tifffile", "h5py"):
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - optional backends may be missing
            pass


def _failure(res: dict[str, Any]) -> dict[str, Any]:
    from gigamil.wsi.reader import slide_id

    return {"slide_id": slide_id(res["file"]), "file": res["file"], "error": res["error"]}


def infer_slides_local(paths: Sequence[Path], spec: InferenceSpec, out: str | os.PathLike[str],
                       on_result: Callable[[dict[str, Any]], None] | None = None
                       ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The same work in this process, one slide after another (no Ray)."""
    worker = _Worker(spec, str(out))
    rows, failures = [], []
    for p in paths:
        res = worker.run(str(p))
        (rows if res["ok"] else failures).append(res["row"] if res["ok"] else _failure(res))
        if on_result is not None:
            on_result(res)
    return rows, failures


def infer_slides(paths: Sequence[Path], spec: InferenceSpec, out: str | os.PathLike[str],
                 ray_address: str = "local", workers: int = 2, gpus_per_worker: float = 0,
                 on_result: Callable[[dict[str, Any]], None] | None = None,
                 on_workers: Callable[[list[Any]], None] | None = None,
                 ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Predict ``paths`` on Ray (``local`` starts a cluster here; else join ``ray_address``)."""
    import ray

    started = False
    if not ray.is_initialized():
        if ray_address == "local":
            ray.init(num_cpus=max(1, workers) * max(1, spec.threads), include_dashboard=False,
                     object_store_memory=OBJECT_STORE_BYTES, log_to_driver=False,
                     configure_logging=False)
        else:
            ray.init(address=ray_address, log_to_driver=False, configure_logging=False)
        started = True
    try:
        actor = ray.remote(num_cpus=max(1, spec.threads), num_gpus=gpus_per_worker,
                           max_restarts=-1, max_task_retries=3)(_Worker)
        actors = [actor.remote(spec, str(Path(out).resolve())) for _ in range(max(1, workers))]
        if on_workers is not None:
            on_workers(actors)
        rows, failures = [], []
        queue = [str(p) for p in paths]
        in_flight: dict[Any, Any] = {}  # future → actor; two per actor, so none waits for work

        def feed(a: Any) -> None:
            if queue:
                in_flight[a.run.remote(queue.pop(0))] = a

        for a in actors:
            feed(a)
            feed(a)
        while in_flight:
            done, _ = ray.wait(list(in_flight), num_returns=1)
            a = in_flight.pop(done[0])
            res = ray.get(done[0])
            (rows if res["ok"] else failures).append(res["row"] if res["ok"] else _failure(res))
            feed(a)
            if on_result is not None:
                on_result(res)
        return rows, failures
    finally:
        if started:
            ray.shutdown()


def todo(paths: Sequence[Path], out: Path) -> list[Path]:
    """The slides without a finished result (a rerun does only these)."""
    from gigamil.wsi.reader import slide_id

    return [p for p in paths if not slide_done(out, slide_id(p))]
