"""Decode-once cache: every image is decoded, masked/resized once and stored as uint8 on disk.

Layout under the cache root::

    stat-index.jsonl                      (path, device, inode, size, mtime_ns, ctime_ns) -> content hash
    v2-<settings>-<hash>/<key>.xc         one preprocessed image: 20-byte header (magic, version, H, W,
                                          CRC-32 of the pixels) + H*W uint8 pixels
    v2-<settings>-<hash>/arrays/<id>.npy  one (N, S, S) uint8 array per list of images (only above the
                                          memmap threshold) + <id>.json (rows, failures, CRC-32)

* **Keys.** An entry's key is the SHA-1 of the file's bytes (plus the lung mask's bytes, or the
  segmenter's ``cache_tag``, where a mask is used). The folder name covers every preprocessing
  setting that changes the pixels (all of ``Preprocessing`` except ``mean``/``std``, which apply
  later, on tensors). Changing the file, its mask or any setting changes the key: stale entries are
  never read, only left behind (delete the folder to reclaim the space).
* **Fast path.** Hashing every file every run costs a full read of the dataset. The stat index maps
  a file's (path, device, inode, size, mtime_ns, ctime_ns) to its content hash; a file whose stat
  is unchanged is not read again. Any change to the stat (a write always changes ctime) falls back
  to hashing the content, which stays the truth. Stats younger than two seconds are not recorded
  (coarse file-system clocks). ``trust_stat=False`` always hashes.
* **Concurrency.** Every file is written to a unique temp file and renamed into place, and the
  index is append-only (whole lines, unreadable lines ignored). Two processes (or DDP ranks)
  building the same cache at once may both decode an image, but never read a partial entry.
* **Corruption.** An entry whose header, size or CRC does not match is deleted and rebuilt; so is a
  per-list array whose sidecar is missing or whose CRC does not match.
* **Bounded memory.** When N*S*S exceeds ``memmap_threshold`` (default 512 MiB, or the environment
  variable ``XRAYDX_MEMMAP_BYTES``) and a cache folder is given, ``load_many`` fills an on-disk
  ``.npy`` array and returns it memory-mapped (copy-on-write): the operating system pages it in
  and out, so a 34k-image dataset at 256 px (2.2 GB) never has to fit in RAM. The next run with
  the same list of images (same keys, same order) opens that array directly without touching the
  per-image entries. Training batches are gathered from these arrays by :mod:`xraydx.batches`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import tempfile
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from xraydx.config import DEFAULT_MEMMAP_BYTES as DEFAULT_MEMMAP_BYTES
from xraydx.config import memmap_bytes_from_env
from xraydx.device import available_cpus
from xraydx.io import ImageReadError, read_image
from xraydx.transforms import Preprocessing, preprocess

CACHE_VERSION = 2
ENTRY_MAGIC = b"XDXC"
ENTRY_HEADER = struct.Struct("<4sIIII")  # magic, version, height, width, crc32 of the pixels
ENTRY_SUFFIX = ".xc"
INDEX_NAME = "stat-index.jsonl"
RACY_STAT_NS = 2_000_000_000  # stats this recent are not trusted (coarse mtime clocks)
_CHUNK = 1 << 20


def memmap_threshold_default() -> int:
    """``XRAYDX_MEMMAP_BYTES`` (default 512 MiB); a ConfigError (exit 2) when it is not a byte count."""
    return memmap_bytes_from_env()


def file_digest(path: Path, extra: Path | None = None) -> str:
    """SHA-1 of a file's bytes (and, if given, a second file's bytes)."""
    h = hashlib.sha1()
    for p in (path, extra):
        if p is None:
            continue
        with open(p, "rb") as fh:
            for chunk in iter(lambda fh=fh: fh.read(_CHUNK), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def settings_key(spec: Preprocessing) -> str:
    """Folder name for a preprocessing: readable part + hash of every pixel-changing setting."""
    d = {k: v for k, v in spec.to_dict().items() if k not in ("mean", "std", "tta")}
    h = hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"v{CACHE_VERSION}-{spec.cache_key()}-{h}"


def mask_fn_tag(mask_fn: Callable[[np.ndarray], np.ndarray] | None) -> str:
    """Identity of a segmenter for cache keys: its ``cache_tag`` attribute (which should change when its
    weights do), else its qualified name."""
    if mask_fn is None:
        return ""
    tag = getattr(mask_fn, "cache_tag", None)
    if tag:
        return str(tag)
    return f"{getattr(mask_fn, '__module__', '?')}.{getattr(mask_fn, '__qualname__', type(mask_fn).__qualname__)}"


def _read_error(path: Path, exc: OSError) -> ImageReadError:
    if isinstance(exc, FileNotFoundError):
        return ImageReadError(path, "file not found")
    if isinstance(exc, IsADirectoryError):
        return ImageReadError(path, "is a directory")
    if isinstance(exc, PermissionError):
        return ImageReadError(path, "permission denied")
    return ImageReadError(path, f"cannot read ({exc.strerror or exc})")


# ---- the stat index --------------------------------------------------------------------------------


class StatIndex:
    """Append-only map (path, stat) -> content hash, shared by every preprocessing setting."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._map: dict[str, tuple[tuple[int, ...], str]] = {}
        self._lines = 0
        self._pending: list[str] = []
        self._load()

    @staticmethod
    def stat_tuple(st: os.stat_result) -> tuple[int, ...]:
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def _load(self) -> None:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return
        except OSError:
            return  # an unreadable index only costs re-hashing
        for line in raw.splitlines():
            self._lines += 1
            try:
                rec = json.loads(line)
                st = tuple(int(v) for v in rec["st"])
                digest = str(rec["h"])
                if len(st) != 5 or len(digest) != 40:
                    continue
                self._map[str(rec["p"])] = (st, digest)
            except (ValueError, KeyError, TypeError):
                continue  # a torn or foreign line: ignore it

    def get(self, path: str, st: os.stat_result) -> str | None:
        hit = self._map.get(path)
        if hit is not None and hit[0] == self.stat_tuple(st):
            return hit[1]
        return None

    def put(self, path: str, st: os.stat_result, digest: str) -> None:
        if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) < RACY_STAT_NS:
            return
        tup = self.stat_tuple(st)
        with self._lock:
            self._map[path] = (tup, digest)
            self._pending.append(json.dumps({"p": path, "st": list(tup), "h": digest}) + "\n")
            flush = len(self._pending) >= 2048
        if flush:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            lines, self._pending = self._pending, []
        if not lines:
            return
        self._lines += len(lines)
        if self._lines > 4 * max(1, len(self._map)) and self._lines > 20_000:
            self._compact()
            return
        with contextlib.suppress(OSError):  # an index that cannot be written only costs re-hashing
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, "".join(lines).encode())
            finally:
                os.close(fd)

    def _compact(self) -> None:
        from xraydx.fsutil import atomic_write_text

        with self._lock:
            text = "".join(
                json.dumps({"p": p, "st": list(st), "h": h}) + "\n" for p, (st, h) in self._map.items()
            )
            self._lines = len(self._map)
        with contextlib.suppress(OSError):
            atomic_write_text(self.path, text)


# ---- entries ---------------------------------------------------------------------------------------


def _write_temp(dir_: Path, name: str, write: Callable[[Any], None]) -> None:
    """Write via a unique temp file in ``dir_`` and rename to ``name`` (atomic, safe across processes)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=dir_)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.replace(tmp, dir_ / name)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class ImageCache:
    """Per-image store for one preprocessing setting. ``root=None`` disables caching (decode every time)."""

    def __init__(
        self,
        root: Path | str | None,
        spec: Preprocessing,
        *,
        trust_stat: bool = True,
    ) -> None:
        self.spec = spec
        self.root = Path(root) if root else None
        self.dir = self.root / settings_key(spec) if self.root is not None else None
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
        self.index = StatIndex(self.root / INDEX_NAME) if self.root is not None and trust_stat else None
        self.stats = {"hit": 0, "decoded": 0, "rebuilt": 0, "hashed": 0}
        self._lock = threading.Lock()

    @property
    def needs_mask(self) -> bool:
        return self.spec.lung_mask != "none"

    def _count(self, what: str) -> None:
        with self._lock:
            self.stats[what] += 1

    def content_digest(self, path: Path) -> str:
        """SHA-1 of the file's bytes, from the stat index when the file is unchanged."""
        try:
            st = os.stat(path)
            ap = os.path.abspath(path)
            if self.index is not None:
                hit = self.index.get(ap, st)
                if hit is not None:
                    return hit
            digest = file_digest(path)
        except OSError as exc:
            raise _read_error(path, exc) from exc
        self._count("hashed")
        if self.index is not None:
            self.index.put(ap, st, digest)
        return digest

    def key(
        self,
        path: Path,
        mask_path: Path | None = None,
        mask_fn: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> str:
        """The entry key: content hash of the image (+ its mask or the segmenter's tag, where used)."""
        digest = self.content_digest(path)
        if not self.needs_mask:
            return digest
        extra = self.content_digest(mask_path) if mask_path is not None else f"fn:{mask_fn_tag(mask_fn)}"
        return hashlib.sha1(f"{digest}|{extra}".encode()).hexdigest()

    def entry_path(self, key: str) -> Path:
        assert self.dir is not None
        return self.dir / f"{key}{ENTRY_SUFFIX}"

    def lookup(self, key: str) -> np.ndarray | None:
        """The stored image, or None if absent; a corrupt or partial entry is deleted (and so rebuilt)."""
        entry = self.entry_path(key)
        try:
            blob = entry.read_bytes()
        except FileNotFoundError:
            return None
        except OSError:
            blob = b""
        s = self.spec.size
        ok = len(blob) == ENTRY_HEADER.size + s * s
        if ok:
            magic, version, h, w, crc = ENTRY_HEADER.unpack_from(blob)
            pixels = memoryview(blob)[ENTRY_HEADER.size :]
            ok = magic == ENTRY_MAGIC and version == CACHE_VERSION and (h, w) == (s, s)
            ok = ok and zlib.crc32(pixels) == crc
        if not ok:
            with contextlib.suppress(OSError):
                entry.unlink()
            self._count("rebuilt")
            return None
        return np.frombuffer(blob, dtype=np.uint8, offset=ENTRY_HEADER.size).reshape(s, s)

    def store(self, key: str, arr: np.ndarray) -> None:
        arr = np.ascontiguousarray(arr, dtype=np.uint8)
        h, w = arr.shape
        header = ENTRY_HEADER.pack(ENTRY_MAGIC, CACHE_VERSION, h, w, zlib.crc32(arr))
        assert self.dir is not None

        def write(fh: Any) -> None:
            fh.write(header)
            fh.write(arr.tobytes())

        _write_temp(self.dir, f"{key}{ENTRY_SUFFIX}", write)

    def decode(
        self,
        path: Path,
        mask_path: Path | None = None,
        mask_fn: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> np.ndarray:
        img = read_image(path)
        mask = None
        if self.needs_mask:
            if mask_path is not None:
                mask = read_image(mask_path)
            elif mask_fn is not None:
                mask = mask_fn(img)
            else:
                raise ImageReadError(path, f"lung_mask={self.spec.lung_mask} but no lung mask for this image")
        try:
            return preprocess(img, self.spec, mask)
        except ValueError as exc:
            raise ImageReadError(path, str(exc)) from exc

    def get(
        self,
        path: Path,
        mask_path: Path | None = None,
        mask_fn: Callable[[np.ndarray], np.ndarray] | None = None,
        key: str | None = None,
    ) -> np.ndarray:
        """Preprocessed uint8 (S, S) image; raises ImageReadError for unreadable files.

        ``mask_fn`` supplies a lung mask where the dataset has none (the shipped segmenter)."""
        if self.dir is not None:
            key = key or self.key(path, mask_path, mask_fn)
            hit = self.lookup(key)
            if hit is not None:
                self._count("hit")
                return hit
        out = self.decode(path, mask_path, mask_fn)
        self._count("decoded")
        if self.dir is not None and key is not None:
            self.store(key, out)
        return out

    def flush(self) -> None:
        if self.index is not None:
            self.index.flush()


# ---- whole lists -------------------------------------------------------------------------------------


def _ordered_map(fn: Callable[[int], Any], n: int, workers: int) -> Iterator[Any]:
    """fn(0..n-1) on a thread pool, results in order, at most ~4 per worker in flight (bounded memory)."""
    if workers <= 1:
        for i in range(n):
            yield fn(i)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque[Future[Any]] = deque()
        nxt = 0
        while nxt < n or pending:
            while nxt < n and len(pending) < 4 * workers:
                pending.append(pool.submit(fn, nxt))
                nxt += 1
            yield pending.popleft().result()


class _ArrayStore:
    """One (N, S, S) uint8 ``.npy`` per list of entry keys, with a JSON sidecar; opened memory-mapped."""

    def __init__(self, cache: ImageCache, ident: str) -> None:
        assert cache.dir is not None
        self.dir = cache.dir / "arrays"
        self.ident = ident
        self.npy = self.dir / f"{ident}.npy"
        self.side = self.dir / f"{ident}.json"

    def open(self, n: int, size: int) -> tuple[np.ndarray, list[tuple[int, str]]] | None:
        try:
            side = json.loads(self.side.read_text(encoding="utf-8"))
            rows, crc = int(side["rows"]), int(side["crc32"])
            failures = [(int(i), str(r)) for i, r in side["failures"]]
            if int(side["n"]) != n or int(side["size"]) != size or int(side["version"]) != CACHE_VERSION:
                raise ValueError("sidecar does not match")
            arr = np.load(self.npy, mmap_mode="c", allow_pickle=False)
            if arr.dtype != np.uint8 or arr.shape != (rows, size, size):
                raise ValueError("array shape does not match")
            if _crc_rows(arr) != crc:
                raise ValueError("array CRC does not match")
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            self.remove()  # corrupt or partial: rebuild
            return None
        return arr, failures

    def remove(self) -> None:
        for p in (self.side, self.npy):
            with contextlib.suppress(OSError):
                p.unlink()

    def create(self, rows: int, size: int) -> tuple[np.ndarray, Path]:
        self.dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.ident}.", suffix=".npy.tmp", dir=self.dir)
        os.close(fd)
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(rows, size, size))
        return arr, Path(tmp)

    def publish(
        self, arr: np.memmap, tmp: Path, n: int, size: int, failures: list[tuple[int, str]], crc: int
    ) -> None:
        from xraydx.fsutil import atomic_write_json

        arr.flush()
        rows = arr.shape[0]
        del arr
        os.replace(tmp, self.npy)
        doc = {
            "version": CACHE_VERSION, "n": n, "rows": rows, "size": size,
            "failures": [[i, r] for i, r in failures], "crc32": crc,
        }  # fmt: skip
        atomic_write_json(self.side, doc)


def _crc_rows(arr: np.ndarray, start: int = 0, crc: int = 0) -> int:
    step = max(1, (64 * 2**20) // max(1, arr[0].nbytes if len(arr) else 1))
    for i in range(start, len(arr), step):
        crc = zlib.crc32(np.ascontiguousarray(arr[i : i + step]), crc)
    return crc


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
    memmap_threshold: int | None = None,
    compact: bool = False,
    trust_stat: bool = True,
) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Preprocessed uint8 (N, S, S) images and the (index, reason) of those that could not be read.

    ``out``: fill this array (e.g. a caller's memmap) instead of allocating one. Otherwise, with a
    ``cache_dir`` and N*S*S above ``memmap_threshold`` bytes, the result is a copy-on-write memmap of
    an array in the cache (see the module doc); below it, an in-RAM array. ``compact=True`` returns
    only the readable images (in order; failures still carry their original index), without a copy
    of the whole array. ``workers``: decode threads (0 = one per available CPU, at most 8).
    """
    n, s = len(paths), spec.size
    if out is not None and compact:
        raise ValueError("compact=True cannot fill a caller's array (out=...)")
    if masks is not None and len(masks) != n:
        raise ValueError(f"{len(masks)} masks for {n} images")
    cache = ImageCache(cache_dir, spec, trust_stat=trust_stat)
    mlist: list[Path | None] = list(masks) if masks is not None else [None] * n
    nw = workers or min(8, available_cpus())
    threshold = memmap_threshold_default() if memmap_threshold is None else memmap_threshold
    use_memmap = out is None and cache.dir is not None and n * s * s > threshold

    keys: list[str | None] = [None] * n
    failures: list[tuple[int, str]] = []
    fail_at: dict[int, str] = {}
    if cache.dir is not None:

        def key_of(i: int) -> tuple[int, str | None, str]:
            try:
                return i, cache.key(Path(paths[i]), mlist[i], mask_fn), ""
            except ImageReadError as exc:
                return i, None, exc.reason

        for i, k, reason in _ordered_map(key_of, n, nw):
            keys[i] = k
            if k is None:
                fail_at[i] = reason
        cache.flush()

    store: _ArrayStore | None = None
    if use_memmap:
        ident_src = "\n".join(
            k if k is not None else f"!{paths[i]}\t{fail_at[i]}" for i, k in enumerate(keys)
        )
        ident = hashlib.sha1(f"{settings_key(spec)}|compact={compact}|{ident_src}".encode()).hexdigest()
        store = _ArrayStore(cache, ident)
        hit = store.open(n, s)
        if hit is not None:
            return hit

    tmp: Path | None = None
    if store is not None:
        arr, tmp = store.create(n, s)
    else:
        arr = out if out is not None else np.zeros((n, s, s), dtype=np.uint8)

    def one(i: int) -> tuple[int, np.ndarray | None, str]:
        if i in fail_at:
            return i, None, fail_at[i]
        try:
            return i, cache.get(Path(paths[i]), mlist[i], mask_fn, key=keys[i]), ""
        except ImageReadError as exc:
            return i, None, exc.reason

    try:
        bar = tqdm(total=n, desc=desc, disable=not progress, leave=False, unit="img")
        for i, img, reason in _ordered_map(one, n, nw):
            bar.update(1)
            if img is None:
                failures.append((i, reason))
            else:
                arr[i] = img
        bar.close()
        cache.flush()
        if compact and failures:
            bad = {i for i, _ in failures}
            keep = [i for i in range(n) if i not in bad]
            if store is not None:
                small, tmp2 = store.create(len(keep), s)
                for j0 in range(0, len(keep), 1024):
                    sel = keep[j0 : j0 + 1024]
                    small[j0 : j0 + len(sel)] = arr[sel]
                del arr
                assert tmp is not None
                os.unlink(tmp)
                arr, tmp = small, tmp2
            else:
                arr = arr[keep]
        if store is not None:
            assert tmp is not None and isinstance(arr, np.memmap)
            arr.flush()
            store.publish(arr, tmp, n, s, failures, _crc_rows(arr))
            tmp = None
            hit = store.open(n, s)
            if hit is None:
                raise ImageReadError(store.npy, "cache array could not be read back after writing it")
            return hit
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return arr, failures
