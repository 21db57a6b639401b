#!/usr/bin/env python3
"""Build the small bundled sample ``data/sample/`` from the cxr3 development set.

Usage (from the repository root)::

    python scripts/make_sample.py --src DATA_DIR/cxr3 --out data/sample --seed 0

What it does:

* per class it picks 60 images and splits them 40 train / 10 val / 10 test;
* whole patient groups (``patient_group`` of the cxr3 manifest) are drawn, so no group is in
  two splits; groups whose images carry more than one label are left out;
* within a class the images are stratified by source: each split gets a share of every source
  of that class proportional to the source's share in cxr3 (at least one image each);
* every image is resized to 224x224 (Pillow LANCZOS on grayscale) and saved as 8-bit PNG
  with ``optimize=True``;
* it writes ``manifest.csv`` and ``README.md`` next to the images.

The result only depends on the cxr3 manifest and ``--seed``.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import shutil
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

CLASSES: tuple[str, ...] = ("covid", "non_covid", "normal")
SPLITS: tuple[str, ...] = ("train", "val", "test")
DEFAULT_QUOTA: dict[str, int] = {"train": 40, "val": 10, "test": 10}
SIZE = 224
MANIFEST_COLUMNS = (
    "path",
    "label",
    "split",
    "group",
    "source",
    "finding",
    "original_dataset",
    "source_repo",
    "source_path",
)


@dataclass(frozen=True)
class Row:
    file: str
    label: str
    source: str
    group: str
    finding: str
    original_dataset: str
    source_repo: str
    source_path: str


def read_cxr3(src: Path) -> list[Row]:
    rows: list[Row] = []
    with open(src / "manifest.csv", newline="", encoding="utf-8") as fh:
        for r in csv.DictReader(fh):
            name = r["file"].rsplit("/", 1)[-1]
            source = name.split("__", 1)[0] if "__" in name else ""
            rows.append(
                Row(
                    file=r["file"],
                    label=r["label"],
                    source=source,
                    group=r["patient_group"] or r["file"],
                    finding=r["finding"],
                    original_dataset=r["original_dataset"],
                    source_repo=r["source_repo"],
                    source_path=r["source_path"],
                )
            )
    return rows


def source_quotas(shares: dict[str, int], n: int) -> dict[str, int]:
    """Split ``n`` over sources proportionally to ``shares`` (largest remainder), at least 1 each."""
    total = sum(shares.values())
    names = sorted(shares)
    if n < len(names):
        raise ValueError(f"cannot give each of {len(names)} sources an image out of {n}")
    exact = {s: n * shares[s] / total for s in names}
    out = {s: max(1, int(exact[s])) for s in names}
    while sum(out.values()) < n:
        best = max(names, key=lambda s: (exact[s] - out[s], s))
        out[best] += 1
    while sum(out.values()) > n:
        best = max((s for s in names if out[s] > 1), key=lambda s: (out[s] - exact[s], s))
        out[best] -= 1
    return out


def select(rows: list[Row], quota: dict[str, int], seed: int) -> dict[str, list[Row]]:
    """Return split -> rows, drawing whole patient groups per (class, source)."""
    labels_of_group: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        labels_of_group[r.group].add(r.label)
    mixed = {g for g, labels in labels_of_group.items() if len(labels) > 1}

    rng = random.Random(seed)
    chosen: dict[str, list[Row]] = {s: [] for s in SPLITS}
    for label in CLASSES:
        in_class = [r for r in rows if r.label == label]
        shares: dict[str, int] = defaultdict(int)
        for r in in_class:
            shares[r.source] += 1
        per_split = {split: source_quotas(shares, quota[split]) for split in SPLITS}
        for source in sorted(shares):
            groups: dict[str, list[Row]] = defaultdict(list)
            for r in in_class:
                if r.source == source and r.group not in mixed:
                    groups[r.group].append(r)
            order = sorted(groups)
            rng.shuffle(order)
            want = {split: per_split[split][source] for split in SPLITS}
            left = dict(want)
            for g in order:
                if not any(left.values()):
                    break
                members = sorted(groups[g], key=lambda r: r.file)
                fits = [s for s in SPLITS if left[s] >= len(members)]
                if not fits:
                    continue
                # the split that is furthest from its quota, so multi-image groups spread out
                split = max(fits, key=lambda s: (left[s] / want[s], -SPLITS.index(s)))
                chosen[split].extend(members)
                left[split] -= len(members)
            if any(left.values()):
                raise RuntimeError(f"not enough groups for {label}/{source}: still need {left}")
    return chosen


def write_image(src: Path, dst: Path) -> None:
    with Image.open(src) as im:
        im.load()
        gray = im.convert("L")
    if gray.size != (SIZE, SIZE):
        gray = gray.resize((SIZE, SIZE), Image.Resampling.LANCZOS)
    dst.parent.mkdir(parents=True, exist_ok=True)
    gray.save(dst, format="PNG", optimize=True)


def counts_table(entries: list[tuple[str, Row]]) -> str:
    sources = sorted({r.source for _, r in entries})
    lines = ["| split | class | " + " | ".join(sources) + " | total |"]
    lines.append("|---|---|" + "---:|" * (len(sources) + 1))
    for split in [*SPLITS, "all"]:
        for label in [*CLASSES, "all"]:
            sel = [r for s, r in entries if split in (s, "all") and label in (r.label, "all")]
            cells = [str(sum(r.source == src for r in sel)) for src in sources]
            row = f"| {split} | {label} | " + " | ".join(cells) + f" | {len(sel)} |"
            if split == "all" or label == "all":
                row = "| " + " | ".join(f"**{c.strip()}**" for c in row.strip("|").split("|")) + " |"
            lines.append(row)
    return "\n".join(lines)


def findings_table(entries: list[tuple[str, Row]]) -> str:
    tally: dict[tuple[str, str], int] = defaultdict(int)
    for _, r in entries:
        tally[(r.label, r.finding)] += 1
    lines = ["| class | finding (source label) | n |", "|---|---|---:|"]
    for (label, finding), n in sorted(tally.items(), key=lambda kv: (CLASSES.index(kv[0][0]), kv[0][1])):
        lines.append(f"| {label} | {finding} | {n} |")
    return "\n".join(lines)


README_TEMPLATE = """# data/sample — bundled 3-class chest X-ray sample

A small, real chest X-ray sample for unit tests, demos and smoke runs of xraydx: 180 images,
60 per class (`covid`, `non_covid`, `normal`), already split 40 train / 10 val / 10 test per
class. It is **not** a training set: a model trained on it proves nothing about accuracy.
**Research use only — not for clinical use.**

* Layout: `{{train,val,test}}/{{covid,non_covid,normal}}/<source>__<original-file-name>.png`
* Every image is 224x224, 8-bit grayscale PNG. Total size: {size_mb:.1f} MB.
* `manifest.csv` (paths relative to this folder), columns
  `path,label,split,group,source,finding,original_dataset,source_repo,source_path`:
  * `group` – the patient group of the cxr3 manifest (Kermany `personN`, NIH patient number,
    else the file itself); **no group appears in more than one split**.
  * `source` – the collection the image comes from (`radiographydb`, `kermany`, `nihcxr8`).
  * `finding` – the source label before mapping to the 3 classes.
  * `source_repo` / `source_path` – the public GitHub repository and the file in it the
    image was taken from (snapshot commits below).
* `xraydx.data.discover("data/sample")` loads it (CSV layout, through `manifest.csv`).

## Counts per split, class and source

{counts}

Findings behind the labels:

{findings}

## How it was made

From the repository root, with the cxr3 development set at `{src}`:

```
{command}
```

`scripts/make_sample.py` reads `{src}/manifest.csv`, and for each class draws whole patient
groups (seed {seed}, Python `random.Random`), leaving out the few groups whose images carry
more than one label. Within a class each split gets every source of that class in proportion
to its share in cxr3 (at least one image per source and split): covid is radiographydb only;
non_covid is kermany + nihcxr8; normal is radiographydb + nihcxr8. Images were resized to
224x224 with Pillow LANCZOS on the grayscale image (the 512x512 nihcxr8 images were
downscaled; the others were already 224x224 and are re-saved unchanged) and saved as PNG with
`optimize=True`. Running the command again gives the same files.

## Sources, credit and licences

| source | repository @ snapshot commit | files used |
|---|---|---|
| radiographydb | `rtchanon/Machine-Learning-for-COVID-19-detection-from-chest-X-RAYS` @ `744af3631b6055c5c808f56d7c3d65bd0aa3439d` | `COVID-19_Radiography_Dataset/{{COVID,Normal}}/*.png` (224x224 copies) |
| kermany | `lecuong1502/BTL_Machine_Learning` @ `19a2d6171e2b9678617eba9ad207ef416196d08f` | `{{train,val,test}}/PNEUMONIA/*.jpeg` |
| nihcxr8 | `muhammedtalo/COVID-19` @ `ee3e2cffc0824711bed675275506b26f19be7198` | `X-Ray Image DataSet/{{Pneumonia,No_findings}}/*.png` (1024x1024, downscaled) |

The images are a subset of cxr3, the project's development set, which collected them from
the public GitHub repository snapshots above (RGB copies converted to grayscale, JPEGs
re-saved as PNG, exact and near duplicates removed). Credit goes to the authors of the
original datasets: cite them when you use these images. Licences as the sources state them
(recorded in the cxr3 README):

* **COVID-19 Radiography Database** (Qatar University, University of Dhaka and
  collaborators; Kaggle `tawsifurrahman/covid19-radiography-database`), source `radiographydb`:
  M.E.H. Chowdhury et al., "Can AI help in screening Viral and COVID-19 pneumonia?",
  IEEE Access 8 (2020) 132665–132676; T. Rahman et al., "Exploring the Effect of Image
  Enhancement Techniques on COVID-19 Detection using Chest X-ray Images", arXiv:2012.02238
  (2020). Its COVID images come from BIMCV/PadChest, Hannover Medical School, SIRM, Eurorad,
  ieee8023/covid-chestxray-dataset and the COVID-CXNet figshare collection; its Normal
  images from the RSNA Pneumonia Detection Challenge and the Kermany pediatric set. Neither
  the source repository nor the database README names a licence: research use only, with
  attribution to the authors and to the underlying collections.
* **Chest X-Ray Images (Pneumonia)**, source `kermany`: D. Kermany, K. Zhang, M. Goldbaum
  et al., "Identifying Medical Diagnoses and Treatable Diseases by Image-Based Deep
  Learning", Cell 172(5) (2018) 1122–1131 (Mendeley Data doi:10.17632/rscbjbr9sj). The
  original publisher distributes it under CC BY 4.0 (not restated in the source repository).
* **NIH ChestX-ray8**, source `nihcxr8`: X. Wang, Y. Peng, L. Lu, Z. Lu, M. Bagheri,
  R.M. Summers, "ChestX-ray8: Hospital-scale Chest X-ray Database and Benchmarks…",
  CVPR 2017; subset selected by T. Ozturk et al., "Automated detection of COVID-19 cases
  using deep neural networks with X-ray images", Comput. Biol. Med. 121 (2020) 103792.
  The source repository states no licence; the NIH Clinical Center asks for acknowledgement
  of the NIH Clinical Center and citation of the paper.

## Limitations

The same as cxr3's: classes are confounded with sources (all covid images are Radiography
DB COVID images, mostly adult; most non_covid images are pediatric Kermany images), the
ChestX-ray8 labels are NLP-mined and noisy, and the Radiography DB COVID class has no patient
ids, so follow-up images of one patient may sit in different splits.
"""


def build(src: Path, out: Path, seed: int, quota: dict[str, int], command: str) -> list[tuple[str, Row]]:
    rows = read_cxr3(src)
    chosen = select(rows, quota, seed)
    entries = sorted(
        ((split, r) for split, rs in chosen.items() for r in rs),
        key=lambda e: (SPLITS.index(e[0]), CLASSES.index(e[1].label), e[1].file),
    )

    if out.exists() and any(out.iterdir()) and not (out / "manifest.csv").exists():
        raise SystemExit(f"{out}: exists, is not empty and has no manifest.csv; refusing to overwrite it")
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)

    manifest_rows = []
    for split, r in entries:
        name = r.file.rsplit("/", 1)[-1]
        rel = f"{split}/{r.label}/{name}"
        write_image(src / r.file, tmp / rel)
        manifest_rows.append(
            {
                "path": rel,
                "label": r.label,
                "split": split,
                "group": r.group,
                "source": r.source,
                "finding": r.finding,
                "original_dataset": r.original_dataset,
                "source_repo": r.source_repo,
                "source_path": r.source_path,
            }
        )
    with open(tmp / "manifest.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(manifest_rows)

    size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
    readme = README_TEMPLATE.format(
        size_mb=size / 1e6,
        counts=counts_table(entries),
        findings=findings_table(entries),
        src=src,
        seed=seed,
        command=command,
    )
    (tmp / "README.md").write_text(readme, encoding="utf-8")

    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return entries


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", type=Path, required=True, help="the cxr3 folder (DATA_DIR/cxr3)")
    ap.add_argument("--out", type=Path, default=Path("data/sample"), help="output folder")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    command = f"python scripts/make_sample.py --src {args.src} --out {args.out} --seed {args.seed}"
    entries = build(args.src, args.out, args.seed, DEFAULT_QUOTA, command)
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"wrote {len(entries)} images to {args.out} ({size / 1e6:.1f} MB)", file=sys.stderr)
    print(counts_table(entries))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
