"""Decode-once cache: each image is decoded, masked/resized once, and stored as a uint8 array.

Entries are content-addressed: ``<cache_dir>/<preprocessing key>/<sha1 of file bytes [+ mask bytes]>.npy``.
Changing the file or the preprocessing settings changes the key, so stale entries are never used.
Entries are written atomically (temp file + rename), so two processes filling the cache at once are
safe; an entry that fails to load or has the wrong shape is rebuilt.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from xraydx.io import ImageReadError, read_image
from xraydx.transforms import Preprocessing, preprocess


def file_digest(path: Path, extra: Path | None = None) -> str:
    h = hashlib.sha1()
    for p in (path, extra):
        if p is None:
            continue
        with open(p, "rb") as fh:
            for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def load_mask(path: Path | None) -> np.ndarray | None:
    return None if path is None else read_image(path)


class ImageCache:
    def __init__(self, root: Path | str | None, spec: Preprocessing) -> None:
        self.spec = spec
        self.dir = Path(root) / spec.cache_key() if root else None
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)

    def get(
        self,
        path: Path,
        mask_path: Path | None = None,
        mask_fn: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> np.ndarray:
        """Preprocessed uint8 (S, S) image; raises ImageReadError for unreadable files.

        ``mask_fn`` supplies a lung mask where the dataset has none (the shipped segmenter)."""
        needs_mask = self.spec.lung_mask != "none"
        key = None
        if self.dir is not None:
            try:
                key = file_digest(path, mask_path if needs_mask else None)
            except FileNotFoundError as exc:
                raise ImageReadError(path, "file not found") from exc
            except IsADirectoryError as exc:
                raise ImageReadError(path, "is a directory") from exc
            except PermissionError as exc:
                raise ImageReadError(path, "permission denied") from exc
            entry = self.dir / f"{key}.npy"
            hit = self._load_entry(entry)
            if hit is not None:
                return hit
        img = read_image(path)
        mask = None
        if needs_mask:
            if mask_path is not None:
                mask = read_image(mask_path)
            elif mask_fn is not None:
                mask = mask_fn(img)
            else:
                raise ImageReadError(path, f"lung_mask={self.spec.lung_mask} but no lung mask for this image")
        out = preprocess(img, self.spec, mask)
        if key is not None:
            self._store(self.dir / f"{key}.npy", out)  # type: ignore[operator]
        return out

    def _load_entry(self, entry: Path) -> np.ndarray | None:
        if not entry.exists():
            return None
        try:
            arr = np.load(entry, allow_pickle=False)
        except (OSError, ValueError, EOFError):
            arr = None
        s = self.spec.size
        if arr is None or arr.dtype != np.uint8 or arr.shape != (s, s):
            entry.unlink(missing_ok=True)  # corrupt or partial: rebuild
            return None
        return arr

    @staticmethod
    def _store(entry: Path, arr: np.ndarray) -> None:
        tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as fh:
            np.save(fh, arr, allow_pickle=False)
        os.replace(tmp, entry)


def load_many(
    paths: Sequence[Path],
    spec: Preprocessing,
    *,
    cache_dir: Path | str | None,
    masks: Sequence[Path | None] | None = None,
    mask_fn: Callable[[np.ndarray], np.ndarray] | None = None,
    out: np.ndarray | None = None,
    progress: bool = True,
    desc: str = "decode",
    workers: int = 0,
) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Fill a uint8 (N, S, S) array (``out`` may be a memmap) and return it with (index, reason) failures."""
    cache = ImageCache(cache_dir, spec)
    n, s = len(paths), spec.size
    arr = out if out is not None else np.zeros((n, s, s), dtype=np.uint8)
    failures: list[tuple[int, str]] = []
    mlist = list(masks) if masks is not None else [None] * n

    def one(i: int) -> tuple[int, np.ndarray | None, str]:
        try:
            return i, cache.get(paths[i], mlist[i], mask_fn), ""
        except ImageReadError as exc:
            return i, None, exc.reason

    nw = workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=nw) as pool:
        for i, img, reason in tqdm(
            pool.map(one, range(n)), total=n, desc=desc, disable=not progress, leave=False, unit="img"
        ):
            if img is None:
                failures.append((i, reason))
            else:
                arr[i] = img
    return arr, failures
