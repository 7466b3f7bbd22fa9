"""Bag datasets, batches and batch samplers for MIL training.

    ds = BagDataset([paths[s] for s in fold.train], targets, max_instances=4096, seed=0)
    sampler = BagBatchSampler(targets, lengths, batch_size=8, seed=0, rank=r, world_size=w)
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate_bags)

Every random choice (order, balanced draws, instance subsampling) is derived from
``(seed, epoch, …)`` alone, so a resumed run sees exactly the batches an
uninterrupted run would, on any number of ranks and data-loader workers.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from gigamil.errors import UsageError
from gigamil.wsi.features import bag_header, read_bag

__all__ = ["BagDataset", "BagBatch", "collate_bags", "BagBatchSampler", "parent_rows",
           "bag_dim"]


@dataclass
class BagBatch:
    """A batch of bags, packed: the real instances of all bags back to back.

    ``packed`` (ΣN, D), ``lengths`` (B,), ``targets`` (B, W) float (label-matrix rows,
    NaN = missing; a class index for one classification target), dataset ``index`` (B,). Only
    real instances are copied between host and device; :meth:`padded` lays them out
    as (B, N_max, D) with a mask where the batch lives (on the GPU, for GPU training).
    """

    packed: torch.Tensor
    lengths: torch.Tensor
    targets: torch.Tensor
    index: torch.Tensor

    def to(self, device: torch.device) -> BagBatch:
        nb = device.type == "cuda"
        return BagBatch(self.packed.to(device, non_blocking=nb), self.lengths.to(device),
                        self.targets.to(device), self.index)

    def padded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(features (B, N_max, D) zero-padded, mask (B, N_max) True on real instances)."""
        lengths = self.lengths
        n = max(1, int(lengths.max())) if len(lengths) else 1
        mask = torch.arange(n, device=lengths.device)[None, :] < lengths[:, None]
        feats = self.packed.new_zeros(len(lengths), n, self.packed.shape[-1])
        feats[mask] = self.packed  # row-major order of the mask = the packing order
        return feats, mask


class BagDataset(Dataset):
    """Bags read from feature files; items are addressed as ``(index, epoch)``.

    With ``max_instances`` a bag longer than that is randomly subsampled; the draw
    depends only on ``(seed, epoch, index)``. ``preload`` keeps every bag in memory
    (for small cohorts and benchmarks), on ``preload_device`` (the GPU, to take the
    host out of the loop; use no data-loader workers then).
    """

    def __init__(self, paths: Sequence[str | os.PathLike[str]],
                 targets: Sequence[int] | np.ndarray, max_instances: int | None = None,
                 seed: int = 0, preload: bool = False,
                 preload_device: torch.device | str = "cpu", layout: str = "instances") -> None:
        if len(paths) != len(targets):
            raise ValueError("paths and targets differ in length")
        self.layout = layout  # "parent": rows [fine | coarse parent] (see parent_rows)
        self.paths = [Path(p) for p in paths]
        y = np.asarray(targets, np.float64)
        self.targets = y.reshape(len(y), -1) if y.size else y.reshape(len(paths), 1)
        self.max_instances = max_instances
        self.seed = seed
        self._cache: dict[int, torch.Tensor] = {}
        if preload:
            for i in range(len(self.paths)):
                self._cache[i] = self._read(i).to(preload_device)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def on_device(self) -> bool:
        """True when the bags are preloaded on a GPU (data-loader workers cannot be used)."""
        return any(t.device.type != "cpu" for t in self._cache.values())

    def lengths(self) -> list[int]:
        """Instances per bag, from the file headers (no feature data is read)."""
        out = []
        for i, p in enumerate(self.paths):
            if i in self._cache:
                out.append(len(self._cache[i]))
                continue
            header = bag_header(p)
            out.append(header[1] if header else len(read_bag(p)))
        return out

    def _read(self, i: int) -> torch.Tensor:
        bag = read_bag(self.paths[i])
        feats = bag.features
        if self.layout == "parent":
            feats = parent_rows(self.paths[i], feats, float(bag.attrs.get("mpp", 0.0)))
        return torch.from_numpy(np.ascontiguousarray(feats, np.float32))


    def __getitem__(self, item: tuple[int, int] | int) -> tuple[torch.Tensor, np.ndarray, int]:
        i, epoch = item if isinstance(item, tuple) else (item, -1)
        feats = self._cache[i] if i in self._cache else self._read(i)
        if self.max_instances and epoch >= 0 and len(feats) > self.max_instances:
            rng = np.random.default_rng([self.seed, epoch, i])
            keep = np.sort(rng.choice(len(feats), self.max_instances, replace=False))
            feats = feats[torch.from_numpy(keep).to(feats.device)]
        return feats, self.targets[i], i


def parent_rows(path: Path, fine: np.ndarray, mpp: float) -> np.ndarray:
    """(N, 2D) rows ``[fine feature | its parent's feature in the coarsest scale]`` of a
    file embedded with ``--scales all`` (``mpp``: its primary scale); a patch whose parent
    was not kept repeats its own feature (a region of one)."""
    from gigamil.wsi.features import read_scales

    coarser = [sc for sc in read_scales(path) if sc.mpp > mpp]
    if not coarser:
        raise UsageError(f"{path.name} holds one scale: the model needs each patch's parent "
                         "in a coarser scale",
                         "extract with several --mpp (e.g. 0.5,2.0), then embed --scales all")
    sc = coarser[-1]
    parent = np.where(sc.parent >= 0, sc.parent, 0)
    coarse = sc.features[parent] if len(sc.features) else np.zeros_like(fine)
    coarse = np.where((sc.parent >= 0)[:, None], coarse, fine)
    return np.concatenate([fine, coarse], axis=1)


def bag_dim(path: Path, layout: str = "instances") -> int:
    """The width of a bag's instance rows: the feature dimension (twice it for ``parent``),
    from the dataset shape (no data is read)."""
    import h5py

    with h5py.File(path, "r") as f:
        key = "features" if "features" in f else "feats"
        dim = int(f[key].shape[-1])
        if layout == "parent" and "scales" not in f:
            raise UsageError(f"{path.name} holds one scale: the model needs each patch's "
                             "parent in a coarser scale",
                             "extract with several --mpp (e.g. 0.5,2.0), then embed "
                             "--scales all")
    return 2 * dim if layout == "parent" else dim


def collate_bags(items: Sequence[tuple[torch.Tensor, np.ndarray, int]]) -> BagBatch:
    """Pack the bags of a batch back to back (see :class:`BagBatch`)."""
    return BagBatch(torch.cat([f for f, _, _ in items]),
                    torch.tensor([len(f) for f, _, _ in items], dtype=torch.long),
                    torch.from_numpy(np.stack([t for _, t, _ in items]).astype(np.float32)),
                    torch.tensor([i for _, _, i in items], dtype=torch.long))


class BagBatchSampler(Sampler[list[tuple[int, int]]]):
    """Global batches of ``batch_size`` bags, each split evenly across the ranks.

    The global batches depend only on ``(seed, epoch)``, never on the world size:
    a 2-rank run sees the same batches as a 1-rank run. Training (``shuffle=True``)
    drops the last incomplete batch; ``balanced`` draws bags with replacement with
    equal probability per class; ``bucket`` groups bags of similar length to cut
    padding. ``set_epoch(epoch, start)`` skips the first ``start`` batches (resume).
    Evaluation (``shuffle=False``) yields every bag once, in order, in batches.
    """

    def __init__(self, targets: Sequence[int] | np.ndarray,
                 lengths: Sequence[int] | None = None,
                 batch_size: int = 8, shuffle: bool = True, balanced: bool = False,
                 bucket: bool = False, seed: int = 0, rank: int = 0, world_size: int = 1
                 ) -> None:
        self.targets = np.asarray(targets, np.int64).reshape(-1)  # strata (--balanced-sampler)
        self.lengths = np.asarray(lengths if lengths is not None else np.ones(len(targets)))
        n = len(self.targets)
        if shuffle:
            usable = max(world_size, n - n % world_size)
            batch_size = min(batch_size, usable)
        if shuffle and batch_size % world_size:
            raise UsageError(f"--batch-size {batch_size} is not divisible by {world_size} ranks",
                             "the batch size is global; make it a multiple of the number of GPUs")
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.balanced = balanced
        self.bucket = bucket
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch = epoch
        self.start = start

    def global_batches(self, epoch: int) -> list[list[int]]:
        n = len(self.targets)
        if not self.shuffle:
            return [list(range(i, min(i + self.batch_size, n))) for i in range(0, n, self.batch_size)]
        rng = np.random.default_rng([self.seed, epoch, 7])
        if self.balanced:
            counts = np.bincount(self.targets)
            p = 1.0 / counts[self.targets]
            order = rng.choice(n, size=n, replace=True, p=p / p.sum())
        else:
            order = rng.permutation(n)
        n_batches = max(1, len(order) // self.batch_size)
        order = order[: n_batches * self.batch_size]
        if self.bucket:  # sort within chunks of 50 batches by length, then shuffle the batches
            chunk = 50 * self.batch_size
            parts = [sorted(order[i : i + chunk], key=lambda j: self.lengths[j])
                     for i in range(0, len(order), chunk)]
            order = np.concatenate(parts)
        batches = [order[i * self.batch_size : (i + 1) * self.batch_size].tolist()
                   for i in range(n_batches)]
        if self.bucket:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def _local(self, batch: list[int]) -> list[int]:
        if not self.shuffle:  # evaluation: ranks take interleaved bags (gathered afterwards)
            return batch[self.rank :: self.world_size]
        per = len(batch) // self.world_size
        return batch[self.rank * per : (self.rank + 1) * per]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = self.epoch if self.shuffle else -1
        for batch in self.global_batches(self.epoch)[self.start :]:
            local = self._local(batch)
            if local:
                yield [(i, epoch) for i in local]

    def __len__(self) -> int:
        return max(0, len(self.global_batches(self.epoch)) - self.start)
