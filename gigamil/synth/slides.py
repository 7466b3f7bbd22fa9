"""Synthetic pyramidal H&E-like slides for tests, benchmarks and the demo.

Slides are tiled JPEG TIFFs in Aperio layout (``.svs``): level 0, a stripped
thumbnail, reduced levels (tiled; ``subfiletype`` 0 as Aperio writes them, 1 in a generic TIFF) and a fake label image that holds
made-up "PHI" text (to check it never reaches an output). The description carries
``MPP`` and ``AppMag`` and the TIFF resolution tags carry the mpp, so openslide
and cuCIM both see levels and resolution. The tissue itself is drawn by
:class:`gigamil.synth.model.SyntheticSlideModel`; ground-truth masks are saved
beside each slide at :data:`gigamil.synth.model.MASK_MPP`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import cv2
import numpy as np

from gigamil.io import atomic_path, write_csv
from gigamil.synth.model import MASK_MPP, SynthConfig, SyntheticSlideModel

__all__ = [
    "write_synthetic_slide",
    "make_cohort",
    "load_masks",
    "save_masks",
    "damage_tile",
    "fake_label",
]


def fake_label(width: int = 400, height: int = 400) -> np.ndarray:
    """A slide label with made-up PHI text; gigamil must never copy it into outputs."""
    img = np.full((height, width, 3), 235, np.uint8)
    for i, text in enumerate(["PATIENT: DOE^JANE", "MRN 0000000", "DOB 1900-01-01"]):
        cv2.putText(img, text, (12, 60 + 60 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.8, (0, 0, 0), 2)
    return img


def write_synthetic_slide(path: str | os.PathLike[str], cfg: SynthConfig) -> dict[str, np.ndarray]:
    """Write a synthetic slide to ``path`` (atomically) and return its ground-truth masks."""
    import tifffile

    path = Path(path)
    model = SyntheticSlideModel(cfg)
    levels = model.level_sizes()
    w, h = cfg.width, cfg.height
    t = cfg.tile
    if cfg.record_mpp:
        description = (
            f"Aperio Image Library v12.0.15 \n{w}x{h} [0,0 {w}x{h}] ({t}x{t}) "
            f"JPEG/RGB Q={cfg.jpeg_quality}|AppMag = {10.0 / cfg.mpp:g}|MPP = {cfg.mpp:g}"
            f"|Filename = synthetic|Title = gigamil synthetic slide"
        )
        resolution: tuple[float, float] | None = (1e4 / cfg.mpp, 1e4 / cfg.mpp)
    else:
        description = "gigamil synthetic slide without resolution"
        resolution = None
    common = {
        "photometric": "rgb",
        "compression": "jpeg",
        "compressionargs": {"level": cfg.jpeg_quality},
        "dtype": np.uint8,
        "metadata": None,
    }
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=w * h > 2**31) as tif:
        res_kw = {"resolution": resolution, "resolutionunit": "CENTIMETER"} if resolution else {}
        tif.write(
            model.iter_tiles(w, h, 1), shape=(h, w, 3), tile=(t, t),
            description=description, **res_kw, **common,
        )
        thumb_w = min(1024, w)
        thumb_h = max(1, int(round(h * thumb_w / w)))
        thumb = model.render(cfg.mpp * w / thumb_w, 0, 0, thumb_w, thumb_h)
        if cfg.record_mpp:  # Aperio: the second IFD is a stripped thumbnail
            tif.write(thumb, description=f"Aperio Image Library v12.0.15 \n{w}x{h} -> "
                      f"{thumb_w}x{thumb_h} - |", photometric="rgb", compression="jpeg",
                      metadata=None)
        for lw, lh, ds in levels[1:]:
            lres = {"resolution": (resolution[0] / ds, resolution[1] / ds),
                    "resolutionunit": "CENTIMETER"} if resolution else {}
            tif.write(
                model.iter_tiles(lw, lh, ds), shape=(lh, lw, 3), tile=(t, t),
                subfiletype=0 if cfg.record_mpp else 1,  # Aperio: 0; generic TIFF: reduced
                description=description if cfg.record_mpp else None, **lres, **common,
            )
        if cfg.label_image and cfg.record_mpp:
            tif.write(fake_label(), subfiletype=1, photometric="rgb", compression="lzw",
                      description="Aperio Image Library v12.0.15\nlabel 400x400", metadata=None)
    return model.masks


def save_masks(path: str | os.PathLike[str], masks: dict[str, np.ndarray]) -> None:
    """Save masks as ``.npz`` (uint8 0–255 at :data:`MASK_MPP`) plus a colour ``.png`` overview."""
    path = Path(path)
    arrays = {k: np.round(v * 255).astype(np.uint8) for k, v in masks.items()}
    with atomic_path(path.with_suffix(".npz")) as tmp:
        with open(tmp, "wb") as fh:
            # allow_pickle (its default) named so mypy does not match **arrays against it
            np.savez_compressed(fh, mpp=np.float64(MASK_MPP), **arrays)  # type: ignore[arg-type]
    overview = np.full(masks["tissue"].shape + (3,), 255, np.uint8)
    overview[masks["tissue"] > 0.5] = (200, 200, 200)
    overview[masks["tumor"] > 0.5] = (220, 40, 40)
    overview[masks["blur"] > 0.5] = (230, 200, 40)
    for name, color in (("pen_blue", (40, 60, 200)), ("pen_green", (30, 150, 60)),
                        ("pen_black", (20, 20, 20))):
        overview[masks[name] > 0.5] = color
    with atomic_path(path.with_suffix(".png")) as tmp:
        ok, buf = cv2.imencode(".png", overview[..., ::-1])
        tmp.write_bytes(buf.tobytes())


def load_masks(path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], float]:
    """Masks (bool arrays) and their mpp from a ``masks/<slide_id>.npz`` file."""
    with np.load(Path(path).with_suffix(".npz")) as data:
        mpp = float(data["mpp"])
        return {k: data[k] > 127 for k in data.files if k != "mpp"}, mpp


def _write_one(path: Path, cfg: SynthConfig) -> str:
    masks = write_synthetic_slide(path, cfg)
    save_masks(path.parent / "masks" / path.stem, masks)
    with atomic_path(path.parent / "masks" / f"{path.stem}.json") as tmp:
        tmp.write_text(_cfg_json(cfg))
    return path.stem


def make_cohort(
    out_dir: str | os.PathLike[str],
    n: int = 6,
    width: int = 20000,
    height: int = 16000,
    mpp: float = 0.25,
    seed: int = 0,
    positive_fraction: float = 0.5,
    pen_marks: bool = False,
    blur: bool = False,
    n_empty: int = 0,
    workers: int = 1,
    progress: Callable[[str], None] | None = None,
) -> list[Path]:
    """Write ``n`` slides ``s000.svs`` … plus ``labels.csv`` and ``masks/``; return slide paths.

    About ``positive_fraction`` of the slides carry a planted tumour (label
    ``tumor``), the others are ``normal``; the last ``n_empty`` slides have no
    tissue. Two consecutive slides share a patient id. Slides already present
    with the same configuration are kept, so an interrupted run can be resumed.
    ``workers`` > 1 writes slides in parallel processes.
    """
    out = Path(out_dir)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_pos = int(round(n * positive_fraction))
    positive = np.zeros(n, bool)
    positive[rng.permutation(max(n - n_empty, 0))[:n_pos]] = True
    paths, rows, todo = [], [], []
    for i in range(n):
        cfg = SynthConfig(
            width=width, height=height, mpp=mpp, seed=seed * 1000 + i,
            tumor=bool(positive[i]), pen_marks=pen_marks, blur=blur, empty=i >= n - n_empty,
        )
        sid = f"s{i:03d}"
        path = out / f"{sid}.svs"
        stamp = out / "masks" / f"{sid}.json"
        if path.exists() and stamp.exists() and stamp.read_text() == _cfg_json(cfg):
            if progress is not None:
                progress(sid)
        else:
            todo.append((path, cfg))
        paths.append(path)
        rows.append({"slide_id": sid, "label": "tumor" if cfg.tumor else "normal",
                     "patient_id": f"p{i // 2:03d}"})
    if workers > 1 and len(todo) > 1:
        import concurrent.futures as cf
        import multiprocessing as mp

        with cf.ProcessPoolExecutor(min(workers, len(todo)), mp_context=mp.get_context("spawn")) as pool:
            for sid in pool.map(_write_one, *zip(*todo)):
                if progress is not None:
                    progress(sid)
    else:
        for path, cfg in todo:
            _write_one(path, cfg)
            if progress is not None:
                progress(path.stem)
    write_csv(out / "labels.csv", rows, ["slide_id", "label", "patient_id"])
    return paths


def _cfg_json(cfg: SynthConfig) -> str:
    import json

    return json.dumps(asdict(cfg), sort_keys=True)


def damage_tile(path: str | os.PathLike[str], page: int, tile: int, mode: str = "zero",
                seed: int = 0) -> None:
    """Damage one tile of a TIFF in place, for tests: ``zero`` overwrites its bytes with
    zeros; ``garbage`` overwrites the middle half of its entropy-coded data with random
    bytes (the JPEG markers at both ends stay, so only decoding can tell)."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        p = tif.pages[page]
        offset, length = int(p.dataoffsets[tile]), int(p.databytecounts[tile])
    with open(path, "r+b") as fh:
        if mode == "zero":
            fh.seek(offset)
            fh.write(bytes(length))
        elif mode == "garbage":
            rng = np.random.default_rng(seed)
            start = offset + length // 4
            fh.seek(start)
            fh.write(rng.integers(0, 256, length // 2, dtype=np.uint8).tobytes())
        else:
            raise ValueError(f"mode must be 'zero' or 'garbage', not {mode!r}")
