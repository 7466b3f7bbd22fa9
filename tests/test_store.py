from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import h5py
import numpy as np
import pytest

from gigamil.errors import StoreError
from gigamil.wsi.store import PatchStore
from gigamil.wsi.store_format import decode_patch, encode_patch, write_coords_h5
from gigamil.wsi.store_writer import PatchStoreWriter


def _patches(n: int, size: int = 32) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    return [np.roll(base, i, axis=0) for i in range(n)]


def _write(path: Path, patches: list[np.ndarray], encoding: str = "raw", **kw) -> Path:
    with PatchStoreWriter(path, len(patches), patches[0].shape[0], encoding, **kw) as w:
        for p in patches:
            w.add(p)
        coords = np.arange(2 * len(patches), dtype=np.int64).reshape(-1, 2)
        return w.finish(coords, {"slide_id": path.stem})


@pytest.mark.parametrize("encoding", ["raw", "png", "jpeg"])
def test_roundtrip(tmp_path: Path, encoding: str) -> None:
    patches = _patches(10)
    path = _write(tmp_path / "s.lmdb", patches, encoding, commit_bytes=1000)  # many commits
    with PatchStore(path) as store:
        assert len(store) == 10 and store.meta["encoding"] == encoding
        assert store.coords.shape == (10, 2) and store.coords.dtype == np.int64
        for i, p in enumerate(patches):
            if encoding == "jpeg":
                assert np.abs(store[i].astype(int) - p).mean() < 40  # random noise is jpeg's worst case
            else:
                np.testing.assert_array_equal(store[i], p)
        assert len(list(store)) == 10
        with pytest.raises(IndexError):
            store[10]


def test_partial_store_is_never_read_as_complete(tmp_path: Path) -> None:
    target = tmp_path / "s.lmdb"
    writer = PatchStoreWriter(target, 3, 32, "raw")
    writer.add(_patches(1)[0])
    writer._flush()
    # a second writer while the first is alive is refused
    with pytest.raises(StoreError, match="another process"):
        PatchStoreWriter(target, 3, 32, "raw")
    # the process dies here, without finish(): its lock goes with it
    writer._release()
    assert writer.partial.exists() and not target.exists()
    with pytest.raises(StoreError, match="interrupted"):
        PatchStore(target)
    with pytest.raises(StoreError, match="unfinished"):
        PatchStore(writer.partial)
    # the next writer starts from scratch
    path = _write(target, _patches(2))
    assert len(PatchStore(path)) == 2 and not writer.partial.exists()


def test_exception_inside_writer_removes_partial(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        with PatchStoreWriter(tmp_path / "s.lmdb", 1, 32, "raw") as w:
            raise RuntimeError("boom")
    assert not w.partial.exists()


def test_coords_must_match_count(tmp_path: Path) -> None:
    w = PatchStoreWriter(tmp_path / "s.lmdb", 1, 32, "raw")
    w.add(_patches(1)[0])
    with pytest.raises(StoreError):
        w.finish(np.zeros((2, 2)), {})


def test_same_store_opened_twice_in_one_process(tmp_path: Path) -> None:
    path = _write(tmp_path / "s.lmdb", _patches(3))
    a, b = PatchStore(path), PatchStore(path)
    np.testing.assert_array_equal(a[1], b[1])
    a.close()
    np.testing.assert_array_equal(b[2], _patches(3)[2])  # b still works after a closed


def _worker_sum(args: tuple[str, int]) -> int:
    path, i = args
    return int(PatchStore(path)[i].sum())


def test_many_processes_read_one_store(tmp_path: Path) -> None:
    patches = _patches(8)
    path = _write(tmp_path / "s.lmdb", patches)
    store = PatchStore(path)
    _ = store[0]  # parent has it open too
    with mp.get_context("spawn").Pool(2) as pool:
        sums = pool.map(_worker_sum, [(str(path), i) for i in range(8)])
    assert sums == [int(p.sum()) for p in patches]


def test_decode_rejects_wrong_shape() -> None:
    data = encode_patch(np.zeros((16, 16, 3), np.uint8), "png")
    with pytest.raises(StoreError):
        decode_patch(data, "png", 32)


def test_coords_h5_layout(tmp_path: Path) -> None:
    coords = np.array([[0, 0], [512, 0]], np.int64)
    write_coords_h5(tmp_path / "c.h5", coords, {"patch_size": 256, "patch_level": 0, "mpp": 0.5})
    with h5py.File(tmp_path / "c.h5", "r") as f:
        ds = f["coords"]
        assert ds.dtype == np.int64 and ds.shape == (2, 2)
        assert ds.attrs["patch_size"] == 256 and ds.attrs["patch_level"] == 0
        np.testing.assert_array_equal(ds[:], coords)


def test_multiscale_store(tmp_path: Path) -> None:
    fine, coarse = _patches(4), _patches(1, size=32)
    with PatchStoreWriter(tmp_path / "m.lmdb", 5, 32, "raw") as w:
        for p in fine:
            w.add(p)
        w.add(coarse[0], scale="1")
        w.finish({"": np.zeros((4, 2)), "1": np.ones((1, 2))},
                 {"scales": [0.5, 1.0], "target_mpp": 0.5})
    with PatchStore(tmp_path / "m.lmdb") as a, PatchStore(tmp_path / "m.lmdb", mpp=1.0) as b:
        assert a.scales == [0.5, 1.0] and len(a) == 4 and len(b) == 1
        assert b.coords.tolist() == [[1, 1]] and a.mpp == 0.5 and b.mpp == 1.0
        np.testing.assert_array_equal(b[0], coarse[0])
    with pytest.raises(StoreError, match="no patches at 2"):
        len(PatchStore(tmp_path / "m.lmdb", mpp=2.0))


def test_truncated_store_is_an_error_not_a_crash(tmp_path: Path) -> None:
    path = _write(tmp_path / "s.lmdb", _patches(20, size=64))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreError, match="truncated"):
        len(PatchStore(path))


def test_outputs_are_group_readable(tmp_path: Path) -> None:
    write_coords_h5(tmp_path / "c.h5", np.zeros((1, 2)), {})
    assert (tmp_path / "c.h5").stat().st_mode & 0o044 == 0o044 & ~_umask()


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask
