"""``gigamil embed``: patch stores → feature bags, one HDF5 file per slide.

A single DataLoader streams the patches of every pending slide in order; its
worker processes decode JPEG (libjpeg-turbo) into uint8 tensors, the main
process normalizes on the device and runs the encoder under autocast. A slide's
bag is written (temporary name, flush, rename) as soon as its last batch is
done, so a killed job loses at most the slides in flight and a rerun skips the
finished ones. Patches that fail to decode are dropped and counted, never
turned into NaN features. ``--from-slides`` (no patch store) is
:mod:`gigamil.mil.embed_slides`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from gigamil.errors import DiskFullError, GigamilError, StoreError, UsageError, is_disk_full
from gigamil.io import ensure_writable, sweep_stale_temps, work_lock, write_csv, write_json
from gigamil.layout import ExtractDir, FeatureDir
from gigamil.memory import retain_freed_memory
from gigamil.mil.embed_config import EMBED_FIELDS, EmbedConfig, EmbedResult
from gigamil.mil.encoders import Encoder, create_encoder
from gigamil.versions import gigamil_version, package_versions
from gigamil.wsi.features import ScaleBag, bag_header, parent_index, trident_attrs, write_bag
from gigamil.wsi.store import PatchStore

__all__ = ["embed_stores", "select_share", "forward_patches"]

log = logging.getLogger("gigamil.embed")
T = TypeVar("T")


class _Patches(Dataset):
    """Patches of several stores in order → (uint8 HWC patch, ok, slide index, patch index).

    Holds per-slide offsets, not one row per patch, and keeps only the store it
    is reading open, so memory and open files do not grow with the cohort.
    """

    def __init__(self, stores: Sequence[PatchStore], normalizers: Sequence[Any] | None = None
                 ) -> None:
        self.stores = list(stores)
        self.offsets = np.cumsum([0] + [len(st) for st in self.stores])
        self.normalizers = list(normalizers) if normalizers else None
        self._current = -1

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, k: int) -> tuple[torch.Tensor, bool, int, int]:
        s = int(np.searchsorted(self.offsets, k, side="right") - 1)
        i = int(k - self.offsets[s])
        if s != self._current:
            if self._current >= 0:
                self.stores[self._current].close()
            self._current = s
        store = self.stores[s]
        try:
            patch = store[i]
            ok = True
        except Exception as exc:  # a corrupt patch: dropped and counted, never a NaN feature
            log.warning("%s: patch %d unreadable (%s: %s)", store.path.stem, i,
                        type(exc).__name__, exc)
            patch = np.zeros((store.patch_size, store.patch_size, 3), np.uint8)
            ok = False
        if ok and self.normalizers is not None:
            patch = self.normalizers[s].apply(patch[None])[0]
        return torch.from_numpy(np.ascontiguousarray(patch)), ok, s, i


def select_share(stores: Sequence[T], shard: tuple[int, int] | None, rank: int = 0,
                 world_size: int = 1, key: Callable[[T], Any] = str) -> list[T]:
    """The share of the slides for this shard and this rank (deterministic: sorted by
    ``key``, the path by default)."""
    stores = sorted(stores, key=key)
    if shard is not None:
        k, n = shard
        stores = stores[k::n]
    return stores[rank::world_size]


def _is_done(h5: Path, store: PatchStore, encoder: Encoder, cfg: EmbedConfig) -> bool:
    """A finished bag of this store, encoder, weights and stain setting (attributes only)."""
    header = bag_header(h5)
    if header is None:  # missing, unreadable or partial: redo it
        return False
    a, n = header
    return (a.get("encoder") == encoder.spec.name
            and (a.get("encoder_sha256") or "") == (encoder.weights_sha256 or "")
            and (a.get("stain_norm") or "") == (cfg.stain_norm or "")
            and a.get("store_count") == len(store)
            and a.get("store_mtime") == int(store.path.stat().st_mtime)
            and [float(m) for m in a.get("scales_embedded", [])]
            == (store.scales[1:] if cfg.scales == "all" else [])
            and n == len(store) - int(a.get("n_bad", 0)))


def embed_stores(
    data_dir: str | Path,
    cfg: EmbedConfig,
    out_dir: str | Path | None = None,
    on_result: Callable[[EmbedResult], None] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> list[EmbedResult]:
    """Embed every store in ``data_dir/patches`` into ``out_dir/features/<encoder>/``."""
    data = Path(data_dir)
    patch_dir = ExtractDir.store_folder(data)
    paths = sorted(patch_dir.glob("*.lmdb"))
    if not paths:
        raise UsageError(f"no patch stores in {patch_dir}", "run `gigamil extract` first")
    retain_freed_memory()  # activations are re-allocated every batch
    device = cfg.resolved_device()
    encoder = create_encoder(cfg.encoder, cfg.weights, device)
    features = ExtractDir(out_dir or data).features(cfg.encoder)
    ensure_writable(features.root)
    sweep_stale_temps(features.root)  # manifests half-written by a killed job
    write_json(features.config, {
        "config": dataclasses.asdict(cfg), "encoder": dataclasses.asdict(encoder.spec)
        | {"kwargs": {k: str(v) for k, v in encoder.spec.kwargs.items()}},
        "feature_dim": encoder.feature_dim, "encoder_sha256": encoder.weights_sha256,
        "versions": {"gigamil": gigamil_version(), **package_versions(), "torch": torch.__version__},
    })
    results: list[EmbedResult] = []
    claims: dict[str, contextlib.ExitStack] = {}

    def record(res: EmbedResult) -> None:
        results.append(res)
        write_csv(features.manifest(cfg.manifest_part), [r.row() for r in results], EMBED_FIELDS)
        stack = claims.pop(res.slide_id, None)
        if stack is not None:  # this slide's bag is written (or failed): let others see it
            stack.close()
        if on_result is not None:
            on_result(res)

    def claim(sid: str, wait: bool) -> bool:
        stack = contextlib.ExitStack()
        if stack.enter_context(work_lock(features.h5(sid), wait=wait)):
            claims[sid] = stack
            return True
        stack.close()
        return False

    def select(share: list[Path], wait: bool) -> tuple[list[PatchStore], list[Path]]:
        """The stores to embed now, and those another process is embedding this moment
        (looked at again once it is done: embedded by whichever gets there first)."""
        pending: list[PatchStore] = []
        elsewhere: list[Path] = []
        for path in share:
            sid = path.stem
            if not claim(sid, wait):
                elsewhere.append(path)
                continue
            store = PatchStore(path)
            try:
                if not cfg.overwrite and _is_done(features.h5(sid), store, encoder, cfg):
                    record(EmbedResult(sid, "skipped", len(store)))
                    store.close()
                elif len(store) == 0:
                    _write(features.h5(sid), np.zeros((0, encoder.feature_dim), np.float32),
                           store.coords[:0], store, encoder, 0, cfg.stain_norm)
                    record(EmbedResult(sid, "ok", 0))
                    store.close()
                else:
                    pending.append(store)
            except GigamilError as exc:
                record(EmbedResult(sid, "failed", error=str(exc)))
        return pending, elsewhere

    share = list(select_share(paths, cfg.shard, cfg.rank, cfg.world_size))
    _allow_open_files(len(share))  # one claim held per slide until its bag is written
    try:
        pending, elsewhere = select(share, wait=False)
        _embed_pending(pending, encoder, cfg, device, features, record, on_batch)
        if elsewhere:  # two runs on one output: wait for the other, then finish its misses
            log.info("%d slide(s) being embedded by another process: waiting for it",
                     len(elsewhere))
            pending, _ = select(elsewhere, wait=True)
            _embed_pending(pending, encoder, cfg, device, features, record, on_batch)
    finally:
        for stack in claims.values():
            stack.close()
    return results


def _allow_open_files(n: int) -> None:
    """Raise the soft limit on open files to hold ``n`` claims (up to the hard limit)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = n + 256
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(hard, want)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))


def _embed_pending(pending: list[PatchStore], encoder: Encoder, cfg: EmbedConfig,
                   device: torch.device, features: FeatureDir,
                   record: Callable[[EmbedResult], None],
                   on_batch: Callable[[int], None] | None) -> None:
    """Embed ``pending`` (stain normalizers fitted once per slide first, if asked)."""
    normalizers = None
    if cfg.stain_norm is not None:  # fitted once per slide; a slide that cannot be fitted fails
        fitted = []
        for store in list(pending):
            try:
                fitted.append(_fit_stain(store, cfg))
            except Exception as exc:
                pending.remove(store)
                record(EmbedResult(store.path.stem, "failed", error=str(exc)))
        normalizers = fitted
    if pending:
        _run(pending, normalizers, encoder, cfg, device, features, record, on_batch)


def _write(path: Path, feats: np.ndarray, coords: np.ndarray, store: PatchStore,
           encoder: Encoder, n_bad: int, stain_norm: str | None,
           scales: list[ScaleBag] | None = None) -> None:
    attrs = {**trident_attrs(store.meta), "encoder": encoder.spec.name, "stain_norm": stain_norm or "",
             "store_mtime": int(store.path.stat().st_mtime),
             "encoder_weights": "file" if encoder.weights_sha256 else "random-init",
             "encoder_arch": encoder.spec.arch, "encoder_sha256": encoder.weights_sha256 or "",
             "feature_dim": encoder.feature_dim, "store_count": len(store), "n_bad": n_bad,
             "scales_embedded": [float(sc.mpp) for sc in scales or []]}
    write_bag(path, feats, coords, attrs, scales)


def _entries(stores: list[PatchStore], cfg: EmbedConfig) -> tuple[list[PatchStore], list[int]]:
    """What the loader streams: each slide's primary store, then (``--scales all``) a view
    of each of its other scales; and the slide each entry belongs to."""
    entries, owner = [], []
    for j, store in enumerate(stores):
        entries.append(store)
        owner.append(j)
        if cfg.scales == "all":
            for mpp in store.scales[1:]:
                entries.append(PatchStore(store.path, mpp=mpp))
                owner.append(j)
    return entries, owner


def _run(stores: list[PatchStore], normalizers: list[Any] | None, encoder: Encoder,
         cfg: EmbedConfig, device: torch.device, features: FeatureDir,
         record: Callable[[EmbedResult], None], on_batch: Callable[[int], None] | None) -> None:
    entries, owner = _entries(stores, cfg)
    counts = [len(e) for e in entries]
    loader = DataLoader(
        _Patches(entries, [normalizers[j] for j in owner] if normalizers else None),
        batch_size=cfg.batch_size, shuffle=False,
        num_workers=cfg.workers, pin_memory=device.type == "cuda",
        persistent_workers=cfg.workers > 0, prefetch_factor=4 if cfg.workers > 0 else None,
        multiprocessing_context="spawn" if cfg.workers > 0 else None,
    )
    model: Callable[..., torch.Tensor] = encoder.model
    if cfg.compile:
        model = torch.compile(model)
    dtype = cfg.autocast_dtype(device)
    slides = _SlideBags(stores, entries, owner, encoder, features, record, cfg.stain_norm)
    for k, n in enumerate(counts):
        if n == 0:  # an empty extra scale: done before it starts
            slides.entry_done(k, [], [], 0)
    feats: dict[int, list[np.ndarray]] = {}
    ok_rows: dict[int, list[np.ndarray]] = {}
    seen = [0] * len(entries)
    bad = [0] * len(entries)
    with torch.inference_mode():
        for patches, ok, entry_idx, patch_idx in loader:
            x = encoder.preprocess(patches.to(device, non_blocking=True))
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                out = model(x).float().cpu().numpy()
            ok = ok.numpy().astype(bool)
            e_idx, p_idx = entry_idx.numpy(), patch_idx.numpy()
            for k in np.unique(e_idx):
                k = int(k)
                slides.start(owner[k])
                sel = e_idx == k
                good = sel & ok
                feats.setdefault(k, []).append(out[good])
                ok_rows.setdefault(k, []).append(p_idx[good])
                seen[k] += int(sel.sum())
                bad[k] += int((sel & ~ok).sum())
                if seen[k] == counts[k]:  # the entry is complete (and maybe its slide)
                    slides.entry_done(k, feats.pop(k), ok_rows.pop(k), bad[k])
            if on_batch is not None:
                on_batch(len(p_idx))


def _fit_stain(store: PatchStore, cfg: EmbedConfig) -> Any:
    """A normalizer fitted once on up to 64 evenly spaced patches of the slide."""
    from gigamil.wsi.stain import create_stain_normalizer

    norm = create_stain_normalizer(cfg.stain_norm or "macenko", cfg.stain_reference)
    idx = np.linspace(0, len(store) - 1, min(64, len(store))).astype(int)
    norm.fit_slide(np.concatenate([store[int(i)] for i in idx], axis=0))
    return norm


class _SlideBags:
    """Collects each slide's entries (its scales) as they complete; writes the slide's
    bag as soon as the last one is done."""

    def __init__(self, stores: list[PatchStore], entries: list[PatchStore], owner: list[int],
                 encoder: Encoder, features: FeatureDir, record: Callable[[EmbedResult], None],
                 stain_norm: str | None) -> None:
        self.stores, self.entries, self.owner = stores, entries, owner
        self.encoder, self.features, self.record = encoder, features, record
        self.stain_norm = stain_norm
        self.done: dict[int, tuple[np.ndarray, np.ndarray, int]] = {}
        self.started: dict[int, float] = {}

    def start(self, j: int) -> None:
        self.started.setdefault(j, time.perf_counter())

    def entry_done(self, k: int, feats: list[np.ndarray], rows: list[np.ndarray],
                   bad: int) -> None:
        dim = self.encoder.feature_dim
        self.done[k] = (np.concatenate(feats) if feats else np.zeros((0, dim), np.float32),
                        np.concatenate(rows) if rows else np.zeros(0, np.int64), bad)
        j = self.owner[k]
        mine = [i for i, o in enumerate(self.owner) if o == j]
        if all(i in self.done for i in mine):
            self._write(j, [self.done.pop(i) for i in mine], [self.entries[i] for i in mine])

    def _write(self, j: int, parts: list[tuple[np.ndarray, np.ndarray, int]],
               views: list[PatchStore]) -> None:
        store = self.stores[j]
        sid = store.path.stem
        (f, idx, bad), extra = parts[0], parts[1:]
        res = EmbedResult(sid, "ok", len(f), sum(p[2] for p in parts))
        try:
            if not all(np.isfinite(p[0]).all() for p in parts):
                raise StoreError(f"{sid}: the encoder produced NaN/inf features",
                                 "check the weights, or use --precision fp32")
            coords = store.coords[idx]
            scales = [_scale_bag(store, view, coords, ef, eidx)
                      for view, (ef, eidx, _) in zip(views[1:], extra)]
            _write(self.features.h5(sid), f, coords, store, self.encoder, bad, self.stain_norm,
                   scales)
            if res.n_bad:
                res.error = f"{res.n_bad} corrupt patch(es) skipped"
                log.warning("%s: %d corrupt patches skipped", sid, res.n_bad)
        except Exception as exc:
            if is_disk_full(exc):  # every later bag would fail too: stop here
                raise DiskFullError(self.features.root) from exc
            res.status, res.error = "failed", str(exc)
        res.seconds = time.perf_counter() - self.started.get(j, time.perf_counter())
        for view in views:
            view.close()
        self.record(res)


def _scale_bag(store: PatchStore, view: PatchStore, coords: np.ndarray, feats: np.ndarray,
               rows: np.ndarray) -> ScaleBag:
    """An extra scale's features, and each primary patch's parent among its patches
    (-1 when the scale is not coarser than the primary one)."""
    meta = store.meta
    mpp = float(view.mpp or 0.0)
    size0 = float(meta["patch_size"]) * mpp / float(meta["level0_mpp"])
    scale_coords = view.coords[rows]
    parent = (parent_index(coords, float(meta["patch_size_level0"]), scale_coords, size0)
              if mpp > float(store.mpp or 0.0) else np.full(len(coords), -1, np.int64))
    return ScaleBag(mpp, feats, scale_coords, size0, parent)


def forward_patches(encoder: Encoder, patches: Sequence[np.ndarray] | np.ndarray,
                    device: torch.device,
                    dtype: torch.dtype | None) -> np.ndarray:
    """Features (B, D) of a batch of uint8 HWC patches: preprocess, encode under autocast."""
    batch = np.stack(list(patches))  # a fresh, writable copy (Ray's chunks are read-only)
    x = encoder.preprocess(torch.from_numpy(batch).to(device))
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype,
                                                enabled=dtype is not None):
        return encoder.model(x).float().cpu().numpy()
