"""The patch grid: where patches of ``patch_size`` px at a target mpp lie on a slide.

Positions are computed in pixels of the *read level* (the level that is
resampled to the target mpp) so that one large read can be cut into patches
that are pixel-identical to reading each patch on its own. Coordinates are
reported in level-0 pixels, as CLAM and TRIDENT do.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from gigamil.errors import SlideTooSmallError, UsageError
from gigamil.wsi.metadata import Level, choose_level
from gigamil.wsi.tissue import TissueMask

__all__ = ["GridSpec", "PatchGrid", "make_grid"]


@dataclass(frozen=True)
class GridSpec:
    """What to cut: ``patch_size`` px at ``mpp`` µm/px, ``overlap`` px shared by neighbours."""

    mpp: float = 0.5
    patch_size: int = 256
    overlap: int = 0
    min_tissue: float = 0.5
    allow_upsample: bool = False

    def __post_init__(self) -> None:
        if self.patch_size < 8:
            raise UsageError(f"--patch-size {self.patch_size} is too small", "use at least 8 px")
        if not 0 <= self.overlap < self.patch_size:
            raise UsageError(
                f"--overlap {self.overlap} must be in [0, patch size {self.patch_size})",
                "overlap is in target-mpp pixels shared by neighbouring patches",
            )
        if not 0.0 <= self.min_tissue <= 1.0:
            raise UsageError(f"--min-tissue {self.min_tissue} must be between 0 and 1")
        if not self.mpp > 0:
            raise UsageError(f"--mpp {self.mpp} must be positive", "e.g. 0.5 for 20x")


@dataclass(frozen=True)
class PatchGrid:
    """Kept patch positions of one slide at one resolution."""

    spec: GridSpec
    level: int  # pyramid level that is read
    downsample: float  # of the read level
    read_size: int  # patch side in read-level px, resized to spec.patch_size
    read_xy: np.ndarray  # (N, 2) int64 top-left in read-level px
    coords: np.ndarray  # (N, 2) int64 top-left in level-0 px
    tissue: np.ndarray  # (N,) float32 tissue fraction
    n_candidates: int  # patches on the full grid before the tissue filter
    level0_mpp: float

    def __len__(self) -> int:
        return len(self.coords)

    def subset(self, keep: np.ndarray) -> PatchGrid:
        """The grid with only the patches where ``keep`` (bool, one per patch) is true."""
        return dataclasses.replace(self, read_xy=self.read_xy[keep], coords=self.coords[keep],
                                   tissue=self.tissue[keep])

    @property
    def size_level0(self) -> float:
        """Patch side in level-0 px (may be fractional)."""
        return self.spec.patch_size * self.spec.mpp / self.level0_mpp


def make_grid(
    levels: list[Level],
    spec: GridSpec,
    tissue: TissueMask | None = None,
    name: str = "slide",
) -> PatchGrid:
    """All patches on a regular grid that have at least ``spec.min_tissue`` tissue.

    Raises :class:`SlideTooSmallError` if not even one patch fits on the slide.
    """
    level, scale = choose_level(levels, spec.mpp, spec.allow_upsample, name)
    lv = levels[level]
    read_size = max(1, int(round(spec.patch_size * scale)))
    stride = (spec.patch_size - spec.overlap) * scale
    nx = int(np.floor((lv.width - read_size) / stride)) + 1 if lv.width >= read_size else 0
    ny = int(np.floor((lv.height - read_size) / stride)) + 1 if lv.height >= read_size else 0
    if nx <= 0 or ny <= 0:
        raise SlideTooSmallError(
            f"{name} ({levels[0].width}x{levels[0].height} px) is smaller than one "
            f"{spec.patch_size} px patch at {spec.mpp:g} µm/px",
            "use a smaller --patch-size or a finer --mpp",
        )
    # positions are laid out in level-0 px (so grids at several scales nest exactly)
    # and then mapped to the read level
    stride0 = (spec.patch_size - spec.overlap) * spec.mpp / levels[0].mpp
    xs0 = np.round(np.arange(nx) * stride0).astype(np.int64)
    ys0 = np.round(np.arange(ny) * stride0).astype(np.int64)
    gy, gx = np.meshgrid(ys0, xs0, indexing="ij")  # row-major: y, then x
    coords = np.stack([gx.ravel(), gy.ravel()], axis=1)
    read_xy = np.round(coords / lv.downsample).astype(np.int64)
    inside = (read_xy[:, 0] + read_size <= lv.width) & (read_xy[:, 1] + read_size <= lv.height)
    coords, read_xy = coords[inside], read_xy[inside]
    size0 = spec.patch_size * spec.mpp / levels[0].mpp
    if tissue is None:
        frac = np.ones(len(coords), np.float32)
    else:
        frac = tissue.coverage(coords, size0, levels[0].mpp)
    keep = frac >= spec.min_tissue
    return PatchGrid(
        spec=spec,
        level=level,
        downsample=lv.downsample,
        read_size=read_size,
        read_xy=read_xy[keep],
        coords=coords[keep],
        tissue=frac[keep],
        n_candidates=len(coords),
        level0_mpp=levels[0].mpp,
    )
