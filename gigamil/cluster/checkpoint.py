"""Atomic, checksummed, resumable checkpoints (DESIGN rule 5).

    ckpt = CheckpointManager("runs/crc1/checkpoints/fold0", keep=3, is_main=rank == 0)
    ckpt.save(state, step=120)        # step_00000120.pt + step_00000120.json (sha256, step)
    ckpt.save_best(model_state, metric=0.91)
    state = ckpt.load_latest()        # newest checkpoint whose checksum matches, else None

A checkpoint is written to a temporary file, fsynced and renamed; its sidecar
(sha256, size, step) is written the same way afterwards, so a checkpoint without
a matching sidecar is incomplete. A corrupt or truncated checkpoint is skipped
with a warning and the previous one is used. Loading uses ``weights_only=True``:
nothing but tensors and plain containers is ever unpickled. Only the main rank
writes; every rank loads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

from gigamil.errors import DiskFullError, is_disk_full
from gigamil.io import atomic_path, write_json

__all__ = ["CheckpointManager", "file_sha256"]

log = logging.getLogger(__name__)

_STEP = re.compile(r"^step_(\d{8,})\.pt$")


def file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class CheckpointManager:
    """Numbered checkpoints of one training (one fold) in one directory."""

    def __init__(self, directory: str | os.PathLike[str], keep: int = 3, is_main: bool = True
                 ) -> None:
        self.directory = Path(directory)
        self.keep = max(1, keep)
        self.is_main = is_main

    # -- writing ----------------------------------------------------------------
    def _write(self, path: Path, state: dict[str, Any], extra: dict[str, Any]) -> None:
        try:
            with atomic_path(path) as tmp:
                torch.save(state, tmp)
            write_json(path.with_suffix(".json"),
                       {"sha256": file_sha256(path), "bytes": path.stat().st_size, **extra})
        except (OSError, RuntimeError) as exc:
            if is_disk_full(exc, self.directory):  # the last good checkpoint stays
                raise DiskFullError(self.directory) from exc
            raise

    def save(self, state: dict[str, Any], step: int) -> Path:
        """Write ``step_<step>.pt`` (main rank only) and keep the newest ``keep``."""
        path = self.directory / f"step_{step:08d}.pt"
        if self.is_main:
            self._write(path, state, {"step": step})
            for old in self.steps()[: -self.keep]:
                for p in (old, old.with_suffix(".json")):
                    p.unlink(missing_ok=True)
        return path

    def save_best(self, state: dict[str, Any], metric: float, step: int) -> Path:
        """Write ``best.pt``, kept apart from the numbered checkpoints."""
        path = self.directory / "best.pt"
        if self.is_main:
            self._write(path, state, {"step": step, "metric": metric})
        return path

    # -- reading ----------------------------------------------------------------
    def steps(self) -> list[Path]:
        """Numbered checkpoint files, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir()
                 if (m := _STEP.match(p.name))]
        return [p for _, p in sorted(found)]

    def verify(self, path: Path) -> str | None:
        """None if ``path`` matches its sidecar, else why not."""
        sidecar = path.with_suffix(".json")
        if not path.exists():
            return "missing"
        if not sidecar.exists():
            return "no checksum file (the write was interrupted)"
        try:
            meta = json.loads(sidecar.read_text())
        except (OSError, ValueError):
            return "unreadable checksum file"
        if path.stat().st_size != meta.get("bytes"):
            return f"size {path.stat().st_size} B, expected {meta.get('bytes')} B (truncated)"
        if file_sha256(path) != meta.get("sha256"):
            return "sha256 mismatch (corrupt)"
        return None

    def load(self, path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
        return torch.load(path, map_location=map_location, weights_only=True)

    def load_latest(self, map_location: str | torch.device = "cpu"
                    ) -> tuple[dict[str, Any], Path] | None:
        """The newest valid checkpoint and its path; corrupt ones are skipped with a warning."""
        for path in reversed(self.steps()):
            problem = self.verify(path)
            if problem is None:
                try:
                    return self.load(path, map_location), path
                except Exception as exc:  # noqa: BLE001 - any unreadable file: fall back
                    problem = f"unreadable ({exc.__class__.__name__}: {exc})"
            log.warning("checkpoint %s is unusable: %s — using the previous one",
                        path.name, problem)
        return None

    def load_best(self, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
        path = self.directory / "best.pt"
        problem = self.verify(path)
        if problem is None:
            return self.load(path, map_location)
        if path.exists():
            log.warning("best checkpoint %s is unusable: %s", path, problem)
        return None
