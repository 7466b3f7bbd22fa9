"""DICOM whole-slide images (a series folder of VL Whole Slide Microscopy instances).

A DICOM WSI is a *folder*: one VOLUME instance per pyramid level, plus LABEL,
OVERVIEW and THUMBNAIL instances. :class:`DicomReader` opens the VOLUME instances
with wsidicom and reads a region by fetching the encoded frames under it and decoding
them with imagecodecs (libjpeg-turbo, OpenJPEG) outside any lock, so many threads can
read one slide at once. Where a level is one fully tiled file, its frames are read
straight from the file (:mod:`gigamil.wsi.dicom_frames`); otherwise through
:meth:`wsidicom.WsiDicom.read_encoded_tile`. Other instances are only classified from their header: their pixels (which
may show PHI) are never read. Discovery helpers read headers only:
:func:`is_wsi_dicom`, :func:`series_image_type`, :func:`is_dicom_series_folder`.
No patient attribute (name, id, dates, …) reaches anything this module returns.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gigamil.errors import SlideOpenError, UnreadableRegionError
from gigamil.wsi.dicom_frames import FrameTable, frame_table
from gigamil.wsi.dicom_phi import redacted_message
from gigamil.wsi.jpeg import strict_jpeg_decode
from gigamil.wsi.metadata import valid_mpp, valid_power
from gigamil.wsi.slide import SlideReader

__all__ = ["WSI_SOP_CLASS_UID", "DicomReader", "is_wsi_dicom", "series_image_type",
           "is_dicom_series_folder"]

warnings.filterwarnings("ignore", message="get_frame_offsets is deprecated")  # wsidicom
logging.getLogger("wsidicom").setLevel(logging.ERROR)  # its warnings carry file paths

#: SOP Class UID of VL Whole Slide Microscopy Image Storage.
WSI_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.77.1.6"

#: Image types of instances that are not pyramid levels, and the names a reader lists.
_ASSOCIATED = {"LABEL": "label", "OVERVIEW": "overview", "THUMBNAIL": "thumbnail"}

#: wsidicom keeps encoded/decoded frames in LRU caches (100 MB each by default);
#: extraction reads each frame about once, so a small cache per open slide suffices.
_FRAME_CACHE_BYTES = 16 * 2**20

#: Transfer syntaxes decoded here with imagecodecs: JPEG (baseline, extended, lossless) →
#: libjpeg-turbo; JPEG 2000 and HTJ2K → OpenJPEG. Others (native, RLE, JPEG-LS, JPEG XL)
#: go through wsidicom's own decoders.
_CODECS = {
    **dict.fromkeys(["1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51",
                     "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70"], "jpeg8"),
    **dict.fromkeys(["1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91",
                     "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202",
                     "1.2.840.10008.1.2.4.203"], "jpeg2k"),
}


# ---- header-only discovery ----------------------------------------------------------------


def _has_dicom_preamble(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _image_type(path: Path) -> str | None:
    """ImageType value 3 of a DICOM WSI instance (header only); None if it is not one."""
    if not path.is_file() or not _has_dicom_preamble(path):
        return None
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True,
                             specific_tags=["SOPClassUID", "ImageType"])
    except Exception:
        return None
    sop = str(ds.get("SOPClassUID", "") or ds.file_meta.get("MediaStorageSOPClassUID", ""))
    value = ds.get("ImageType", [])
    values = [value] if isinstance(value, str) else list(value)
    if sop != WSI_SOP_CLASS_UID:
        return None
    return str(values[2]).strip().upper() if len(values) >= 3 else ""


def is_wsi_dicom(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a DICOM file of a whole-slide microscopy image (any image type)."""
    return _image_type(Path(path)) is not None


def series_image_type(path: str | os.PathLike[str]) -> str:
    """The image type of a DICOM WSI instance: ``VOLUME``, ``LABEL``, ``OVERVIEW``, ``THUMBNAIL``.

    Read from the header only (ImageType, value 3). Raises :class:`SlideOpenError`
    for a file that is not a DICOM WSI instance.
    """
    image_type = _image_type(Path(path))
    if image_type is None:
        raise SlideOpenError(f"{Path(path).name} is not a DICOM whole-slide image instance",
                             "check the file; only VL Whole Slide Microscopy instances are read")
    return image_type or "UNKNOWN"


def _scan_folder(folder: Path, stop_at_volume: bool = False) -> tuple[list[Path], set[str]]:
    """VOLUME instances directly in ``folder`` and the image types of the others."""
    volumes: list[Path] = []
    others: set[str] = set()
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return volumes, others
    for f in entries:
        image_type = None if f.name.startswith(".") else _image_type(f)
        if image_type == "VOLUME":
            volumes.append(f)
            if stop_at_volume:
                break
        elif image_type is not None:
            others.add(image_type)
    return volumes, others


def is_dicom_series_folder(folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder`` directly holds at least one VOLUME DICOM WSI instance (headers only)."""
    folder = Path(folder)
    return folder.is_dir() and bool(_scan_folder(folder, stop_at_volume=True)[0])


# ---- decoding -----------------------------------------------------------------------------


Decode = Callable[[bytes], np.ndarray]


def _decoder(syntax: str, photometric: str) -> Decode | None:
    """An imagecodecs decoder for frames of this transfer syntax; None: let wsidicom decode."""
    import imagecodecs

    codec = _CODECS.get(syntax)
    if codec is None or not (photometric in ("RGB", "MONOCHROME2") or photometric.startswith("YBR")):
        return None
    if not getattr(imagecodecs, codec.upper()).available:
        return None
    if codec == "jpeg8" and photometric.startswith("YBR"):  # strict: corrupt data raises
        return strict_jpeg_decode
    decode: Decode = getattr(imagecodecs, f"{codec}_decode")
    return decode


# ---- the reader ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _LevelInfo:
    index: int  # wsidicom's pyramid index (log2 of the downsample); not our level number
    width: int
    height: int
    downsample: float
    tile_w: int
    tile_h: int
    decode: Decode | None
    frames: FrameTable | None = None  # direct reads where the layout allows


class DicomReader(SlideReader):
    """A DICOM WSI series folder, read with wsidicom (frames decoded with imagecodecs).

    ``path`` is the series folder, or any file in it (then its folder is used).
    Levels are the VOLUME instances that are there, finest first; a level missing
    from the pyramid is simply absent. Reads return each level's own pixels.
    """

    backend = "wsidicom"
    exact_levels = True

    # ---- lifecycle -----------------------------------------------------------
    def _open(self) -> None:
        path = self.path
        if path.is_file():
            path = path.parent
        elif not path.is_dir():
            raise SlideOpenError(f"{path.name} does not exist",
                                 "give a DICOM series folder or one of its .dcm files")
        self.path = path
        volumes, others = _scan_folder(path)
        if not volumes:
            raise SlideOpenError(
                f"{path.name} holds no DICOM whole-slide VOLUME instance",
                "point to the folder with the slide's .dcm files (one series), "
                "not to a study folder or a label/overview file",
            )
        self._associated = sorted(_ASSOCIATED.get(t, t.lower()) for t in others if t)
        from wsidicom import WsiDicom

        try:
            wsi = WsiDicom.open(volumes)
        except Exception as exc:
            raise SlideOpenError(
                f"{path.name} is not a readable DICOM WSI series "
                f"({type(exc).__name__}: {redacted_message(exc, path)})",
                "check that the folder holds one complete series; re-export or copy it again",
            ) from exc
        self._handle = wsi
        self._lock = threading.Lock()
        try:
            wsi.resize_cache(_FRAME_CACHE_BYTES)
            self._levels = self._describe_levels(wsi)
        except Exception as exc:
            wsi.close()
            if isinstance(exc, SlideOpenError):
                raise
            raise SlideOpenError(
                f"{path.name}: the DICOM pyramid cannot be read "
                f"({type(exc).__name__}: {redacted_message(exc, path)})",
                "check that the series is complete; re-export or copy it again",
            ) from exc

    def _describe_levels(self, wsi: Any) -> list[_LevelInfo]:
        levels = sorted(wsi.levels, key=lambda lv: -int(lv.size.width))
        if not levels:
            raise SlideOpenError(f"{self.path.name} has no pyramid level",
                                 "check that the series is complete")
        base = levels[0]
        w0, h0 = int(base.size.width), int(base.size.height)
        self._spacing0 = spacing0 = _spacing(base)
        infos = []
        for lv in levels:
            w, h = int(lv.size.width), int(lv.size.height)
            ds = w0 / w
            spacing = _spacing(lv)
            if spacing0 and spacing:
                ds_spacing = spacing / spacing0
                # trust the pixel spacing when the level size is level 0's divided by it
                if abs(w0 / ds_spacing - w) <= 1.0 and abs(h0 / ds_spacing - h) <= 1.0:
                    ds = ds_spacing
            inst = lv.default_instance
            ds_set = inst.dataset
            if (bits := int(ds_set.get("BitsAllocated", 8) or 8)) != 8:
                raise SlideOpenError(f"{self.path.name} stores {bits}-bit samples",
                                     "only 8-bit (brightfield RGB) DICOM slides are supported")
            tile = lv.tile_size
            decode = _decoder(str(inst.image_data.transfer_syntax),
                              str(ds_set.get("PhotometricInterpretation", "")))
            infos.append(_LevelInfo(int(lv.level), w, h, float(ds), int(tile.width),
                                    int(tile.height), decode,
                                    frame_table(wsi, lv) if decode is not None else None))
        return infos

    def _close(self) -> None:
        for lv in getattr(self, "_levels", []):
            if lv.frames is not None:
                lv.frames.close()
        self._handle.close()

    # ---- metadata hooks ------------------------------------------------------
    def _level_dims_and_downsamples(self) -> list[tuple[int, int, float]]:
        return [(lv.width, lv.height, lv.downsample) for lv in self._levels]

    def _native_mpp(self) -> float | None:  # pixel spacing is in mm
        return None if self._spacing0 is None else valid_mpp(self._spacing0 * 1000.0)

    def _native_objective_power(self) -> float | None:
        try:
            ds = self._handle.levels[0].default_instance.dataset
            powers = [valid_power(p.get("ObjectiveLensPower"))
                      for p in ds.get("OpticalPathSequence", [])]
        except Exception:
            return None
        return next((p for p in powers if p is not None), None)

    @functools.cached_property
    def _tiff_meta(self) -> tuple[float | None, float | None]:
        return None, None  # a folder, not a TIFF

    @functools.cached_property
    def vendor(self) -> str:
        try:
            ds = self._handle.levels[0].default_instance.dataset
            maker = str(ds.get("Manufacturer", "") or "").strip()
        except Exception:
            maker = ""
        return maker if maker and maker.lower() != "unknown" else "dicom"

    @property
    def format(self) -> str:
        return "dicom"

    @property
    def associated_names(self) -> list[str]:
        return list(self._associated)

    # ---- pixels --------------------------------------------------------------
    def _read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        lv = self._levels[level]
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + w, lv.width), min(y + h, lv.height)
        inside = (x0, y0, x1, y1) == (x, y, x + w, y + h)
        out = np.empty((h, w, 3), np.uint8) if inside else np.full((h, w, 3), 255, np.uint8)
        if x0 >= x1 or y0 >= y1:
            return out
        for ty in range(y0 // lv.tile_h, (y1 - 1) // lv.tile_h + 1):
            for tx in range(x0 // lv.tile_w, (x1 - 1) // lv.tile_w + 1):
                tile = self._tile(level, lv, tx, ty, (x, y, w, h))
                # the part of this frame inside both the level and the region
                fx0, fy0 = tx * lv.tile_w, ty * lv.tile_h
                ax0, ay0 = max(x0, fx0), max(y0, fy0)
                ax1, ay1 = min(x1, fx0 + lv.tile_w), min(y1, fy0 + lv.tile_h)
                out[ay0 - y:ay1 - y, ax0 - x:ax1 - x] = tile[ay0 - fy0:ay1 - fy0,
                                                             ax0 - fx0:ax1 - fx0]
        return out

    def _tile(self, level: int, lv: _LevelInfo, tx: int, ty: int,
              region: tuple[int, int, int, int]) -> np.ndarray:
        """Frame (tx, ty) of a level as RGB uint8, checked to cover its part of the level."""
        def unreadable(why: str) -> UnreadableRegionError:
            x, y, w, h = region
            return UnreadableRegionError(
                f"{self.path.name}: frame ({tx},{ty}) of level {level} {why}; "
                f"region ({x},{y}) {w}x{h} px of level {level} cannot be read",
                "the series is damaged there; re-export or copy it again "
                "(extraction leaves out the patches that cannot be read)",
            )

        try:
            if lv.frames is not None:  # straight from the file, no lock
                arr = lv.decode(lv.frames.read(tx, ty))  # type: ignore[misc]
            elif lv.decode is not None:
                with self._lock:
                    encoded = self._handle.read_encoded_tile(
                        lv.index, (tx, ty), crop_to_image_boundary=False)
                arr = lv.decode(encoded)
            else:  # a transfer syntax imagecodecs does not cover here: wsidicom decodes
                image = self._handle.read_tile(lv.index, (tx, ty), crop_to_image_boundary=False)
                arr = np.asarray(image.convert("RGB"))
        except Exception as exc:
            raise unreadable(f"cannot be read or decoded ({type(exc).__name__}: "
                             f"{redacted_message(exc, self.path)})") from exc
        if arr.dtype != np.uint8:
            raise unreadable(f"decodes to {arr.dtype} samples")
        arr = arr[:, :, None] if arr.ndim == 2 else arr  # monochrome
        if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
            raise unreadable(f"decodes to an array of shape {arr.shape}")
        # edge frames may be stored smaller than the tile, but must cover the level
        need_h = min(lv.tile_h, lv.height - ty * lv.tile_h)
        need_w = min(lv.tile_w, lv.width - tx * lv.tile_w)
        rows, cols = arr.shape[:2]
        if rows > lv.tile_h or cols > lv.tile_w or rows < need_h or cols < need_w:
            raise unreadable(f"decodes to {cols}x{rows} px (tile {lv.tile_w}x{lv.tile_h})")
        return np.repeat(arr, 3, axis=2) if arr.shape[2] == 1 else arr[:, :, :3]


def _spacing(level: Any) -> float | None:
    """Horizontal pixel spacing of a wsidicom level in mm, or None."""
    try:
        value = float(level.pixel_spacing.width)
    except Exception:
        return None
    return value if value > 0 else None
