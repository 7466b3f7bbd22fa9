"""Slide I/O and patching (no torch): readers, tissue detection, grids, QC, stain, stores, extraction."""

from gigamil.wsi.extract import (
    ExtractConfig,
    SlideResult,
    extract_slide,
    extract_slides,
    preview_slide,
)
from gigamil.wsi.grid import GridSpec, PatchGrid, make_grid
from gigamil.wsi.qc import QCConfig
from gigamil.wsi.reader import SlideReader, open_slide, slide_id
from gigamil.wsi.stain import STAIN_NORMALIZERS, create_stain_normalizer
from gigamil.wsi.store import PatchStore, PatchStoreWriter
from gigamil.wsi.tissue import TISSUE_DETECTORS, TissueMask, detect_tissue

__all__ = [
    "ExtractConfig", "SlideResult", "extract_slide", "extract_slides", "preview_slide",
    "GridSpec", "PatchGrid", "make_grid", "QCConfig", "SlideReader", "open_slide", "slide_id",
    "STAIN_NORMALIZERS", "create_stain_normalizer", "PatchStore", "PatchStoreWriter",
    "TISSUE_DETECTORS", "TissueMask", "detect_tissue",
]
