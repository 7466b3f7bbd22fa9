"""Many slides → patch stores: a crash-tolerant pool here, or one share of a SLURM array.

    results = extract_slides(["slides/"], "data/", ExtractConfig(mpp=0.5), workers=8)
    merge_extract_manifests("data/")     # after an array: extract.shard*.csv → extract.csv

Each slide is :func:`gigamil.wsi.extract.extract_slide`; this module finds the slides,
shares them out, stages them to local disk (``--stage-dir``) and keeps the manifest.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from gigamil.cluster.pool import report_progress, run_pool
from gigamil.errors import DiskFullError, UsageError, is_disk_full
from gigamil.io import ensure_writable, sweep_stale_temps, work_lock, write_csv, write_json
from gigamil.layout import ExtractDir
from gigamil.versions import gigamil_version, package_versions
from gigamil.wsi.discovery import Pseudonyms, SlideSource, find_slides
from gigamil.wsi.extract import ELSEWHERE, extract_slide
from gigamil.wsi.extract_config import MANIFEST_FIELDS, ExtractConfig, SlideResult
from gigamil.wsi.metadata import SLIDE_EXTENSIONS, load_mpp_csv

if TYPE_CHECKING:
    from gigamil.cluster.staging import SlideStager

__all__ = ["extract_slides", "merge_extract_manifests", "slide_config", "WORKER_DIED"]

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
    for sub in (out.root, out.patches, out.coords, out.previews):
        sweep_stale_temps(sub)  # manifests half-written by a killed job
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
        # two runs on one --out: wait for the other's slides, then do what it left undone,
        # so that this manifest is true too (skipped: written by it; ok: it died first)
        elsewhere = [r for r in results if r.status == "skipped" and r.note == ELSEWHERE]
        by_id = {job.slide_id: job for job in jobs}
        for res in elsewhere:
            results.remove(res)
            job = by_id[res.slide_id]
            record(extract_slide(job.path, out.root, slide_config(cfg, job, mpps), job.slide_id,
                                 False, max(1, workers), on_patches, name=job.name,
                                 roi_key=job.original_id, wait_claim=True))
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


def merge_extract_manifests(out: str | os.PathLike[str], complete_only: bool = False
                            ) -> Path | None:
    """Join the array tasks' ``extract.shard*.csv`` into ``extract.csv`` (then remove them).

    ``complete_only``: merge only when every task of the array has written its part (what
    each task does as it ends: the last one merges). Merging holds a lock, so tasks that
    end at once neither merge half the parts nor remove each other's.
    """
    layout = ExtractDir(out)
    with work_lock(layout.manifest(), wait=True):
        parts = layout.shard_manifests()
        if not parts or (complete_only and not _all_shards(parts)):
            return None
        rows: list[dict[str, str]] = []
        for p in parts:
            with open(p, newline="") as fh:
                rows.extend(csv.DictReader(fh))
        rows.sort(key=lambda r: r["slide_id"])
        write_csv(layout.manifest(), rows, MANIFEST_FIELDS)
        for p in parts:
            p.unlink(missing_ok=True)
    return layout.manifest()


def _all_shards(parts: list[Path]) -> bool:
    """Whether ``extract.shard<k>of<n>.csv`` parts include every k < n (for one n)."""
    found: dict[int, set[int]] = {}
    for p in parts:
        m = re.fullmatch(r"extract\.shard(\d+)of(\d+)\.csv", p.name)
        if m:
            found.setdefault(int(m.group(2)), set()).add(int(m.group(1)))
    return any(ks >= set(range(n)) for n, ks in found.items())
