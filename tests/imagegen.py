"""Generated test images: learnable class folders and every odd kind of file ingest must cope with."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image


def pattern(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """An RGB uint8 image whose class is visible: a circle, a square or stripes, with random colour and noise."""
    h = w = size
    yy, xx = np.mgrid[0:h, 0:w]
    background = rng.integers(0, 100, size=3)
    colour = rng.integers(140, 256, size=3)
    img = np.broadcast_to(background, (h, w, 3)).astype(np.float32).copy()
    cy, cx = rng.integers(size // 3, 2 * size // 3, size=2)
    r = rng.integers(size // 6, size // 3)
    if kind == "circle":
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
    elif kind == "square":
        mask = (abs(yy - cy) < r) & (abs(xx - cx) < r)
    elif kind == "stripes":
        period = rng.integers(4, 9)
        mask = (xx // period) % 2 == 0
    else:
        mask = ((yy + xx) // max(2, size // 8)) % 2 == 0
    img[mask] = colour
    img += rng.normal(0, 8, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_class_folder(
    root: Path, classes: Sequence[str] = ("circle", "square", "stripes"), per_class: int = 30, size: int = 64,
    seed: int = 0, fmt: str = "JPEG",
) -> Path:
    """root/<class>/<class>_NNN.jpg for each class; every image has distinct content."""
    rng = np.random.default_rng(seed)
    ext = {"JPEG": "jpg", "PNG": "png"}[fmt]
    for name in classes:
        folder = Path(root) / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(pattern(name, size, rng)).save(folder / f"{name}_{i:03d}.{ext}", fmt)
    return Path(root)


class ImageFactory:
    """Writes single files of a given kind under `root`; every method returns the path it wrote.

    Valid kinds: jpeg, png, bmp, gif, webp, tiff, cmyk_jpeg, png16 (16-bit grey), palette_png, rgba_png, grey_jpeg.
    Broken kinds: truncated_jpeg, corrupt (random bytes with a .jpg name), empty, bomb (pixel count over PIL's
    limit), not_image (text with .txt), fake_ext (text with .png name), hidden (a dot-file JPEG).
    """

    VALID = ("jpeg", "png", "bmp", "gif", "webp", "tiff", "cmyk_jpeg", "png16", "palette_png", "rgba_png",
             "grey_jpeg")
    BROKEN = ("truncated_jpeg", "corrupt", "empty", "bomb", "fake_ext")

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.rng = np.random.default_rng(1234)

    def _path(self, rel: str) -> Path:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def array(self, size: int = 32) -> np.ndarray:
        return pattern("circle", size, self.rng)

    def _save(self, rel: str, image: Image.Image, fmt: str, **kw: object) -> Path:
        path = self._path(rel)
        image.save(path, fmt, **kw)
        return path

    def make(self, kind: str, rel: str | None = None, size: int = 32) -> Path:
        """Write one file of `kind` at root/rel (a default name when rel is None)."""
        ext = {"jpeg": "jpg", "png": "png", "bmp": "bmp", "gif": "gif", "webp": "webp", "tiff": "tif",
               "cmyk_jpeg": "jpg", "png16": "png", "palette_png": "png", "rgba_png": "png", "grey_jpeg": "jpg",
               "truncated_jpeg": "jpg", "corrupt": "jpg", "empty": "jpg", "bomb": "png", "not_image": "txt",
               "fake_ext": "png", "hidden": "jpg"}[kind]
        rel = rel or f"{kind}_{self.rng.integers(1 << 30)}.{ext}"
        rgb = Image.fromarray(self.array(size))
        if kind == "jpeg":
            return self._save(rel, rgb, "JPEG", quality=90)
        if kind == "png":
            return self._save(rel, rgb, "PNG")
        if kind == "bmp":
            return self._save(rel, rgb, "BMP")
        if kind == "gif":
            return self._save(rel, rgb.convert("P"), "GIF")
        if kind == "webp":
            return self._save(rel, rgb, "WEBP")
        if kind == "tiff":
            return self._save(rel, rgb, "TIFF")
        if kind == "cmyk_jpeg":
            return self._save(rel, rgb.convert("CMYK"), "JPEG")
        if kind == "png16":
            grey = (self.array(size)[..., 0].astype(np.uint16) * 257)
            return self._save(rel, Image.fromarray(grey), "PNG")
        if kind == "palette_png":
            return self._save(rel, rgb.convert("P", palette=Image.Palette.ADAPTIVE), "PNG")
        if kind == "rgba_png":
            rgba = rgb.convert("RGBA")
            rgba.putalpha(128)
            return self._save(rel, rgba, "PNG")
        if kind == "grey_jpeg":
            return self._save(rel, rgb.convert("L"), "JPEG")
        if kind == "truncated_jpeg":
            buf = io.BytesIO()
            rgb.save(buf, "JPEG")
            data = buf.getvalue()
            path = self._path(rel)
            path.write_bytes(data[: len(data) // 2])
            return path
        if kind == "corrupt":
            path = self._path(rel)
            path.write_bytes(b"\xff\xd8\xff\xe0" + self.rng.bytes(500))
            return path
        if kind == "empty":
            path = self._path(rel)
            path.write_bytes(b"")
            return path
        if kind == "bomb":
            # A 1-bit PNG of 20000x20000 = 4e8 pixels (> PIL's 1.8e8 bomb limit) that is only a few kB on disk.
            return self._save(rel, Image.new("1", (20000, 20000)), "PNG")
        if kind == "not_image":
            path = self._path(rel)
            path.write_text("not an image\n")
            return path
        if kind == "fake_ext":
            path = self._path(rel)
            path.write_text("plain text pretending to be a PNG\n")
            return path
        if kind == "hidden":
            folder, _, name = rel.rpartition("/")
            rel = f"{folder}/.{name}" if folder else f".{name}"
            return self._save(rel, rgb, "JPEG")
        raise ValueError(f"unknown image kind {kind!r}")
