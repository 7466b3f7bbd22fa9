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

import dataclasses
import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from gigamil.cluster.executor import ClusterOptions, Stage
from gigamil.cluster.extract_cohort import extract_slides, merge_extract_manifests
from gigamil.errors import GigamilError, UsageError
from gigamil.layout import ExtractDir
from gigamil.wsi.discovery import Pseudonyms, find_slides
from gigamil.wsi.extract_config import ExtractConfig, SlideResult

if TYPE_CHECKING:  # torch-side configs: imported by the jobs themselves, not at start-up
    from gigamil.mil.embed_config import EmbedConfig, EmbedResult
    from gigamil.mil.train_config import TrainConfig

__all__ = ["ExtractStage", "EmbedStage", "TrainStage", "failed_slides"]


# -- extract ---------------------------------------------------------------------------------

def failed_slides(results: Sequence[Any] | None) -> str:
    """What failed among a stage's results (one list per job), e.g. ``1 of 4 slides failed,
    e.g. s03: …``; "" when nothing did."""
    rows = [r for part in results or [] for r in (part if isinstance(part, list) else [part])]
    bad = [r for r in rows if getattr(r, "status", "") == "failed"]
    if not bad:
        return ""
    return (f"{len(bad)} of {len(rows)} slides failed, e.g. {bad[0].slide_id}: "
            f"{getattr(bad[0], 'error', '')}")


def _strict(results: list[Any], strict: bool) -> list[Any]:
    """A job of a study chain fails (after writing its manifest) when a slide failed, so
    the stages that depend on it are cancelled rather than run on a partial cohort."""
    why = failed_slides([results]) if strict else ""
    if why:
        raise GigamilError(why, "see the stage's manifest; fix or remove the slide, then "
                                "`gigamil run STUDY` again")
    return results


def _extract_job(inputs: list[str], out: str, cfg: ExtractConfig, workers: int,
                 overwrite: bool, shard: tuple[int, int] | None, hooks: dict[str, Any],
                 own_process: bool, strict: bool = False) -> list[SlideResult]:
    from gigamil.cluster.resources import configure_threads

    if own_process:  # a job of its own (SLURM): --cpus-per-task, not every core of the node
        configure_threads()
    return _strict(extract_slides(inputs, out, cfg, workers=workers, overwrite=overwrite,
                                  shard=shard, **hooks), strict)


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
    #: a job fails when one of its slides fails (a study chain stops there)
    strict: bool = False

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
                                 not here, self.strict)

    def before_submit(self) -> None:
        """A new array lists every slide again: the parts of an earlier one (perhaps split
        another way, perhaps naming slides since removed) must not be merged with it."""
        for part in ExtractDir(self.out).shard_manifests():
            part.unlink()

    def finish(self, results: list[list[SlideResult]]) -> None:
        # run here, this may be one task of an array (``--shard``, the sbatch template):
        # only the last task to end merges, once every part is there
        merge_extract_manifests(self.out, complete_only=True)

    def record(self) -> dict[str, Any]:
        return {"slides": self.n_slides}


# -- embed -----------------------------------------------------------------------------------

def _embed_job(data: str, cfg: EmbedConfig, out: str | None,
               from_slides: ExtractConfig | None, hooks: dict[str, Any],
               own_process: bool, strict: bool = False,
               after_extract: bool = False) -> list[EmbedResult]:
    from gigamil.cluster.resources import configure_threads
    from gigamil.mil.embed import embed_stores
    from gigamil.mil.embed_slides import embed_slides

    if own_process:  # a job of its own (SLURM): --cpus-per-task, not every core of the node
        configure_threads()
    if after_extract and (cfg.shard is None or cfg.shard[0] == 0):
        merge_extract_manifests(data)  # the extract array before it had no one to merge
    if from_slides is not None:
        if out is None:
            raise UsageError("--from-slides needs --out", "e.g. --out data/")
        return embed_slides([data], out, cfg, from_slides, **hooks)
    return _strict(embed_stores(data, cfg, out, **hooks), strict)


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
    #: a job fails when one of its slides fails (a study chain stops there)
    strict: bool = False
    #: submitted behind an extract array (a study chain): its first job merges that
    #: array's manifests, and the stores are counted when it runs, not now
    after_extract: bool = False

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
                                 self.from_slides, self.hooks if here else {}, not here,
                                 self.strict, self.after_extract)

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
