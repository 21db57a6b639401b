"""What a folder or list file given to ``predict`` / ``data inspect`` may hold, and that nothing in it is left
out without a word (issue 16 items 1, 2, 16; issue 17 item 11). The cases: tests/badfiles.py WALK_CASES."""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
from pathlib import Path

import pytest
from badfiles import WALK_CASES, printable, write_walk_cases

from conftest import sample_images
from xraydx.cli import EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, main
from xraydx.io_formats import is_image_path
from xraydx.predict import expand_inputs


def _block_scandir(monkeypatch: pytest.MonkeyPatch, blocked: set[str]) -> None:
    """``os.scandir`` fails with EACCES for these folders (root ignores chmod 000, so it is simulated)."""
    real = os.scandir

    def scandir(path: str | int | os.PathLike[str] = ".") -> os.ScandirIterator[str]:
        if not isinstance(path, int) and os.path.abspath(os.fspath(path)) in blocked:
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)


@pytest.fixture()
def walk_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, dict[str, Path], list[str]]:
    folder = tmp_path / "export"
    paths = write_walk_cases(folder)
    _block_scandir(monkeypatch, {os.path.abspath(paths[c.key]) for c in WALK_CASES if c.blocked})
    inputs = [str(folder)] + [str(paths[c.key]) for c in WALK_CASES if c.as_input]
    return folder, paths, inputs


def _rows(p: Path) -> dict[str, dict[str, str]]:
    with open(p, newline="", encoding="utf-8", errors="surrogateescape") as fh:
        return {r["path"]: r for r in csv.DictReader(fh)}


def test_expand_inputs_reports_every_walk_case(walk_dir: tuple[Path, dict[str, Path], list[str]]) -> None:
    folder, paths, inputs = walk_dir
    notes: list[str] = []
    found, problems = expand_inputs(inputs, notes)
    why = {str(p): r for p, r in problems}
    found_s = {str(p) for p in found}
    for c in WALK_CASES:
        p = str(paths[c.key])
        if c.expect == "read" or (
            c.expect == "row" and is_image_path(c.name)
        ):  # read_image refuses the latter
            assert p in found_s, c.key
        elif c.expect == "row":
            assert c.reason in why.get(p, ""), (c.key, why.get(p))
        elif c.expect == "left_out":
            assert p not in found_s and p not in why
            assert any(c.reason in n for n in notes), (c.key, notes)
    assert str(folder / "Normal" / "images" / "n1.png") in found_s
    assert not any("lung masks" in p for p in found_s)
    assert str(paths["unlistable"] / "inside.png") not in found_s


def test_predict_reports_every_walk_case(checkpoint: Path, walk_dir: tuple[Path, dict[str, Path], list[str]],
                                         tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    folder, paths, inputs = walk_dir
    out = tmp_path / "pred.csv"
    assert (
        main(["predict", *inputs, "--checkpoint", str(checkpoint), "--out", str(out), "-q"]) == EXIT_PARTIAL
    )
    rows = _rows(out)
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\r" not in err, "control characters of a file name reach the terminal"
    for c in WALK_CASES:
        p = str(paths[c.key])
        if c.expect == "read":
            assert rows[p]["status"] == "ok", (c.key, rows.get(p))
        elif c.expect == "row":
            assert rows[p]["status"].startswith("error: ") and c.reason in rows[p]["status"], (c.key, rows[p])
            line = next((ln for ln in err.splitlines() if printable(p) in ln), None)
            assert line is not None and c.reason in line, (c.key, err)
        else:
            assert p not in rows and c.reason in err, (c.key, err)
    assert rows[str(folder / "Normal" / "images" / "n1.png")]["status"] == "ok"
    errors = {p for p, r in rows.items() if r["status"].startswith("error: ")}
    assert errors == {str(paths[c.key]) for c in WALK_CASES if c.expect == "row"} | {str(folder / "loop-b")}
    assert f"{len(errors)} unreadable" in err


def test_data_inspect_reports_unlistable_folders_link_loops_and_fifos(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "ds"
    for label in ("covid", "non_covid", "normal"):
        (root / label).mkdir(parents=True)
        for p in sample_images("train", label)[:2]:
            shutil.copy(p, root / label / p.name)
    (root / "normal" / "locked").mkdir()
    shutil.copy(sample_images("val", "normal")[0], root / "normal" / "locked" / "x.png")
    os.symlink("loop-b", root / "covid" / "loop-a")
    os.symlink("loop-a", root / "covid" / "loop-b")
    os.mkfifo(root / "non_covid" / "pipe.png")
    _block_scandir(monkeypatch, {os.path.abspath(root / "normal" / "locked")})
    report = tmp_path / "r.json"
    assert main(["data", "inspect", str(root), "--json", str(report), "--no-near", "-q"]) == EXIT_PARTIAL
    cap = capsys.readouterr()
    doc = json.loads(report.read_text(encoding="utf-8"))
    not_read = {Path(e["path"]).name: e["reason"] for e in doc["not_read"]}
    assert not_read["locked"].startswith("cannot list folder (Permission denied")
    assert not_read["loop-a"].startswith("symbolic link loop") and "loop-b" in not_read
    assert not_read["pipe.png"] == "not a regular file (FIFO)"
    for name in ("locked", "loop-a", "loop-b", "pipe.png"):
        assert any(name in ln for ln in cap.err.splitlines()), (name, cap.err)
        assert any(name in ln and "Not read" not in ln for ln in cap.out.splitlines()), name
    assert "Not read" in cap.out
    # without them: exit 0
    shutil.rmtree(root / "normal" / "locked")
    for name in ("loop-a", "loop-b"):
        (root / "covid" / name).unlink()
    (root / "non_covid" / "pipe.png").unlink()
    assert main(["data", "inspect", str(root), "--no-near", "-q"]) == EXIT_OK


def test_data_inspect_reads_extensionless_dicom_by_content(tmp_path: Path) -> None:
    from badfiles import _bare_dicom_bytes, dicom_bytes, real_xray

    from xraydx.data import discover

    _, real = real_xray()
    root = tmp_path / "ds"
    for label in ("covid", "non_covid", "normal"):
        (root / label).mkdir(parents=True)
        shutil.copy(sample_images("train", label)[0], root / label / "a.png")
    (root / "covid" / "IM000001").write_bytes(dicom_bytes(real.astype("uint16") << 4))
    (root / "covid" / "IM000002").write_bytes(_bare_dicom_bytes(real.astype("uint16") << 4, implicit=True))
    (root / "covid" / "README").write_text("not an image\n", encoding="utf-8")
    m = discover(root)
    names = {r.path.name for r in m.records}
    assert {"IM000001", "IM000002", "a.png"} <= names and "README" not in names
    assert any(Path(p).name == "README" for p, _ in m.skipped)


def test_out_equal_to_an_input_and_heatmaps_in_the_input_folder_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 16 item 16: refused before any model is loaded (the checkpoint here does not even exist)."""
    folder = tmp_path / "scans"
    folder.mkdir()
    img = folder / "a.png"
    shutil.copy(sample_images("test")[0], img)
    before = img.read_bytes()
    ck = str(tmp_path / "none.safetensors")
    assert (
        main(["predict", str(img), "--checkpoint", ck, "--out", str(img), "--overwrite", "-q"]) == EXIT_USAGE
    )
    assert "--out is one of the inputs" in capsys.readouterr().err and img.read_bytes() == before
    for heat in (folder, folder / "cams"):
        args = [
            "predict",
            str(folder),
            "--checkpoint",
            ck,
            "--out",
            str(tmp_path / "p.csv"),
            "--heatmaps",
            str(heat),
        ]
        assert main([*args, "-q"]) == EXIT_USAGE
        assert "--heatmaps is inside the input folder" in capsys.readouterr().err
    assert main(["predict", str(img), "--checkpoint", ck, "--out", str(tmp_path / "p.csv"),
                 "--heatmaps", str(folder / "sub" / "cams"), "-q"]) == EXIT_USAGE  # fmt: skip
