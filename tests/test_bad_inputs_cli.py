"""The bad-input matrix end to end through the command line: predict, data inspect and train.

Every bad file must give a message naming the file and the reason, the rest of the batch must be
processed, and the exit code must be the documented one (xraydx.cli: 0 ok, 1 fatal, 2 usage,
3 partial). The files are built from a real bundled chest X-ray (tests/badfiles.py).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from badfiles import CLI_CASES, CliCase, build_cases, printable, real_xray, write_cases

from conftest import ROOT, SAMPLE, TINY_MODEL, sample_images
from xraydx.cli import EXIT_FATAL, EXIT_PARTIAL, EXIT_USAGE, main
from xraydx.io import read_image

CLASSES = ["covid", "non_covid", "normal"]
CASES = build_cases()
BAD = [c for c in CASES if c.reason is not None]
GOOD = [c for c in CASES if c.reason is None]


def _rows(p: Path) -> list[dict[str, str]]:
    with open(p, newline="", encoding="utf-8", errors="surrogateescape") as fh:
        return list(csv.DictReader(fh))


def _supports_non_utf8_names(folder: Path) -> bool:
    try:
        probe = Path(os.fsdecode(os.path.join(os.fsencode(folder), b"probe-\xff")))
        probe.write_bytes(b"")
        probe.unlink()
    except (OSError, UnicodeError):
        return False
    return True


@pytest.fixture(scope="module")
def matrix_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path], list[Path]]:
    """A folder with every case of the matrix plus three good sample images."""
    folder = tmp_path_factory.mktemp("matrix") / "in"
    folder.mkdir()
    if not _supports_non_utf8_names(folder):
        pytest.skip("this file system does not allow non-UTF-8 file names")
    paths = write_cases(folder, CASES)
    goods = []
    for p in sample_images("test")[:3]:
        shutil.copy(p, folder / p.name)
        goods.append(folder / p.name)
    return folder, paths, goods


def _check_prediction_rows(rows: list[dict[str, str]], paths: dict[str, Path], goods: list[Path]) -> None:
    by_path = {r["path"]: r for r in rows}
    assert len(by_path) == len(rows) == len(CASES) + len(goods), "one row per input file, no duplicates"
    for c in CASES:
        r = by_path[str(paths[c.key])]
        if c.reason is None:
            assert r["status"] == "ok", (c.key, r["status"])
            assert r["prediction"] in CLASSES
            assert sum(float(r[f"prob_{k}"]) for k in CLASSES) == pytest.approx(1.0, abs=1e-4)
        else:
            assert r["status"].startswith("error: ") and c.reason in r["status"], (c.key, r["status"])
            assert r["prediction"] == "" and all(r[f"prob_{k}"] == "" for k in CLASSES)
    for g in goods:
        assert by_path[str(g)]["status"] == "ok"
    # RGBA (alpha 255) has the same pixels as the 8-bit original: the same prediction, to the digit
    rgba, orig = by_path[str(paths["png_rgba"])], by_path[str(paths["non_utf8_name_ok"])]
    assert [rgba[f"prob_{k}"] for k in CLASSES] == [orig[f"prob_{k}"] for k in CLASSES]


def test_predict_bad_input_matrix(checkpoint: Path, matrix_dir: tuple[Path, dict[str, Path], list[Path]],
                                  tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    folder, paths, goods = matrix_dir
    out = tmp_path / "pred.csv"
    code = main(
        [
            "predict",
            str(folder),
            "--checkpoint",
            str(checkpoint),
            "--out",
            str(out),
            "-q",
            "--batch-size",
            "4",
        ]
    )
    assert code == EXIT_PARTIAL
    _check_prediction_rows(_rows(out), paths, goods)
    err = capsys.readouterr().err
    for c in BAD:  # each bad file named (undecodable bytes as \xNN) with its reason, on stderr
        line = next((ln for ln in err.splitlines() if printable(paths[c.key]) in ln), None)
        assert line is not None, f"{c.key} not reported on stderr:\n{err}"
        assert c.reason in line, line
    assert f"{len(CASES) - len(BAD) + len(goods)} predicted, {len(BAD)} unreadable" in err

    # the same through JSON output
    out_json = tmp_path / "pred.json"
    code = main(
        [
            "predict",
            str(folder),
            "--checkpoint",
            str(checkpoint),
            "--out",
            str(out_json),
            "--format",
            "json",
            "-q",
        ]
    )
    assert code == EXIT_PARTIAL
    doc = json.loads(out_json.read_text(encoding="utf-8"))
    statuses = {r["path"]: r["status"] for r in doc["predictions"]}
    assert statuses == {r["path"]: r["status"] for r in _rows(out)}


def test_16bit_palette_and_jpeg2000_are_read_not_mangled(
    matrix_dir: tuple[Path, dict[str, Path], list[Path]],
) -> None:
    _, paths, _ = matrix_dir
    _, real = real_xray()
    for key in ("png_16bit", "png_palette", "png_rgba", "dicom_jpeg2000", "non_utf8_name_ok"):
        img = read_image(paths[key])
        assert img.shape == real.shape and img.dtype == np.uint8
        r = float(np.corrcoef(img.ravel().astype(float), real.ravel().astype(float))[0, 1])
        assert r > 0.98, (key, r)


def test_missing_dicom_codec_is_named(checkpoint: Path, matrix_dir: tuple[Path, dict[str, Path], list[Path]],
                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """pylibjpeg-openjpeg (and Pillow's JPEG 2000 plugin) 'not installed': a clear message, not a crash."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEG2000Lossless

    monkeypatch.setattr(get_decoder(JPEG2000Lossless), "_available", {})
    _, paths, goods = matrix_dir
    out = tmp_path / "pred.csv"
    args = [
        str(paths["dicom_jpeg2000"]),
        str(goods[0]),
        "--checkpoint",
        str(checkpoint),
        "--out",
        str(out),
        "-q",
    ]
    assert main(["predict", *args]) == EXIT_PARTIAL
    rows = {Path(r["path"]).name: r["status"] for r in _rows(out)}
    assert rows[goods[0].name] == "ok"
    status = rows["j2k.dcm"]
    assert (
        "JPEG 2000" in status and "needs a decoder plugin: pip install pylibjpeg pylibjpeg-openjpeg" in status
    )
    assert "j2k.dcm" in capsys.readouterr().err


def test_predict_empty_folder_and_missing_file(checkpoint: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    (tmp_path / "empty").mkdir()
    out = tmp_path / "p.csv"
    assert (
        main(["predict", str(tmp_path / "empty"), "--checkpoint", str(checkpoint), "--out", str(out), "-q"])
        == EXIT_USAGE
    )
    assert "no image files found" in capsys.readouterr().err and not out.exists()
    good = sample_images("val")[0]
    missing = tmp_path / "gone.png"
    assert (
        main(["predict", str(good), str(missing), "--checkpoint", str(checkpoint), "--out", str(out), "-q"])
        == EXIT_PARTIAL
    )
    rows = {r["path"]: r["status"] for r in _rows(out)}
    assert rows[str(good)] == "ok" and rows[str(missing)] == "error: file not found"


# ---- data inspect ----------------------------------------------------------------------------------


def _dataset_with_bad_files(root: Path, per_class: int, empty_val_class: bool) -> dict[str, Path]:
    """split/class folders of real sample images; every case of the matrix in train/covid; a symlink
    loop; optionally an empty class folder (val/non_covid: its images are moved to train)."""
    for split in ("train", "val", "test"):
        for label in CLASSES:
            d = root / split / label
            d.mkdir(parents=True)
            for p in sample_images(split, label)[:per_class]:
                shutil.copy(p, d / p.name)
    if empty_val_class:
        for p in (root / "val" / "non_covid").iterdir():
            p.rename(root / "train" / "non_covid" / p.name)
    paths = write_cases(root / "train" / "covid", CASES)
    os.symlink("..", root / "train" / "normal" / "loop")  # train/normal/loop -> train
    os.symlink(".", root / "test" / "covid" / "self")  # a folder that contains itself
    return paths


def test_data_inspect_bad_input_matrix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if not _supports_non_utf8_names(tmp_path):
        pytest.skip("this file system does not allow non-UTF-8 file names")
    root = tmp_path / "ds"
    paths = _dataset_with_bad_files(root, per_class=4, empty_val_class=True)
    report_json = tmp_path / "report.json"
    code = main(["data", "inspect", str(root), "--json", str(report_json), "--no-near", "-q"])
    assert code == EXIT_PARTIAL
    doc = json.loads(report_json.read_text(encoding="utf-8"))
    assert doc["layout"] == "split-class-folders"
    unreadable = {u["path"]: u["reason"] for u in doc["unreadable"]}
    from xraydx.data import _show

    expected = {_show(paths[c.key]): c.reason for c in BAD}
    assert set(unreadable) == set(expected)
    for p, fragment in expected.items():
        assert fragment in unreadable[p], (p, unreadable[p])
    # every case is listed in the manifest (4 sample images + the cases in train/covid); the bad ones as unreadable
    assert doc["counts"]["train"]["covid"] == 4 + len(CASES)
    assert doc["counts"]["val"]["non_covid"] == 0
    assert "split val has no images of class non_covid" in doc["notes"]
    skipped = {Path(s["path"]).name: s["reason"] for s in doc["skipped"]}
    assert (
        "pointing inside the dataset" in skipped["loop"] and "pointing inside the dataset" in skipped["self"]
    )
    text = capsys.readouterr().out
    for c in BAD:
        assert any(c.reason in ln and _show(c.display_name) in ln for ln in text.splitlines()), c.key


def test_data_inspect_empty_class_is_fatal_and_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "ds"
    for label in CLASSES:
        (root / label).mkdir(parents=True)
    for p in sample_images("train", "covid")[:2]:
        shutil.copy(p, root / "covid" / p.name)
    for p in sample_images("train", "normal")[:2]:
        shutil.copy(p, root / "normal" / p.name)
    assert main(["data", "inspect", str(root), "-q"]) == EXIT_FATAL
    err = capsys.readouterr().err
    assert "class 'non_covid' has 0 images" in err and str(root / "non_covid") in err
    assert main(["data", "inspect", str(tmp_path / "nowhere"), "-q"]) == EXIT_FATAL
    assert "no such file or folder" in capsys.readouterr().err


# ---- train -----------------------------------------------------------------------------------------


def test_train_skips_bad_files_and_lists_them(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if not _supports_non_utf8_names(tmp_path):
        pytest.skip("this file system does not allow non-UTF-8 file names")
    root = tmp_path / "ds"
    paths = _dataset_with_bad_files(root, per_class=8, empty_val_class=False)
    # a readable and an unreadable non-UTF-8 name in the test split too (predictions.csv has them)
    test_cases = [c for c in CASES if c.key in ("non_utf8_name_ok", "non_utf8_name_bad")]
    test_paths = write_cases(root / "test" / "normal", test_cases)
    runs = tmp_path / "runs"
    code = main([
        "train", "--data", str(root), "--model", TINY_MODEL, "--pretrained", "none", "--image-size", "64",
        "--epochs", "1", "--batch-size", "16", "--runs-dir", str(runs), "--name", "bad", "-q",
    ])  # fmt: skip
    assert code == EXIT_PARTIAL
    run = runs / "bad"
    with open(run / "skipped.csv", newline="", encoding="utf-8", errors="surrogateescape") as fh:
        skipped = {r["path"]: (r["split"], r["reason"]) for r in csv.DictReader(fh)}
    expected = {str(paths[c.key]): ("train", c.reason) for c in BAD}
    expected[str(test_paths["non_utf8_name_bad"])] = ("test", "not an image")
    assert set(skipped) == set(expected)
    for p, (split, fragment) in expected.items():
        assert skipped[p][0] == split and fragment in skipped[p][1], (p, skipped[p])
    captured = capsys.readouterr()
    assert f"{len(expected)} unreadable" in captured.err and "skipped.csv" in captured.err
    assert captured.out.count("run folder:") == 1, captured.out  # said once (the log's line), not repeated
    log = (run / "train.log").read_text(encoding="utf-8")
    for c in BAD:
        assert f"skipped unreadable {printable(paths[c.key])}: " in log, c.key
    # training completed on the readable files, the readable cases included
    assert (run / "metrics.json").is_file()
    assert f"train {8 * 3 + len(GOOD)}," in log  # 8 per class + the readable cases
    preds = _rows(run / "predictions.csv")
    assert str(test_paths["non_utf8_name_ok"]) in {r["path"] for r in preds}
    from xraydx.models import load_checkpoint

    _, meta = load_checkpoint(run / "checkpoints" / "best.safetensors")
    assert meta["classes"] == CLASSES


# ---- a real process: exit codes and stderr -----------------------------------------------------------


def test_exit_code_and_stderr_of_a_real_process(checkpoint: Path,
                                                matrix_dir: tuple[Path, dict[str, Path], list[Path]],
                                                tmp_path: Path) -> None:  # fmt: skip
    """`python -m xraydx predict` on the matrix as a real process: exit code 3, one clean UTF-8 message per
    bad file on stderr (non-UTF-8 names as \\xNN), no traceback, every row written."""
    folder, paths, goods = matrix_dir
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "pred.csv"
    cmd = [
        sys.executable,
        "-m",
        "xraydx",
        "predict",
        str(folder),
        "--checkpoint",
        str(checkpoint),
        "--out",
        str(out),
        "-q",
    ]
    r = subprocess.run(cmd, env=env, capture_output=True, timeout=600, check=False)
    assert r.returncode == EXIT_PARTIAL, r.stderr.decode(errors="replace")
    text = r.stderr.decode("utf-8")  # valid UTF-8 even for non-UTF-8 file names
    for c in BAD:
        assert any(printable(paths[c.key]) in ln and c.reason in ln for ln in text.splitlines()), (
            c.key,
            text,
        )
    assert "Traceback" not in text
    _check_prediction_rows(_rows(out), paths, goods)


def test_usage_and_fatal_exit_codes(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = str(sample_images("val")[0])
    with pytest.raises(SystemExit) as exc:  # argparse: missing --out
        main(["predict", good])
    assert exc.value.code == EXIT_USAGE and "--out" in capsys.readouterr().err
    out = tmp_path / "x.csv"
    assert (
        main(["predict", good, "--checkpoint", str(tmp_path / "none.safetensors"), "--out", str(out), "-q"])
        == EXIT_FATAL
    )
    err = capsys.readouterr().err
    assert err.startswith("xraydx: error: ") and "checkpoint not found" in err and not out.exists()


# ---- bad command lines: refused up front with one line (badfiles.CLI_CASES) --------------------------------


def _no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make decoding an image (or starting a server) fail the test: the checks must come first."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("work started before the command line was checked")

    import xraydx.cache
    import xraydx.io
    import xraydx.predict
    import xraydx.trainset

    for mod in (xraydx.io, xraydx.predict, xraydx.cache):
        monkeypatch.setattr(mod, "read_image", refuse)
    monkeypatch.setattr(xraydx.trainset, "load_many", refuse)
    uvicorn = pytest.importorskip("uvicorn")
    monkeypatch.setattr(uvicorn, "run", refuse)


def _fill(case: CliCase, tmp_path: Path, checkpoint: Path) -> tuple[list[str], Path]:
    runs = tmp_path / "runs"
    runs.mkdir()
    (tmp_path / "existing.txt").write_text("keep me\n")
    (tmp_path / "folder").mkdir()
    (tmp_path / "bad.yaml").write_bytes(b'data:\n  path: "caf\xe9 \xff"\n')  # Latin-1, not UTF-8
    fill = {
        "data": str(SAMPLE), "runs": str(runs), "ckpt": str(checkpoint), "image": str(sample_images("test")[0]),
        "tmp": str(tmp_path), "file": str(tmp_path / "existing.txt"), "folder": str(tmp_path / "folder"),
        "bad_yaml": str(tmp_path / "bad.yaml"),
    }  # fmt: skip
    return [a.format(**fill) for a in case.argv], runs


@pytest.mark.parametrize("case", CLI_CASES, ids=lambda c: c.key)
def test_bad_command_lines_stop_up_front_with_one_line(case: CliCase, checkpoint: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """Each bad flag, config value, environment variable or output path: the documented exit code (2 bad
    usage, 1 an output that cannot be written) and exactly one line on stderr naming the value or the file,
    before any image is decoded, any server started or any run folder made; nothing written."""
    import torch

    if case.needs_no_cuda and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    argv, runs = _fill(case, tmp_path, checkpoint)
    for key, value in case.env:
        monkeypatch.setenv(key, value)
    _no_decoding(monkeypatch)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code = main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == case.exit_code, err
    assert len(lines) == 1 and lines[0].startswith("xraydx: error: ") and case.message in lines[0], err
    if (
        case.key != "holdout_source_unknown"
    ):  # the data must be listed to know its sources: after the run folder
        assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written, no run folder
    assert (tmp_path / "existing.txt").read_text() == "keep me\n"


def test_pretrained_timm_offline_is_one_line_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """Offline, ``--pretrained timm`` stops at once (no hub retries) with what to do, when the weights are not
    in the local Hugging Face cache; the network is never used (the reachability probe is replaced)."""
    import time

    import huggingface_hub

    import xraydx.models as models

    probes: list[tuple[str, int]] = []
    monkeypatch.setattr(models, "hub_reachable", lambda where, timeout=3.0: probes.append(where) or False)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, filename, **kw: None)
    _no_decoding(monkeypatch)
    runs = tmp_path / "runs"
    t0 = time.perf_counter()
    code = main(["train", "--data", str(SAMPLE), "--model", "resnet18", "--pretrained", "timm",
                 "--runs-dir", str(runs), "-q"])  # fmt: skip
    seconds = time.perf_counter() - t0
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_USAGE and len(err) == 1, err
    assert "--pretrained timm: the weights of 'resnet18' are not in the local Hugging Face cache" in err[0]
    assert "pass --pretrained none" in err[0] and probes and seconds < 10
    assert not runs.exists()


def test_pretrained_timm_uses_the_local_cache_and_rewraps_a_failed_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Weights in the local cache are loaded from there (no network); a download that fails is one line."""
    import huggingface_hub
    import timm
    import torch

    import xraydx.models as models
    from xraydx.errors import CheckpointError

    net = timm.create_model("test_resnet", pretrained=False)
    cached = tmp_path / "model.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(cached))
    monkeypatch.setattr(models, "hub_reachable", lambda where, timeout=3.0: pytest.fail("network probed"))
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, filename, **kw: str(cached))
    m = models.create_model("test_resnet", 3, in_chans=1, pretrained="timm")
    stem = next(k for k, v in net.state_dict().items() if v.ndim == 4)
    torch.testing.assert_close(m.state_dict()[stem], net.state_dict()[stem].sum(dim=1, keepdim=True))

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, filename, **kw: None)
    monkeypatch.setattr(models, "hub_reachable", lambda where, timeout=3.0: True)

    def failing_download(*args: object, **kwargs: object) -> None:
        raise OSError(
            "We couldn't connect to 'https://huggingface.co' to load the files\nmore lines\nand more"
        )

    monkeypatch.setattr(timm.models._builder, "load_state_dict_from_hf", failing_download)
    with pytest.raises(CheckpointError) as exc:
        models.create_model("test_resnet", 3, in_chans=1, pretrained="timm")
    assert "\n" not in str(exc.value) and "could not get the weights of 'test_resnet'" in str(exc.value)
    assert "We couldn't connect" in str(exc.value)


def test_a_full_disk_is_one_line_naming_the_output(checkpoint: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """ENOSPC while writing predictions (simulated in-process: the final fsync fails as on a full disk):
    exit 1, one line naming the output and the cause, no output and no temp file left; the same for the
    --resume stream (its rows so far are kept in the partial file)."""
    import errno

    real_fsync = os.fsync

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    images = [str(p) for p in sample_images("test")[:2]]
    out = tmp_path / "p.csv"
    monkeypatch.setattr(os, "fsync", full)
    code = main(["predict", *images, "--checkpoint", str(checkpoint), "--out", str(out), "-q"])
    monkeypatch.setattr(os, "fsync", real_fsync)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == EXIT_FATAL and err == [f"xraydx: error: {out}: cannot write (No space left on device)"]
    assert list(tmp_path.iterdir()) == []
    calls = {"n": 0}

    def full_after_header(fd: int) -> None:
        calls["n"] += 1
        if calls["n"] > 1:  # the partial file's header is written; the first row hits the full disk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_after_header)
    code = main(["predict", *images, "--checkpoint", str(checkpoint), "--out", str(out), "--resume", "-q"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == EXIT_FATAL and err == [
        f"xraydx: error: {out}.partial: cannot write (No space left on device)"
    ]
