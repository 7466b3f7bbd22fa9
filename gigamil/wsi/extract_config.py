"""What ``gigamil extract`` is asked to do and what it reports.

:class:`ExtractConfig` holds every option (saved with the outputs);
:class:`SlideResult` is one row of the ``extract.csv`` manifest
(:data:`MANIFEST_FIELDS`); :class:`SlidePlan` and :class:`RunResult` carry a
slide's grids and the outcome of one region read between planning and writing.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from gigamil.errors import UsageError
from gigamil.wsi.grid import GridSpec, PatchGrid
from gigamil.wsi.qc import QC_REASONS, QCConfig
from gigamil.wsi.stain import StainNormalizer, create_stain_normalizer
from gigamil.wsi.store_format import Encoding
from gigamil.wsi.tissue import TISSUE_DETECTORS, TissueMask

__all__ = [
    "Status",
    "MANIFEST_FIELDS",
    "REJECT_REASONS",
    "ExtractConfig",
    "SlideResult",
    "SlidePlan",
    "RunResult",
    "rejection_summary",
]

Status = Literal["ok", "skipped", "failed"]
#: Why a grid patch is left out: the QC filters, or pixels that cannot be decoded.
REJECT_REASONS = (*QC_REASONS, "unreadable")
MANIFEST_FIELDS = ["slide_id", "file", "status", "n_patches", "seconds", "error", "note",
                   *(f"qc_{r}" for r in REJECT_REASONS)]


#: Slide readers (``auto``: TIFF tiles directly, DICOM with wsidicom, else openslide).
Backend = Literal["auto", "tiles", "wsidicom", "openslide", "cucim"]
#: Stain normalization methods, fitted once per slide.
StainMethod = Literal["macenko", "reinhard"]


@dataclass(frozen=True)
class ExtractConfig:
    """Every option of ``gigamil extract``; saved with the outputs.

    ``mpp`` may list several scales (``(0.5, 1.0, 2.0)``): aligned grids go into
    the same store, the first one is the primary scale.
    """

    mpp: float | tuple[float, ...] = 0.5
    patch_size: int = 256
    overlap: int = 0
    min_tissue: float = 0.5
    allow_upsample: bool = False
    encoding: Encoding = "jpeg"
    jpeg_quality: int = 90
    backend: Backend = "auto"
    mpp_override: float | None = None
    tissue_detector: str = "otsu"
    tissue_params: dict[str, Any] = field(default_factory=dict)  # the detector's options
    tissue_mpp: float = 8.0
    qc: QCConfig = field(default_factory=QCConfig)
    stain_norm: StainMethod | None = None
    stain_reference: str | None = None
    coords_h5: bool = False
    previews: bool = False
    record_paths: bool = False
    read_block_px: int = 4096
    recursive: bool = True  # search input folders recursively
    pseudonymize: bool = False  # salted-hash slide ids; the mapping in one 0600 file
    pseudonym_map: str | None = None  # that file (default OUT.pseudonyms.json beside OUT)
    mpp_csv: str | None = None  # slide_id,mpp: level-0 resolutions of slides without one
    mpp_from_magnification: bool = False  # mpp = 10 / objective power, with a warning
    roi_dir: str | None = None  # <slide_id>.geojson annotations (QuPath): patches inside
    roi_classes: tuple[str, ...] = ()  # only annotations of these classes
    roi_min_fraction: float = 0.5  # of a patch's area inside the ROI to keep it
    geojson: bool = False  # write geojson/<slide_id>.geojson for QuPath
    stage_dir: str | None = None  # copy slides ahead to this local folder
    stage_gb: float = 20.0  # at most this much staged at once

    def __post_init__(self) -> None:
        try:  # an unknown detector or option is a usage error now, not on the first slide
            TISSUE_DETECTORS.create(self.tissue_detector, **self.tissue_params)
        except TypeError as exc:
            raise UsageError(f"tissue detector {self.tissue_detector!r}: {exc}",
                             "see `gigamil models` for each detector's options") from None
        if isinstance(self.mpp, (int, float)):
            object.__setattr__(self, "mpp", (float(self.mpp),))
        mpps = tuple(float(m) for m in self.mpp)  # type: ignore[union-attr]
        if not mpps or len(set(mpps)) != len(mpps):
            raise UsageError(f"--mpp {self.mpp} needs distinct values", "e.g. --mpp 0.5,1.0,2.0")
        object.__setattr__(self, "mpp", mpps)
        _ = self.grids  # validates the grid options early
        if self.encoding not in ("jpeg", "png", "raw"):
            raise UsageError(f"--format {self.encoding!r} is not supported", "use jpeg, png or raw")
        if not 1 <= self.jpeg_quality <= 100:
            raise UsageError(f"--jpeg-quality {self.jpeg_quality} must be in 1..100")
        if self.mpp_override is not None and not 0.02 < self.mpp_override < 20:
            raise UsageError(f"--mpp-override {self.mpp_override} is not a plausible resolution",
                             "give level-0 µm per pixel, e.g. 0.25 for 40x or 0.5 for 20x")
        object.__setattr__(self, "roi_classes", tuple(self.roi_classes))
        if not 0 < self.roi_min_fraction <= 1:
            raise UsageError(f"--roi-min-fraction {self.roi_min_fraction} must be in (0, 1]")
        if self.roi_classes and self.roi_dir is None:
            raise UsageError("--roi-class needs --roi", "add --roi DIR of QuPath GeoJSON files")
        if self.stage_gb <= 0:
            raise UsageError(f"--stage-gb {self.stage_gb} must be positive")
        if self.stain_norm is not None:
            create_stain_normalizer(self.stain_norm, self.stain_reference)  # fails early
        elif self.stain_reference is not None:
            raise UsageError("--stain-reference needs --stain-norm", "add --stain-norm macenko")

    @property
    def mpps(self) -> tuple[float, ...]:
        """The scales to cut, µm/px; the first is the primary one."""
        return self.mpp  # type: ignore[return-value]

    @property
    def grids(self) -> list[GridSpec]:
        """One grid specification per scale."""
        return [GridSpec(m, self.patch_size, self.overlap, self.min_tissue, self.allow_upsample)
                for m in self.mpps]

    def output_params(self) -> dict[str, Any]:
        """The options that determine a store's content (a rerun with others redoes the slide)."""
        skip = {"backend", "coords_h5", "previews", "record_paths", "read_block_px",
                "stain_reference", "recursive", "pseudonymize", "pseudonym_map", "mpp_csv",
                "roi_dir", "geojson", "stage_dir", "stage_gb"}
        params = {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}
        if not self.mpp_from_magnification:  # stores written before it existed stay current
            del params["mpp_from_magnification"]
        if self.roi_dir is None:  # the ROI options mean nothing without --roi
            del params["roi_classes"], params["roi_min_fraction"]
        else:
            params["roi"] = True
        params["mpp"] = list(self.mpps)
        if not self.tissue_params:  # stores written before the option existed stay current
            del params["tissue_params"]
        if self.stain_reference is not None:
            params["stain_reference_sha256"] = hashlib.sha256(
                Path(self.stain_reference).read_bytes()).hexdigest()
        return params


@dataclass
class SlideResult:
    """One manifest row."""

    slide_id: str
    file: str
    status: Status
    n_patches: int = 0
    seconds: float = 0.0
    error: str = ""
    note: str = ""
    qc: dict[str, int] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        """The result as a manifest row (the columns of :data:`MANIFEST_FIELDS`)."""
        return {
            "slide_id": self.slide_id, "file": self.file, "status": self.status,
            "n_patches": self.n_patches, "seconds": round(self.seconds, 3),
            "error": self.error, "note": self.note,
            **{f"qc_{r}": self.qc.get(r, 0) for r in REJECT_REASONS},
        }


@dataclass
class SlidePlan:
    """What will be cut from one slide: the tissue mask, its thumbnail and a grid per scale."""

    tissue: TissueMask
    thumb: np.ndarray | None  # None unless kept for previews
    grids: list[PatchGrid]
    normalizer: StainNormalizer | None = None


@dataclass
class RunResult:
    """The outcome of one region read: per patch, its grid index, QC reason and bytes."""

    indices: list[int]
    reasons: list[str]
    encoded: list[bytes | None]
    patches: list[np.ndarray] | None = None  # the kept patches, when asked for (no encoding)

    @property
    def kept(self) -> list[int]:
        """Grid indices of the patches that passed QC (the order of ``patches``)."""
        return [i for i, r in zip(self.indices, self.reasons) if not r]

    def rejections(self) -> Counter[str]:
        """QC reason → patches of this run it dropped."""
        return Counter(r for r in self.reasons if r)


def rejection_summary(counts: Mapping[str, int]) -> str:
    """``blur=3;pen=1``: QC rejections by reason, as the manifests and bags record them."""
    return ";".join(f"{k}={v}" for k, v in sorted(counts.items()) if v)
