"""``gigamil embed --from-slides``: slides → feature bags with no patch store in between.

Patches are cut on the fly by the extraction code (tissue, grid, QC, stain) and
encoded in batches; each slide's bag is written as soon as it is done, and a rerun
skips the bags already made from the same slide, encoder and extraction settings.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gigamil.io import write_csv
from gigamil.layout import ExtractDir
from gigamil.memory import retain_freed_memory
from gigamil.mil.embed import forward_patches, select_share
from gigamil.mil.embed_config import EMBED_FIELDS, EmbedConfig, EmbedResult
from gigamil.mil.encoders import Encoder, create_encoder
from gigamil.wsi.discovery import SlideSource
from gigamil.wsi.extract_config import ExtractConfig, SlideResult
from gigamil.wsi.features import bag_header, trident_attrs, write_bag

__all__ = ["embed_slides", "slide_features", "slide_sources"]


def embed_slides(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    cfg: EmbedConfig,
    extract: ExtractConfig,
    on_result: Callable[[EmbedResult], None] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> list[EmbedResult]:
    """``--from-slides``: patches straight from the slides through the extraction code
    (tissue, grid, QC, stain), no patch store. Reading runs in ``cfg.workers`` threads
    beside the model; each slide's bag is written as soon as it is done.
    """
    from gigamil.wsi.extract import safe_message, source_signature

    retain_freed_memory()  # activations are re-allocated every batch
    device = cfg.resolved_device()
    encoder = create_encoder(cfg.encoder, cfg.weights, device)
    features = ExtractDir(out_dir).features(cfg.encoder)
    features.root.mkdir(parents=True, exist_ok=True)
    dtype = cfg.autocast_dtype(device)
    results: list[EmbedResult] = []

    def record(res: EmbedResult) -> None:
        results.append(res)
        write_csv(features.manifest(cfg.manifest_part), [r.row() for r in results], EMBED_FIELDS)
        if on_result is not None:
            on_result(res)

    sources, unusable = slide_sources(inputs, out_dir, cfg, extract)
    if cfg.rank == 0 and (cfg.shard is None or cfg.shard[0] == 0):  # once, not per share
        for r in unusable:
            record(EmbedResult(r.slide_id, "failed", error=r.error))
    for source in select_share(sources, cfg.shard, cfg.rank, cfg.world_size,
                               key=lambda s: str(s.path)):
        path, sid = source.path, source.slide_id
        h5 = features.h5(sid)
        t0 = time.perf_counter()
        res = EmbedResult(sid, "ok")
        try:
            size = source_signature(path)[0]
            header = None if cfg.overwrite else bag_header(h5)
            if header is not None:
                a, n = header
                if (a.get("encoder") == encoder.spec.name
                        and (a.get("encoder_sha256") or "") == (encoder.weights_sha256 or "")
                        and a.get("source_size") == size
                        and a.get("extract_params") == repr(extract.output_params())):
                    res.status, res.n_patches = "skipped", n
                    record(res)
                    continue
            f, coords, attrs = slide_features(path, encoder, extract, device, dtype,
                                              cfg.batch_size, max(1, cfg.workers), on_batch,
                                              sid=sid, name=source.name)
            write_bag(h5, f, coords, attrs)
            res.n_patches = len(f)
        except Exception as exc:  # one bad slide never stops the batch
            res.status, res.error = "failed", safe_message(exc, path)
            if extract.pseudonymize:
                for w in sorted({str(path), path.name, path.stem}, key=len, reverse=True):
                    res.error = res.error.replace(w, sid)
        res.seconds = time.perf_counter() - t0
        record(res)
    if not results:  # nothing in this share: still a manifest, so the job's outcome is on disk
        write_csv(features.manifest(cfg.manifest_part), [], EMBED_FIELDS)
    return results


def slide_sources(inputs: Sequence[str | Path], out_dir: str | Path, cfg: EmbedConfig,
                  extract: ExtractConfig) -> tuple[list[SlideSource], list[SlideResult]]:
    """The slides of ``inputs`` as ``gigamil extract`` finds them (lists, DICOM series,
    pseudonyms when ``extract.pseudonymize``), and the inputs that are not usable slides."""
    from gigamil.errors import UsageError
    from gigamil.wsi.discovery import Pseudonyms, find_slides

    pseudonyms = None
    if extract.pseudonymize:
        mapping = Path(extract.pseudonym_map or ExtractDir(out_dir).pseudonyms)
        if cfg.world_size > 1 and not mapping.is_file():
            raise UsageError(f"--pseudonymize on {cfg.world_size} ranks needs one salt for all",
                             f"run once on one rank first, or give --pseudonym-map {mapping}")
        pseudonyms = Pseudonyms(mapping)
    found = find_slides(inputs, extract.recursive, pseudonyms)
    if pseudonyms is not None and cfg.rank == 0:
        pseudonyms.save()
    return found.slides, found.failed


def slide_features(path: Path, encoder: Encoder, extract: ExtractConfig, device: torch.device,
                   dtype: torch.dtype | None, batch_size: int = 64, threads: int = 1,
                   on_batch: Callable[[int], None] | None = None, sid: str | None = None,
                   name: str | None = None
                   ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """One slide → (features (N, D), level-0 coords (N, 2), bag attributes), with patches cut
    on the fly by the extraction code (tissue, grid, QC, stain); nothing is stored.
    ``sid``/``name``: what outputs call the slide (default its stem and file name)."""
    from gigamil.wsi.extract import source_signature, store_meta
    from gigamil.wsi.extract_config import rejection_summary
    from gigamil.wsi.metadata import slide_id
    from gigamil.wsi.planning import plan_slide, process_grid
    from gigamil.wsi.reader import open_slide_for

    sid = sid or slide_id(path)
    with open_slide_for(path, extract) as slide:
        plan = plan_slide(slide, extract, sid)
        grid = plan.grids[0]
        feats, kept = [], []
        rejected: Counter[str] = Counter()
        buf: list[np.ndarray] = []
        for run in process_grid(slide, grid, extract, plan.normalizer, threads=threads,
                                encode=False, keep_patches=True):
            kept.extend(run.kept)
            rejected.update(run.rejections())
            for patch in run.patches or []:
                buf.append(patch)
                if len(buf) == batch_size:
                    feats.append(forward_patches(encoder, buf, device, dtype))
                    if on_batch is not None:
                        on_batch(len(buf))
                    buf = []
        if buf:
            feats.append(forward_patches(encoder, buf, device, dtype))
            if on_batch is not None:
                on_batch(len(buf))
        meta = store_meta(sid, path, slide, plan, extract, {}, name=name)
    f = np.concatenate(feats) if feats else np.zeros((0, encoder.feature_dim), np.float32)
    attrs = {**trident_attrs(meta), "encoder": encoder.spec.name,
             "encoder_arch": encoder.spec.arch, "encoder_sha256": encoder.weights_sha256 or "",
             "feature_dim": encoder.feature_dim, "source_size": source_signature(path)[0],
             "extract_params": repr(extract.output_params()),
             "stain_norm": extract.stain_norm or "",
             "qc_counts": rejection_summary(rejected)}
    return f, grid.coords[kept], attrs
