"""The decode-once cache on real sample images: keys, invalidation, concurrency, corruption, memmaps."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import xraydx.cache as cache_mod
from conftest import sample_images
from xraydx.batches import BatchBuffers, gather_batch, iter_batches
from xraydx.cache import ENTRY_SUFFIX, ImageCache, load_many, settings_key
from xraydx.io import read_image
from xraydx.transforms import Preprocessing, preprocess

SPEC = Preprocessing(size=64)


def _copy_images(dst: Path, n: int = 8) -> list[Path]:
    dst.mkdir(parents=True, exist_ok=True)
    srcs = sample_images("train")[:: max(1, len(sample_images("train")) // n)][:n]
    out = []
    for i, p in enumerate(srcs):
        q = dst / f"img{i:02d}.png"
        shutil.copyfile(p, q)
        out.append(q)
    return out


def _expected(paths: list[Path], spec: Preprocessing = SPEC) -> np.ndarray:
    return np.stack([preprocess(read_image(p), spec) for p in paths])


def _entries(root: Path, spec: Preprocessing = SPEC) -> list[Path]:
    return sorted((root / settings_key(spec)).glob(f"*{ENTRY_SUFFIX}"))


def test_cached_equals_uncached_and_second_pass_is_all_hits(tmp_path: Path) -> None:
    paths = _copy_images(tmp_path / "img")
    root = tmp_path / "cache"
    arr, fails = load_many(paths, SPEC, cache_dir=root, progress=False)
    assert fails == [] and arr.dtype == np.uint8 and arr.shape == (len(paths), 64, 64)
    assert np.array_equal(arr, _expected(paths))
    assert len(_entries(root)) == len(paths)
    c = ImageCache(root, SPEC)
    again = np.stack([c.get(p) for p in paths])
    assert np.array_equal(again, arr)
    assert c.stats["hit"] == len(paths) and c.stats["decoded"] == 0


def _bmp(src: Path, dst: Path) -> None:
    """A 128x128 BMP of ``src``: uncompressed, so any two have the same file size."""
    Image.fromarray(preprocess(read_image(src), Preprocessing(size=128))).save(dst, format="BMP")


def test_changed_file_is_invalidated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache_mod, "RACY_STAT_NS", 20_000_000)  # trust stats older than 20 ms
    paths = _copy_images(tmp_path / "img", 6)
    others = sample_images("val")
    _bmp(others[2], paths[1])  # paths[1] becomes a BMP (content sniffed, not the name)
    root = tmp_path / "cache"
    time.sleep(0.05)  # let the files' stats age past the racy window, so the stat index records them
    before, _ = load_many(paths, SPEC, cache_dir=root, progress=False)
    c = ImageCache(root, SPEC)
    for p in paths:
        c.get(p)
    assert c.stats["hashed"] == 0, "unchanged files should come from the stat index, not be re-read"

    # 1) new content of another size
    shutil.copyfile(others[0], paths[0])
    # 2) new content of the same size, with the old mtime put back: only the inode's ctime tells
    st = os.stat(paths[1])
    _bmp(others[3], paths[1])
    os.utime(paths[1], ns=(st.st_atime_ns, st.st_mtime_ns))
    st2 = os.stat(paths[1])
    assert (st2.st_size, st2.st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    after, _ = load_many(paths, SPEC, cache_dir=root, progress=False)
    assert np.array_equal(after[0], _expected([others[0]])[0])
    assert np.array_equal(after[1], _expected([paths[1]])[0])
    assert np.array_equal(after[2:], before[2:])
    assert not np.array_equal(after[0], before[0]) and not np.array_equal(after[1], before[1])

    # 3) trust_stat=False always hashes and gives the same answer
    c2 = ImageCache(root, SPEC, trust_stat=False)
    assert np.array_equal(np.stack([c2.get(p) for p in paths]), after)
    assert c2.stats["hashed"] == len(paths) and c2.stats["hit"] == len(paths)


def test_settings_change_gives_new_entries_but_mean_std_do_not(tmp_path: Path) -> None:
    paths = _copy_images(tmp_path / "img", 4)
    root = tmp_path / "cache"
    a64, _ = load_many(paths, SPEC, cache_dir=root, progress=False)
    s96 = Preprocessing(size=96)
    a96, _ = load_many(paths, s96, cache_dir=root, progress=False)
    eq = Preprocessing(size=64, intensity="equalize")
    aeq, _ = load_many(paths, eq, cache_dir=root, progress=False)
    assert a96.shape == (4, 96, 96) and np.array_equal(a96, _expected(paths, s96))
    assert np.array_equal(aeq, _expected(paths, eq)) and not np.array_equal(aeq, a64)
    assert len({settings_key(s) for s in (SPEC, s96, eq)}) == 3
    for s in (SPEC, s96, eq):
        assert len(_entries(root, s)) == 4
    # mean/std are applied later, on tensors: same pixels, same entries
    assert settings_key(Preprocessing(size=64, mean=0.1, std=0.3)) == settings_key(SPEC)


def _build_worker(paths: list[str], root: str, out: str, barrier: object, threshold: int) -> None:
    barrier.wait()  # type: ignore[attr-defined]
    arr, fails = load_many(
        [Path(p) for p in paths], SPEC, cache_dir=root, progress=False, memmap_threshold=threshold
    )
    np.save(out, np.asarray(arr))
    Path(out + ".fails.json").write_text(json.dumps(fails))


def test_two_processes_building_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both processes fill the per-image entries, the stat index and the per-list memmap array at once."""
    monkeypatch.setattr(cache_mod, "RACY_STAT_NS", 0)  # (inherited by the forked children) record every stat
    paths = _copy_images(tmp_path / "img", 16)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    plist = [str(p) for p in paths] + [str(tmp_path / "bad.png")]
    root = tmp_path / "cache"
    ctx = mp.get_context("fork")  # the children run numpy/Pillow only (fast start; no torch ops)
    barrier = ctx.Barrier(2)
    outs = [str(tmp_path / f"out{i}.npy") for i in range(2)]
    procs = [ctx.Process(target=_build_worker, args=(plist, str(root), o, barrier, 0)) for o in outs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    a, b = (np.load(o) for o in outs)
    assert np.array_equal(a, b)
    assert np.array_equal(a[:-1], _expected(paths)) and not a[-1].any()
    for o in outs:
        assert json.loads(Path(o + ".fails.json").read_text())[0][0] == len(paths)
    c = ImageCache(root, SPEC)
    assert all(c.lookup(c.key(p)) is not None for p in paths)  # every entry complete and valid
    assert c.stats["rebuilt"] == 0
    assert not list(root.rglob("*.tmp")), "temp files left behind"
    for line in (root / "stat-index.jsonl").read_text().splitlines():
        json.loads(line)  # no torn lines


def test_corrupt_or_partial_entries_are_rebuilt(tmp_path: Path) -> None:
    paths = _copy_images(tmp_path / "img", 5)
    root = tmp_path / "cache"
    good, _ = load_many(paths, SPEC, cache_dir=root, progress=False, memmap_threshold=1 << 40)
    c = ImageCache(root, SPEC)
    e = [c.entry_path(c.key(p)) for p in paths]
    e[0].write_bytes(e[0].read_bytes()[:1000])  # truncated (partial write)
    blob = bytearray(e[1].read_bytes())
    blob[-7] ^= 0xFF  # one flipped pixel: same size, CRC catches it
    e[1].write_bytes(bytes(blob))
    e[2].write_bytes(b"garbage")
    e[3].write_bytes(b"")
    c2 = ImageCache(root, SPEC)
    again = np.stack([c2.get(p) for p in paths])
    assert np.array_equal(again, good)
    assert c2.stats["rebuilt"] == 4 and c2.stats["decoded"] == 4 and c2.stats["hit"] == 1
    c3 = ImageCache(root, SPEC)
    assert all(c3.lookup(c3.key(p)) is not None for p in paths)


def test_memmap_above_threshold_in_ram_below(tmp_path: Path) -> None:
    paths = _copy_images(tmp_path / "img", 8)
    root = tmp_path / "cache"
    nbytes = len(paths) * 64 * 64
    small, _ = load_many(paths, SPEC, cache_dir=root, progress=False, memmap_threshold=nbytes)
    assert type(small) is np.ndarray
    big, fails = load_many(paths, SPEC, cache_dir=root, progress=False, memmap_threshold=nbytes - 1)
    assert isinstance(big, np.memmap) and fails == []
    assert np.array_equal(big, small)
    arrays = list((root / settings_key(SPEC) / "arrays").glob("*.npy"))
    assert len(arrays) == 1 and Path(big.filename) == arrays[0]
    # the next run opens the per-list array directly: it does not even need the per-image entries
    for e in _entries(root):
        e.unlink()
    again, _ = load_many(paths, SPEC, cache_dir=root, progress=False, memmap_threshold=0)
    assert isinstance(again, np.memmap) and np.array_equal(again, small)
    assert not _entries(root)
    # copy-on-write: writing to the returned array never changes the cache
    again[0] = 0
    fresh, _ = load_many(paths, SPEC, cache_dir=root, progress=False, memmap_threshold=0)
    assert np.array_equal(fresh, small)
    # the environment variable sets the default threshold
    os.environ["XRAYDX_MEMMAP_BYTES"] = "0"
    try:
        env, _ = load_many(paths, SPEC, cache_dir=root, progress=False)
    finally:
        del os.environ["XRAYDX_MEMMAP_BYTES"]
    assert isinstance(env, np.memmap)


def test_corrupt_memmap_array_is_rebuilt(tmp_path: Path) -> None:
    paths = _copy_images(tmp_path / "img", 6)
    root = tmp_path / "cache"
    good, _ = load_many(paths, SPEC, cache_dir=root, progress=False, memmap_threshold=0)
    npy = Path(good.filename)
    side = npy.with_suffix(".json")
    ref = np.array(good)
    del good
    blob = bytearray(npy.read_bytes())
    blob[-100] ^= 0x55
    npy.write_bytes(bytes(blob))  # flipped pixel: CRC mismatch
    a, _ = load_many(paths, SPEC, cache_dir=root, progress=False, memmap_threshold=0)
    assert np.array_equal(a, ref)
    del a
    npy.write_bytes(npy.read_bytes()[:5000])  # truncated
    b, _ = load_many(paths, SPEC, cache_dir=root, progress=False, memmap_threshold=0)
    assert np.array_equal(b, ref)
    del b
    side.unlink()  # sidecar lost (crash between the two renames)
    c, _ = load_many(paths, SPEC, cache_dir=root, progress=False, memmap_threshold=0)
    assert np.array_equal(c, ref) and side.is_file()


def test_compact_drops_unreadable_without_losing_indices(tmp_path: Path) -> None:
    paths = _copy_images(tmp_path / "img", 5)
    bad = tmp_path / "img" / "broken.png"
    bad.write_bytes(b"not an image at all")
    plist = [paths[0], bad, *paths[1:], tmp_path / "missing.png"]
    root = tmp_path / "cache"
    for threshold in (1 << 40, 0, 0):  # in RAM; memmap built; memmap reused (failures from the sidecar)
        arr, fails = load_many(
            plist, SPEC, cache_dir=root, progress=False, compact=True, memmap_threshold=threshold
        )
        assert arr.shape == (5, 64, 64)
        assert [i for i, _ in fails] == [1, 6]
        assert "file not found" in fails[1][1]
        assert np.array_equal(arr, _expected(paths))
    full, fails = load_many(plist, SPEC, cache_dir=None, progress=False)
    assert full.shape == (7, 64, 64) and [i for i, _ in fails] == [1, 6] and not full[1].any()


def test_load_split_uses_the_memmap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from xraydx.data import discover
    from xraydx.trainset import load_split

    monkeypatch.setenv("XRAYDX_MEMMAP_BYTES", "0")
    man = discover(str(sample_images("train")[0].parents[2]))
    recs = man.split("val")
    split, bad = load_split(recs, SPEC, tmp_path / "cache", "val", progress=False)
    assert isinstance(split.images, np.memmap) and not bad
    assert len(split.images) == len(split.labels) == len(recs)


def test_iter_batches_matches_indexing_and_forwards_errors() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (37, 8, 8), dtype=np.uint8)
    labels = rng.integers(0, 3, 37)
    order = rng.permutation(37)
    got = list(iter_batches(images, labels, order, 10, torch.device("cpu")))
    assert [len(y) for _, y in got] == [10, 10, 10, 7]
    for k, (x, y) in enumerate(got):
        idx = np.sort(order[k * 10 : k * 10 + 10])
        assert x.shape == (len(idx), 1, 8, 8) and x.dtype == torch.uint8
        assert np.array_equal(x[:, 0].numpy(), images[idx]) and np.array_equal(y.numpy(), labels[idx])
    sync = list(iter_batches(images, labels, order, 10, torch.device("cpu"), prefetch=0))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(got, sync, strict=True))
    with pytest.raises(IndexError):
        list(iter_batches(images, labels, np.array([0, 1, 99]), 2, torch.device("cpu")))
    it = iter_batches(images, labels, order, 5, torch.device("cpu"))
    next(it)
    it.close()  # stopping early must not hang


@pytest.mark.parametrize("prefetch", [0, 1, 3])
def test_iter_batches_reuse_recycles_a_ring_of_buffers(prefetch: int) -> None:
    """reuse=True (train on a CPU): every batch is right when read before the next is asked for, even with
    a slow consumer and the producer running ahead; the memory of prefetch + 2 buffers is recycled."""
    rng = np.random.default_rng(1)
    images = rng.integers(0, 255, (53, 8, 8), dtype=np.uint8)
    labels = rng.integers(0, 3, 53)
    order = rng.permutation(53)
    ptrs = set()
    n = 0
    for k, (x, y) in enumerate(
        iter_batches(images, labels, order, 8, torch.device("cpu"), prefetch=prefetch, reuse=True)
    ):
        time.sleep(0.002)  # let the producer fill the ring meanwhile
        idx = np.sort(order[k * 8 : k * 8 + 8])
        assert np.array_equal(x[:, 0].numpy(), images[idx]) and np.array_equal(y.numpy(), labels[idx])
        ptrs.add(x.data_ptr())
        n += len(y)
    assert n == 53 and len(ptrs) == prefetch + 2
    kept = BatchBuffers()  # kept across epochs (as train does): the same memory every epoch
    epochs = [
        {
            x.data_ptr()
            for x, _ in iter_batches(
                images, labels, order, 8, torch.device("cpu"), prefetch=prefetch, reuse=kept
            )
        }
        for _ in range(2)
    ]
    assert epochs[0] == epochs[1] and len(epochs[0]) == prefetch + 2
    with pytest.raises(ValueError, match="out must be"):
        gather_batch(images, np.arange(4), out=torch.empty((3, 1, 8, 8), dtype=torch.uint8))
