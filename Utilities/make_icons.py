"""Draw LesionSeg's icons (extension icon 128×128, module icon, one icon per Segment
Editor effect) with numpy only and write them as PNG.

Run from the repository root:  python Utilities/make_icons.py
The PNGs are committed; this script documents how they were made and redraws them.
Shapes are rendered at 4× and averaged down, which gives anti-aliased edges.
"""
from __future__ import annotations

import struct
import sys
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SS = 4   # supersampling factor


def write_png(path: Path, rgba: np.ndarray) -> None:
    """Minimal PNG writer (8-bit RGBA, no interlace)."""
    h, w, _ = rgba.shape
    raw = b"".join(b"\x00" + rgba[y].astype(np.uint8).tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 6, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png)


class Canvas:
    """Premultiplied-free RGBA float canvas at SS× resolution; coordinates in output pixels."""

    def __init__(self, size: int):
        self.size = size
        n = size * SS
        self.rgb = np.zeros((n, n, 3))
        self.a = np.zeros((n, n))
        c = (np.arange(n) + 0.5) / SS
        self.y, self.x = np.meshgrid(c, c, indexing="ij")

    def fill(self, mask: np.ndarray, color, alpha: float = 1.0) -> None:
        col = np.asarray(color, float) / 255.0
        a = mask.astype(float) * alpha
        out_a = a + self.a * (1 - a)
        safe = np.where(out_a > 0, out_a, 1)
        self.rgb = (col * a[..., None] + self.rgb * (self.a * (1 - a))[..., None]) / safe[..., None]
        self.a = out_a

    def ellipse(self, cx, cy, rx, ry, angle=0.0):
        t = np.radians(angle)
        dx, dy = self.x - cx, self.y - cy
        u = dx * np.cos(t) + dy * np.sin(t)
        v = -dx * np.sin(t) + dy * np.cos(t)
        return (u / rx) ** 2 + (v / ry) ** 2 <= 1.0

    def ring(self, cx, cy, rx, ry, width, angle=0.0):
        return self.ellipse(cx, cy, rx + width / 2, ry + width / 2, angle) & ~self.ellipse(
            cx, cy, max(rx - width / 2, 0.01), max(ry - width / 2, 0.01), angle)

    def blob(self, cx, cy, r, lobes, seed=0):
        """Irregular lesion-like shape: a circle with a few smooth bumps."""
        rng = np.random.default_rng(seed)
        theta = np.arctan2(self.y - cy, self.x - cx)
        radius = np.full_like(theta, r)
        for k in range(2, 2 + lobes):
            radius += r * 0.12 * rng.uniform(0.5, 1.0) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
        return np.hypot(self.x - cx, self.y - cy) <= radius

    def blob_outline(self, cx, cy, r, lobes, width, seed=0):
        return self.blob(cx, cy, r + width / 2, lobes, seed) & ~self.blob(cx, cy, r - width / 2, lobes, seed)

    def rounded_rect(self, x0, y0, x1, y1, radius):
        cx = np.clip(self.x, x0 + radius, x1 - radius)
        cy = np.clip(self.y, y0 + radius, y1 - radius)
        return np.hypot(self.x - cx, self.y - cy) <= radius

    def rect(self, x0, y0, x1, y1):
        return (self.x >= x0) & (self.x <= x1) & (self.y >= y0) & (self.y <= y1)

    def image(self) -> np.ndarray:
        n = self.size
        rgb = self.rgb.reshape(n, SS, n, SS, 3)
        a = self.a.reshape(n, SS, n, SS)
        a_mean = a.mean(axis=(1, 3))
        rgb_mean = (rgb * a[..., None]).sum(axis=(1, 3)) / np.maximum(a.sum(axis=(1, 3)), 1e-9)[..., None]
        out = np.concatenate([rgb_mean * 255, a_mean[..., None] * 255], axis=-1)
        return np.clip(np.round(out), 0, 255).astype(np.uint8)


def scale(c: Canvas, v: float) -> float:
    return v * c.size / 128.0


def extension_icon(size=128) -> np.ndarray:
    """A scan slice with a segmented lesion: navy tile, grey organ slice with texture,
    an orange lesion with a yellow segmentation contour."""
    c = Canvas(size)
    s = lambda v: scale(c, v)   # noqa: E731
    c.fill(c.rounded_rect(s(4), s(4), s(124), s(124), s(22)), (28, 40, 72))
    c.fill(c.ellipse(s(64), s(66), s(46), s(52)), (150, 156, 168))
    c.fill(c.ellipse(s(64), s(66), s(38), s(44)), (186, 190, 198))
    for cx, cy, r in ((46, 44, 6), (84, 90, 8), (52, 98, 5), (88, 46, 4)):
        c.fill(c.ellipse(s(cx), s(cy), s(r), s(r)), (160, 165, 176), 0.8)
    c.fill(c.blob(s(76), s(62), s(17), 4, seed=3), (232, 96, 44))
    c.fill(c.blob_outline(s(76), s(62), s(21), 4, s(4.5), seed=3), (255, 214, 40))
    return c.image()


def effect_icon(kind: str, size=64) -> np.ndarray:
    c = Canvas(size)
    s = lambda v: scale(c, v)   # noqa: E731
    tile = c.rounded_rect(s(4), s(4), s(124), s(124), s(20))
    if kind == "MSENet":      # brain slice, yellow stroke lesion
        c.fill(tile, (34, 34, 48))
        c.fill(c.ellipse(s(64), s(66), s(44), s(54)), (170, 170, 182))
        c.fill(c.rect(s(62), s(14), s(66), s(118)) & c.ellipse(s(64), s(66), s(44), s(54)), (120, 120, 134))
        c.fill(c.blob(s(84), s(56), s(15), 3, seed=1), (255, 200, 0))
    elif kind == "M2SNet":    # colonoscopy view, orange polyp
        c.fill(tile, (70, 20, 24))
        c.fill(c.ellipse(s(64), s(64), s(54), s(54)), (196, 92, 88))
        c.fill(c.ellipse(s(58), s(58), s(18), s(18)), (90, 30, 34))
        c.fill(c.blob(s(84), s(84), s(20), 3, seed=5), (255, 128, 0))
        c.fill(c.ellipse(s(80), s(78), s(6), s(4)), (255, 220, 170), 0.9)
    elif kind == "LSeg":      # fundus with the four lesion colours
        c.fill(tile, (20, 12, 8))
        c.fill(c.ellipse(s(64), s(64), s(54), s(54)), (214, 96, 40))
        c.fill(c.ellipse(s(40), s(60), s(11), s(11)), (255, 226, 160))
        for (cx, cy, r, col) in ((78, 40, 7, (255, 0, 0)), (92, 72, 8, (0, 200, 0)),
                                 (66, 90, 5, (0, 60, 255)), (52, 30, 6, (255, 255, 0))):
            c.fill(c.ellipse(s(cx), s(cy), s(r), s(r)), col)
    elif kind == "BSNet":     # two lungs, infection patches with a boundary contour
        c.fill(tile, (24, 24, 30))
        c.fill(c.ellipse(s(42), s(64), s(24), s(46), -8), (70, 70, 80))
        c.fill(c.ellipse(s(86), s(64), s(24), s(46), 8), (70, 70, 80))
        c.fill(c.blob(s(88), s(80), s(14), 3, seed=7), (230, 80, 40))
        c.fill(c.blob_outline(s(88), s(80), s(16), 3, s(4), seed=7), (255, 240, 200))
        c.fill(c.blob(s(40), s(50), s(9), 3, seed=2), (230, 80, 40))
    elif kind == "MSLKSeg":   # nested large kernels over a lesion
        c.fill(tile, (30, 44, 60))
        for r, col in ((50, (70, 96, 126)), (36, (96, 128, 160)), (22, (130, 164, 196))):
            c.fill(c.rounded_rect(s(64 - r), s(64 - r), s(64 + r), s(64 + r), s(6)), col)
        c.fill(c.blob(s(64), s(64), s(14), 3, seed=4), (255, 64, 64))
    else:
        raise ValueError(kind)
    return c.image()


EFFECTS = ("MSENet", "M2SNet", "LSeg", "BSNet", "MSLKSeg")


def main() -> int:
    icons = ROOT / "LesionSeg" / "Resources" / "Icons"
    ext = extension_icon(128)
    write_png(ROOT / "LesionSeg.png", ext)
    write_png(icons / "LesionSeg.png", ext)
    for kind in EFFECTS:
        write_png(icons / f"SegmentEditorLesionSeg{kind}Effect.png", effect_icon(kind, 64))
    print(f"wrote {2 + len(EFFECTS)} icons")
    return 0


if __name__ == "__main__":
    sys.exit(main())
