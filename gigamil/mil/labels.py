"""The labels CSV of a cohort, and its match with the feature files.

    table = read_labels("labels.csv", targets)     # slide_id,<targets>[,patient_id,site,split]
    table, paths = match_features(table, "features/resnet50")
    table.y(slide)                                 # its label-matrix row (NaN = missing)

``label`` of a slide is what folds are stratified on: the first target's class (survival:
its event indicator); ``classes`` are those strata. For one classification target they
are its classes.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gigamil.errors import UsageError
from gigamil.mil.targets import Classification, Target, split_columns

__all__ = [
    "PARTITIONS",
    "LabeledSlide",
    "LabelTable",
    "read_labels",
    "match_features",
    "abbreviate_ids",
]

log = logging.getLogger(__name__)

PARTITIONS = ("train", "val", "test")


@dataclass(frozen=True)
class LabeledSlide:
    slide_id: str
    label: str  # the stratum (see the module doc)
    patient_id: str
    site: str | None = None
    split: str | None = None
    values: tuple[float, ...] = ()  # label-matrix row: every target's values, NaN = missing


@dataclass
class LabelTable:
    """The labelled slides, the strata (sorted; the index is the position) and the targets."""

    slides: list[LabeledSlide]
    classes: list[str]
    targets: list[Target] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.slides)

    def target(self, slide: LabeledSlide) -> int:
        return self.classes.index(slide.label)

    def by_id(self) -> dict[str, LabeledSlide]:
        return {s.slide_id: s for s in self.slides}

    def subset(self, ids: Sequence[str]) -> LabelTable:
        keep = set(ids)
        return LabelTable([s for s in self.slides if s.slide_id in keep], self.classes,
                          self.targets)

    def y(self, ids: Sequence[str] | None = None) -> np.ndarray:
        """The label matrix (n, Σ width) of ``ids`` (default every slide), NaN = missing."""
        by_id = self.by_id()
        rows = [by_id[i] for i in ids] if ids is not None else self.slides
        width = split_columns(self.targets)
        return np.array([s.values for s in rows], np.float64).reshape(len(rows), width)


def _check_targets(table: LabelTable, where: str) -> None:
    y = table.y()
    for t in table.targets:
        t.finish_parsing(y[:, t.columns], where)


def read_labels(path: str | os.PathLike[str], targets: Sequence[Target] | str = "label",
                classes: Sequence[str] | None = None) -> LabelTable:
    """Read the labels CSV (``slide_id`` and the targets' columns, plus optional
    ``patient_id,site,split``).

    ``targets`` are laid out (:func:`~gigamil.mil.targets.layout_targets`); a column name
    means one classification target. ``patient_id`` defaults to the slide id. A target's
    ``classes`` fix the class order; by default they are the sorted label values. A slide
    with some targets empty keeps the others (the empty ones are masked).
    """
    from gigamil.mil.targets import layout_targets

    if isinstance(targets, str):
        targets = [Classification(targets, column=targets, classes=list(classes or []))]
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"labels file {path} does not exist",
                         "give a CSV with columns slide_id,label[,patient_id,site,split]")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        columns = [c.strip() for c in reader.fieldnames or []]
        rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    wanted = ["slide_id", *(c for t in targets for c in t.csv_columns)]
    missing = [c for c in wanted if c not in columns]
    if missing:
        raise UsageError(f"{path.name} has no column {', '.join(missing)} (it has: "
                         f"{', '.join(columns) or 'nothing'})",
                         "the labels CSV needs slide_id and each target's columns; pick them "
                         "with --label-column / --target (survival: NAME_time, NAME_event, "
                         "or --time-column/--event-column)")
    for t in targets:
        t.prepare(rows, f"in {path.name}")
    targets = layout_targets(targets)
    slides: dict[str, LabeledSlide] = {}
    blank = 0
    first = targets[0]
    for line, row in enumerate(rows, start=2):
        sid = row["slide_id"]
        where = f"{path.name} line {line}"
        values = [v for t in targets for v in t.parse(row, where)]
        if not sid or all(np.isnan(values)):
            blank += 1
            continue
        split = row.get("split") or None
        if split is not None and split not in PARTITIONS:
            raise UsageError(f"{where}: split {split!r} is not train, val or test",
                             "fix the split column or remove it")
        stratum = first.stratum(np.asarray(values[first.columns], np.float64))
        slide = LabeledSlide(sid, stratum, row.get("patient_id") or sid, row.get("site") or None,
                             split, tuple(values))
        if sid in slides and not _same(slides[sid], slide):
            raise UsageError(f"{path.name}: slide {sid!r} appears twice with different values",
                             "keep one row per slide")
        slides[sid] = slide
    if blank:
        log.warning("%s: %d rows without a slide id or any target were skipped", path.name, blank)
    if not slides:
        raise UsageError(f"{path.name} has no labelled slides",
                         f"add rows with slide_id and {', '.join(wanted[1:])}")
    strata = sorted({s.label for s in slides.values()})
    if isinstance(first, Classification):
        strata = list(first.classes) + ([""] if "" in strata else [])
    table = LabelTable(list(slides.values()), strata, list(targets))
    patients: dict[str, str] = {}
    for s in table.slides:
        if patients.setdefault(s.patient_id, s.label) != s.label:
            log.info("patient %s has slides with different labels", s.patient_id)
    _check_targets(table, f"in {path.name}")
    return table


def _same(a: LabeledSlide, b: LabeledSlide) -> bool:
    """Equal, NaN equal to NaN (a missing value)."""
    return (a.label, a.patient_id, a.site, a.split) == (b.label, b.patient_id, b.site, b.split) \
        and np.array_equal(np.asarray(a.values), np.asarray(b.values), equal_nan=True)


def abbreviate_ids(ids: Sequence[str], n: int = 8) -> str:
    """The first ``n`` ids (sorted), and how many more there are, for a message."""
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
            parts.append(f"{len(no_features)} labelled slides have no features ({abbreviate_ids(no_features)})")
        if no_label:
            parts.append(f"{len(no_label)} feature files have no label ({abbreviate_ids(no_label)})")
        log.warning("; ".join(parts) + " — they are left out")
    kept = table.subset(sorted(labelled & files.keys()))
    if not kept.slides:
        raise UsageError(f"none of the labelled slides has a feature file in {features_dir}",
                         "check that slide_id in the labels matches the .h5 file names")
    _check_targets(kept, "among the slides with features")
    return kept, {s.slide_id: files[s.slide_id] for s in kept.slides}
