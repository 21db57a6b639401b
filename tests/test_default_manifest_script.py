"""scripts/make_default_manifest.py's two data fixes, on real sample images: an ieee8023 patient with a copy
in cxr3 moves whole into the copy's split, and cxr3's Kermany-derived normals are found by their finding."""

from __future__ import annotations

import csv
import importlib.util
import shutil
from pathlib import Path

from xraydx.data import discover

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_default_manifest.py"


def _script() -> object:
    spec = importlib.util.spec_from_file_location("make_default_manifest", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_an_ieee_patient_with_a_cxr3_copy_moves_whole_into_the_copys_split(
    sample_dir: Path, tmp_path: Path
) -> None:
    mod = _script()
    recs = [r for r in discover(sample_dir).records if r.label == "covid"][:3]
    copy = tmp_path / "ieee-copy.png"
    shutil.copy(recs[0].path, copy)
    rows = [
        {"path": str(recs[0].path), "label": "covid", "split": "test", "group": "rdb:1", "source": "radiographydb"},
        {"path": str(copy), "label": "covid", "split": "train", "group": "ieee8023:p1", "source": "ieee8023"},
        {"path": str(recs[1].path), "label": "covid", "split": "val", "group": "ieee8023:p1", "source": "ieee8023"},
        {"path": str(recs[2].path), "label": "covid", "split": "train", "group": "ieee8023:p2", "source": "ieee8023"},
    ]  # fmt: skip
    assert mod.join_copies(rows) == 2  # type: ignore[attr-defined]
    assert [r["split"] for r in rows] == ["test", "test", "test", "train"]  # p1 whole; p2 and cxr3 untouched


def test_kermany_normals_are_found_by_their_finding(tmp_path: Path) -> None:
    mod = _script()
    with open(tmp_path / "manifest.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=["file", "label", "finding"])
        w.writeheader()
        w.writerows(
            [
                {"file": "normal/a.png", "label": "normal", "finding": "Normal (pediatric; Kermany image included in the Radiography DB)"},
                {"file": "normal/b.png", "label": "normal", "finding": "Normal"},
                {"file": "non_covid/c.png", "label": "non_covid", "finding": "Bacterial pneumonia (pediatric)"},
            ]
        )  # fmt: skip
    assert mod.kermany_normals(tmp_path) == {str(tmp_path / "normal/a.png")}  # type: ignore[attr-defined]
