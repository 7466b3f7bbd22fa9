"""Slide I/O and patching (no torch): readers, tissue detection, grids, QC, stain, stores, extraction."""

from gigamil.wsi.extract import extract_slide, preview_slide
from gigamil.wsi.extract_config import ExtractConfig, SlideResult
from gigamil.wsi.grid import GridSpec, PatchGrid, make_grid
from gigamil.wsi.metadata import slide_id
from gigamil.wsi.qc import QCConfig
from gigamil.wsi.reader import open_slide
from gigamil.wsi.slide import SlideReader
from gigamil.wsi.stain import STAIN_NORMALIZERS, create_stain_normalizer
from gigamil.wsi.store import PatchStore
from gigamil.wsi.store_writer import PatchStoreWriter
from gigamil.wsi.tissue import TISSUE_DETECTORS, TissueMask, detect_tissue

__all__ = [
    "ExtractConfig", "SlideResult", "extract_slide", "preview_slide",
    "GridSpec", "PatchGrid", "make_grid", "QCConfig", "SlideReader", "open_slide", "slide_id",
    "STAIN_NORMALIZERS", "create_stain_normalizer", "PatchStore", "PatchStoreWriter",
    "TISSUE_DETECTORS", "TissueMask", "detect_tissue",
]
