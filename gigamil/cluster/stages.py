"""The pipeline's stages, each defined once as jobs that any executor runs.

    stage = ExtractStage(inputs, out, cfg, workers=8)
    outcome = run_stage(stage, ClusterOptions(executor="slurm", slides_per_job=20))

- :class:`ExtractStage`: slides → patch stores. Here: the slides in a crash-tolerant process
  pool; on SLURM: an array task per ``slides_per_job`` slides, each with its own pool.
- :class:`EmbedStage`: patch stores → feature bags. One process (DataLoader workers); on
  SLURM an array task per ``slides_per_job`` stores.
- :class:`TrainStage`: the cross-validated run; on SLURM one multi-rank job that
  checkpoints and requeues itself (:class:`gigamil.cluster.slurm.TrainJob`).

Every job is idempotent (finished slides are skipped, training resumes from its
checkpoints), so a resubmitted array or a requeued job does only what is missing.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from gigamil.cluster.executor import ClusterOptions, Stage
from gigamil.cluster.pool import report_progress, run_pool
from gigamil.errors import DiskFullError, UsageError, is_disk_full
from gigamil.io import ensure_writable, write_csv, write_json
from gigamil.layout import ExtractDir
from gigamil.versions import gigamil_version, package_versions
from gigamil.wsi.discovery import Pseudonyms, SlideSource, find_slides
from gigamil.wsi.extract import extract_slide
from gigamil.wsi.extract_config import MANIFEST_FIELDS, ExtractConfig, SlideResult
from gigamil.wsi.metadata import SLIDE_EXTENSIONS, load_mpp_csv

if TYPE_CHECKING:  # torch-side configs: imported by the jobs themselves, not at start-up
    from gigamil.cluster.staging import SlideStager
    from gigamil.mil.embed_config import EmbedConfig, EmbedResult
    from gigamil.mil.train_config import TrainConfig

__all__ = ["ExtractStage", "EmbedStage", "TrainStage", "extract_slides",
           "merge_extract_manifests"]

log = logging.getLogger("gigamil.extract")

WORKER_DIED = ("the worker process died on this slide (a crash in the slide library, or out "
               "of memory); check the file, or try --backend openslide")


# -- extract ---------------------------------------------------------------------------------

def _extract_one(job: SlideSource, out: Path, cfg: ExtractConfig, overwrite: bool,
                 threads: int, mpps: dict[str, float]) -> SlideResult:
    """One slide, in a pool worker (patch counts go to the parent's progress)."""
    return extract_slide(job.path, out, slide_config(cfg, job, mpps), job.slide_id, overwrite,
                         threads, on_patches=report_progress, name=job.name,
                         roi_key=job.original_id)


def slide_config(cfg: ExtractConfig, job: SlideSource, mpps: dict[str, float]) -> ExtractConfig:
    """The options for one slide: its ``--mpp-csv`` resolution as its override."""
    mpp = mpps.get(job.original_id)
    return cfg if mpp is None else dataclasses.replace(cfg, mpp_override=mpp)


def _prepare_extract_dir(out: ExtractDir, cfg: ExtractConfig) -> None:
    if out.root.exists() and not out.root.is_dir():
        raise UsageError(f"--out {out.root} is a file", "give a directory for the outputs")
    for sub in (out.patches, out.coords, out.previews):
        if sub.exists() and not sub.is_dir():
            raise UsageError(f"{sub} is a file", "remove it or choose another --out")
    ensure_writable(out.patches)  # a read-only or full --out: one error, before any work
    config = dataclasses.asdict(cfg)
    if not cfg.record_paths:  # folder names may name patients: keep file names only
        for key in ("pseudonym_map", "mpp_csv", "roi_dir", "stage_dir", "stain_reference"):
            if config[key]:  # pseudonymized: not even those
                config[key] = "(given)" if cfg.pseudonymize else Path(config[key]).name
    write_json(out.config, {"config": config,
                            "versions": {"gigamil": gigamil_version(), **package_versions()}})


def extract_slides(
    inputs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    cfg: ExtractConfig,
    workers: int = 1,
    overwrite: bool = False,
    on_result: Callable[[SlideResult], None] | None = None,
    on_start: Callable[[int], None] | None = None,
    on_patches: Callable[[int], None] | None = None,
    shard: tuple[int, int] | None = None,
) -> list[SlideResult]:
    """Extract every slide in ``inputs`` into ``out_dir``; write ``out_dir/extract.csv``.

    ``shard=(k, n)`` takes every n-th slide from the k-th (one SLURM array task) and
    writes ``extract.shard<k>of<n>.csv``; :func:`merge_extract_manifests` joins the parts.

    Slides run in worker processes: ``min(workers, slides)`` at a time, each with
    ``workers // processes`` reading threads, so one large slide still uses every core. A
    process that dies (a crash inside a slide library, or out of memory) fails only the
    slide it was on, and the batch goes on. ``workers=0``: every slide in this process.
    """
    out = ExtractDir(out_dir)
    pseudonyms = (Pseudonyms(Path(cfg.pseudonym_map) if cfg.pseudonym_map else out.pseudonyms)
                  if cfg.pseudonymize else None)
    found = find_slides(inputs, cfg.recursive, pseudonyms)
    if not found.slides and not found.failed:
        raise UsageError("no slides found", "slides need one of: "
                         f"{' '.join(sorted(SLIDE_EXTENSIONS))}, or a DICOM series folder")
    mpps = load_mpp_csv(cfg.mpp_csv) if cfg.mpp_csv else {}
    jobs, duplicates = found.slides, found.failed
    if shard is not None:
        jobs = jobs[shard[0]::shard[1]]
        duplicates = duplicates if shard[0] == 0 else []
    _prepare_extract_dir(out, cfg)
    if pseudonyms is not None:
        pseudonyms.save()
    for note in found.notes:
        log.warning(note)
    order = {r.file: i for i, r in enumerate([*duplicates, *(SlideResult(
        j.slide_id, j.name, "ok") for j in jobs)])}
    results: list[SlideResult] = []
    if on_start is not None:
        on_start(len(jobs) + len(duplicates))
    last_write = [0.0]

    def write_manifest() -> None:
        results.sort(key=lambda r: order.get(r.file, 0))
        try:
            write_csv(out.manifest(shard), [r.row() for r in results], MANIFEST_FIELDS)
        except OSError as exc:
            if is_disk_full(exc):
                raise DiskFullError(out.root) from exc
            raise
        last_write[0] = time.monotonic()

    def record(res: SlideResult) -> None:
        results.append(res)
        if time.monotonic() - last_write[0] > 2.0:  # not once per slide: cheap on big cohorts
            write_manifest()
        if on_result is not None:
            on_result(res)

    stager, to_stage = _stager(cfg, out, jobs, overwrite)
    originals = {job.slide_id: job.path for job in jobs if job.path in to_stage}

    def staged(job: SlideSource) -> SlideSource:
        if stager is None or job.path not in to_stage:
            return job
        return dataclasses.replace(job, path=stager.get(job.path))

    def done(res: SlideResult) -> None:
        if stager is not None and res.slide_id in originals:
            source = originals[res.slide_id]
            stager.release(source)
            if source in stager.notes:
                res.note = "; ".join(n for n in (res.note, stager.notes[source]) if n)
        record(res)

    try:
        for res in duplicates:
            record(res)
        if workers <= 0:  # in this process (the debug executor)
            for job in jobs:
                local = staged(job)
                done(extract_slide(local.path, out.root, slide_config(cfg, job, mpps),
                                   job.slide_id, overwrite, 1, on_patches, name=job.name,
                                   roi_key=job.original_id))
        elif jobs:
            processes = max(1, min(workers, len(jobs)))
            threads = max(1, workers // processes)
            run_pool(functools.partial(_extract_one, out=out.root, cfg=cfg, overwrite=overwrite,
                                       threads=threads, mpps=mpps),
                     [(job.slide_id, job) for job in jobs], processes,
                     threads=threads, on_result=done, on_progress=on_patches,
                     on_died=lambda sid, job: SlideResult(sid, job.name, "failed",
                                                          error=WORKER_DIED),
                     on_submit=staged)
    finally:
        if stager is not None:
            stager.close()
        # with an error on its way (a full disk, say), a manifest that cannot be written waits
        with contextlib.suppress(DiskFullError) if sys.exc_info()[1] else contextlib.nullcontext():
            write_manifest()
    return results


def _stager(cfg: ExtractConfig, out: ExtractDir, jobs: list[SlideSource], overwrite: bool
            ) -> tuple[SlideStager | None, set[Path]]:
    """A started stager for ``--stage-dir`` and the slides it copies: those without a
    store yet (all with ``overwrite``); slides that are probably done are not copied."""
    if cfg.stage_dir is None:
        return None, set()
    from gigamil.cluster.staging import SlideStager

    todo = [j.path for j in jobs if overwrite or not out.store(j.slide_id).is_file()]
    stager = SlideStager(todo, Path(cfg.stage_dir), max_bytes=int(cfg.stage_gb * 2**30))
    return stager.start(), set(todo)


def merge_extract_manifests(out: str | os.PathLike[str]) -> Path | None:
    """Join the array tasks' ``extract.shard*.csv`` into ``extract.csv`` (then remove them)."""
    layout = ExtractDir(out)
    parts = layout.shard_manifests()
    if not parts:
        return None
    rows: list[dict[str, str]] = []
    for p in parts:
        with open(p, newline="") as fh:
            rows.extend(csv.DictReader(fh))
    rows.sort(key=lambda r: r["slide_id"])
    write_csv(layout.manifest(), rows, MANIFEST_FIELDS)
    for p in parts:
        p.unlink()
    return layout.manifest()


def _extract_job(inputs: list[str], out: str, cfg: ExtractConfig, workers: int,
                 overwrite: bool, shard: tuple[int, int] | None, hooks: dict[str, Any],
                 own_process: bool) -> list[SlideResult]:
    from gigamil.cluster.resources import configure_threads

    if own_process:  # a job of its own (SLURM): --cpus-per-task, not every core of the node
        configure_threads()
    return extract_slides(inputs, out, cfg, workers=workers, overwrite=overwrite, shard=shard,
                          **hooks)


@dataclass
class ExtractStage(Stage[list[SlideResult]]):
    """Slides → one patch store per slide, and the manifest ``extract.csv``."""

    kind: ClassVar[str] = "extract"
    inputs: Sequence[str | os.PathLike[str]]
    out: Path
    cfg: ExtractConfig
    workers: int = 1
    overwrite: bool = False
    shard: tuple[int, int] | None = None
    #: progress callbacks of a run in this process (on_start, on_result, on_patches)
    hooks: dict[str, Callable[..., None]] = field(default_factory=dict)

    @property
    def target(self) -> Path:
        return Path(self.out)

    @property
    def local_shard(self) -> tuple[int, int] | None:
        return self.shard

    @property
    def local_workers(self) -> int:
        return self.workers

    @functools.cached_property
    def n_slides(self) -> int:
        found = find_slides(self.inputs, self.cfg.recursive)
        return len(found.slides) + (1 if found.failed else 0)

    def n_jobs(self, opts: ClusterOptions) -> int:
        if not self.n_slides:
            raise UsageError("no slides found", "check the slide directory")
        return -(-self.n_slides // max(1, opts.slides_per_job))

    def job(self, shard: tuple[int, int] | None, workers: int, here: bool
            ) -> Callable[[], list[SlideResult]]:
        if self.cfg.pseudonymize:  # one salt for every array task: made here, before them
            mapping = Path(self.cfg.pseudonym_map or ExtractDir(self.out).pseudonyms)
            if not mapping.is_file():
                Pseudonyms(mapping).save()
        sources = [str(Path(p).resolve()) for p in self.inputs]
        return functools.partial(_extract_job, sources, str(Path(self.out).resolve()), self.cfg,
                                 workers, self.overwrite, shard, self.hooks if here else {},
                                 not here)

    def finish(self, results: list[list[SlideResult]]) -> None:
        merge_extract_manifests(self.out)

    def record(self) -> dict[str, Any]:
        return {"slides": self.n_slides}


# -- embed -----------------------------------------------------------------------------------

def _embed_job(data: str, cfg: EmbedConfig, out: str | None,
               from_slides: ExtractConfig | None, hooks: dict[str, Any],
               own_process: bool) -> list[EmbedResult]:
    from gigamil.cluster.resources import configure_threads
    from gigamil.mil.embed import embed_stores
    from gigamil.mil.embed_slides import embed_slides

    if own_process:  # a job of its own (SLURM): --cpus-per-task, not every core of the node
        configure_threads()
    if from_slides is not None:
        if out is None:
            raise UsageError("--from-slides needs --out", "e.g. --out data/")
        return embed_slides([data], out, cfg, from_slides, **hooks)
    return embed_stores(data, cfg, out, **hooks)


@dataclass
class EmbedStage(Stage[list["EmbedResult"]]):
    """Patch stores → ``features/<encoder>/<slide_id>.h5``;
    with ``from_slides``, patches cut from the slides in ``data`` on the fly, stored nowhere."""

    kind: ClassVar[str] = "embed"
    data: Path
    cfg: EmbedConfig
    out: Path | None = None
    from_slides: ExtractConfig | None = None
    hooks: dict[str, Callable[..., None]] = field(default_factory=dict)

    @property
    def target(self) -> Path:
        return Path(self.out or self.data)

    @functools.cached_property
    def n_stores(self) -> int:
        return len(list(ExtractDir.store_folder(self.data).glob("*.lmdb")))

    def n_jobs(self, opts: ClusterOptions) -> int:
        if self.from_slides is not None:
            raise UsageError("--from-slides runs locally only",
                             "extract with --executor slurm, then embed the stores")
        if not self.n_stores:
            raise UsageError(f"no patch stores in {ExtractDir.store_folder(self.data)}",
                             "run `gigamil extract` first")
        return max(1, -(-self.n_stores // max(1, opts.slides_per_job)))

    def job(self, shard: tuple[int, int] | None, workers: int, here: bool
            ) -> Callable[[], list[EmbedResult]]:
        cfg = self.cfg
        if shard is not None:
            cfg = dataclasses.replace(cfg, shard=shard)
        if workers == 0:
            cfg = dataclasses.replace(cfg, workers=0)
        return functools.partial(_embed_job, str(Path(self.data).resolve()), cfg,
                                 str(Path(self.out).resolve()) if self.out else None,
                                 self.from_slides, self.hooks if here else {}, not here)

    def record(self) -> dict[str, Any]:
        return {"stores": self.n_stores}


# -- train -----------------------------------------------------------------------------------

def _train_here(cfg: TrainConfig, resume: bool, on_epoch: Callable[[dict[str, Any]], None] | None
                ) -> dict[str, Any]:
    from gigamil.cluster.launch import run_training

    return run_training(cfg, resume=resume, on_epoch=on_epoch)


@dataclass
class TrainStage(Stage[dict[str, Any]]):
    """The cross-validated run; its result is the summary."""

    kind: ClassVar[str] = "train"
    multi_rank: ClassVar[bool] = True
    cfg: TrainConfig
    resume: bool = False
    on_epoch: Callable[[dict[str, Any]], None] | None = None

    @property
    def target(self) -> Path:
        return Path(self.cfg.out)

    def job(self, shard: tuple[int, int] | None, workers: int, here: bool
            ) -> Callable[[], dict[str, Any]]:
        if here:
            return functools.partial(_train_here, self.cfg, self.resume, self.on_epoch)
        from gigamil.cluster.slurm import TrainJob

        return TrainJob(self.cfg)  # resumes from its checkpoints on every start
