"""Labels, patient-grouped splits, bag datasets and batch samplers for MIL training.

    table = read_labels("labels.csv")                    # slide_id,label[,patient_id,site,split]
    table, paths = match_features(table, "features/resnet50")
    folds = make_folds(table, n_folds=5, seed=0)          # stratified, grouped by patient
    ds = BagDataset([paths[s] for s in fold.train], targets, max_instances=4096, seed=0)
    sampler = BagBatchSampler(targets, lengths, batch_size=8, seed=0, rank=r, world_size=w)
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate_bags)

Every random choice (order, balanced draws, instance subsampling) is derived from
``(seed, epoch, …)`` alone, so a resumed run sees exactly the batches an
uninterrupted run would, on any number of ranks and data-loader workers.
"""

from __future__ import annotations

import csv
import logging
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from gigamil.errors import UsageError
from gigamil.wsi.features import bag_header, read_bag

__all__ = [
    "LabeledSlide",
    "LabelTable",
    "read_labels",
    "match_features",
    "Fold",
    "make_folds",
    "write_splits",
    "BagDataset",
    "BagBatch",
    "collate_bags",
    "BagBatchSampler",
    "class_weights",
]

log = logging.getLogger(__name__)

PARTITIONS = ("train", "val", "test")


@dataclass(frozen=True)
class LabeledSlide:
    slide_id: str
    label: str
    patient_id: str
    site: str | None = None
    split: str | None = None


@dataclass
class LabelTable:
    """The labelled slides and the class names (sorted; the class index is the position)."""

    slides: list[LabeledSlide]
    classes: list[str]

    def __len__(self) -> int:
        return len(self.slides)

    def target(self, slide: LabeledSlide) -> int:
        return self.classes.index(slide.label)

    def by_id(self) -> dict[str, LabeledSlide]:
        return {s.slide_id: s for s in self.slides}

    def subset(self, ids: Sequence[str]) -> LabelTable:
        keep = set(ids)
        return LabelTable([s for s in self.slides if s.slide_id in keep], self.classes)


def _check_classes(table: LabelTable, where: str) -> None:
    counts = Counter(s.label for s in table.slides)
    if len(counts) < 2:
        raise UsageError(f"{where} has a single class ({', '.join(counts) or 'none'})",
                         "MIL training needs at least two classes in the label column")
    empty = [c for c in table.classes if counts[c] == 0]
    if empty:
        raise UsageError(f"class {', '.join(map(repr, empty))} has no slides {where}",
                         "add slides of that class, or drop it from the labels")


def read_labels(path: str | os.PathLike[str], label_column: str = "label",
                classes: Sequence[str] | None = None) -> LabelTable:
    """Read the labels CSV (``slide_id,label`` plus optional ``patient_id,site,split``).

    ``patient_id`` defaults to the slide id. ``classes`` fixes the class order and makes
    a class with no slide an error; by default the classes are the sorted label values.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"labels file {path} does not exist",
                         "give a CSV with columns slide_id,label[,patient_id,site,split]")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        columns = [c.strip() for c in reader.fieldnames or []]
        rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    missing = [c for c in ("slide_id", label_column) if c not in columns]
    if missing:
        raise UsageError(f"{path.name} has no column {', '.join(missing)} (it has: "
                         f"{', '.join(columns) or 'nothing'})",
                         "the labels CSV needs slide_id and label columns"
                         + ("; pick another with --label-column" if label_column in missing else ""))
    slides: dict[str, LabeledSlide] = {}
    blank = 0
    for line, row in enumerate(rows, start=2):
        sid, label = row["slide_id"], row[label_column]
        if not sid or not label:
            blank += 1
            continue
        split = row.get("split") or None
        if split is not None and split not in PARTITIONS:
            raise UsageError(f"{path.name} line {line}: split {split!r} is not train, val or test",
                             "fix the split column or remove it")
        slide = LabeledSlide(sid, label, row.get("patient_id") or sid, row.get("site") or None,
                             split)
        if sid in slides and slides[sid] != slide:
            raise UsageError(f"{path.name}: slide {sid!r} appears twice with different values",
                             "keep one row per slide")
        slides[sid] = slide
    if blank:
        log.warning("%s: %d rows without a slide id or label were skipped", path.name, blank)
    if not slides:
        raise UsageError(f"{path.name} has no labelled slides", "add rows slide_id,label")
    found = sorted({s.label for s in slides.values()})
    if classes is not None:
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise UsageError(f"labels {unknown} are not among the classes {list(classes)}",
                             "add them to --classes or fix the labels")
    table = LabelTable(list(slides.values()), list(classes) if classes else found)
    patients: dict[str, str] = {}
    for s in table.slides:
        if patients.setdefault(s.patient_id, s.label) != s.label:
            log.info("patient %s has slides with different labels", s.patient_id)
    _check_classes(table, f"in {path.name}")
    return table


def _short(ids: Sequence[str], n: int = 8) -> str:
    ids = sorted(ids)
    return ", ".join(ids[:n]) + (f", … ({len(ids) - n} more)" if len(ids) > n else "")


def match_features(table: LabelTable, features_dir: str | os.PathLike[str]
                   ) -> tuple[LabelTable, dict[str, Path]]:
    """Keep the labelled slides that have a feature file; warn once about the rest."""
    features_dir = Path(features_dir)
    if not features_dir.is_dir():
        raise UsageError(f"feature directory {features_dir} does not exist",
                         "run `gigamil embed` first, and pass features/<encoder>")
    files = {p.stem: p for p in sorted(features_dir.glob("*.h5"))}
    if not files:
        raise UsageError(f"no .h5 feature files in {features_dir}",
                         "pass the folder that `gigamil embed` wrote, e.g. data/features/resnet50")
    labelled = {s.slide_id for s in table.slides}
    no_features = sorted(labelled - files.keys())
    no_label = sorted(files.keys() - labelled)
    if no_features or no_label:
        parts = []
        if no_features:
            parts.append(f"{len(no_features)} labelled slides have no features ({_short(no_features)})")
        if no_label:
            parts.append(f"{len(no_label)} feature files have no label ({_short(no_label)})")
        log.warning("; ".join(parts) + " — they are left out")
    kept = table.subset(sorted(labelled & files.keys()))
    if not kept.slides:
        raise UsageError(f"none of the labelled slides has a feature file in {features_dir}",
                         "check that slide_id in the labels matches the .h5 file names")
    _check_classes(kept, "among the slides with features")
    return kept, {s.slide_id: files[s.slide_id] for s in kept.slides}


@dataclass(frozen=True)
class Fold:
    """One cross-validation fold: slide ids per partition (``val`` may be empty)."""

    index: int
    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]

    def partition(self, name: str) -> tuple[str, ...]:
        return {"train": self.train, "val": self.val, "test": self.test}[name]


def _assign(groups: dict[str, np.ndarray], n_bins: int, rng: np.random.Generator
            ) -> dict[str, int]:
    """Greedy stratified assignment of whole groups (patients) to ``n_bins`` bins.

    Groups go largest first (random among equals) to the bin whose share of the
    group's classes is lowest, so every bin gets about 1/n of every class.
    """
    names = list(groups)
    rng.shuffle(names)
    names.sort(key=lambda g: -int(groups[g].sum()))  # stable: random order among equal sizes
    totals = np.maximum(sum(groups.values()), 1).astype(np.float64)
    fill = np.zeros((n_bins, len(totals)))
    out = {}
    for g in names:
        counts = groups[g]
        cost = ((fill + counts) / totals * (counts > 0)).sum(1) + 1e-9 * fill.sum(1)
        b = int(np.argmin(cost))
        fill[b] += counts
        out[g] = b
    return out


def _group_counts(table: LabelTable, ids: Sequence[str], key: str) -> dict[str, np.ndarray]:
    by_id = table.by_id()
    groups: dict[str, np.ndarray] = {}
    for sid in ids:
        s = by_id[sid]
        g = getattr(s, key)
        groups.setdefault(g, np.zeros(len(table.classes), np.int64))[table.target(s)] += 1
    return groups


def _members(table: LabelTable, ids: Sequence[str], key: str, chosen: set[str]) -> tuple[str, ...]:
    by_id = table.by_id()
    return tuple(sorted(sid for sid in ids if getattr(by_id[sid], key) in chosen))


def _split_val(table: LabelTable, pool: Sequence[str], val_frac: float,
               rng: np.random.Generator) -> tuple[tuple[str, ...], tuple[str, ...]]:
    if val_frac <= 0:
        return tuple(sorted(pool)), ()
    groups = _group_counts(table, pool, "patient_id")
    n_bins = max(2, round(1 / val_frac))
    if len(groups) < n_bins:
        return tuple(sorted(pool)), ()
    bins = _assign(groups, n_bins, rng)
    val = {g for g, b in bins.items() if b == 0}
    val_ids = _members(table, pool, "patient_id", val)
    return tuple(sorted(set(pool) - set(val_ids))), val_ids


def make_folds(table: LabelTable, n_folds: int = 5, seed: int = 0, val_frac: float = 0.15,
               by: str = "patient") -> list[Fold]:
    """Cross-validation folds, no patient in two partitions.

    - ``by="patient"``: stratified k-fold over patients; in each fold one part is the
      test set and ``val_frac`` of the other patients (stratified) the validation set.
    - ``by="site"``: one fold per site, holding that site out as the test set.
    - A ``split`` column in the labels overrides both: one fold with its partitions.
    """
    ids = [s.slide_id for s in table.slides]
    rng = np.random.default_rng(seed)
    if any(s.split for s in table.slides):
        if not all(s.split for s in table.slides):
            raise UsageError("the split column is filled for some slides only",
                             "give every slide train, val or test, or remove the column")
        parts = {p: tuple(sorted(s.slide_id for s in table.slides if s.split == p))
                 for p in PARTITIONS}
        if not parts["train"]:
            raise UsageError("the split column names no train slides", "mark some slides train")
        _check_patients_disjoint(table, parts)
        return [Fold(0, parts["train"], parts["val"], parts["test"])]
    if by == "site":
        if not all(s.site for s in table.slides):
            raise UsageError("site-held-out folds need a site for every slide",
                             "fill the site column, or use --cv patient")
        patient_sites: dict[str, set[str]] = {}
        for s in table.slides:
            patient_sites.setdefault(s.patient_id, set()).add(s.site or "")
        mixed = [p for p, v in patient_sites.items() if len(v) > 1]
        if mixed:
            raise UsageError(f"patients {_short(mixed)} have slides from several sites",
                             "a patient must belong to one site for site-held-out validation")
        sites = sorted({s.site or "" for s in table.slides})
        if len(sites) < 2:
            raise UsageError("site-held-out validation needs at least two sites",
                             "use --cv patient")
        folds = []
        for k, site in enumerate(sites):
            test = _members(table, ids, "site", {site})
            pool = sorted(set(ids) - set(test))
            train, val = _split_val(table, pool, val_frac, rng)
            folds.append(Fold(k, train, val, test))
        return folds
    if by != "patient":
        raise UsageError(f"--cv {by!r} is not patient or site")
    groups = _group_counts(table, ids, "patient_id")
    if n_folds < 2:
        raise UsageError("--folds must be at least 2", "or give a split column in the labels")
    if len(groups) < n_folds:
        raise UsageError(f"{len(groups)} patients cannot make {n_folds} folds",
                         "lower --folds")
    bins = _assign(groups, n_folds, rng)
    folds = []
    for k in range(n_folds):
        test = _members(table, ids, "patient_id", {g for g, b in bins.items() if b == k})
        pool = sorted(set(ids) - set(test))
        train, val = _split_val(table, pool, val_frac, rng)
        folds.append(Fold(k, train, val, test))
    return folds


def _check_patients_disjoint(table: LabelTable, parts: dict[str, tuple[str, ...]]) -> None:
    by_id = table.by_id()
    seen: dict[str, str] = {}
    for name, ids in parts.items():
        for sid in ids:
            other = seen.setdefault(by_id[sid].patient_id, name)
            if other != name:
                raise UsageError(f"patient {by_id[sid].patient_id} is in both {other} and {name}",
                                 "put all slides of a patient in one partition")


def write_splits(path: str | os.PathLike[str], table: LabelTable, folds: Sequence[Fold]) -> None:
    """``splits.csv``: fold, partition, slide_id, patient_id, label (one row per slide and fold)."""
    from gigamil.io import write_csv

    by_id = table.by_id()
    rows = [{"fold": f.index, "partition": p, "slide_id": sid,
             "patient_id": by_id[sid].patient_id, "label": by_id[sid].label}
            for f in folds for p in PARTITIONS for sid in f.partition(p)]
    write_csv(path, rows, ["fold", "partition", "slide_id", "patient_id", "label"])


def class_weights(targets: Sequence[int], n_classes: int) -> torch.Tensor:
    """Inverse-frequency weights ``n / (C · n_c)`` (1 for a balanced set)."""
    counts = np.bincount(np.asarray(targets, np.int64), minlength=n_classes).astype(np.float64)
    w = len(targets) / (n_classes * np.maximum(counts, 1))
    return torch.tensor(w, dtype=torch.float32)


@dataclass
class BagBatch:
    """A batch of bags, packed: the real instances of all bags back to back.

    ``packed`` (ΣN, D), ``lengths`` (B,), ``targets`` (B,), dataset ``index`` (B,). Only
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

    def __init__(self, paths: Sequence[str | os.PathLike[str]], targets: Sequence[int],
                 max_instances: int | None = None, seed: int = 0, preload: bool = False,
                 preload_device: torch.device | str = "cpu") -> None:
        if len(paths) != len(targets):
            raise ValueError("paths and targets differ in length")
        self.paths = [Path(p) for p in paths]
        self.targets = [int(t) for t in targets]
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
        return torch.from_numpy(np.ascontiguousarray(read_bag(self.paths[i]).features, np.float32))

    def __getitem__(self, item: tuple[int, int] | int) -> tuple[torch.Tensor, int, int]:
        i, epoch = item if isinstance(item, tuple) else (item, -1)
        feats = self._cache[i] if i in self._cache else self._read(i)
        if self.max_instances and epoch >= 0 and len(feats) > self.max_instances:
            rng = np.random.default_rng([self.seed, epoch, i])
            keep = np.sort(rng.choice(len(feats), self.max_instances, replace=False))
            feats = feats[torch.from_numpy(keep).to(feats.device)]
        return feats, self.targets[i], i


def collate_bags(items: Sequence[tuple[torch.Tensor, int, int]]) -> BagBatch:
    """Pack the bags of a batch back to back (see :class:`BagBatch`)."""
    return BagBatch(torch.cat([f for f, _, _ in items]),
                    torch.tensor([len(f) for f, _, _ in items], dtype=torch.long),
                    torch.tensor([t for _, t, _ in items], dtype=torch.long),
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

    def __init__(self, targets: Sequence[int], lengths: Sequence[int] | None = None,
                 batch_size: int = 8, shuffle: bool = True, balanced: bool = False,
                 bucket: bool = False, seed: int = 0, rank: int = 0, world_size: int = 1
                 ) -> None:
        self.targets = np.asarray(targets, np.int64)
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
