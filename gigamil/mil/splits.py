"""Patient-grouped cross-validation splits of a label table.

    folds = make_folds(table, n_folds=5, seed=0)          # stratified, grouped by patient
    write_splits("runs/crc1/splits.csv", table, folds)

Every random choice is derived from ``seed`` alone, so the same labels always give
the same folds.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gigamil.errors import UsageError
from gigamil.mil.labels import PARTITIONS, LabelTable, abbreviate_ids

__all__ = ["Fold", "make_folds", "write_splits"]


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
            raise UsageError(f"patients {abbreviate_ids(mixed)} have slides from several sites",
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
