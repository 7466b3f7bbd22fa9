"""Keeping patient identifiers out of the messages that DICOM libraries raise.

wsidicom and pydicom quote header values (and paths) in their errors; before such a
message goes into one of our errors, :func:`redacted_message` replaces every identifying
value found in the series' headers (names, ids, dates, accession number, …).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["redacted_message"]


#: Header attributes that identify a patient or a case; their values are scrubbed from
#: any library message that goes into one of our errors.
_PHI_TAGS = (
    "PatientName PatientID OtherPatientIDs IssuerOfPatientID PatientBirthDate PatientBirthTime "
    "PatientAddress PatientComments AccessionNumber StudyID StudyDate StudyTime SeriesDate "
    "SeriesTime ContentDate ContentTime AcquisitionDateTime ReferringPhysicianName "
    "InstitutionName StudyDescription ContainerIdentifier"
).split()


def _is_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def _phi_values(folder: Path) -> set[str]:
    """Identifying values in the headers of a series' files (only to scrub messages)."""
    import pydicom

    values: set[str] = set()
    try:
        files = [f for f in folder.iterdir() if f.is_file() and _is_dicom(f)]
    except OSError:
        return values
    for f in files[:8]:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=_PHI_TAGS)
        except Exception:
            continue
        for keyword in _PHI_TAGS:
            value = ds.get(keyword)
            items = value if isinstance(value, (list, tuple)) else [value]
            for item in items:
                text = str(item or "").strip()
                if len(text) >= 3:
                    values.add(text)
                    values.update(part for part in text.split("^") if len(part) >= 3)
    return values


def redacted_message(exc: BaseException, folder: Path, limit: int = 160) -> str:
    """A library's error message on one line, without any identifying header value."""
    text = " ".join(str(exc).split())
    for value in sorted(_phi_values(folder), key=len, reverse=True):
        text = text.replace(value, "<redacted>")
    return text if len(text) <= limit else text[: limit - 1] + "…"
