"""CSV formula injection (issue 16 item 8): every CSV xraydx writes escapes cells that start with = + - @ TAB
or CR with a leading ' (OWASP); JSON stays raw; xraydx reads its own CSVs back to the same values."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import pytest

from conftest import sample_images
from xraydx.cli import main
from xraydx.fsutil import csv_cell, csv_unescape

PKG = Path(__file__).resolve().parents[1] / "src" / "xraydx"
NASTY = ["=HYPERLINK(evil)", "+1+cmd", "-2-cmd", "@SUM(A1)", "\tTAB", "'=quoted"]


def test_csv_cell_escapes_formulas_and_round_trips() -> None:
    for v in [*NASTY, "\rCR", "''=x", "-", "=", "'a", "a=b", "normal", ""]:
        e = csv_cell(v)
        assert csv_unescape(e) == v, (v, e)
        if v.lstrip("'").startswith(("=", "+", "-", "@", "\t", "\r")):
            assert e.startswith("'"), (v, e)
        else:
            assert e == v
    for number in ["-0.5", "+3", "1e-3", "-1.5E+2", "-inf", "nan"]:  # numbers stay numbers
        assert csv_cell(number) == number
    assert csv_cell(-1.5) == -1.5


def test_every_csv_writer_in_the_package_escapes() -> None:
    """No csv.writer / csv.DictWriter outside fsutil's escaping ones (predict's --resume rewrites rows read
    from its own file, escaped already)."""
    allowed = {
        ("predwrite.py", "cw = csv.writer(fh)  # the kept rows, as they are in the file (escaped already)")
    }
    found = []
    for p in PKG.rglob("*.py"):
        if p.name == "fsutil.py":
            continue
        for line in p.read_text(encoding="utf-8").splitlines():
            if re.search(r"\bcsv\.(writer|DictWriter)\(", line) and (p.name, line.strip()) not in allowed:
                found.append(f"{p.relative_to(PKG)}: {line.strip()}")
    assert not found, "CSV written without csv_writer/CsvDictWriter:\n" + "\n".join(found)


def _dataset(root: Path) -> list[str]:
    names = []
    for label in ("covid", "non_covid", "normal"):
        (root / label).mkdir(parents=True)
        for i, p in enumerate(sample_images("train", label)[:3]):
            name = f"{NASTY[i + 3 * (label == 'normal')] if label != 'non_covid' else 'ok'}{i}.png"
            shutil.copy(p, root / label / name)
            names.append(name)
    return names


def _cells(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.reader(fh))


def test_manifest_csv_is_escaped_and_reads_back(tmp_path: Path) -> None:
    from xraydx.data import discover

    root = tmp_path / "ds"
    _dataset(root)
    expected = {r.path for r in discover(root).records}
    m = root / "covid" / "out.csv"  # paths relative to the CSV's folder: the covid names lead their cells
    assert main(["data", "inspect", str(root), "--manifest-out", str(m), "--no-read", "-q"]) == 0
    cells = [c for row in _cells(m) for c in row]
    assert not [c for c in cells if c[:1] in ("=", "+", "-", "@", "\t", "\r")], cells
    assert {"'=HYPERLINK(evil)0.png", "'+1+cmd1.png", "'-2-cmd2.png"} <= set(cells)
    assert {r.path for r in discover(m).records} == expected


def test_predictions_csv_is_escaped_json_raw_and_resume_matches(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "ds"
    _dataset(root)
    monkeypatch.chdir(root / "covid")  # relative inputs: the file names lead the path cells
    out = tmp_path / "p.csv"
    base = ["predict", ".", "--checkpoint", str(checkpoint), "-q"]
    assert main([*base, "--out", str(out)]) == 0
    paths = [row[0] for row in _cells(out)[1:]]
    assert sorted(paths) == sorted(csv_cell(p.name) for p in (root / "covid").iterdir())
    assert sum(p.startswith("'") for p in paths) == 3 and all(Path(csv_unescape(p)).exists() for p in paths)
    assert main([*base, "--out", str(tmp_path / "p.json"), "--format", "json"]) == 0
    doc = json.loads((tmp_path / "p.json").read_text(encoding="utf-8"))
    assert {r["path"] for r in doc["predictions"]} == {p.name for p in (root / "covid").iterdir()}  # raw
    capsys.readouterr()
    assert main([*base, "--out", str(out), "--resume"]) == 0  # every escaped path matches its file
    assert f"({len(paths)} already done)" in capsys.readouterr().err


def test_checkpoints_get_the_same_permissions_as_every_other_output(tmp_path: Path) -> None:
    """One rule (issue 16 item 16): safetensors made checkpoints 0600 while other outputs were 0644."""
    import os

    import torch

    from xraydx.checkpoint import save
    from xraydx.fsutil import atomic_write_text

    atomic_write_text(tmp_path / "p.csv", "path\n")
    save(tmp_path / "c.safetensors", {"w": torch.zeros(2)}, {"kind": "test"})
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == {"p.csv": 0o666 & ~umask, "c.safetensors": 0o666 & ~umask}, modes
