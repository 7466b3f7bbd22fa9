from __future__ import annotations

import logging
import pickle
from pathlib import Path

import pytest
import torch

from gigamil.cluster.checkpoint import CheckpointManager


def _state(step: int) -> dict:
    return {"w": torch.full((64,), float(step)), "progress": {"step": step, "best": 0.5}}


def test_keeps_the_last_k_and_best_apart(tmp_path: Path) -> None:
    ckpt = CheckpointManager(tmp_path, keep=2)
    for step in range(1, 6):
        ckpt.save(_state(step), step)
    ckpt.save_best({"model": _state(3)}, metric=0.9, step=3)
    assert [p.name for p in ckpt.steps()] == ["step_00000004.pt", "step_00000005.pt"]
    assert not list(tmp_path.glob(".*tmp*"))
    state, path = ckpt.load_latest()
    assert path.name == "step_00000005.pt" and state["progress"]["step"] == 5
    assert ckpt.load_best()["model"]["progress"]["step"] == 3


@pytest.mark.parametrize("damage", ["flip", "truncate", "no_sidecar", "garbage"])
def test_a_damaged_latest_checkpoint_falls_back_with_a_warning(
        tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture) -> None:
    ckpt = CheckpointManager(tmp_path, keep=3)
    for step in (10, 20):
        ckpt.save(_state(step), step)
    latest = tmp_path / "step_00000020.pt"
    data = bytearray(latest.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
        latest.write_bytes(bytes(data))
    elif damage == "truncate":
        latest.write_bytes(bytes(data[: len(data) // 3]))
    elif damage == "no_sidecar":
        latest.with_suffix(".json").unlink()
    else:
        latest.with_suffix(".json").write_text("{not json")
    with caplog.at_level(logging.WARNING):
        state, path = ckpt.load_latest()
    assert path.name == "step_00000010.pt" and torch.equal(state["w"], _state(10)["w"])
    assert any("step_00000020.pt is unusable" in r.getMessage() for r in caplog.records)


def test_all_damaged_means_start_over(tmp_path: Path) -> None:
    ckpt = CheckpointManager(tmp_path)
    ckpt.save(_state(1), 1)
    (tmp_path / "step_00000001.pt").write_bytes(b"x")
    assert ckpt.load_latest() is None
    assert CheckpointManager(tmp_path / "none").load_latest() is None


class Evil:
    def __reduce__(self):  # noqa: ANN204 - pickle protocol
        return (print, ("pwned",))


def test_loading_never_unpickles_arbitrary_objects(tmp_path: Path) -> None:
    ckpt = CheckpointManager(tmp_path)
    ckpt.save({"w": torch.zeros(1), "evil": Evil()}, 1)  # a file someone slipped in
    path = tmp_path / "step_00000001.pt"
    with pytest.raises(pickle.UnpicklingError):
        ckpt.load(path)
    assert ckpt.load_latest() is None  # refused, not executed


def test_only_the_main_rank_writes(tmp_path: Path) -> None:
    CheckpointManager(tmp_path, is_main=False).save(_state(1), 1)
    CheckpointManager(tmp_path, is_main=False).save_best(_state(1), 0.1, 1)
    assert not list(tmp_path.iterdir())
