"""Direct tests of the crash-safe writers (gigamil.io) and the name → factory registry."""

from __future__ import annotations

import csv
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

import gigamil.io as gio
from gigamil.errors import GigamilError, UsageError
from gigamil.io import atomic_open, atomic_path, fsync_dir, write_csv, write_json
from gigamil.registry import Registry


class Boom(RuntimeError):
    pass


def _entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


# --------------------------------------------------------------------------- atomic_path


def test_atomic_path_completed_write_appears_whole(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    payload = os.urandom(1 << 20)
    with atomic_path(target) as tmp:
        assert tmp != target
        tmp.write_bytes(payload)
        assert not target.exists()  # nothing visible under the real name mid-write
    assert target.read_bytes() == payload
    assert _entries(tmp_path) == ["out.bin"]  # the temporary is gone


def test_atomic_path_temp_lives_beside_target(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "dir" / "result.csv"  # parents are created
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent  # same directory → same filesystem → atomic rename
        assert tmp.name.startswith(".result.csv.tmp-")  # hidden, never mistaken for the output
        assert tmp.exists()  # created up front (mkstemp), so the name is reserved
        tmp.write_text("a\n")
    assert target.read_text() == "a\n"
    assert _entries(target.parent) == ["result.csv"]


def test_atomic_path_renames_with_os_replace(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Path, Path]] = []
    real_replace = os.replace

    def spy(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        calls.append((Path(src), Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    target = tmp_path / "x.txt"
    target.write_text("old")
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert len(calls) == 1
    src, dst = calls[0]
    assert src == tmp and dst == target and src.parent == dst.parent
    assert target.read_text() == "new"


def test_atomic_path_exception_leaves_no_file(tmp_path: Path) -> None:
    target = tmp_path / "never.txt"
    with pytest.raises(Boom), atomic_path(target) as tmp:
        tmp.write_text("partial")
        raise Boom
    assert not target.exists()
    assert not tmp.exists()
    assert _entries(tmp_path) == []


def test_atomic_path_exception_keeps_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "keep.txt"
    target.write_text("the old, complete content")
    with pytest.raises(Boom), atomic_path(target) as tmp:
        tmp.write_text("half a new")
        raise Boom
    assert target.read_text() == "the old, complete content"
    assert _entries(tmp_path) == ["keep.txt"]


def test_atomic_path_exception_after_temp_removed_by_caller(tmp_path: Path) -> None:
    target = tmp_path / "t.txt"
    with pytest.raises(Boom), atomic_path(target) as tmp:
        tmp.unlink()  # cleanup must not trip over a temporary that is already gone
        raise Boom
    assert _entries(tmp_path) == []


def test_atomic_path_replaces_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "f.txt"
    target.write_text("old content that is longer than the new one")
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"  # replaced, not overwritten in place (no old tail)


def test_atomic_path_fsyncs_file_before_rename_and_then_dir(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync-dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync-file")
        real_fsync(fd)

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        events.append("replace")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    with atomic_path(tmp_path / "a.bin") as tmp:
        tmp.write_bytes(b"data")
    assert events == ["fsync-file", "replace", "fsync-dir"]


def test_atomic_path_no_fsync_or_rename_on_error(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append("fsync"))
    monkeypatch.setattr(os, "replace", lambda src, dst: calls.append("replace"))
    with pytest.raises(Boom), atomic_path(tmp_path / "a.bin"):
        raise Boom
    assert calls == []


def test_atomic_path_output_gets_umask_permissions(tmp_path: Path, umask_022: None) -> None:
    target = tmp_path / "perm.txt"
    with atomic_path(target) as tmp:
        tmp.write_text("x")
    assert stat.S_IMODE(target.stat().st_mode) == 0o644  # not mkstemp's 0600


def test_atomic_path_accepts_str(tmp_path: Path) -> None:
    with atomic_path(str(tmp_path / "s.txt")) as tmp:
        assert isinstance(tmp, Path)
        tmp.write_text("ok")
    assert (tmp_path / "s.txt").read_text() == "ok"


# --------------------------------------------------------------------------- fsync_dir


def test_fsync_dir_syncs_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[bool] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    fsync_dir(tmp_path)
    assert synced == [True]


def test_fsync_dir_missing_directory_is_a_no_op(tmp_path: Path) -> None:
    fsync_dir(tmp_path / "does-not-exist")  # no exception


def test_fsync_dir_swallows_fsync_error_and_closes_fd(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[int] = []
    closed: list[int] = []
    real_open, real_close = os.open, os.close

    def fake_open(path: str | os.PathLike[str], flags: int, *a: int) -> int:
        fd = real_open(path, flags, *a)
        opened.append(fd)
        return fd

    def fake_close(fd: int) -> None:
        closed.append(fd)
        real_close(fd)

    def failing_fsync(fd: int) -> None:
        raise OSError("EINVAL: fsync not supported on this filesystem")

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "close", fake_close)
    monkeypatch.setattr(os, "fsync", failing_fsync)
    fsync_dir(tmp_path)
    assert len(opened) == 1 and closed == opened


# --------------------------------------------------------------------------- atomic_open


def test_atomic_open_text_and_binary(tmp_path: Path) -> None:
    with atomic_open(tmp_path / "t.txt", encoding="utf-8") as fh:
        fh.write("µm/px\n")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "µm/px\n"
    with atomic_open(tmp_path / "b.bin", "wb") as fh:
        fh.write(b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert _entries(tmp_path) == ["b.bin", "t.txt"]


def test_atomic_open_exception_keeps_old_file(tmp_path: Path) -> None:
    target = tmp_path / "t.txt"
    target.write_text("old")
    with pytest.raises(Boom), atomic_open(target) as fh:
        fh.write("new, unfinished")
        raise Boom
    assert target.read_text() == "old"
    assert _entries(tmp_path) == ["t.txt"]


# --------------------------------------------------------------------------- write_json / csv


def test_write_json_sorted_indented_newline(tmp_path: Path) -> None:
    target = tmp_path / "m.json"
    obj = {"b": [1, 2], "a": {"y": 1.5, "x": None}}
    write_json(target, obj)
    text = target.read_text(encoding="utf-8")
    assert json.loads(text) == obj
    assert text == json.dumps(obj, indent=2, sort_keys=True) + "\n"
    assert text.index('"a"') < text.index('"b"')


def test_write_json_unserialisable_keeps_old_file(tmp_path: Path) -> None:
    target = tmp_path / "m.json"
    write_json(target, {"ok": 1})
    with pytest.raises(TypeError):
        write_json(target, {"bad": object()})  # fails half-way through json.dump
    assert json.loads(target.read_text()) == {"ok": 1}
    assert _entries(tmp_path) == ["m.json"]


def test_write_csv_header_order_extras_and_missing(tmp_path: Path) -> None:
    target = tmp_path / "r.csv"
    rows = [{"slide": "s0", "label": 1, "extra": "dropped"}, {"slide": "s1, b"}]
    write_csv(target, rows, ("slide", "label"))
    with open(target, newline="", encoding="utf-8") as fh:
        assert fh.readline() == "slide,label\r\n"  # csv's own line ends, not doubled
        fh.seek(0)
        back = list(csv.DictReader(fh))
    assert back == [{"slide": "s0", "label": "1"}, {"slide": "s1, b", "label": ""}]


def test_write_csv_empty_rows_writes_header(tmp_path: Path) -> None:
    write_csv(tmp_path / "e.csv", [], ["a", "b"])
    assert (tmp_path / "e.csv").read_text() == "a,b\n"  # universal newlines read \r\n as \n


def test_io_all_exports_exist() -> None:
    for name in gio.__all__:
        assert callable(getattr(gio, name))


# --------------------------------------------------------------------------- Registry


class _Thing:
    def __init__(self, size: int = 1) -> None:
        self.size = size


def _fresh() -> Registry[object]:
    reg: Registry[object] = Registry("widget")

    @reg.register("zeta")
    class Zeta(_Thing):
        pass

    @reg.register("alpha")
    def make_alpha(size: int = 2) -> _Thing:
        return _Thing(size * 10)

    reg.register("mid")(_Thing)
    return reg


def test_register_returns_factory_unchanged() -> None:
    reg: Registry[_Thing] = Registry("widget")
    decorated = reg.register("t")(_Thing)
    assert decorated is _Thing
    assert reg.get("t") is _Thing


def test_create_passes_kwargs() -> None:
    reg = _fresh()
    made = reg.create("mid", size=7)
    assert isinstance(made, _Thing) and made.size == 7
    alpha = reg.create("alpha", size=3)
    assert isinstance(alpha, _Thing) and alpha.size == 30  # function factories work too
    zeta = reg.create("zeta")
    assert type(zeta).__name__ == "Zeta" and zeta.size == 1
    assert reg.create("mid") is not reg.create("mid")  # a new object every call


def test_duplicate_name_refused_and_original_kept() -> None:
    reg = _fresh()
    with pytest.raises(ValueError, match=r"widget 'mid' is already registered"):
        reg.register("mid")(dict)
    assert reg.get("mid") is _Thing
    assert reg.names() == ["alpha", "mid", "zeta"]


def test_unknown_name_is_usage_error_listing_known_names() -> None:
    reg = _fresh()
    with pytest.raises(UsageError) as info:
        reg.get("gamma")
    err = info.value
    assert isinstance(err, GigamilError)
    assert err.message == "unknown widget 'gamma'"
    assert err.hint == "choose one of: alpha, mid, zeta"  # sorted
    assert str(err) == "unknown widget 'gamma' — choose one of: alpha, mid, zeta"
    assert err.__cause__ is None and err.__suppress_context__  # no KeyError chained in
    with pytest.raises(UsageError, match="choose one of: alpha, mid, zeta"):
        reg.create("gamma", size=1)


def test_unknown_name_in_empty_registry() -> None:
    reg: Registry[object] = Registry("encoder")
    with pytest.raises(UsageError) as info:
        reg.get("x")
    assert info.value.hint == "choose one of: none"


def test_names_sorted_contains_and_iteration() -> None:
    reg = _fresh()
    assert reg.names() == ["alpha", "mid", "zeta"]  # sorted, not registration order
    assert list(reg) == reg.names()
    assert [n for n in reg] == ["alpha", "mid", "zeta"]
    assert "alpha" in reg and "zeta" in reg
    assert "gamma" not in reg
    assert 3 not in reg  # any object may be tested
    reg.register("beta")(_Thing)
    assert reg.names() == ["alpha", "beta", "mid", "zeta"]
    assert "beta" in reg


def test_names_returns_a_copy() -> None:
    reg = _fresh()
    reg.names().append("injected")
    assert "injected" not in reg
    assert reg.names() == ["alpha", "mid", "zeta"]


def test_registries_are_independent() -> None:
    a: Registry[object] = Registry("a")
    b: Registry[object] = Registry("b")
    a.register("x")(_Thing)
    assert "x" in a and "x" not in b
    b.register("x")(dict)  # the same name in another registry is fine
    assert b.get("x") is dict and a.get("x") is _Thing
