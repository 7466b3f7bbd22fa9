"""DICOM WSI series for tests: convert a slide with wsidicomizer, and damage frames.

:func:`write_dicom_series` turns a slide (e.g. a synthetic ``.svs`` from
:func:`gigamil.synth.slides.write_synthetic_slide`) into a folder of DICOM WSI
instances with the real converter (wsidicomizer): one VOLUME instance per pyramid
level, plus LABEL / OVERVIEW / THUMBNAIL instances when the source has them. With
``phi=True`` the instances carry the made-up patient data in :data:`FAKE_PHI`, so
tests can check that none of it reaches an output.

:func:`damage_frame` corrupts one encoded frame of one level in place, for the
unreadable-tile paths of the readers.
"""

from __future__ import annotations

import datetime
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Literal

import numpy as np

from gigamil.errors import SlideOpenError, UsageError

__all__ = ["FAKE_PHI", "write_dicom_series", "damage_frame", "volume_files"]

#: Made-up patient data written into the DICOM metadata with ``phi=True``
#: (DICOM keyword → value as DICOM stores it).
FAKE_PHI: dict[str, str] = {
    "PatientName": "DOE^JANE",
    "PatientID": "MRN0000000",
    "AccessionNumber": "ACC123456",
    "PatientBirthDate": "19000101",
    "StudyDate": "20200101",
}

_WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"


def _date(value: str) -> datetime.date:
    return datetime.datetime.strptime(value, "%Y%m%d").date()


def write_dicom_series(
    source: str | os.PathLike[str],
    folder: str | os.PathLike[str],
    phi: bool = True,
    add_missing_levels: bool = True,
    tile_size: int | None = None,
    include_label: bool = True,
    include_overview: bool = True,
    include_thumbnail: bool = True,
    objective_power: float | None = None,
    workers: int = 1,
) -> Path:
    """Convert ``source`` into a DICOM WSI series folder ``folder``; return ``folder``.

    The instances are written to a hidden temporary folder beside ``folder`` and
    renamed when complete, so ``folder`` is either a whole series or absent.
    ``add_missing_levels`` makes wsidicomizer add levels so that the pyramid has
    every factor-2 step; ``tile_size`` only applies to sources whose tiles are
    re-encoded (an ``.svs``'s JPEG tiles are copied as they are). wsidicomizer does not
    carry the objective power over from an ``.svs``; ``objective_power`` records one.
    """
    from wsidicom.metadata import Image, Objectives, OpticalPath, Patient, Pyramid, Study
    from wsidicomizer import WsiDicomizer
    from wsidicomizer.metadata import WsiDicomizerMetadata

    source, folder = Path(source), Path(folder)
    if not source.is_file():
        raise UsageError(f"{source.name} does not exist", "give the slide file to convert")
    if folder.exists() and any(folder.iterdir()):
        raise UsageError(f"{folder.name} already exists and is not empty",
                         "remove it or choose another output folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    patient = study = pyramid = None
    if phi:
        patient = Patient(name=FAKE_PHI["PatientName"], identifier=FAKE_PHI["PatientID"],
                          birth_date=_date(FAKE_PHI["PatientBirthDate"]))
        study = Study(accession_number=FAKE_PHI["AccessionNumber"],
                      date=_date(FAKE_PHI["StudyDate"]))
    if objective_power is not None:
        optical = OpticalPath(objective=Objectives(objective_power=objective_power))
        pyramid = Pyramid(image=Image(), optical_paths=[optical])
    metadata = WsiDicomizerMetadata(patient=patient, study=study, pyramid=pyramid)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; outputs get the usual permissions
    try:
        WsiDicomizer.convert(
            source, tmp, metadata=metadata, tile_size=tile_size,
            add_missing_levels=add_missing_levels, include_label=include_label,
            include_overview=include_overview, include_thumbnail=include_thumbnail,
            include_confidential=phi, workers=workers,
        )
        for f in tmp.iterdir():
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
        if folder.exists():
            folder.rmdir()  # empty (checked above)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def volume_files(folder: str | os.PathLike[str]) -> list[Path]:
    """The VOLUME instances of a series folder, finest level first (header-only reads)."""
    import pydicom

    found: list[tuple[int, int, Path]] = []
    for f in sorted(Path(folder).iterdir()):
        if not f.is_file():
            continue
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=[
                "SOPClassUID", "ImageType", "TotalPixelMatrixColumns", "TotalPixelMatrixRows"])
        except Exception:
            continue
        image_type = list(ds.get("ImageType", []))
        if str(ds.get("SOPClassUID", "")) != _WSI_SOP_CLASS or len(image_type) < 3:
            continue
        if str(image_type[2]).upper() == "VOLUME":
            found.append((-int(ds.TotalPixelMatrixColumns), -int(ds.TotalPixelMatrixRows), f))
    return [f for *_, f in sorted(found)]


def _frame_spans(data: bytes, n_frames: int) -> list[tuple[int, int]]:
    """(offset, length) in the file of each encapsulated frame (one fragment per frame)."""
    # Pixel Data (7FE0,0010), explicit VR little endian, OB, undefined length
    start = data.find(b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff")
    if start < 0:
        raise SlideOpenError("no encapsulated pixel data found",
                             "damage_frame only handles compressed (encapsulated) frames")
    pos = start + 12
    spans: list[tuple[int, int]] = []
    first = True
    while pos + 8 <= len(data):
        group, element, length = struct.unpack_from("<HHI", data, pos)
        if (group, element) == (0xFFFE, 0xE0DD):  # sequence delimiter
            break
        if (group, element) != (0xFFFE, 0xE000):
            raise SlideOpenError("unexpected element inside the pixel data",
                                 "damage_frame expects one item per fragment")
        if not first:  # the first item is the basic offset table
            spans.append((pos + 8, length))
        first = False
        pos += 8 + length
    if len(spans) != n_frames:
        raise SlideOpenError(f"{len(spans)} fragments for {n_frames} frames",
                             "damage_frame expects one fragment per frame")
    return spans


def damage_frame(
    folder: str | os.PathLike[str],
    level: int,
    frame_index: int,
    mode: Literal["zero", "garbage"] = "zero",
    seed: int = 0,
) -> Path:
    """Corrupt frame ``frame_index`` of pyramid ``level`` (0 = finest) in place; return its file.

    ``zero`` overwrites the whole frame with zero bytes (no JPEG markers left).
    ``garbage`` keeps the JPEG headers and overwrites the middle of the entropy-coded
    scan data with random bytes that begin with an invalid marker (``FF 3F``), so
    that a decoder reports the frame as broken rather than silently returning
    wrong pixels (DICOM frames carry no checksum: quieter damage is undetectable).
    The file keeps its size and layout. Frames of a full tiling are numbered row
    by row: ``frame_index = row * tiles_across + column``.
    """
    import pydicom

    files = volume_files(folder)
    if not 0 <= level < len(files):
        raise UsageError(f"level {level} does not exist ({len(files)} levels)")
    path = files[level]
    n_frames = int(pydicom.dcmread(path, stop_before_pixels=True,
                                   specific_tags=["NumberOfFrames"]).get("NumberOfFrames", 1))
    data = bytearray(path.read_bytes())
    spans = _frame_spans(bytes(data), n_frames)
    if not 0 <= frame_index < len(spans):
        raise UsageError(f"frame {frame_index} does not exist ({len(spans)} frames)")
    offset, length = spans[frame_index]
    if mode == "zero":
        data[offset:offset + length] = bytes(length)
    elif mode == "garbage":
        frame = bytes(data[offset:offset + length])
        sos = frame.find(b"\xff\xda")
        if sos < 0:
            raise SlideOpenError("frame is not a JPEG", "garbage mode needs JPEG frames")
        scan = sos + 2 + int.from_bytes(frame[sos + 2:sos + 4], "big")
        n = (length - 2 - scan) // 2
        rng = np.random.default_rng(seed)
        junk = b"\xff\x3f" + rng.integers(0, 256, max(n - 2, 0), dtype=np.uint8).tobytes()
        begin = offset + scan + (length - 2 - scan - n) // 2
        data[begin:begin + len(junk)] = junk
    else:
        raise UsageError(f"unknown damage mode {mode!r}", "use 'zero' or 'garbage'")
    with open(path, "r+b") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return path
