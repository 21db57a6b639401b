"""Add the tensor digest (``tensors_sha256``) to checkpoints written before xraydx stored one.

    python scripts/add_tensor_digest.py src/xraydx/weights/*.safetensors

Each file is re-saved through :func:`xraydx.checkpoint.save` (atomic), which computes the digest; the
tensors are checked byte for byte against the original afterwards (the data section of the file and
every tensor entry of its header), so only the metadata changes. A file that already has a digest is
left alone (it is verified instead).
"""

from __future__ import annotations

import json
import struct
import sys
import warnings
from pathlib import Path

from xraydx import checkpoint


def _tensor_part(path: Path) -> tuple[dict[str, object], bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    return header, raw[8 + n :]


def add_digest(path: Path) -> str:
    """Re-save ``path`` with its digest; returns what was done."""
    meta = checkpoint.read_metadata(path)
    if checkpoint.DIGEST_KEY in meta:
        checkpoint.load_tensors(path)  # verifies
        return "has a digest (verified)"
    before = _tensor_part(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no tensor digest": the point of this script
        tensors = checkpoint.load_tensors(path)
    rest = {k: v for k, v in meta.items() if k not in ("format", "format_version")}
    checkpoint.save(path, tensors, rest)
    if _tensor_part(path) != before:
        raise SystemExit(f"{path}: the tensors changed on re-saving; restore the file from git")
    checkpoint.load_tensors(path)
    return f"digest added ({checkpoint.read_metadata(path)[checkpoint.DIGEST_KEY][:16]}...)"


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        return 2
    for name in argv:
        print(f"{name}: {add_digest(Path(name))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
