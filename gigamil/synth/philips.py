"""Synthetic Philips TIFF slides (the export of IntelliSite / Philips DP), for tests and
benchmarks.

A Philips TIFF keeps its metadata as XML (``DPUfsImport``) in the first page's
description: the pixel spacing of every level in millimetres, the barcode, and the
label and macro images as base64 JPEG. Reduced levels are tiled pages (2× steps)
whose stored size is padded up to whole tiles; their true size is level 0's divided
by the downsample. The barcode, label and macro here hold made-up "PHI", to check
that none of it reaches an output.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import os
from pathlib import Path

import numpy as np

from gigamil.io import atomic_path
from gigamil.synth.model import SynthConfig, SyntheticSlideModel, pyramid_depth

__all__ = ["write_philips_tiff", "PHILIPS_BARCODE"]

#: The made-up barcode written into the XML (base64 there, as Philips stores it).
PHILIPS_BARCODE = "PATIENT-DOE-JANE-0000000"


def _attr(name: str, value: str, vr: str = "IString") -> str:
    return f'<Attribute Name="{name}" PMSVR="{vr}">{value}</Attribute>'


def _spacing(mpp: float) -> str:
    mm = f"{mpp / 1000:.9f}"
    return f'&quot;{mm}&quot; &quot;{mm}&quot;'


def _jpeg_b64(img: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=85)
    return base64.b64encode(buf.getvalue()).decode()


def philips_xml(mpp: float, levels: int, label: np.ndarray) -> str:
    """The ``DPUfsImport`` description: one WSI image with a pixel spacing per level,
    a label image, and a barcode."""
    reps = "".join(
        '<DataObject ObjectType="PixelDataRepresentation">'
        + _attr("DICOM_PIXEL_SPACING", _spacing(mpp * 2**k), "IDoubleArray")
        + _attr("PIIM_PIXEL_DATA_REPRESENTATION_NUMBER", str(k), "IUInt16")
        + "</DataObject>" for k in range(levels))
    wsi = ('<DataObject ObjectType="DPScannedImage">'
           + _attr("DICOM_DERIVATION_DESCRIPTION",
                   f"tiff-useBigTIFF=0-useRgb=0-levels={10.0 / mpp:g},10002-q80=85")
           + _attr("DICOM_PIXEL_SPACING", _spacing(mpp), "IDoubleArray")
           + _attr("PIM_DP_IMAGE_TYPE", "WSI")
           + '<Attribute Name="PIIM_PIXEL_DATA_REPRESENTATION_SEQUENCE" '
             f'PMSVR="IDataObjectArray"><Array>{reps}</Array></Attribute>'
           + "</DataObject>")
    lab = ('<DataObject ObjectType="DPScannedImage">' + _attr("PIM_DP_IMAGE_TYPE", "LABELIMAGE")
           + _attr("PIM_DP_IMAGE_DATA", _jpeg_b64(label)) + "</DataObject>")
    barcode = base64.b64encode(PHILIPS_BARCODE.encode()).decode()
    return ('<?xml version="1.0" encoding="UTF-8" ?>\n<DataObject ObjectType="DPUfsImport">'
            + _attr("PIM_DP_UFS_BARCODE", barcode)
            + '<Attribute Name="PIM_DP_SCANNED_IMAGES" PMSVR="IDataObjectArray"><Array>'
            + wsi + lab + "</Array></Attribute></DataObject>")


def write_philips_tiff(path: str | os.PathLike[str], cfg: SynthConfig,
                       levels: int | None = None) -> dict[str, np.ndarray]:
    """Write a synthetic Philips TIFF (``levels`` levels in 2× steps, by default down to
    about 512 px; padded to whole
    tiles as Philips does; a label in the XML and as a page) to ``path`` atomically and
    return its ground-truth masks. Level 0 is rounded down to whole tiles."""
    import tifffile

    from gigamil.synth.slides import fake_label

    t = cfg.tile
    levels = levels or pyramid_depth(cfg.width, cfg.height)
    cfg = dataclasses.replace(cfg, width=cfg.width // t * t, height=cfg.height // t * t)
    model = SyntheticSlideModel(cfg)
    label = fake_label()
    common = {"photometric": "rgb", "compression": "jpeg", "dtype": np.uint8,
              "compressionargs": {"level": cfg.jpeg_quality}, "metadata": None,
              "software": "Philips DP v1.0"}
    with atomic_path(Path(path)) as tmp, tifffile.TiffWriter(tmp) as tif:
        for k in range(levels):
            ds = 2**k
            w, h = cfg.width // ds, cfg.height // ds  # the true size; stored padded
            pw, ph = -(-w // t) * t, -(-h // t) * t
            tif.write(model.iter_tiles(w, h, ds), shape=(ph, pw, 3), tile=(t, t),
                      subfiletype=0 if k == 0 else 1,
                      description=philips_xml(cfg.mpp, levels, label) if k == 0 else None,
                      **common)
        tif.write(label, description="Label", photometric="rgb", compression="jpeg",
                  metadata=None, software="Philips DP v1.0")
        tif.write(label[::2, ::2], description="Macro", photometric="rgb",
                  compression="jpeg", metadata=None, software="Philips DP v1.0")
    return model.masks
