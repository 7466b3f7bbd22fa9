"""Extraction speed and memory, as ratios measured in one run.

    .venv/bin/python benchmarks/extract.py [--size 20001x16003] [--no-memory]

One synthetic 40x (0.25 µm/px) JPEG slide with Aperio-style odd dimensions (every
reduced level has a fractional downsample, 4.0002…), written as ``.svs``, as a DICOM
series (wsidicomizer, JPEG tiles copied) and as an OME-TIFF pyramid; the same tissue
as a Hamamatsu NDPI (JPEG strips with restart markers, 2× levels) and as a Philips
TIFF (padded 2× levels), both read directly (openslide is their per-patch loop). For each format
and backend, at 0.5 µm/px (level 0, shrunk 2×) and at 2.0 µm/px (read from the
fractional level 1, 4.0002…, shrunk ~2×), 256 px patches, ``--format raw``, one worker:

- decode limit: every tile of the read level under a kept patch, read from the file
  (``pread``) and decoded once by libjpeg-turbo directly, the same decoder for every
  format (one core);
- per-patch loop: the CLAM/TRIDENT way, one ``read_region`` per patch then a resize, on
  an even sample: openslide for svs and DICOM level 0 (openslide 4 misreads the reduced
  levels of these series: wsidicom there), tiffslide for OME-TIFF (openslide does not read
  OME pyramids);
- gigamil: one slide's extraction with one reading thread beside the LMDB writer, as in
  a warm worker (tissue detection, planning and LMDB writes included); best of two runs
  after a warm-up (the machine is shared).

Also: multi-scale ``--mpp 0.5,1.0,2.0`` against 0.5 alone, and peak RSS of
``gigamil extract`` on a 20k×16k and a 100k×80k slide. ``benchmarks/staging.py``
measures ``--stage-dir`` behind a throttled filesystem.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from gigamil.cluster.extract_cohort import extract_slides
from gigamil.synth.model import SynthConfig
from gigamil.synth.slides import write_synthetic_slide
from gigamil.wsi.extract_config import ExtractConfig
from gigamil.wsi.reader import cucim_available, open_slide
from gigamil.wsi.slide import resize_area
from gigamil.wsi.store import PatchStore


def make_slide(path: Path, width: int, height: int, seed: int = 1) -> Path:
    if not path.exists():
        t = time.perf_counter()
        write_synthetic_slide(path, SynthConfig(width=width, height=height, mpp=0.25, seed=seed,
                                                tumor=True, tissue_fraction=0.5))
        print(f"  wrote {path.name} ({width}x{height}) in {time.perf_counter() - t:.0f} s",
              flush=True)
    return path


def make_dicom(svs: Path, folder: Path) -> Path:
    from gigamil.synth.dicom import write_dicom_series

    if not folder.exists():
        t = time.perf_counter()
        write_dicom_series(svs, folder, phi=False, add_missing_levels=False)
        print(f"  wrote DICOM series {folder.name} in {time.perf_counter() - t:.0f} s",
              flush=True)
    return folder


def make_ome(svs: Path, path: Path) -> Path:
    """The svs's level-0 JPEG tiles re-encoded as an OME-TIFF with 4× SubIFD levels."""
    import tifffile

    if path.exists():
        return path
    t = time.perf_counter()
    with tifffile.TiffFile(svs) as src:
        pages = [p for p in src.pages if p.is_tiled]
        levels = [p.asarray() for p in pages]  # benchmark-sized slides only
    with tifffile.TiffWriter(path, ome=True, bigtiff=True) as tif:
        tif.write(levels[0], subifds=len(levels) - 1, tile=(256, 256), compression="jpeg",
                  compressionargs={"level": 85}, photometric="rgb",
                  metadata={"axes": "YXS", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25})
        for lv in levels[1:]:
            tif.write(lv, subfiletype=1, tile=(256, 256), compression="jpeg",
                      compressionargs={"level": 85}, photometric="rgb")
    print(f"  wrote {path.name} in {time.perf_counter() - t:.0f} s", flush=True)
    return path


def make_vendor(path: Path, width: int, height: int) -> Path:
    """The same synthetic tissue as an NDPI (``.ndpi``) or a Philips TIFF (``.tiff``)."""
    from gigamil.synth.ndpi import write_ndpi
    from gigamil.synth.philips import write_philips_tiff

    if not path.exists():
        t = time.perf_counter()
        write = write_ndpi if path.suffix == ".ndpi" else write_philips_tiff
        write(path, SynthConfig(width=width, height=height, mpp=0.25, seed=1, tumor=True,
                                tissue_fraction=0.5))
        print(f"  wrote {path.name} in {time.perf_counter() - t:.0f} s", flush=True)
    return path


def tile_decoder(path: Path, level: int) -> tuple[Callable[[int, int], object], int, int]:
    """(decode(tx, ty), tile width, tile height) reading one tile of ``level`` directly."""
    if path.is_dir():
        from gigamil.wsi.dicom import DicomReader

        reader = DicomReader(path)
        lv = reader._levels[level]  # noqa: SLF001 - the benchmark measures the raw frames
        wsi = reader._handle  # noqa: SLF001
        decode = lv.decode

        def one(tx: int, ty: int) -> object:
            if lv.frames is not None:  # the frame straight from the file
                return decode(lv.frames.read(tx, ty))  # type: ignore[misc]
            return decode(wsi.read_encoded_tile(lv.index, (tx, ty), crop_to_image_boundary=False))
        return one, lv.tile_w, lv.tile_h
    import tifffile

    from gigamil.wsi.tiles import pyramid_levels

    tif = tifffile.TiffFile(path)
    lv = pyramid_levels(tif)[0][level]
    page, fd = lv.page, os.open(path, os.O_RDONLY)

    def one(tx: int, ty: int) -> object:
        i = ty * lv.across + tx
        data = os.pread(fd, int(page.databytecounts[i]), int(page.dataoffsets[i]))
        if lv.jpeg is not None:  # libjpeg-turbo straight on the tile, as for DICOM frames
            return lv.jpeg(data)  # (tifffile's page.decode costs ~30 % more per tile)
        return page.decode(data, i, jpegtables=page.jpegtables,
                           jpegheader=getattr(page, "jpegheader", None))
    return one, lv.seg_w, lv.seg_h


def decode_limit(path: Path, level: int, read_xy: np.ndarray, read_size: int) -> float:
    """Seconds to read and decode, once, every tile of ``level`` under the patches."""
    one, tw, th = tile_decoder(path, level)
    tiles = set()
    for x, y in read_xy:
        for ty in range(y // th, (y + read_size - 1) // th + 1):
            for tx in range(x // tw, (x + read_size - 1) // tw + 1):
                tiles.add((ty, tx))
    t = time.perf_counter()
    for ty, tx in sorted(tiles):
        one(tx, ty)
    return time.perf_counter() - t


def per_patch_loop(path: Path, level: int, read_xy: np.ndarray, read_size: int, patch: int,
                   n: int) -> float:
    """Seconds per patch of the reference library's read_region → RGB → resize."""
    idx = np.linspace(0, len(read_xy) - 1, min(n, len(read_xy))).astype(int)
    if path.is_dir() and level == 0:  # what CLAM users get: openslide 4 reads DICOM level 0
        import openslide

        slide = openslide.OpenSlide(str(next(path.glob("*.dcm"))))

        def read(x: int, y: int) -> np.ndarray:
            img = slide.read_region((x, y), 0, (read_size, read_size))
            return np.asarray(img.convert("RGB"))
    elif path.is_dir():  # openslide misreads the reduced levels of these series: wsidicom
        from wsidicom import WsiDicom

        slide = WsiDicom.open(path)
        lvl = slide.levels[level].level

        def read(x: int, y: int) -> np.ndarray:
            return np.asarray(slide.read_region((x, y), lvl, (read_size, read_size)).convert("RGB"))
    else:
        if path.name.endswith(".ome.tif"):
            import tiffslide as lib
        else:
            import openslide as lib  # type: ignore[no-redef]
        slide = lib.OpenSlide(str(path))
        ds = slide.level_downsamples[level]

        def read(x: int, y: int) -> np.ndarray:
            img = slide.read_region((int(round(x * ds)), int(round(y * ds))), level,
                                    (read_size, read_size))
            return np.asarray(img.convert("RGB"))
    t = time.perf_counter()
    for x, y in read_xy[idx]:
        resize_area(read(int(x), int(y)), patch)
    return (time.perf_counter() - t) / len(idx)


def gigamil_run(path: Path, out: Path, cfg: ExtractConfig, repeats: int = 2) -> tuple[float, int]:
    """Best of ``repeats`` runs of one slide in this process, one reading thread beside the
    writer, as in a worker that has done a slide before (libraries imported, warm)."""
    extract_slides([path], out, cfg, workers=0, overwrite=True)  # warm-up
    best, n = float("inf"), 0
    for _ in range(repeats):
        res = extract_slides([path], out, cfg, workers=0, overwrite=True)[0]
        assert res.status == "ok", res.error
        best, n = min(best, res.seconds), res.n_patches
    return best, n


def kept(out: Path, path: Path) -> tuple[np.ndarray, int, int, float]:
    """Read-level positions of the stored patches, read size, read level, downsample."""
    from gigamil.wsi.metadata import slide_id

    with PatchStore(out / "patches" / f"{slide_id(path)}.lmdb") as store:
        with open_slide(path) as slide:
            ds = slide.levels[int(store.meta["read_level"])].downsample
        xy = np.round(store.coords / ds).astype(np.int64)
        return xy, int(store.meta["read_size"]), int(store.meta["read_level"]), ds


def peak_rss(cmd: list[str]) -> tuple[float, float, float]:
    """(peak RSS, peak anonymous RSS, both in MB, and wall seconds) of a command's process
    tree. Anonymous = RSS less file-backed pages (the store's and libraries' mapped pages,
    which the kernel can drop at any time)."""
    import psutil

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ps = psutil.Process(proc.pid)
    peak = [0, 0]

    def sample() -> None:
        while proc.poll() is None:
            try:
                infos = [p.memory_info() for p in [ps, *ps.children(recursive=True)]]
                peak[0] = max(peak[0], sum(m.rss for m in infos))
                peak[1] = max(peak[1], sum(m.rss - getattr(m, "shared", 0) for m in infos))
            except psutil.Error:
                pass
            time.sleep(0.02)

    t = time.perf_counter()
    th = threading.Thread(target=sample)
    th.start()
    proc.wait()
    th.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with {proc.returncode}")
    return peak[0] / 2**20, peak[1] / 2**20, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", default="20001x16003")
    ap.add_argument("--workdir", default=os.environ.get("GIGAMIL_BENCH_DIR", "/tmp/gigamil-bench"))
    ap.add_argument("--baseline-patches", type=int, default=300)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--formats", default="svs,dicom,ome-tiff,ndpi,philips",
                    help="formats to measure (comma-separated)")
    ap.add_argument("--no-multiscale", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    w, h = (int(v) for v in args.size.split("x"))
    print(f"extraction benchmark: {w}x{h} px at 0.25 µm/px, 256 px patches, --format raw, "
          "one worker", flush=True)
    svs = make_slide(work / f"odd_{w}x{h}.svs", w, h)
    dicom = make_dicom(svs, work / f"odd_{w}x{h}_dicom")
    ome = make_ome(svs, work / f"odd_{w}x{h}.ome.tif")
    ndpi = make_vendor(work / f"odd_{w}x{h}_v2.ndpi", w, h)
    philips = make_vendor(work / f"odd_{w}x{h}_philips_v2.tiff", w, h)
    cases = [("svs", svs, "tiles"), ("svs", svs, "openslide"), ("dicom", dicom, "wsidicom"),
             ("ome-tiff", ome, "tiles"), ("ndpi", ndpi, "tiles"), ("philips", philips, "tiles")]
    if cucim_available():
        cases.insert(1, ("svs", svs, "cucim"))
    cases = [c for c in cases if c[0] in args.formats.split(",")]
    rows: list[dict[str, object]] = []
    print(f"\n{'format':9s} {'backend':9s} {'µm/px':>5s} {'level':>5s} {'ds':>7s} {'patches':>7s} "
          f"{'limit/s':>8s} {'loop/s':>7s} {'ours/s':>7s} {'÷limit':>6s} {'÷loop':>6s}")
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        for fmt, path, backend in cases:
            for mpp in (0.5, 2.0):
                cfg = ExtractConfig(mpp=mpp, patch_size=256, encoding="raw",
                                    backend=backend)  # type: ignore[arg-type]
                out = Path(tmp) / f"{fmt}_{backend}_{mpp}"
                t_ours, n = gigamil_run(path, out, cfg)
                xy, rs, level, ds = kept(out, path)
                t_lim = min(decode_limit(path, level, xy, rs) for _ in range(2))
                t_loop = per_patch_loop(path, level, xy, rs, 256, args.baseline_patches)
                r = {"format": fmt, "backend": backend, "mpp": mpp, "level": level,
                     "downsample": ds, "patches": n, "limit_pps": n / t_lim,
                     "loop_pps": 1 / t_loop, "gigamil_pps": n / t_ours}
                r["vs_limit"] = r["gigamil_pps"] / r["limit_pps"]  # type: ignore[operator]
                r["vs_loop"] = r["gigamil_pps"] / r["loop_pps"]  # type: ignore[operator]
                rows.append(r)
                goal = 0.6 if level == 0 else 0.4
                print(f"{fmt:9s} {backend:9s} {mpp:5.1f} {level:5d} {ds:7.4f} {n:7d} "
                      f"{r['limit_pps']:8.0f} {r['loop_pps']:7.0f} {r['gigamil_pps']:7.0f} "
                      f"{r['vs_limit']:6.2f} {r['vs_loop']:6.1f}  "
                      f"{'PASS' if r['vs_limit'] >= goal and r['vs_loop'] >= 3 else 'SHORT'} "
                      f"(goal ≥ {goal} of the limit, ≥ 3× the loop)", flush=True)
        result: dict[str, object] = {"size": [w, h], "cases": rows}
        if not args.no_multiscale:
            t_one, _ = gigamil_run(svs, Path(tmp) / "ms1", ExtractConfig(mpp=0.5, encoding="raw"))
            t_multi, _ = gigamil_run(svs, Path(tmp) / "ms3",
                                     ExtractConfig(mpp=(0.5, 1.0, 2.0), encoding="raw"))
            ms = result["multiscale_ratio"] = t_multi / t_one
            print(f"\nmulti-scale 0.5,1.0,2.0 / 0.5 alone (svs, tiles): {ms:.2f}× "
                  f"(goal ≤ 1.3: {'PASS' if ms <= 1.3 else 'SHORT'})")

    if not args.no_memory:
        print("\npeak RSS of `gigamil extract` (CLI process + worker):", flush=True)
        mem, anon = {}, {}
        for mw, mh in ((20000, 16000), (100000, 80000)):
            s = make_slide(work / f"bench_{mw}x{mh}.svs", mw, mh, seed=2)
            with tempfile.TemporaryDirectory(dir=work) as tmp:
                mb, an, secs = peak_rss([sys.executable, "-m", "gigamil", "extract", str(s),
                                         "--out", tmp])
            mem[f"{mw}x{mh}"], anon[f"{mw}x{mh}"] = mb, an
            print(f"  {mw}x{mh}: {mb:7.0f} MB, of it anonymous {an:5.0f} MB  ({secs:.0f} s)",
                  flush=True)
        small, big = mem["20000x16000"], mem["100000x80000"]
        print(f"  100k×80k under 1 GB: {big < 1024}; growth over 20k×16k (goal ≤ +20 %): "
              f"RSS {big / small - 1:+.1%}, anonymous "
              f"{anon['100000x80000'] / anon['20000x16000'] - 1:+.1%}")
        result["peak_rss_mb"] = mem
        result["peak_anonymous_rss_mb"] = anon
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
