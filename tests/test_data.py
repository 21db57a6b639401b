"""Tests for xraydx.data: layout discovery, made-up splits, CSV round trips and inspection.

Every miniature dataset is built in tmp_path from real images of the bundled data/sample.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from PIL import Image

from xraydx.data import (
    CLASSES,
    SPLITS,
    DatasetError,
    Manifest,
    Record,
    discover,
    format_report,
    inspect,
    normalize_label,
    normalize_split,
)

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"
CXR3 = Path("/work/shared/data/cxr3")


@pytest.fixture(scope="session")
def pool() -> dict[str, list[Path]]:
    """Real sample images per class (all splits), in a fixed order."""
    out: dict[str, list[Path]] = {}
    for label in CLASSES:
        out[label] = sorted(p for s in SPLITS for p in (SAMPLE / s / label).glob("*.png"))
        assert len(out[label]) == 60
    return out


def put(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return dst


def groups_by_split(m: Manifest) -> dict[str, set[str]]:
    out: dict[str, set[str]] = defaultdict(set)
    for r in m.records:
        out[r.group].add(r.split)
    return out


def assert_no_group_leak(m: Manifest) -> None:
    leaks = {g: s for g, s in groups_by_split(m).items() if len(s) > 1}
    assert not leaks


# --------------------------------------------------------------------------------------------
# Aliases
# --------------------------------------------------------------------------------------------


def test_aliases() -> None:
    assert normalize_label("COVID-19") == "covid"
    assert normalize_label("covid19") == "covid"
    assert normalize_label("Non-COVID") == "non_covid"
    assert normalize_label("non covid") == "non_covid"
    assert normalize_label("Viral Pneumonia") == "non_covid"
    assert normalize_label("Lung_Opacity") == "non_covid"
    assert normalize_label("HEALTHY") == "normal"
    assert normalize_label("tumour") is None
    assert normalize_split("Training") == "train"
    assert normalize_split("valid") == normalize_split("Validation") == "val"
    assert normalize_split("TESTING") == "test"


# --------------------------------------------------------------------------------------------
# The bundled sample and cxr3
# --------------------------------------------------------------------------------------------


def test_bundled_sample_loads_as_csv() -> None:
    m = discover(SAMPLE)
    assert m.layout == "csv"
    assert m.counts() == {s: dict.fromkeys(CLASSES, n) for s, n in zip(SPLITS, (40, 10, 10), strict=True)}
    assert_no_group_leak(m)
    assert not m.skipped
    assert {r.source for r in m.records} == {"radiographydb", "kermany", "nihcxr8"}
    # every source of a class is in every split
    by = defaultdict(set)
    for r in m.records:
        by[(r.label, r.split)].add(r.source)
    assert by[("non_covid", "val")] == {"kermany", "nihcxr8"}
    assert by[("normal", "test")] == {"radiographydb", "nihcxr8"}
    assert all(r.path.is_absolute() and r.path.is_file() for r in m.records)
    # the sample's folders agree with its manifest
    assert all(r.path.parent.name == r.label and r.path.parent.parent.name == r.split for r in m.records)


@pytest.mark.skipif(not (CXR3 / "manifest.csv").is_file(), reason="cxr3 not available")
def test_cxr3_loads_through_its_manifest() -> None:
    m = discover(CXR3)
    assert m.layout == "csv"
    assert len(m.records) == 4200
    assert_no_group_leak(m)
    assert any(r.group.startswith("kermany:person") for r in m.records)
    assert {r.source for r in m.records} == {"radiographydb", "kermany", "nihcxr8"}
    assert any("source taken from" in n for n in m.notes)
    c = m.counts()
    for label in CLASSES:
        assert 150 < c["test"][label] < 260 and 150 < c["val"][label] < 260


# --------------------------------------------------------------------------------------------
# COVID-QU-Ex
# --------------------------------------------------------------------------------------------

QU_CLASSES = {"COVID-19": "covid", "Non-COVID": "non_covid", "Normal": "normal"}
QU_SPLITS = {"Train": "train", "Val": "val", "Test": "test"}


def make_qu_part(
    part: Path, pool: dict[str, list[Path]], per: dict[str, int], infection: bool = False
) -> None:
    """part/{Train,Val,Test}/{COVID-19,Non-COVID,Normal}/{images,lung masks[,infection masks]}."""
    for qsplit, n in per.items():
        for qcls, label in QU_CLASSES.items():
            start = list(QU_SPLITS).index(qsplit) * 10
            for i, src in enumerate(pool[label][start : start + n]):
                name = f"{qcls.lower()}_{qsplit.lower()}_{i}.png"
                put(src, part / qsplit / qcls / "images" / name)
                # the mask is a different real image, so we can tell which one got attached
                put(pool[label][-1 - i], part / qsplit / qcls / "lung masks" / name)
                if infection:
                    put(pool[label][-2 - i], part / qsplit / qcls / "infection masks" / name)


def test_covid_qu_ex_kaggle_wrapped(tmp_path: Path, pool: dict[str, list[Path]]) -> None:
    root = tmp_path / "archive" / "COVID-QU-Ex" / "COVID-QU-Ex"
    make_qu_part(root / "Lung Segmentation Data", pool, {"Train": 3, "Val": 2, "Test": 1})
    make_qu_part(
        root / "Infection Segmentation Data", pool, {"Train": 1, "Val": 1, "Test": 1}, infection=True
    )
    (root / "README.txt").write_text("readme")

    for given in (tmp_path / "archive", tmp_path / "archive" / "COVID-QU-Ex", root):
        m = discover(given)
        assert m.layout == "covid-qu-ex"
        assert m.counts() == {s: dict.fromkeys(CLASSES, n) for s, n in zip(SPLITS, (3, 2, 1), strict=True)}
        assert any("Lung Segmentation Data" in n and "subset" in n for n in m.notes)
        assert all("Lung Segmentation Data" in r.path.parts for r in m.records)

    for r in m.records:
        qsplit = r.path.parts[-4]
        qcls = r.path.parts[-3]
        assert QU_SPLITS[qsplit] == r.split and QU_CLASSES[qcls] == r.label
        assert r.group == r.path.stem and r.source == ""
        assert r.mask is not None
        assert r.mask == r.path.parent.parent / "lung masks" / r.path.name
        i = int(r.path.stem.rsplit("_", 1)[1])
        assert r.mask.read_bytes() == pool[r.label][-1 - i].read_bytes()

    # the part folder itself
    m2 = discover(root / "Lung Segmentation Data")
    assert m2.layout == "covid-qu-ex" and len(m2.records) == 18


def test_covid_qu_ex_infection_part_alone(tmp_path: Path, pool: dict[str, list[Path]]) -> None:
    part = tmp_path / "Infection Segmentation Data" / "Infection Segmentation Data"
    make_qu_part(part, pool, {"Train": 2, "Val": 1, "Test": 1}, infection=True)
    m = discover(tmp_path)
    assert m.layout == "covid-qu-ex"
    assert m.counts()["train"] == dict.fromkeys(CLASSES, 2)
    assert all(r.mask is not None and r.mask.parent.name == "lung masks" for r in m.records)
    assert any("Infection Segmentation Data" in n for n in m.notes)
    assert not any("infection masks" in p for p, _ in m.skipped)


# --------------------------------------------------------------------------------------------
# COVID-19 Radiography Database
# --------------------------------------------------------------------------------------------


def test_radiography_db(tmp_path: Path, pool: dict[str, list[Path]]) -> None:
    root = tmp_path / "COVID-19_Radiography_Dataset"
    folders = {
        "COVID": ("covid", 14),
        "Lung_Opacity": ("non_covid", 7),
        "Viral Pneumonia": ("non_covid", 7),
        "Normal": ("normal", 14),
    }
    offset = 0
    for folder, (label, n) in folders.items():
        for i in range(n):
            src = pool[label][offset + i if folder == "Viral Pneumonia" else i]
            name = f"{folder.replace(' ', '_')}-{i + 1}.png"
            put(src, root / folder / "images" / name)
            if folder != "Normal" or i % 2 == 0:  # some masks missing
                put(pool[label][-1 - i], root / folder / "masks" / name)
        offset = n if folder == "Lung_Opacity" else offset
    (root / "COVID.metadata.xlsx").write_bytes(b"PK\x03\x04")
    (root / "README.md.txt").write_text("readme")

    m = discover(tmp_path)
    assert m.layout == "radiography-db"
    assert len(m.records) == 42
    total = Counter(r.label for r in m.records)
    assert total == {"covid": 14, "non_covid": 14, "normal": 14}
    for r in m.records:
        folder = r.path.parent.parent.name
        assert folders[folder][0] == r.label
        if r.mask is not None:
            assert r.mask == r.path.parent.parent / "masks" / r.path.name
    assert sum(r.mask is None for r in m.records) == 7
    # splits were made, with notes, grouped and every class in every split
    assert any("no test split" in n for n in m.notes) and any("no val split" in n for n in m.notes)
    c = m.counts()
    assert all(c[s][lab] > 0 for s in SPLITS for lab in CLASSES)
    assert_no_group_leak(m)
    rep = inspect(m, check_images=False, progress=False)
    assert rep.masks_missing == 7 and rep.masks_present == 35


def test_radiography_db_old_layout(tmp_path: Path, pool: dict[str, list[Path]]) -> None:
    for folder, label in {"COVID": "covid", "Viral Pneumonia": "non_covid", "NORMAL": "normal"}.items():
        for i in range(5):
            put(pool[label][i], tmp_path / folder / f"{folder} ({i + 1}).png")
    m = discover(tmp_path)
    assert m.layout == "radiography-db"
    assert Counter(r.label for r in m.records) == dict.fromkeys(CLASSES, 5)
    assert all(r.mask is None for r in m.records)


# --------------------------------------------------------------------------------------------
# Class folders
# --------------------------------------------------------------------------------------------


def make_class_folders(
    root: Path, pool: dict[str, list[Path]], names: dict[str, str], n: dict[str, int]
) -> None:
    for folder, label in names.items():
        for i in range(n[label]):
            src = pool[label][i]
            sub = "nested" if i % 4 == 0 else ""
            put(src, root / folder / sub / src.name)


def test_class_folders_aliases_skips_and_made_splits(tmp_path: Path, pool: dict[str, list[Path]]) -> None:
    root = tmp_path / "ds"
    make_class_folders(
        root,
        pool,
        {"COVID-19": "covid", "Pneumonia": "non_covid", "healthy": "normal"},
        {"covid": 40, "non_covid": 30, "normal": 20},
    )
    put(pool["covid"][50], root / "tuberculosis" / "x.png")
    (root / "COVID-19" / "notes.txt").write_text("not an image")
    (root / "COVID-19" / ".DS_Store").write_bytes(b"\0")
    put(pool["covid"][51], root / "COVID-19" / ".hidden" / "h.png")
    put(pool["covid"][52], root / "__MACOSX" / "COVID-19" / "._x.png")
    put(pool["covid"][53], root / "stray.png")

    m = discover(root)
    assert m.layout == "class-folders"
    assert Counter(r.label for r in m.records) == {"covid": 40, "non_covid": 30, "normal": 20}
    reasons = dict(m.skipped)
    assert "not a known class" in reasons[str(root / "tuberculosis")]
    assert "not an image" in reasons[str(root / "COVID-19" / "notes.txt")]
    assert "not inside a class folder" in reasons[str(root / "stray.png")]
    assert not any(".hidden" in p or "__MACOSX" in p or ".DS_Store" in p for p, _ in m.skipped)
    assert all(".hidden" not in r.path.parts for r in m.records)
    # sources from '<source>__<name>' names, group = path relative to root
    assert {r.source for r in m.records} >= {"radiographydb", "kermany"}
    assert all(r.group == r.path.relative_to(root).as_posix() for r in m.records)

    # made-up splits: stratified, no shared group
    c = m.counts()
    for label, n in (("covid", 40), ("non_covid", 30), ("normal", 20)):
        assert c["test"][label] >= 1 and c["val"][label] >= 1
        assert abs(c["test"][label] / n - 0.15) < 0.08, c
        assert abs(c["val"][label] / n - 0.15) < 0.08, c
    assert_no_group_leak(m)
    assert [r for r in m.records] == sorted(
        m.records, key=lambda r: (SPLITS.index(r.split), CLASSES.index(r.label), str(r.path))
    )

    # deterministic for a seed, different for another
    again = discover(root)
    assert again.records == m.records
    other = discover(root, seed=1)
    assert {r.path for r in other.split("test")} != {r.path for r in m.split("test")}


def test_made_splits_keep_groups_together(tmp_path: Path, pool: dict[str, list[Path]]) -> None:
    rows = []
    for label in CLASSES:
        for i, src in enumerate(pool[label][:36]):
            dst = put(src, tmp_path / "img" / label / src.name)
            rows.append(
                {
                    "image_path": dst.relative_to(tmp_path).as_posix(),
                    "class": label.upper(),
                    "patient_id": f"{label}-p{i // 3}",
                }
            )
    with open(tmp_path / "labels.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["image_path", "class", "patient_id"])
        w.writeheader()
        w.writerows(rows)
    m = discover(tmp_path / "labels.csv")
    assert m.layout == "csv" and len(m.records) == 108
    assert_no_group_leak(m)
    per_group = Counter(r.group for r in m.records)
    assert set(per_group.values()) == {3}
    c = m.counts()
    assert all(c["test"][lab] % 3 == 0 and c["test"][lab] > 0 and c["val"][lab] > 0 for lab in CLASSES)
    assert discover(tmp_path / "labels.csv").records == m.records
    with pytest.raises(ValueError):
        discover(tmp_path / "labels.csv", val_fraction=1.5)


def test_split_class_folders(tmp_path: Path, pool: dict[str, list[Path]]) -> None:
    root = tmp_path / "data"
    for split, start, n in (("Training", 0, 6), ("valid", 20, 2), ("TESTING", 30, 3)):
        for folder, label in (("covid", "covid"), ("non-covid", "non_covid"), ("Normal", "normal")):
            for src in pool[label][start : start + n]:
                put(src, root / split / folder / src.name)
    put(pool["normal"][50], root / "Training" / "unknown" / "u.png")
    put(pool["normal"][51], root / "extra" / "normal" / "e.png")
    m = discover(root)
    assert m.layout == "split-class-folders"
    assert m.counts() == {s: dict.fromkeys(CLASSES, n) for s, n in zip(SPLITS, (6, 2, 3), strict=True)}
    skipped = dict(m.skipped)
    assert "not a known class" in skipped[str(root / "Training" / "unknown")]
    assert "not a split" in skipped[str(root / "extra")]
    assert not any("no val split" in n or "no test split" in n for n in m.notes)


def test_split_folders_without_val(tmp_path: Path, pool: dict[str, list[Path]]) -> None:
    for split, start, n in (("train", 0, 20), ("test", 40, 5)):
        for label in CLASSES:
            for src in pool[label][start : start + n]:
                put(src, tmp_path / split / label / src.name)
    m = discover(tmp_path)
    c = m.counts()
    assert c["test"] == dict.fromkeys(CLASSES, 5)  # the given test split is untouched
    assert all(c["val"][lab] >= 2 for lab in CLASSES)
    assert sum(c["train"].values()) + sum(c["val"].values()) == 60
    assert any("no val split" in n for n in m.notes)
    assert not any("no test split" in n for n in m.notes)


def test_empty_class_folder_is_a_clear_error(tmp_path: Path, pool: dict[str, list[Path]]) -> None:
    for label in ("non_covid", "normal"):
        put(pool[label][0], tmp_path / label / "a.png")
    (tmp_path / "covid").mkdir()
    with pytest.raises(DatasetError) as exc:
        discover(tmp_path)
    msg = str(exc.value)
    assert "covid" in msg and "0 images" in msg and str(tmp_path) in msg


def test_missing_class_and_unknown_layout_errors(tmp_path: Path, pool: dict[str, list[Path]]) -> None:
    put(pool["normal"][0], tmp_path / "a" / "normal" / "x.png")
    put(pool["covid"][0], tmp_path / "a" / "covid" / "y.png")
    with pytest.raises(DatasetError, match="non_covid"):
        discover(tmp_path / "a")
    (tmp_path / "b" / "stuff").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no supported dataset layout"):
        discover(tmp_path / "b")
    with pytest.raises(DatasetError, match="no such file"):
        discover(tmp_path / "nope")
    with pytest.raises(DatasetError, match="not a .csv"):
        discover(pool["covid"][0])


def test_symlink_loop_does_not_hang(tmp_path: Path, pool: dict[str, list[Path]]) -> None:
    root = tmp_path / "ds"
    for label in CLASSES:
        for src in pool[label][:4]:
            put(src, root / label / src.name)
    os.symlink(root, root / "covid" / "loop_to_root")
    os.symlink(root / "covid", root / "covid" / "loop_to_self")
    os.symlink(root / "normal", root / "non_covid" / "link_to_normal")
    os.symlink(tmp_path / "gone", root / "normal" / "dangling.png")
    outside = tmp_path / "outside"
    for src in pool["normal"][10:12]:
        put(src, outside / src.name)
    os.symlink(outside, root / "normal" / "more")
    os.symlink(outside, outside / "again")
    m = discover(root)
    assert Counter(r.label for r in m.records) == {"covid": 4, "non_covid": 4, "normal": 6}
    reasons = dict(m.skipped)
    assert "not followed" in reasons[str(root / "covid" / "loop_to_root")]
    assert "not followed" in reasons[str(root / "non_covid" / "link_to_normal")]
    assert "broken" in reasons[str(root / "normal" / "dangling.png")]


def test_non_utf8_file_name(tmp_path: Path, pool: dict[str, list[Path]]) -> None:
    root = tmp_path / "ds"
    for label in CLASSES:
        for src in pool[label][:3]:
            put(src, root / label / src.name)
    bad = os.fsencode(root / "covid") + b"/caf\xe9-\xff.png"
    with open(bad, "wb") as fh:
        fh.write(b"not really an image")
    m = discover(root)
    assert len(m.records) == 10
    odd = [r for r in m.records if os.fsencode(r.path) == bad]
    assert len(odd) == 1
    m.to_csv(tmp_path / "m.csv")
    back = Manifest.from_csv(tmp_path / "m.csv")
    assert back.records == m.records
    rep = inspect(m, progress=False)
    assert [os.fsencode(p) for p, _ in rep.unreadable] == [bad]
    text = format_report(rep)
    assert "caf\ufffd-\ufffd.png" in text
    text.encode("utf-8")  # printable
    json.dumps(rep.to_dict(), ensure_ascii=False).encode("utf-8")


# --------------------------------------------------------------------------------------------
# CSV
# --------------------------------------------------------------------------------------------


def test_csv_with_split_group_and_mask(tmp_path: Path, pool: dict[str, list[Path]]) -> None:
    lines = ["file,target,split,subject,site,mask"]
    for label in CLASSES:
        for i, split in enumerate(("train", "train", "valid", "test")):
            src = pool[label][i]
            put(src, tmp_path / "imgs" / src.name)
            put(pool[label][-1], tmp_path / "masks" / src.name)
            mask = f"masks/{src.name}" if i < 2 else ""
            lines.append(
                f"imgs/{src.name},{label.replace('_', '-')},{split},p-{label}-{i // 2},hosp{i},{mask}"
            )
    lines.append("imgs/missing.png,covid,train,,,")
    lines.append(f"imgs/{pool['covid'][0].name},normal,train,,,")  # listed twice
    put(pool["covid"][9], tmp_path / "imgs" / "odd.png")
    lines.append("imgs/odd.png,tumour,train,,,")
    lines.append("notes.txt,covid,train,,,")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "manifest.csv").write_text("\n".join(lines) + "\n")

    m = discover(tmp_path)  # a folder with manifest.csv
    assert m.layout == "csv"
    assert m.counts() == {
        "train": dict.fromkeys(CLASSES, 2),
        "val": dict.fromkeys(CLASSES, 1),
        "test": dict.fromkeys(CLASSES, 1),
    }
    reasons = " | ".join(f"{p}: {r}" for p, r in m.skipped)
    assert "missing.png" in reasons and "does not exist" in reasons
    assert "more than once" in reasons and "unknown label 'tumour'" in reasons and "not an image" in reasons
    r0 = next(r for r in m.records if r.path.name == pool["non_covid"][0].name)
    assert r0.label == "non_covid" and r0.group == "p-non_covid-0" and r0.source == "hosp0"
    assert r0.mask == tmp_path / "masks" / r0.path.name
    assert sum(r.mask is not None for r in m.records) == 6
    assert not m.notes or not any("no val split" in n for n in m.notes)

    # to_csv / from_csv round trip, atomic (no temp files left)
    out = tmp_path / "out" / "m.csv"
    m.to_csv(out)
    assert os.listdir(out.parent) == ["m.csv"]
    header = out.read_text().splitlines()[0]
    assert header == "path,label,split,group,source,mask"
    back = Manifest.from_csv(out)
    assert back.records == m.records
    # inside the CSV's folder, paths are written relative
    m.to_csv(tmp_path / "rel.csv")
    assert "imgs/" in (tmp_path / "rel.csv").read_text().splitlines()[1].split(",")[0]


def test_csv_without_split_or_group(tmp_path: Path, pool: dict[str, list[Path]]) -> None:
    lines = ["path,label"]
    for label in CLASSES:
        for src in pool[label][:20]:
            put(src, tmp_path / label / src.name)
            lines.append(f"{label}/{src.name},{label}")
    (tmp_path / "list.csv").write_text("\n".join(lines) + "\n")
    m = discover(tmp_path / "list.csv", val_fraction=0.2, test_fraction=0.2, seed=3)
    c = m.counts()
    assert all(c[s][lab] >= 2 for s in SPLITS for lab in CLASSES)
    assert all(r.group == f"{r.label}/{r.path.name}" for r in m.records)
    assert all(r.source for r in m.records)  # from '<source>__<name>'
    assert any("no test split" in n for n in m.notes)
    assert_no_group_leak(m)


def test_csv_errors(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("name,whatever\nx.png,covid\n")
    with pytest.raises(DatasetError, match="no path column"):
        discover(tmp_path / "a.csv")
    (tmp_path / "b.csv").write_text("")
    with pytest.raises(DatasetError, match="empty CSV"):
        discover(tmp_path / "b.csv")


# --------------------------------------------------------------------------------------------
# Inspection
# --------------------------------------------------------------------------------------------


def test_inspect_finds_duplicates_and_unreadable_files(tmp_path: Path, pool: dict[str, list[Path]]) -> None:
    root = tmp_path / "ds"
    for split, start, n in (("train", 0, 5), ("val", 10, 2), ("test", 20, 2)):
        for label in CLASSES:
            for src in pool[label][start : start + n]:
                put(src, root / split / label / src.name)

    # exact duplicate across train and test, re-saved with other PNG settings
    dup_src = pool["covid"][0]
    with Image.open(dup_src) as im:
        im.save(root / "test" / "covid" / "resaved.png", compress_level=1)
    # near duplicates: JPEG q95 (val) and a resized copy (test) of another train image
    near_src = pool["normal"][1]
    with Image.open(near_src) as im:
        im.save(root / "val" / "normal" / "near.jpg", quality=95)
        im.resize((200, 200), Image.Resampling.LANCZOS).save(root / "test" / "normal" / "smaller.png")
    # unreadable files
    (root / "train" / "non_covid" / "text.png").write_text("this is not a PNG\n")
    data = pool["non_covid"][5].read_bytes()
    (root / "val" / "non_covid" / "truncated.png").write_bytes(data[: len(data) // 2])

    m = discover(root)
    rep = inspect(m, progress=False)

    assert rep.layout == "split-class-folders"
    unreadable = {p.name: why for p, why in rep.unreadable}
    assert set(unreadable) == {"text.png", "truncated.png"}
    assert "text" in unreadable["text.png"]
    assert unreadable["truncated.png"]

    exact = [sorted(p.name for p in g) for g in rep.exact_duplicates]
    assert exact == [sorted([dup_src.name, "resaved.png"])]
    assert len(rep.cross_split_duplicates) == 1
    assert {m_.split for m_ in m.records if m_.path in rep.cross_split_duplicates[0]} == {"train", "test"}

    near = [sorted(p.name for p in g) for g in rep.near_duplicates]
    assert near == [sorted([near_src.name, "near.jpg", "smaller.png"])]
    assert len(rep.near_cross_split_duplicates) == 1
    assert not rep.label_conflicts
    assert rep.groups_in_multiple_splits == []

    text = format_report(rep)
    for needle in (
        "train",
        "total",
        "Unreadable images: 2",
        "truncated.png",
        "Exact duplicates across splits",
        "1 groups, 2 images",
        "near.jpg",
        "[test]",
    ):
        assert needle in text, needle
    d = rep.to_dict()
    json.dumps(d)
    assert d["counts"]["train"]["covid"] == 5 and len(d["unreadable"]) == 2

    # near=False skips the thumbnail search; check_images=False only checks existence
    assert inspect(m, near=False, progress=False).near_duplicates == []
    (root / "train" / "covid" / dup_src.name).unlink()
    quick = inspect(m, check_images=False, progress=False)
    assert [p.name for p, _ in quick.unreadable] == [dup_src.name]
    assert "Missing files" in format_report(quick)


def test_inspect_groups_in_multiple_splits_and_label_conflicts(
    tmp_path: Path, pool: dict[str, list[Path]]
) -> None:
    recs = []
    for label in CLASSES:
        for i, split in enumerate(SPLITS):
            recs.append(Record(path=pool[label][i], label=label, split=split, group=f"{label}-patient"))
    recs.append(Record(path=pool["covid"][0], label="normal", split="train", group="x"))
    m = Manifest(root=SAMPLE, layout="csv", records=recs, skipped=[], notes=[])
    rep = inspect(m, progress=False)
    assert [g for g, _ in rep.groups_in_multiple_splits] == [
        "covid-patient",
        "non_covid-patient",
        "normal-patient",
    ]
    assert rep.groups_in_multiple_splits[0][1] == ["train", "val", "test"]
    assert len(rep.label_conflicts) == 1
    assert "Patient groups in more than one split (leak): 3" in format_report(rep)
