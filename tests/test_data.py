from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from gigamil.errors import UsageError
from gigamil.mil.bags import BagBatchSampler, BagDataset, collate_bags
from gigamil.mil.labels import match_features, read_labels
from gigamil.mil.splits import make_folds, write_splits
from gigamil.synth.bags import make_feature_bags


def _csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def bags(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bags")
    make_feature_bags(out, n_slides=30, dim=8, bag_size=(5, 60), patients_per_slide=1.5,
                      sites=3, seed=0)
    return out


def test_read_labels_defaults_patient_and_sorts_classes(tmp_path: Path) -> None:
    t = read_labels(_csv(tmp_path / "l.csv", "slide_id,label\nb,tumor\na,normal\n"))
    assert t.classes == ["normal", "tumor"]
    assert {s.slide_id: s.patient_id for s in t.slides} == {"a": "a", "b": "b"}


@pytest.mark.parametrize(("text", "match"), [
    ("slide,label\na,x\nb,y\n", "no column slide_id"),
    ("slide_id,label\na,x\nb,x\n", "single class"),
    ("slide_id,label,split\na,x,train\nb,y,holdout\n", "not train, val or test"),
    ("slide_id,label\na,x\na,y\n", "twice"),
    ("slide_id,label\n", "no labelled slides"),
])
def test_bad_labels_are_clear_errors(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        read_labels(_csv(tmp_path / "l.csv", text))


def test_empty_class_is_an_error(tmp_path: Path) -> None:
    path = _csv(tmp_path / "l.csv", "slide_id,label\na,x\nb,y\n")
    with pytest.raises(UsageError, match="'z' has no slides"):
        read_labels(path, classes=["x", "y", "z"])


def test_mismatch_between_labels_and_features_is_one_warning(
        bags: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    text = (bags / "labels.csv").read_text().splitlines()
    path = _csv(tmp_path / "l.csv", "\n".join(text[:-2] + ["ghost,tumor,px"]) + "\n")
    with caplog.at_level(logging.WARNING):
        table, paths = match_features(read_labels(path), bags)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "1 labelled slides have no features (ghost)" in warnings[0]
    assert "2 feature files have no label (b028, b029)" in warnings[0]
    assert len(table) == 28 and set(paths) == {s.slide_id for s in table.slides}


def test_features_for_one_class_only_is_an_error(bags: Path, tmp_path: Path) -> None:
    path = _csv(tmp_path / "l.csv", "slide_id,label\nb000,tumor\nb001,tumor\nzzz,normal\n")
    with pytest.raises(UsageError, match="single class"):
        match_features(read_labels(path), bags)


@pytest.mark.parametrize("n_folds", [3, 5])
def test_folds_are_patient_grouped_stratified_and_cover_everything(bags: Path, n_folds: int
                                                                   ) -> None:
    table, _ = match_features(read_labels(bags / "labels.csv"), bags)
    folds = make_folds(table, n_folds, seed=1, val_frac=0.2)
    patient = {s.slide_id: s.patient_id for s in table.slides}
    label = {s.slide_id: s.label for s in table.slides}
    tests = [sid for f in folds for sid in f.test]
    assert sorted(tests) == sorted(patient)  # every slide tested exactly once
    for f in folds:
        parts = [set(f.train), set(f.val), set(f.test)]
        pats = [{patient[s] for s in p} for p in parts]
        assert not (pats[0] & pats[1]) and not (pats[0] & pats[2]) and not (pats[1] & pats[2])
        assert set().union(*parts) == set(patient)
        assert {label[s] for s in f.test} == {"normal", "tumor"}
        assert f.val and {label[s] for s in f.train} == {"normal", "tumor"}
    assert make_folds(table, n_folds, seed=1, val_frac=0.2) == folds  # deterministic


def test_site_folds_hold_out_each_site(bags: Path) -> None:
    table = read_labels(bags / "labels.csv")
    folds = make_folds(table, by="site")
    site = {s.slide_id: s.site for s in table.slides}
    assert len(folds) == 3
    for f in folds:
        held = {site[s] for s in f.test}
        assert len(held) == 1 and not held & {site[s] for s in f.train + f.val}


def test_split_column_overrides_folds(tmp_path: Path) -> None:
    rows = "slide_id,label,patient_id,split\na,x,p1,train\nb,y,p2,train\nc,x,p3,val\nd,y,p4,test\n"
    folds = make_folds(read_labels(_csv(tmp_path / "l.csv", rows)), n_folds=5)
    assert len(folds) == 1 and folds[0].train == ("a", "b") and folds[0].test == ("d",)
    bad = rows.replace("p4,test", "p1,test")
    with pytest.raises(UsageError, match="patient p1 is in both"):
        make_folds(read_labels(_csv(tmp_path / "m.csv", bad)))
    write_splits(tmp_path / "splits.csv", read_labels(tmp_path / "l.csv"), folds)
    assert (tmp_path / "splits.csv").read_text().splitlines()[1].startswith("0,train,a,p1,x")


def test_global_batches_do_not_depend_on_world_size() -> None:
    targets = [0, 1] * 20
    one = BagBatchSampler(targets, batch_size=8, seed=3)
    two = [BagBatchSampler(targets, batch_size=8, seed=3, rank=r, world_size=2) for r in (0, 1)]
    for s in [one, *two]:
        s.set_epoch(2)
    for b1, b_r0, b_r1 in zip(list(one), list(two[0]), list(two[1]), strict=True):
        assert b1 == b_r0 + b_r1 and len(b_r0) == len(b_r1) == 4
    with pytest.raises(UsageError, match="not divisible"):
        BagBatchSampler(targets, batch_size=7, world_size=2)


def test_resume_position_skips_exactly_the_done_batches() -> None:
    s = BagBatchSampler(list(range(2)) * 25, batch_size=5, seed=0)
    s.set_epoch(4)
    full = list(s)
    s.set_epoch(4, start=6)
    assert list(s) == full[6:]


def test_balanced_sampler_equalises_classes() -> None:
    targets = [0] * 90 + [1] * 10
    s = BagBatchSampler(targets, batch_size=10, balanced=True, seed=0)
    drawn = [targets[i] for e in range(20) for b in s.global_batches(e) for i in b]
    assert 0.4 < np.mean(drawn) < 0.6


def test_bucketing_cuts_padding() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 5000, 400)

    def padding(bucket: bool) -> float:
        s = BagBatchSampler([0, 1] * 200, lengths, batch_size=8, bucket=bucket, seed=0)
        return sum(max(lengths[b]) * len(b) - lengths[b].sum() for b in s.global_batches(0))

    assert padding(True) < 0.2 * padding(False)


def test_subsampling_is_deterministic_per_epoch_and_collate_masks(bags: Path) -> None:
    paths = sorted(bags.glob("*.h5"))[:4]
    ds = BagDataset(paths, [0, 1, 0, 1], max_instances=5, seed=0)
    a, b = ds[(0, 1)][0], ds[(0, 1)][0]
    assert torch.equal(a, b) and len(a) == 5
    assert not torch.equal(a, ds[(0, 2)][0])  # another epoch, another draw
    assert len(ds[0][0]) == ds.lengths()[0]  # no epoch: the whole bag
    items = [ds[(i, 0)] for i in range(2)] + [ds[2]]
    batch = collate_bags(items)
    feats, mask = batch.padded()
    assert feats.shape[0] == 3 and mask.sum(1).tolist() == [5, 5, ds.lengths()[2]]
    assert (feats[~mask] == 0).all()
    for b, (f, _, _) in enumerate(items):
        assert torch.equal(feats[b, : len(f)], f)
