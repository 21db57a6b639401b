from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from xraydx.transforms import (
    AugmentSpec,
    BatchAugment,
    Preprocessing,
    apply_lung_mask,
    mask_bbox,
    normalize,
    preprocess,
)


def _img(h: int = 300, w: int = 240) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return ((x + y) % 256).astype(np.uint8)


def test_preprocess_resizes_to_a_square_uint8() -> None:
    out = preprocess(_img(), Preprocessing(size=128))
    assert out.shape == (128, 128) and out.dtype == np.uint8
    with pytest.raises(ValueError, match="2-D uint8"):
        preprocess(np.zeros((10, 10, 3), np.uint8), Preprocessing(size=64))
    with pytest.raises(ValueError, match="needs a lung mask"):
        preprocess(_img(), Preprocessing(size=64, lung_mask="mask"))


def test_masks_line_up_across_sizes() -> None:
    """A mask made at 64 px applied to a 256 px image blanks the same anatomical region."""
    img = np.full((256, 256), 200, np.uint8)
    small = np.zeros((64, 64), np.uint8)
    small[16:48, 8:24] = 255  # a 'left lung' box at 1/4 scale
    masked = apply_lung_mask(img, small, "mask")
    assert masked[128, 64] == 200  # inside the box (scaled x4)
    assert masked[10, 10] == 0 and masked[128, 200] == 0  # outside, beyond the dilation
    cropped = apply_lung_mask(img, small, "crop")
    box = mask_bbox(np.kron(small > 0, np.ones((4, 4), bool)))
    assert box is not None
    assert cropped.shape[0] == pytest.approx(box[1] - box[0], abs=2)
    assert cropped.shape[1] == pytest.approx(box[3] - box[2], abs=2)


def test_crop_mask_is_the_mask_cut_to_the_crop_box() -> None:
    """crop_mask: everything outside the dilated lungs black, then the same box as crop; the lung field
    fills the input at one scale whatever the film's field of view."""
    rng = np.random.default_rng(0)
    img = rng.integers(1, 255, (200, 160), dtype=np.uint8)
    mask = np.zeros((200, 160), np.uint8)
    mask[40:160, 20:60] = 255  # two 'lungs' with a gap between them
    mask[40:160, 100:140] = 255
    both = apply_lung_mask(img, mask, "crop_mask")
    cropped = apply_lung_mask(img, mask, "crop")
    masked = apply_lung_mask(img, mask, "mask")
    box = mask_bbox(mask > 0)
    assert box is not None and both.shape == cropped.shape
    top, bottom, left, right = box
    assert np.array_equal(both, masked[top:bottom, left:right])
    assert (both == 0).any() and both[60 - top, 40 - left] == img[60, 40]  # the gap is black, the lungs kept
    assert both[60 - top, 80 - left] == 0  # the mediastinum between the lungs, beyond the dilation
    # a smaller and a larger view of the same chest give the same input (the scale is the lungs')
    spec = Preprocessing(size=64, lung_mask="crop_mask")
    big = np.kron(img, np.ones((2, 2), np.uint8))
    a = preprocess(img, spec, mask)
    b = preprocess(big, spec, np.kron(mask, np.ones((2, 2), np.uint8)))
    assert np.abs(a.astype(int) - b.astype(int)).mean() < 8
    assert np.array_equal(apply_lung_mask(img, np.zeros_like(mask), "crop_mask"), img)  # empty: unchanged


def test_empty_mask_keeps_the_image() -> None:
    img = _img(100, 100)
    assert np.array_equal(apply_lung_mask(img, np.zeros((100, 100), np.uint8), "mask"), img)


def test_normalize_and_augment_shapes_and_determinism() -> None:
    batch = torch.from_numpy(np.stack([_img(64, 64)] * 4)).unsqueeze(1)
    x = normalize(batch, 0.5, 0.25)
    assert x.shape == (4, 1, 64, 64) and x.dtype == torch.float32
    spec = AugmentSpec.preset("light")
    assert spec is not None and AugmentSpec.preset("none") is None
    aug = BatchAugment(spec)
    a = aug(batch, torch.Generator().manual_seed(1))
    b = aug(batch, torch.Generator().manual_seed(1))
    c = aug(batch, torch.Generator().manual_seed(2))
    assert a.shape == (4, 1, 64, 64) and float(a.min()) >= 0 and float(a.max()) <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    # samples in one batch get different transforms
    assert not torch.equal(a[0], a[1])


def test_augment_never_flips_left_right() -> None:
    """A bright blob on the image's left stays on the left under the light preset."""
    img = np.zeros((64, 64), np.uint8)
    img[20:44, 4:20] = 255
    batch = torch.from_numpy(np.stack([img] * 32)).unsqueeze(1)
    spec = AugmentSpec.preset("light")
    assert spec is not None
    out = BatchAugment(spec)(batch, torch.Generator().manual_seed(0))[:, 0]
    left, right = out[:, :, :32].sum(dim=(1, 2)), out[:, :, 32:].sum(dim=(1, 2))
    assert bool((left > right).all())


def test_equalize_spreads_a_low_contrast_image_and_ignores_black_background() -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(100, 120, size=(80, 80), dtype=np.uint8)
    out = preprocess(img, Preprocessing(size=80, intensity="equalize"))
    assert int(out.max()) - int(out.min()) > 200
    masked = img.copy()
    masked[:, :40] = 0
    eq = preprocess(masked, Preprocessing(size=80, intensity="equalize"))
    assert (eq[:, :40] == 0).all() and int(eq[:, 40:].max()) - int(eq[:, 40:].min()) > 200
    with pytest.raises(ValueError, match="intensity"):
        preprocess(img, Preprocessing(size=80, intensity="clahe"))


def test_fast_affine_grid_equals_torch_affine_grid() -> None:
    import torch.nn.functional as F

    from xraydx.transforms import _affine_grid

    theta = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        _affine_grid(theta, 48, 40), F.affine_grid(theta, [5, 1, 48, 40], align_corners=False)
    )


def test_intensity_lookup_table_equals_the_per_pixel_formula() -> None:
    """nearest mode's lookup table = gamma, then contrast about the image mean, brightness, clamp."""
    from xraydx.transforms import _intensity_lut

    rng = np.random.default_rng(0)
    batch = torch.from_numpy(
        np.stack([_img(40, 48), rng.integers(0, 256, (40, 48), dtype=np.uint8), _img(40, 48) // 3])
    )
    batch = batch.unsqueeze(1)
    gam, con, bri = (
        torch.tensor([0.8, 1.0, 1.3]),
        torch.tensor([1.1, 1.0, 0.9]),
        torch.tensor([0.05, 0.0, -0.1]),
    )
    x = (batch.float() / 255).pow(gam.view(3, 1, 1, 1))
    m = x[..., ::2, ::2].mean(dim=(1, 2, 3), keepdim=True)  # the contrast's centre: every other row/column
    want = ((x - m) * con.view(3, 1, 1, 1) + m + bri.view(3, 1, 1, 1)).clamp(0, 1)
    torch.testing.assert_close(_intensity_lut(batch, gam, con, bri), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("preset", ["light", "strong"])
def test_nearest_augment_moves_pixels_and_keeps_left_and_right(preset: str) -> None:
    img = np.zeros((64, 64), np.uint8)
    img[20:44, 4:20] = 200
    batch = torch.from_numpy(np.stack([img] * 16)).unsqueeze(1)
    spec = AugmentSpec.preset(preset)
    assert spec is not None
    aug = BatchAugment(spec, "nearest")
    out = aug(batch, torch.Generator().manual_seed(0))[:, 0]
    assert torch.equal(out, aug(batch, torch.Generator().manual_seed(0))[:, 0])
    left, right = out[:, :, :32].sum(dim=(1, 2)), out[:, :, 32:].sum(dim=(1, 2))
    assert bool((left > right).all())
    moved = [not torch.equal(out[i] > 0.5, out[0] > 0.5) for i in range(1, 16)]
    assert sum(moved) >= 12  # each image gets its own affine
    if preset == "light":  # no noise or blur: every output pixel is one of the image's two values' images
        assert all(len(torch.unique(out[i])) <= 3 for i in range(16))
    with pytest.raises(ValueError, match="interpolation"):
        BatchAugment(spec, "bicubic")


def test_base_size_gives_every_source_the_same_resolution() -> None:
    """A 512-px image and its own 224-px copy preprocess to (almost) the same pixels with base_size=224,
    and the base size is part of the cache key."""
    rng = np.random.default_rng(0)
    big = np.asarray(Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)).resize((512, 512)))
    small = np.asarray(Image.fromarray(big).resize((224, 224), Image.Resampling.BILINEAR))
    spec = Preprocessing(size=192, base_size=224)
    a, b = preprocess(big, spec), preprocess(small, spec)
    assert np.abs(a.astype(int) - b.astype(int)).mean() < 1.0
    plain = Preprocessing(size=192)
    assert np.abs(preprocess(big, plain).astype(int) - preprocess(small, plain).astype(int)).mean() > 1.0
    assert spec.cache_key() != plain.cache_key()
    assert Preprocessing.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize("preset", ["light", "strong"])
def test_fused_cpu_nearest_equals_the_torch_path(preset: str) -> None:
    """The numba kernel (xraydx.fastaug) gives the torch nearest path's pixels: same random draws, same
    table, same source pixel, except coordinates that land on an exact .5 (a few per million)."""
    pytest.importorskip("numba")
    rng = np.random.default_rng(0)
    imgs = [_img(96, 80)[:, :80], rng.integers(0, 256, (96, 80), dtype=np.uint8)] * 4
    batch = torch.from_numpy(np.stack(imgs)).unsqueeze(1)
    spec = AugmentSpec.preset(preset)
    assert spec is not None
    fused = BatchAugment(spec, "nearest", fused=True)(batch, torch.Generator().manual_seed(3))
    plain = BatchAugment(spec, "nearest", fused=False)(batch, torch.Generator().manual_seed(3))
    assert fused.shape == plain.shape == (8, 1, 96, 80) and fused.dtype == torch.float32
    off = (fused - plain).abs() > 1e-5
    assert float(off.float().mean()) < 1e-3
    assert float((fused == 0).float().mean()) == pytest.approx(float((plain == 0).float().mean()), abs=1e-3)


def test_fused_kernel_handles_extreme_affines() -> None:
    """The kernel finds the run of in-source columns per row analytically; check it against grid_sample on
    affines far outside the presets: quarter/half turns (zero steps), mirror, zoom in and out, shifts that
    move the image partly or wholly out of view, on a non-square image."""
    pytest.importorskip("numba")
    import torch.nn.functional as F

    from xraydx import fastaug
    from xraydx.transforms import _affine_grid, _intensity_lut

    rng = np.random.default_rng(1)
    thetas = (
        [
            [[1, 0, 0], [0, 1, 0]],  # identity
            [[0, -1, 0], [1, 0, 0]],  # quarter turn: no step along x
            [[-1, 0, 0], [0, -1, 0]],  # half turn
            [[-1, 0, 0.1], [0, 1, 0]],  # mirror
            [[3.0, 0.4, 0], [-0.4, 3.0, 0]],  # zoomed out: mostly fill
            [[0.2, 0, 0.5], [0, 0.2, -0.3]],  # zoomed in
            [[1, 0, 1.5], [0, 1, 0]],  # shifted partly out
            [[1, 0, 2.5], [0, 1, -2.5]],  # shifted wholly out: all fill
        ]
        + [[list(r[:3]), list(r[3:])] for r in rng.uniform(-2, 2, (24, 6))]
    )
    b = len(thetas)
    theta = torch.tensor(thetas, dtype=torch.float64)
    batch = torch.from_numpy(rng.integers(0, 256, (b, 1, 37, 53), dtype=np.uint8))
    gam = torch.from_numpy(rng.uniform(0.7, 1.4, b))
    con, bri = torch.from_numpy(rng.uniform(0.8, 1.2, b)), torch.from_numpy(rng.uniform(-0.2, 0.2, b))
    got = fastaug.nearest_affine_lut(batch, theta, gam, con, bri)
    want = F.grid_sample(
        _intensity_lut(batch, gam.float(), con.float(), bri.float()),
        _affine_grid(theta, 37, 53).float(),
        mode="nearest",
        padding_mode="zeros",
        align_corners=False,
    )
    off = (got - want).abs() > 1e-5
    assert float(off.float().mean()) < 1e-3, off.float().mean(dim=(1, 2, 3))
    assert bool((got[-25] == 0).all()) and float((got[4] == 0).float().mean()) > 0.8
    torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize(("mode", "fused"), [("bilinear", None), ("nearest", False), ("nearest", True)])
def test_augment_can_return_normalised_input(mode: str, fused: bool | None) -> None:
    """norm=(mean, std) gives exactly (x - mean) / std of the [0, 1] output (folded into the fused table)."""
    if fused:
        pytest.importorskip("numba")
    batch = torch.from_numpy(np.stack([_img(64, 64)] * 4)).unsqueeze(1)
    spec = AugmentSpec.preset("light")
    assert spec is not None
    aug = BatchAugment(spec, mode, fused=fused)
    x = aug(batch, torch.Generator().manual_seed(5))
    xn = aug(batch, torch.Generator().manual_seed(5), norm=(0.449, 0.226))
    torch.testing.assert_close(xn, (x - 0.449) / 0.226, atol=2e-6, rtol=0)


def test_fused_output_buffer_is_reused_and_gives_the_same_pixels() -> None:
    """reuse_output=True (what train uses on a CPU): the fused kernel writes each batch into one buffer (a
    smaller last batch into its first rows), with exactly the pixels a fresh output gets."""
    pytest.importorskip("numba")
    from xraydx import fastaug

    batch = torch.from_numpy(np.stack([_img(64, 64)] * 4)).unsqueeze(1)
    spec = AugmentSpec.preset("light")
    assert spec is not None
    fresh = BatchAugment(spec, "nearest", fused=True)
    reuse = BatchAugment(spec, "nearest", fused=True, reuse_output=True)
    a = reuse(batch, torch.Generator().manual_seed(1), norm=(0.5, 0.25))
    want_a = fresh(batch, torch.Generator().manual_seed(1), norm=(0.5, 0.25))
    torch.testing.assert_close(a, want_a, atol=0, rtol=0)
    b = reuse(batch, torch.Generator().manual_seed(2), norm=(0.5, 0.25))
    assert b.data_ptr() == a.data_ptr()  # the same memory, overwritten
    torch.testing.assert_close(
        b, fresh(batch, torch.Generator().manual_seed(2), norm=(0.5, 0.25)), atol=0, rtol=0
    )
    c = reuse(batch[:3], torch.Generator().manual_seed(1))
    assert c.shape == (3, 1, 64, 64) and c.data_ptr() == a.data_ptr()
    torch.testing.assert_close(c, fresh(batch[:3], torch.Generator().manual_seed(1)), atol=0, rtol=0)
    d = reuse(batch[:, :, :32], torch.Generator().manual_seed(1))  # another image size: a new buffer
    assert d.shape == (4, 1, 32, 64) and d.is_contiguous()
    assert (
        fresh(batch, torch.Generator().manual_seed(3)).data_ptr()
        != fresh(batch, torch.Generator()).data_ptr()
    )
    args = (torch.zeros(4, 2, 3), torch.ones(4), torch.ones(4), torch.zeros(4))
    with pytest.raises(ValueError, match="out must be"):
        fastaug.nearest_affine_lut(batch, *args, out=torch.empty(4, 1, 64, 63))
    with pytest.raises(ValueError, match="out must be"):
        fastaug.nearest_affine_lut(batch, *args, out=torch.empty(4, 1, 64, 64, dtype=torch.float64))


def test_fused_kernel_leaves_torch_thread_count_alone() -> None:
    """numba's OpenMP pool can share torch's OpenMP runtime, and starting it set torch to all CPUs: a run
    with train.threads=1 then trained on 2 threads, with different float sums (and not repeatable)."""
    pytest.importorskip("numba")
    batch = torch.from_numpy(np.stack([_img(64, 64)] * 4)).unsqueeze(1)
    spec = AugmentSpec.preset("light")
    assert spec is not None
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        BatchAugment(spec, "nearest", fused=True)(batch, torch.Generator().manual_seed(0))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
