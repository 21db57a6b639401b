"""Write the training manifest of the shipped default model (MODEL_CARD.md).

cxr3 alone confounds class with source: every COVID-19 image comes from one collection (the COVID-19
Radiography Database) and most non-COVID images from one pediatric collection (Kermany).  A model can
score well on cxr3 by recognising the collection.  This script adds the only other labelled CXRs on
the development machines, both from the ieee8023 COVID-19 image data collection (Radiopaedia, Eurorad
and hospital case reports; many hospitals, adult patients):

* ``lungseg``: 250 COVID-19 CXRs (163 patients), labelled covid;
* ``cxr3_adult_pneumonia``: 21 adult non-COVID pneumonia CXRs (12 patients), labelled non_covid;
* ``cxr3_adult_normal``: 640 adult normals from three sites in no other set (shenzhen, montgomery,
  openist), split by xraydx's own patient-grouped rule.

Splits: cxr3 rows keep exactly the split ``xraydx train --data cxr3`` makes (patient-grouped,
stratified, seed 0), so its test split is the one every candidate is compared on.  The ieee8023 rows
are split by patient (``ieee8023:<patient id>``, one namespace for both sets) into train / val / test
with scikit-learn's StratifiedGroupKFold.  The ieee8023 masks are deliberately not listed: with
``--lung-mask crop`` every image then gets its lung box from the same shipped segmenter, so the
crop's style cannot tell the new source apart.

Sources are hospitals: the COVID-19 Radiography Database's 470 pediatric normals are Kermany images
(Guangzhou Women and Children's Medical Center; ``finding`` in cxr3/manifest.csv says so), so they get
source ``kermany``: a fold that holds Kermany out then holds out that hospital's normals too, instead of
training on them while calling its pneumonias "an unseen hospital" (docs/generalisation.md, fourth round).

Copies: 87 of the ieee8023 COVID-19 images are also in cxr3 (the COVID-19 Radiography Database
re-distributes them). Each ieee8023 patient with such a copy is moved whole into the split of the cxr3
copy (cxr3's splits stay as they are), so no copy of a training image is validated or tested on; the
crossval leaves the copies of held-out images out of each fold itself (xraydx.crossval).

    python scripts/make_default_manifest.py --shared DATA_DIR --out runs/default-data.csv
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from xraydx.crossval_folds import cross_source_copies
from xraydx.data import Manifest, Record, discover
from xraydx.fsutil import atomic_open


def ieee_rows(shared: Path) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    with open(shared / "lungseg" / "manifest.csv", newline="", encoding="utf-8") as fh:
        for r in csv.DictReader(fh):
            if "COVID-19" not in r["finding"]:
                continue
            rows.append(
                {
                    "path": str(shared / "lungseg" / r["image"]),
                    "label": "covid",
                    "group": f"ieee8023:{r['patientid']}",
                }
            )
    with open(shared / "cxr3_adult_pneumonia" / "manifest.csv", newline="", encoding="utf-8") as fh:
        for r in csv.DictReader(fh):
            group = (
                r["patient_group"]
                if r["patient_group"].startswith("ieee8023:")
                else f"ieee8023:{r['patient_group']}"
            )
            rows.append(
                {
                    "path": str(shared / "cxr3_adult_pneumonia" / r["file"]),
                    "label": "non_covid",
                    "group": group,
                }
            )
    return rows


def split_ieee(rows: list[dict[str, str]], seed: int) -> None:
    """test = 1 of 5 patient folds, val = 1 of 4 folds of the rest (about 20% / 20% / 60%)."""
    idx = np.arange(len(rows))
    y = np.array([r["label"] for r in rows])
    g = np.array([r["group"] for r in rows])
    _, test = next(StratifiedGroupKFold(5, shuffle=True, random_state=seed).split(idx, y, g))
    rest = np.setdiff1d(idx, test)
    _, val = next(StratifiedGroupKFold(4, shuffle=True, random_state=seed).split(rest, y[rest], g[rest]))
    val = rest[val]
    in_test, in_val = set(test.tolist()), set(val.tolist())
    for i, r in enumerate(rows):
        r["split"] = "test" if i in in_test else "val" if i in in_val else "train"
        r["source"] = "ieee8023"


def kermany_normals(cxr3: Path) -> set[str]:
    """The paths of cxr3's radiographydb normals that are Kermany (Guangzhou) images, by their finding."""
    with open(cxr3 / "manifest.csv", newline="", encoding="utf-8") as fh:
        return {
            str(cxr3 / r["file"])
            for r in csv.DictReader(fh)
            if r["label"] == "normal" and "Kermany image" in r["finding"]
        }


def join_copies(rows: list[dict[str, str]]) -> int:
    """Move every ieee8023 patient with an image that is also in cxr3 into that copy's split; the number of
    ieee8023 rows whose split changed. A patient whose copies lie in different cxr3 splits goes to the
    latest of them (test, else val), so none of its images is trained on beside a held-back copy."""
    man = Manifest(
        Path("/"),
        "csv",
        [Record(Path(r["path"]), r["label"], r["split"], r["group"], r["source"]) for r in rows],
    )
    by_path = {r["path"]: r for r in rows}
    target: dict[str, str] = {}  # ieee8023 patient group -> split
    rank = {"train": 0, "val": 1, "test": 2}
    for g in cross_source_copies(man, progress=False):
        fixed = [by_path[p]["split"] for p in g if by_path[p]["source"] != "ieee8023"]
        if not fixed:
            continue
        split = max(fixed, key=rank.__getitem__)
        for p in g:
            r = by_path[p]
            if r["source"] == "ieee8023":
                old = target.get(r["group"])
                target[r["group"]] = split if old is None else max(old, split, key=rank.__getitem__)
    moved = 0
    for r in rows:
        if r["source"] == "ieee8023" and r["group"] in target and r["split"] != target[r["group"]]:
            r["split"] = target[r["group"]]
            moved += 1
    return moved


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--shared", type=Path, required=True, help="DATA_DIR: the folder holding cxr3, lungseg, ..."
    )
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    if args.out.exists() and not args.overwrite:
        print(f"{args.out}: exists (use --overwrite)", file=sys.stderr)
        return 2
    shared = Path(os.path.abspath(args.shared))
    rows = []
    for name in ("cxr3", "cxr3_adult_normal"):
        # each set is split by xraydx's own rule (patient-grouped, stratified, seeded)
        man = discover(shared / name, seed=args.seed, require_all_classes=False)
        rows += [
            {"path": str(r.path), "label": r.label, "split": r.split, "group": r.group, "source": r.source}
            for r in man.records
        ]
    guangzhou = kermany_normals(shared / "cxr3")
    for r in rows:
        if r["path"] in guangzhou:
            r["source"] = "kermany"
    print(f"{len(guangzhou)} radiographydb pediatric normals (Kermany images) given source kermany")
    extra = ieee_rows(shared)
    split_ieee(extra, args.seed)
    rows += extra
    moved = join_copies(rows)
    print(
        f"copies across sources: {moved} ieee8023 images moved into their cxr3 copy's split (with their patient)"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(args.out, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["path", "label", "split", "group", "source"])
        w.writeheader()
        w.writerows(rows)
    counts: dict[tuple[str, str, str], int] = {}
    for r in rows:
        k = (r["source"], r["split"], r["label"])
        counts[k] = counts.get(k, 0) + 1
    for k in sorted(counts):
        print(*k, counts[k])
    print(f"wrote {args.out} ({len(rows)} rows)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
