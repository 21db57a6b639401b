"""render.py: every PNG and overlay encoder (Grad-CAM heat maps, lung masks, gray images, data: URIs)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from xraydx.render import (
    gray_png,
    heat_overlay,
    heat_overlay_png,
    heat_png,
    mask_overlay,
    outline,
    png_bytes,
    png_uri,
    save_png,
)

S = 64


def _open(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def test_heat_overlay_and_heat_png() -> None:
    img = np.full((S, S), 100, np.uint8)
    heat = np.zeros((S, S), np.float32)
    heat[:, : S // 2] = 1.0
    rgb = heat_overlay(img, heat)
    assert rgb.shape == (S, S, 3) and rgb.dtype == np.uint8
    assert not np.array_equal(rgb[0, 0], rgb[0, -1])  # hot and cold halves differ
    png = _open(heat_overlay_png(img, heat))
    assert png.size == (S, S) and png.mode == "RGB"
    assert np.array_equal(np.asarray(png), rgb)  # lossless
    rgba = np.asarray(_open(heat_png(heat)))
    assert rgba.shape == (S, S, 4)
    assert rgba[0, 0, 3] == 255 and rgba[0, -1, 3] == 0  # opacity follows the heat
    small = heat[::4, ::4]  # a heat map at another size is resized to the image
    assert heat_overlay(img, small).shape == (S, S, 3)


def test_mask_overlay_tints_the_lungs_and_draws_their_outline() -> None:
    img = np.full((S, S), 80, np.uint8)
    mask = np.zeros((S, S), np.uint8)
    mask[16:48, 8:28] = 255
    rgb = mask_overlay(img, mask)
    assert rgb.shape == (S, S, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[0, 0]) == (80, 80, 80)  # outside: the gray image
    assert tuple(rgb[16, 8]) == (255, 220, 0)  # the edge: yellow
    inside = rgb[32, 18]
    assert inside[2] > inside[0] and tuple(inside) != (80, 80, 80)  # tinted blue-cyan


def test_outline_draws_one_pixel_border() -> None:
    rgb = np.zeros((8, 8, 3), np.uint8)
    m = np.zeros((8, 8), bool)
    m[2:6, 2:6] = True
    outline(rgb, m)
    drawn = rgb[..., 0] == 255
    assert drawn.sum() == 12 and not drawn[3:5, 3:5].any() and not drawn[~m].any()


def test_gray_png_uri_and_save(tmp_path: Path) -> None:
    img = (np.arange(200 * 100) % 256).astype(np.uint8).reshape(200, 100)
    back = np.asarray(_open(gray_png(img)))
    assert back.dtype == np.uint8 and np.array_equal(back, img)
    small = _open(gray_png(img, max_side=50))
    assert small.size == (25, 50) and small.mode == "L"
    assert _open(gray_png(img, max_side=500)).size == (100, 200)  # never upscaled
    assert len(png_bytes(img, compress_level=0)) > len(png_bytes(img, compress_level=9))
    assert png_uri(b"\x89PNG").startswith("data:image/png;base64,iVBORw")
    save_png(tmp_path / "a.png", img)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), img)
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]  # no temp file left
