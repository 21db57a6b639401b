"""Augmentation that destroys acquisition cues: what tells one hospital's images from another's.

A COVID CXR model can score well by recognising the collection an image came from: its resolution and
sharpness (a 224-px copy vs a 1024-px original), its compression, its burned-in markers and text, its
black or white borders. Each is a cue that says nothing about the lungs. ``AcquisitionAugment`` randomises
them on every training batch, so no class can be told by them (Zech et al., PLoS Med 2018; DeGrave et
al., Nat. Mach. Intell. 2021 show models reading exactly these):

* **resolution**: down-sample by a random factor (0.25-0.8, area) and back up (bilinear);
* **compression**: re-encode as JPEG at a random quality (15-90);
* **sharpness**: unsharp mask with a random amount, negative = blur;
* **borders**: a random black or white band on one to four sides (up to 12% each);
* **markers**: one to four bright or dark rectangles, as burned-in letters, lead markers and labels;
* **noise**: Gaussian noise of random strength.

It works on the uint8 batch (B, 1, H, W) before the geometric/intensity augmentation of
``transforms.BatchAugment``, on the CPU (the JPEG step uses Pillow) or on any torch device for the rest.
Seeded by the generator given, like every augmentation here.
"""

from __future__ import annotations

import io

import numpy as np
import torch

#: probability of each operation per image
P = {"resolution": 0.5, "jpeg": 0.3, "sharpness": 0.3, "border": 0.3, "marker": 0.35, "noise": 0.3}


class AcquisitionAugment:
    """Randomises resolution, compression, sharpness, borders, markers and noise per image."""

    def __init__(self, strength: float = 1.0) -> None:
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"acquisition augmentation strength must be in [0, 1]; got {strength}")
        self.p = {k: v * strength for k, v in P.items()}

    def __call__(self, batch: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """uint8 (B, 1, H, W) in, uint8 of the same shape and device out (a new tensor). One seed is drawn
        from ``gen`` per batch; the per-image draws come from a NumPy generator seeded with it."""
        if batch.dtype != torch.uint8 or batch.ndim != 4 or batch.shape[1] != 1:
            raise ValueError(f"expected a uint8 (B, 1, H, W) batch; got {tuple(batch.shape)} {batch.dtype}")
        rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=gen)))
        arr = batch[:, 0].to("cpu").numpy()
        out = np.stack([self.one(a, rng) for a in arr])
        return torch.from_numpy(out).unsqueeze(1).to(batch.device)

    def one(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One uint8 (H, W) image."""
        from PIL import Image, ImageFilter

        h, w = img.shape
        p = self.p
        u = rng.random(6)
        im = Image.fromarray(img, mode="L")
        if u[0] < p["resolution"]:
            f = rng.uniform(0.25, 0.8)
            im = im.resize((max(8, int(w * f)), max(8, int(h * f))), Image.Resampling.BOX)
            im = im.resize((w, h), Image.Resampling.BILINEAR)
        if u[1] < p["jpeg"]:
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=int(rng.uniform(15, 90)))
            buf.seek(0)
            im = Image.open(buf).convert("L")
        if u[2] < p["sharpness"]:
            amount = rng.uniform(-0.8, 1.5)
            if amount >= 0:
                im = im.filter(ImageFilter.UnsharpMask(radius=1.5, percent=int(amount * 150), threshold=0))
            else:
                im = im.filter(ImageFilter.GaussianBlur(radius=-amount * 1.5))
        out = np.array(im, dtype=np.float32)
        if u[3] < p["border"]:
            self._borders(out, rng)
        if u[4] < p["marker"]:
            self._markers(out, rng)
        if u[5] < p["noise"]:
            out += rng.normal(0.0, rng.uniform(2.0, 12.0), out.shape).astype(np.float32)
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)

    @staticmethod
    def _borders(img: np.ndarray, rng: np.random.Generator) -> None:
        h, w = img.shape
        value = 0.0 if rng.random() < 0.7 else 255.0
        sides = [s for s in range(4) if rng.random() < 0.5] or [int(rng.integers(4))]
        for s in sides:
            k = int(rng.uniform(0.02, 0.12) * (h if s < 2 else w))
            if s == 0:
                img[:k] = value
            elif s == 1:
                img[h - k :] = value
            elif s == 2:
                img[:, :k] = value
            else:
                img[:, w - k :] = value

    @staticmethod
    def _markers(img: np.ndarray, rng: np.random.Generator) -> None:
        h, w = img.shape
        for _ in range(int(rng.integers(1, 5))):
            mh, mw = int(rng.uniform(0.03, 0.10) * h), int(rng.uniform(0.03, 0.12) * w)
            y, x = int(rng.integers(0, max(1, h - mh))), int(rng.integers(0, max(1, w - mw)))
            value = 255.0 if rng.random() < 0.75 else 0.0
            img[y : y + mh, x : x + mw] = value
            if rng.random() < 0.5 and mh > 4 and mw > 4:  # a letter-like outline, not a solid block
                img[y + mh // 4 : y + mh - mh // 4, x + mw // 4 : x + mw - mw // 4] = 255.0 - value
