"""The one view rule (xraydx.frontal; issue 17 item 6): a DICOM header saying lateral, another view or a
one-sided image is not a frontal chest X-ray, for predict, explain, serve and the DICOM node alike.
(The outputs themselves are checked in tests/test_schema.py.)"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from dicomfiles import write, xray_dataset

from conftest import sample_images
from xraydx import frontal

PKG = Path(__file__).resolve().parents[1] / "src" / "xraydx"


@pytest.mark.parametrize(
    ("elements", "want"),
    [
        ({"ViewPosition": "LL"}, "lateral view (ViewPosition LL)"),
        ({"ViewPosition": "rl "}, "lateral view (ViewPosition RL)"),
        ({"ViewPosition": "LATERAL"}, "lateral view (ViewPosition LATERAL)"),
        ({"ViewPosition": "LLD"}, "unknown view (ViewPosition LLD)"),
        ({"ImageLaterality": "L"}, "one-sided image (ImageLaterality L), not a frontal chest X-ray"),
        ({"ViewPosition": "PA"}, None),
        ({"ViewPosition": "AP"}, None),
        ({}, None),  # no view: the OOD guard decides
    ],
)
def test_view_reason(elements: dict[str, str], want: str | None) -> None:
    assert frontal.view_reason(elements) == want


def test_reason_of_files_and_bytes(tmp_path: Path) -> None:
    png = sample_images("test")[0]
    lat = write(xray_dataset(png, view="LL"), tmp_path / "lat.dcm")
    pa = write(xray_dataset(png, view="PA"), tmp_path / "pa.dcm")
    assert frontal.view_reason_of_file(lat) == frontal.view_reason_of_bytes(lat.read_bytes())
    assert frontal.view_reason_of_file(lat) == "lateral view (ViewPosition LL)"
    assert frontal.view_reason_of_file(pa) is None and frontal.view_reason_of_file(png) is None
    assert frontal.view_reason_of_file(tmp_path / "missing.dcm") is None
    assert frontal.view_reason_of_bytes(b"\x00" * 128 + b"DICM" + b"junk") is None  # unreadable: no reason


def test_one_rule_in_one_place() -> None:
    """Only xraydx/frontal.py reads a DICOM header's view: every entry point goes through it."""
    readers = []
    for p in sorted(PKG.rglob("*.py")):
        tree = ast.parse(p.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value in (
                "ViewPosition",
                "ImageLaterality",
                "ViewCodeSequence",
            ):
                readers.append(p.relative_to(PKG).as_posix())
    assert set(readers) == {"frontal.py"}, readers
    from xraydx.dicom import pipeline

    assert pipeline.view_reason is frontal.view_reason
