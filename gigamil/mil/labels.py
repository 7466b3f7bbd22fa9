"""The labels CSV of a cohort, and its match with the feature files.

    table = read_labels("labels.csv")                    # slide_id,label[,patient_id,site,split]
    table, paths = match_features(table, "features/resnet50")
"""

from __future__ import annotations

import csv
import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gigamil.errors import UsageError

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
    _check_classes(kept, "among the slides with features")
    return kept, {s.slide_id: files[s.slide_id] for s in kept.slides}
