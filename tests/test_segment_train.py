"""Training the lung segmenter (xraydx.segment_train): image/mask pairs split by patient, a tiny training
run end to end (checkpoint, log, split, test metrics), refusing to overwrite."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

from conftest import sample_images
from xraydx.data import collect_samples
from xraydx.io import read_image
from xraydx.segment import LungSegmenter, SegmenterError
from xraydx.segment_train import train_segmenter

FIXTURES = Path(__file__).parent / "fixtures" / "lungseg"


def _mini_lungseg(tmp_path: Path, n: int = 10) -> Path:
    """A lungseg-layout folder: the fixtures repeated under distinct patient ids."""
    root = tmp_path / "mini"
    shutil.copytree(FIXTURES / "images", root / "images")
    shutil.copytree(FIXTURES / "masks", root / "masks")
    names = sorted(p.name for p in (root / "images").iterdir())
    with open(root / "manifest.csv", "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "mask", "patientid"])
        for i in range(n):
            nm = names[i % len(names)]
            w.writerow([f"images/{nm}", f"masks/{nm}", f"p{i // 2}"])
    return root


def test_collect_samples_splits_by_patient(tmp_path: Path) -> None:
    samples, notes = collect_samples(
        [_mini_lungseg(tmp_path, 20)], seed=3, val_fraction=0.2, test_fraction=0.2
    )
    assert len(samples) == 20 and notes
    by_group: dict[str, set[str]] = {}
    for s in samples:
        by_group.setdefault(s.group, set()).add(s.split)
    assert all(len(v) == 1 for v in by_group.values()), "a patient in two splits"
    assert {s.split for s in samples} == {"train", "val", "test"}
    again, _ = collect_samples(
        [_mini_lungseg(tmp_path / "b", 20)], seed=3, val_fraction=0.2, test_fraction=0.2
    )
    assert [s.split for s in samples] == [s.split for s in again], "split not reproducible"
    with pytest.raises(SegmenterError, match="not found"):
        collect_samples([tmp_path / "nowhere"])


def test_train_tiny_segmenter(tmp_path: Path) -> None:
    data = _mini_lungseg(tmp_path)
    out = tmp_path / "run"
    res = train_segmenter(
        [data],
        out,
        pretrained="none",
        size=64,
        epochs=1,
        batch_size=4,
        threads=1,
        val_fraction=0.2,
        test_fraction=0.2,
        progress=False,
        half=True,
    )
    ck = out / "lungseg.safetensors"
    assert ck.is_file() and (out / "log.csv").is_file() and (out / "split.csv").is_file()
    assert 0.0 <= res["test"]["dice_mean"] <= 1.0 and res["test"]["n"] >= 1
    seg = LungSegmenter.load(ck)
    assert seg.meta["architecture"]["dtype"] == "float16" and seg.size == 64
    img = read_image(sample_images("test")[0])
    assert seg.predict_mask(img).shape == img.shape
    with pytest.raises(FileExistsError):
        train_segmenter([data], out, pretrained="none", size=64, epochs=1, progress=False)


def test_a_useless_segmenter_is_warned_about_and_the_split_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import xraydx.segment_train as st
    from xraydx.data import SegSample

    monkeypatch.setattr(st, "_val_dice", lambda *a, **k: 0.0)  # every epoch finds no lung
    out = tmp_path / "run"
    res = train_segmenter([_mini_lungseg(tmp_path)], out, pretrained="none", size=64, epochs=1, batch_size=4,
                          threads=1, val_fraction=0.2, test_fraction=0.2, progress=False)  # fmt: skip
    assert res["warnings"] and "val Dice 0.000" in res["warnings"][0]
    assert "WARNING: the best epoch (1) has val Dice 0.000" in (out / "train.log").read_text()
    assert LungSegmenter.load(out / "lungseg.safetensors").meta["warnings"] == res["warnings"]
    assert res["split"].startswith("patient-held-out")  # the mini set has patient ids
    # one image per group (no patient ids, as COVID-QU-Ex's official split): not patient-held-out
    one_each = [SegSample(Path(f"{i}.png"), Path(f"m{i}.png"), f"d:{i}.png", "train", "x") for i in range(4)]
    assert "NOT patient-held-out" in st.describe_split(one_each)
