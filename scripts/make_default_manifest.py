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

from xraydx.data import discover
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
    extra = ieee_rows(shared)
    split_ieee(extra, args.seed)
    rows += extra
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
