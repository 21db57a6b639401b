"""train.ampmix: each image keeps its Fourier phase and takes part of a different source's amplitude
spectrum; on real radiographs of the bundled sample."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import epoch_rows, plain_and_with, refused_on_one_source, refused_values, sample_images
from xraydx.ampmix import AmplitudeMix, mix_amplitude, partners


def _batch(n: int = 6, size: int = 64) -> torch.Tensor:
    imgs = [
        np.asarray(Image.open(p).convert("L").resize((size, size), Image.Resampling.BILINEAR))
        for p in sample_images()[:: max(1, len(sample_images()) // n)][:n]
    ]
    return torch.from_numpy(np.stack(imgs)).unsqueeze(1)


def test_partners_are_always_of_another_source() -> None:
    src = torch.tensor([0, 0, 1, 2, 2, 2, 1])
    for seed in range(20):
        p = partners(src, torch.Generator().manual_seed(seed))
        assert (p >= 0).all()
        assert (src[p] != src).all()
    assert (partners(torch.tensor([3, 3, 3]), torch.Generator()) == -1).all()  # nobody to mix with


def test_the_image_keeps_its_phase_and_takes_the_partners_amplitude() -> None:
    x = _batch(2).float()[:, 0]
    same = mix_amplitude(x[:1], x[1:], torch.tensor([0.0]))
    assert torch.allclose(same, x[:1], atol=1e-2)
    full = mix_amplitude(x[:1], x[1:], torch.tensor([1.0]))
    f_out, f_own, f_partner = torch.fft.fft2(full), torch.fft.fft2(x[:1]), torch.fft.fft2(x[1:])
    assert torch.allclose(f_out.abs(), f_partner.abs(), rtol=1e-3, atol=1e-1)
    strong = f_own.abs() > 1.0  # where the phase is defined
    dphase = torch.angle(f_out[strong] * f_own[strong].conj())
    assert dphase.abs().max() < 1e-2
    # the anatomy is the image's own: closer to it than to the partner
    half = mix_amplitude(x[:1], x[1:], torch.tensor([0.5]))
    c_own = np.corrcoef(half.flatten(), x[0].flatten())[0, 1]
    c_partner = np.corrcoef(half.flatten(), x[1].flatten())[0, 1]
    assert c_own > c_partner and c_own > 0.9


def test_the_batch_is_mixed_across_sources_only_and_repeats_with_its_seed() -> None:
    xb = _batch(6)
    mix = AmplitudeMix(1.0)
    one_site = mix(xb, torch.zeros(6, dtype=torch.long), torch.Generator().manual_seed(0))
    assert torch.equal(one_site, xb)  # a single source: nothing to take a look from
    src = torch.tensor([0, 0, 0, 1, 1, 1])
    a = mix(xb, src, torch.Generator().manual_seed(1))
    b = mix(xb, src, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.dtype == torch.uint8 and a.shape == xb.shape
    changed = (a.int() - xb.int()).abs().flatten(1).float().mean(1)
    assert (changed > 0.5).all()  # every image took some of another source's spectrum
    half = AmplitudeMix(0.5)(xb, src, torch.Generator().manual_seed(2))
    assert 0 < sum(not torch.equal(half[i], xb[i]) for i in range(6)) <= 6
    with pytest.raises(ValueError, match="source ids"):
        mix(xb, src[:3], torch.Generator())


def test_bad_settings_are_refused(tmp_path: Path, sample_dir: Path) -> None:
    refused_values(sample_dir, "ampmix", (-0.1, 1.5, float("nan")))
    refused_on_one_source(sample_dir, tmp_path, "train.ampmix needs two or more sources", ampmix=1.0)


def test_training_with_amplitude_mixing_logs_it_and_trains_differently(
    tmp_path: Path, sample_dir: Path
) -> None:
    plain, run = plain_and_with(sample_dir, tmp_path, ampmix=1.0)
    assert "Fourier amplitude mixing across sources" in (run / "train.log").read_text()
    assert epoch_rows(run)[0]["train_loss"] != epoch_rows(plain)[0]["train_loss"]
