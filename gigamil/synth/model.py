"""The procedural H&E-like slide behind the synthetic generators: masks, textures, tiles.

Everything is defined in micrometres, so the same ``seed`` rendered at 0.25 and at
0.5 µm/px gives the same tissue at the same physical positions. Tissue is pink
stroma with purple nuclei; on positive slides a planted tumour region has larger,
denser, darker nuclei. Pen marks and blurred areas can be planted for QC tests.
Ground-truth masks (tissue, tumor, pen, blur) live at :data:`MASK_MPP`.

Tiles are rendered from a periodic texture and low-resolution masks, so memory
does not depend on slide size; :mod:`gigamil.synth.slides` writes them to TIFF.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import cast

import cv2
import numpy as np

__all__ = ["SynthConfig", "SyntheticSlideModel", "MASK_MPP", "pyramid_depth"]

#: Resolution (µm/px) of the ground-truth masks saved beside each slide.
MASK_MPP = 8.0
#: Period of the tissue texture, µm.
_PERIOD_UM = 512.0
#: Resolution at which the texture is rendered before resizing to each level, µm/px.
_TEXTURE_MPP = 0.25
_BACKGROUND = np.array([243.0, 242.0, 245.0], dtype=np.float32)
_PEN_COLORS = {
    "blue": np.array([40.0, 60.0, 170.0], dtype=np.float32),
    "green": np.array([30.0, 130.0, 60.0], dtype=np.float32),
    "black": np.array([25.0, 25.0, 30.0], dtype=np.float32),
}


def pyramid_depth(width: int, height: int, step: int = 2, min_size: int = 512) -> int:
    """How many levels a pyramid in ``step``× reductions has until the next one would
    be under ``min_size`` px on its long side (at least one)."""
    n, ds = 1, step
    while max(width, height) // ds >= min_size:
        n, ds = n + 1, ds * step
    return n


@dataclass(frozen=True)
class SynthConfig:
    """How one synthetic slide looks. Sizes are level-0 pixels at ``mpp`` µm/px."""

    width: int = 20000
    height: int = 16000
    mpp: float = 0.25
    seed: int = 0
    tumor: bool = False
    pen_marks: bool = False
    blur: bool = False
    empty: bool = False
    tissue_fraction: float = 0.45
    tile: int = 256
    jpeg_quality: int = 85
    record_mpp: bool = True
    label_image: bool = True


def _hash_field(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Smooth random field in [0, 1] of ``shape``, correlation length ~``sigma`` px."""
    factor = max(1.0, sigma / 4.0)  # draw coarse noise and upsample: cheap for large sigma
    small = (max(2, int(math.ceil(shape[0] / factor))), max(2, int(math.ceil(shape[1] / factor))))
    field: np.ndarray = rng.standard_normal(small).astype(np.float32)
    field = cv2.GaussianBlur(field, (0, 0), sigmaX=max(sigma / factor, 0.5))
    if small != shape:
        field = cv2.resize(field, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)
    field -= field.min()
    peak = field.max()
    return field / peak if peak > 0 else field


def _periodic_field(rng: np.random.Generator, n: int, sigma: float) -> np.ndarray:
    """Smooth random field in [0, 1] on an ``n``×``n`` torus (tiles seamlessly)."""
    noise = rng.standard_normal((n, n)).astype(np.float32)
    f = np.fft.fftfreq(n).astype(np.float32)
    gauss = np.exp(-2 * (np.pi * sigma) ** 2 * (f[:, None] ** 2 + f[None, :] ** 2))
    field = np.fft.ifft2(np.fft.fft2(noise) * gauss).real.astype(np.float32)
    field -= field.min()
    peak = field.max()
    return field / peak if peak > 0 else field


class SyntheticSlideModel:
    """The procedural slide: masks at :data:`MASK_MPP` and textures per resolution."""

    def __init__(self, cfg: SynthConfig) -> None:
        self.cfg = cfg
        self.width_um = cfg.width * cfg.mpp
        self.height_um = cfg.height * cfg.mpp
        self.masks = self._make_masks()
        self._textures: dict[float, tuple[np.ndarray, ...]] = {}

    # ---- masks (depend only on the physical size and the seed) ---------------
    def _make_masks(self) -> dict[str, np.ndarray]:
        cfg = self.cfg
        mw = max(4, int(math.ceil(self.width_um / MASK_MPP)))
        mh = max(4, int(math.ceil(self.height_um / MASK_MPP)))
        rng = np.random.default_rng(cfg.seed)
        yy, xx = np.mgrid[0:mh, 0:mw].astype(np.float32)
        nx, ny = (xx + 0.5) / mw * 2 - 1, (yy + 0.5) / mh * 2 - 1
        envelope = np.clip(1.0 - (nx**2 + ny**2) ** 1.5, 0, 1)
        blob_px = 600.0 / MASK_MPP  # tissue lobes ~ 0.6 mm
        field = 0.55 * _hash_field(rng, (mh, mw), blob_px) + 0.45 * envelope
        if cfg.empty:
            tissue = np.zeros((mh, mw), np.float32)
        else:
            thr = np.quantile(field, 1.0 - cfg.tissue_fraction)
            tissue = (field > thr).astype(np.float32)
            tissue = cv2.GaussianBlur(tissue, (0, 0), 1.0)  # soft edges, sub-mask-pixel
        tumor = np.zeros_like(tissue)
        if cfg.tumor and not cfg.empty:
            inside = np.argwhere(tissue > 0.9)
            cy, cx = inside[rng.integers(len(inside))]
            radius = 0.22 * min(mw, mh)
            dist = np.hypot(xx - cx, yy - cy) / radius
            wobble = _hash_field(rng, (mh, mw), radius / 3) - 0.5
            tumor = ((dist + 0.6 * wobble) < 1.0).astype(np.float32) * (tissue > 0.5)
            tumor = cv2.GaussianBlur(tumor, (0, 0), 1.0) * tissue
        pens = {name: np.zeros_like(tissue) for name in _PEN_COLORS}
        if cfg.pen_marks:
            width_px = max(1, int(round(80.0 / MASK_MPP)))
            for name in _PEN_COLORS:
                canvas = np.zeros((mh, mw), np.uint8)
                pts = [rng.uniform([0.1 * mw, 0.1 * mh], [0.9 * mw, 0.9 * mh])]
                step = 0.06 * min(mw, mh)
                heading = rng.uniform(0, 2 * np.pi)
                for _ in range(12):
                    heading += rng.normal(0, 0.4)
                    pts.append(pts[-1] + step * np.array([np.cos(heading), np.sin(heading)]))
                poly = np.array(pts, np.int32).reshape(-1, 1, 2)
                cv2.polylines(canvas, [poly], False, 255, width_px, cv2.LINE_AA)
                pens[name] = canvas.astype(np.float32) / 255.0
        blur = np.zeros_like(tissue)
        if cfg.blur and not cfg.empty:
            inside = np.argwhere(tissue > 0.9)
            for _ in range(2):
                cy, cx = inside[rng.integers(len(inside))]
                axes = (int(0.08 * mw) + 2, int(0.08 * mh) + 2)
                canvas = np.zeros((mh, mw), np.uint8)
                cv2.ellipse(canvas, (int(cx), int(cy)), axes, 0, 0, 360, 255, -1)
                blur = np.maximum(blur, canvas.astype(np.float32) / 255.0)
        masks = {"tissue": tissue, "tumor": tumor, "blur": blur}
        masks.update({f"pen_{k}": v for k, v in pens.items()})
        return masks

    # ---- textures (periodic, rendered in µm and resized per level) -----------
    def _base_textures(self) -> tuple[np.ndarray, ...]:
        n = int(round(_PERIOD_UM / _TEXTURE_MPP))
        rng = np.random.default_rng(12345)  # texture identical across slides/seeds
        stroma = np.empty((n, n, 3), np.float32)
        shade = _periodic_field(rng, n, 20.0 / _TEXTURE_MPP)[..., None]
        fibres = _periodic_field(rng, n, 1.5 / _TEXTURE_MPP)[..., None]
        stroma[:] = np.array([236.0, 168.0, 200.0]) - 25 * shade - 18 * fibres
        normal = self._draw_nuclei(stroma.copy(), rng, spacing=16, radius=2.6, color=(95, 55, 140))
        tumor = self._draw_nuclei(stroma.copy(), rng, spacing=10, radius=4.2, color=(62, 30, 105))
        # fine grain (chromatin, fibre detail) at ~0.4 µm: real tissue is busy at the
        # pixel level, which is what makes its JPEG tiles large and slow to decode
        grain = _periodic_field(rng, n, 0.4 / _TEXTURE_MPP)[..., None]
        grain = 1.0 + 0.9 * (grain - grain.mean())
        normal = cv2.GaussianBlur(normal * grain, (0, 0), 0.6)
        tumor = cv2.GaussianBlur(tumor * grain, (0, 0), 0.6)
        sigma = 4.0 / _TEXTURE_MPP  # strong defocus, ~4 µm
        pad = int(3 * sigma)
        blurred = [
            cv2.GaussianBlur(np.pad(t, ((pad, pad), (pad, pad), (0, 0)), mode="wrap"), (0, 0), sigma)[
                pad:-pad, pad:-pad
            ]
            for t in (normal, tumor)
        ]
        return normal, tumor, blurred[0], blurred[1]

    @staticmethod
    def _draw_nuclei(
        img: np.ndarray, rng: np.random.Generator, spacing: float, radius: float,
        color: tuple[int, int, int],
    ) -> np.ndarray:
        n = img.shape[0]
        cells = int(_PERIOD_UM // spacing)
        shift = 4  # sub-pixel precision bits for cv2.circle
        for i in range(cells):
            for j in range(cells):
                cx = (j + rng.uniform(0.15, 0.85)) * spacing / _TEXTURE_MPP
                cy = (i + rng.uniform(0.15, 0.85)) * spacing / _TEXTURE_MPP
                r = radius * rng.uniform(0.75, 1.3) / _TEXTURE_MPP
                tone = np.array(color, np.float32) * rng.uniform(0.85, 1.15)
                for dx in (-n, 0, n):  # draw wrapped copies so the texture tiles seamlessly
                    for dy in (-n, 0, n):
                        px, py = cx + dx, cy + dy
                        if -r <= px <= n + r and -r <= py <= n + r:
                            cv2.circle(
                                img, (int(px * (1 << shift)), int(py * (1 << shift))),
                                int(r * (1 << shift)), tone.tolist(), -1, cv2.LINE_AA, shift,
                            )
        return img

    def textures(self, mpp: float) -> tuple[np.ndarray, ...]:
        """(normal, tumor, normal_blurred, tumor_blurred) at ``mpp``, wrap-padded by one tile."""
        key = round(mpp, 6)
        if key not in self._textures:
            if not hasattr(self, "_base"):
                self._base = self._base_textures()
            size = max(1, int(round(_PERIOD_UM / mpp)))
            pad = self.cfg.tile + 2
            out = []
            for tex in self._base:
                small = cv2.resize(tex, (size, size), interpolation=cv2.INTER_AREA)
                out.append(np.pad(small, ((0, pad), (0, pad), (0, 0)), mode="wrap"))
            self._textures[key] = tuple(out)
        return self._textures[key]

    # ---- rendering -----------------------------------------------------------
    def _mask_crop(self, mpp: float, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Masks resampled to the region: (h, w, 6) tissue, tumor, blur, pen ×3."""
        if not hasattr(self, "_stacks"):
            names = ["tissue", "tumor", "blur", "pen_blue", "pen_green", "pen_black"]
            self._stacks = [np.dstack([self.masks[n] for n in names[i : i + 3]]) for i in (0, 3)]
        a = mpp / MASK_MPP
        m = np.array([[a, 0, (x + 0.5) * a - 0.5], [0, a, (y + 0.5) * a - 0.5]], np.float64)
        chans = [
            cv2.warpAffine(
                stack, m, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                borderMode=cv2.BORDER_CONSTANT, borderValue=0,
            ).reshape(h, w, -1)
            for stack in (self._stacks if self.cfg.pen_marks else self._stacks[:1])
        ]
        return np.concatenate(chans, axis=2) if len(chans) > 1 else chans[0]

    def render(self, mpp: float, x: int, y: int, w: int, h: int) -> np.ndarray:
        """RGB uint8 (h, w, 3) of the region at resolution ``mpp`` with top-left (x, y) px."""
        normal, tumor, normal_b, tumor_b = self.textures(mpp)
        period = normal.shape[0] - (self.cfg.tile + 2)
        m = self._mask_crop(mpp, x, y, w, h)
        out = np.empty((h, w, 3), np.float32)
        step = self.cfg.tile
        for oy in range(0, h, step):  # texture crops are at most one tile (the padding)
            for ox in range(0, w, step):
                hh, ww = min(step, h - oy), min(step, w - ox)
                tsl = (slice(oy, oy + hh), slice(ox, ox + ww))
                t, tu, bl = m[tsl + (slice(0, 1),)], m[tsl + (slice(1, 2),)], m[tsl + (slice(2, 3),)]
                if not t.any():
                    out[tsl] = _BACKGROUND
                    continue
                ty, tx = (y + oy) % period, (x + ox) % period
                sl = (slice(ty, ty + hh), slice(tx, tx + ww))
                has_tumor, has_blur = tu.any(), bl.any()
                tis = normal[sl] * (1 - tu) + tumor[sl] * tu if has_tumor else normal[sl]
                if has_blur:
                    tis_b = normal_b[sl] * (1 - tu) + tumor_b[sl] * tu if has_tumor else normal_b[sl]
                    tis = tis * (1 - bl) + tis_b * bl
                out[tsl] = _BACKGROUND + (tis - _BACKGROUND) * t
        if self.cfg.pen_marks:
            for k, color in enumerate(_PEN_COLORS.values()):
                p = m[..., 3 + k : 4 + k]
                if p.any():
                    out += (color - out) * (0.85 * p)
        return np.clip(out + 0.5, 0, 255).astype(np.uint8)

    def level_sizes(self, min_size: int = 512) -> list[tuple[int, int, int]]:
        """(width, height, downsample) per level: downsample 1, 4, 16, … until small."""
        cfg = self.cfg
        sizes = [(cfg.width, cfg.height, 1)]
        ds = 4
        while max(cfg.width, cfg.height) // ds >= min_size:
            sizes.append((cfg.width // ds, cfg.height // ds, ds))
            ds *= 4
        return sizes

    def _tile_kind(self, mpp: float, x: int, y: int) -> str:
        """``background``, ``interior`` (plain normal tissue) or ``mixed``, from the masks."""
        t = self.cfg.tile
        f = mpp / MASK_MPP
        x0, y0 = max(0, int(x * f) - 2), max(0, int(y * f) - 2)
        x1, y1 = int((x + t) * f) + 3, int((y + t) * f) + 3
        win = {k: v[y0:y1, x0:x1] for k, v in self.masks.items()}
        if win["tissue"].size == 0:
            return "background"
        others = max(float(v.max()) if v.size else 0.0 for k, v in win.items() if k != "tissue")
        if others > 1e-6:
            return "mixed"
        lo, hi = float(win["tissue"].min()), float(win["tissue"].max())
        if hi <= 1e-6:
            return "background"
        if lo >= 0.999 and y1 <= self.masks["tissue"].shape[0] and x1 <= self.masks["tissue"].shape[1]:
            return "interior"
        return "mixed"

    def iter_tiles(self, level_w: int, level_h: int, ds: int) -> Iterator[bytes]:
        """JPEG-encoded tiles of one level, row by row, as tifffile writes them.

        Background tiles and plain-tissue tiles repeat (the texture is periodic),
        so they are rendered and encoded once and reused: large slides write fast.
        """
        import imagecodecs

        t = self.cfg.tile
        mpp = self.cfg.mpp * ds
        period = self.textures(mpp)[0].shape[0] - (t + 2)
        cache: dict[tuple[int, ...], bytes] = {}
        for ty in range(0, level_h, t):
            for tx in range(0, level_w, t):
                kind = self._tile_kind(mpp, tx, ty) if tx + t <= level_w and ty + t <= level_h \
                    else "mixed"
                key = (0,) if kind == "background" else (1, tx % period, ty % period) \
                    if kind == "interior" else None
                if key is not None and key in cache:
                    yield cache[key]
                    continue
                # without ``out`` jpeg8_encode returns bytes; its stub says bytes | bytearray
                data = cast(bytes, imagecodecs.jpeg8_encode(
                    self.render(mpp, tx, ty, t, t), level=self.cfg.jpeg_quality,
                    colorspace="RGB", outcolorspace="YCBCR", subsampling=(2, 2),
                ))
                if key is not None:
                    cache[key] = data
                yield data
