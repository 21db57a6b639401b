"""Ensembles of crossval runs (xraydx.ensemble, ``xraydx crossval ensemble``), on a real tiny crossval of the
bundled sample: member ``a`` is that crossval; member ``b`` is derived from it deterministically (its
probabilities re-weighted, the classes of every other image rotated so that the members disagree there,
every third image flagged), so the ensemble's rows can be checked against the members' files."""

from __future__ import annotations

import csv
import gzip
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from xraydx.cli import main
from xraydx.constants import UNCERTAIN_FLAG
from xraydx.data import CLASSES
from xraydx.ensemble import combine
from xraydx.errors import OutputExistsError, UsageError

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "test_resnet", "--pretrained", "none", "--image-size", "64", "--epochs", "1",
        "--set", "train.batch_size=16", "--set", "train.threads=1", "--set", "train.lr=3e-3"]  # fmt: skip


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _write_rows(path: Path, rows: list[dict[str, str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _probs(r: dict[str, str]) -> np.ndarray:
    return np.array([float(r[f"prob_{c}"]) for c in CLASSES])


def _copy_run(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for name in ("crossval.json", "config.yaml", "metrics.json", "predictions.csv"):
        shutil.copy(src / name, dst / name)
    return dst


@pytest.fixture(scope="module")
def members(tmp_path_factory: pytest.TempPathFactory, sample_dir: Path) -> tuple[Path, Path]:
    runs = tmp_path_factory.mktemp("members")
    args = ["crossval", "--data", str(sample_dir), "--folds", "kermany;nihcxr8", "--runs-dir", str(runs)]
    assert main([*args, "--name", "a", "-q", *TINY]) == 0
    a = runs / "a"
    rows = _rows(a / "predictions.csv")
    # one epoch leaves the tiny model unsure of everything, so its own rule flags every image: flag a's
    # images below its median top probability instead, so that both flags and their absence occur
    top = np.array([_probs(r).max() for r in rows])
    for r, t in zip(rows, top, strict=True):
        r["flag"] = UNCERTAIN_FLAG if t < np.median(top) else ""
    assert 0 < sum(bool(r["flag"]) for r in rows) < len(rows)
    _write_rows(a / "predictions.csv", rows)
    b = _copy_run(a, runs / "b")
    for i, r in enumerate(rows):
        p = _probs(r) ** 2 * np.array([1.0, 2.0, 0.5])
        p = np.roll(p, 1) if i % 2 == 0 else p  # every other image: another top class
        p /= p.sum()
        r.update({f"prob_{c}": f"{v:.6f}" for c, v in zip(CLASSES, p, strict=True)})
        r["prediction"] = CLASSES[int(p.argmax())]
        r["flag"] = UNCERTAIN_FLAG if i % 3 == 0 else ""
    _write_rows(b / "predictions.csv", rows)
    # b's in-source test figures: fold 1's halved, fold 2's missing
    m = json.loads((b / "metrics.json").read_text())
    m["per_fold"]["1-kermany"]["in_source_test"]["macro_f1"] /= 2
    m["per_fold"]["2-nihcxr8"]["in_source_test"] = None
    (b / "metrics.json").write_text(json.dumps(m))
    return a, b


@pytest.fixture(scope="module")
def ensemble(members: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return combine(list(members), "ab", tmp_path_factory.mktemp("ens"))


def test_probabilities_are_the_members_mean_and_the_prediction_its_argmax(
    members: tuple[Path, Path], ensemble: Path
) -> None:
    a, b = ({r["path"]: r for r in _rows(m / "predictions.csv")} for m in members)
    rows = _rows(ensemble / "predictions.csv")
    assert sorted(r["path"] for r in rows) == sorted(a)
    for r in rows:
        mean = (_probs(a[r["path"]]) + _probs(b[r["path"]])) / 2
        assert _probs(r) == pytest.approx(mean, abs=2e-6)
        assert r["prediction"] == CLASSES[int(mean.argmax())]
        assert (r["pred_a"], r["pred_b"]) == (a[r["path"]]["prediction"], b[r["path"]]["prediction"])
        assert (r["label"], r["source"], r["fold"]) == tuple(
            a[r["path"]][k] for k in ("label", "source", "fold")
        )


def test_rows_are_flagged_where_a_member_flagged_them_or_the_members_disagree(
    members: tuple[Path, Path], ensemble: Path
) -> None:
    a, b = ({r["path"]: r for r in _rows(m / "predictions.csv")} for m in members)
    rows = _rows(ensemble / "predictions.csv")
    disagree = [r for r in rows if r["pred_a"] != r["pred_b"]]
    assert disagree and len(disagree) < len(rows)  # the fixture makes both kinds
    # and images that only the disagreement flags, and images no rule flags
    assert any(not (a[r["path"]]["flag"] or b[r["path"]]["flag"]) for r in disagree)
    assert any(not r["flag"] for r in rows)
    for r in rows:
        agree = a[r["path"]]["prediction"] == b[r["path"]]["prediction"]
        assert r["members_agree"] == ("true" if agree else "false")
        member_flag = bool(a[r["path"]]["flag"]) or bool(b[r["path"]]["flag"])
        assert bool(r["flag"]) == (member_flag or not agree), r["path"]
        if not agree:
            assert UNCERTAIN_FLAG in r["flag"]


def test_metrics_hold_the_ensemble_block_and_the_three_signals(
    members: tuple[Path, Path], ensemble: Path
) -> None:
    m = json.loads((ensemble / "metrics.json").read_text())
    rows = _rows(ensemble / "predictions.csv")
    a, b = ({r["path"]: r for r in _rows(x / "predictions.csv")} for x in members)
    assert m["pooled"]["n"] == len(rows)
    e = m["ensemble"]
    assert [x["name"] for x in e["members"]] == ["a", "b"] and e["rule"]
    y = np.array([CLASSES.index(r["label"]) for r in rows])
    wrong = np.array([CLASSES.index(r["prediction"]) for r in rows]) != y
    by = {
        "members_flags": np.array([bool(a[r["path"]]["flag"] or b[r["path"]]["flag"]) for r in rows]),
        "disagreement": np.array([r["pred_a"] != r["pred_b"] for r in rows]),
    }
    by["union"] = by["members_flags"] | by["disagreement"]
    for k, flagged in by.items():
        s = e["signals"][k]
        assert s["n_flagged"] == int(flagged.sum()), k
        assert s["coverage"] == pytest.approx((~flagged).mean()), k
        if wrong.any():
            assert s["errors_flagged"] == pytest.approx((wrong & flagged).sum() / wrong.sum()), k
        if (~flagged).any():
            assert s["accuracy_accepted"] == pytest.approx((~wrong[~flagged]).mean()), k
    assert m["flag"]["n_flagged"] == e["signals"]["union"]["n_flagged"]  # the rows' flag is the union
    # in-source: the mean of the members' where both have it, else none
    ma, mb = (json.loads((x / "metrics.json").read_text())["per_fold"] for x in members)
    f1 = m["per_fold"]["1-kermany"]["in_source_test"]["macro_f1"]
    want = (ma["1-kermany"]["in_source_test"]["macro_f1"] + mb["1-kermany"]["in_source_test"]["macro_f1"]) / 2
    assert f1 == pytest.approx(want)
    assert m["per_fold"]["2-nihcxr8"]["in_source_test"] is None
    info = json.loads((ensemble / "crossval.json").read_text())
    assert info["ensemble_of"] == [str(x.resolve()) for x in members]
    assert info["folds"] == json.loads((members[0] / "crossval.json").read_text())["folds"]
    assert "The ensemble" in (ensemble / "report.html").read_text()
    assert (ensemble / "crossval.log").read_text().strip()


def test_a_member_error_stays_an_error_and_gzipped_members_are_read(
    members: tuple[Path, Path], tmp_path: Path
) -> None:
    a, b = members
    c = _copy_run(b, tmp_path / "c")
    rows = _rows(c / "predictions.csv")
    rows[0].update({"prediction": "", "status": "error: cannot read it", "flag": "",
                    **{f"prob_{k}": "" for k in CLASSES}})  # fmt: skip
    _write_rows(c / "predictions.csv", rows)
    (c / "predictions.csv.gz").write_bytes(gzip.compress((c / "predictions.csv").read_bytes()))
    (c / "predictions.csv").unlink()
    out = combine([a, c], "ac", tmp_path)
    got = {r["path"]: r for r in _rows(out / "predictions.csv")}
    bad = got[rows[0]["path"]]
    assert bad["status"] == "error: cannot read it" and not bad["prediction"] and not bad["prob_covid"]
    assert json.loads((out / "metrics.json").read_text())["n_unreadable"] == 1
    ref = {r["path"]: r for r in _rows(combine([a, b], "ab", tmp_path / "ref") / "predictions.csv")}
    assert all(got[p]["prob_covid"] == ref[p]["prob_covid"] for p in got if p != rows[0]["path"])


def test_members_that_do_not_match_are_refused_naming_the_run(
    members: tuple[Path, Path], tmp_path: Path
) -> None:
    a, b = members
    fewer = _copy_run(b, tmp_path / "fewer")
    rows = _rows(fewer / "predictions.csv")
    _write_rows(fewer / "predictions.csv", rows[2:])
    with pytest.raises(
        UsageError, match=r"fewer.*image sets differ: 0 images only in fewer; 2 images only in a"
    ):
        combine([a, fewer], "x", tmp_path)
    relabelled = _copy_run(b, tmp_path / "relabelled")
    rows[0]["label"] = next(c for c in CLASSES if c != rows[0]["label"])
    _write_rows(relabelled / "predictions.csv", rows)
    with pytest.raises(UsageError, match=r"relabelled.*the label differs for 1 images"):
        combine([a, relabelled], "x", tmp_path)
    refolded = _copy_run(b, tmp_path / "refolded")
    info = json.loads((refolded / "crossval.json").read_text())
    (refolded / "crossval.json").write_text(json.dumps({**info, "folds": info["folds"][::-1]}))
    with pytest.raises(UsageError, match=r"refolded.*folds"):
        combine([a, refolded], "x", tmp_path)
    with pytest.raises(UsageError, match="named 'a'"):
        combine([a, a], "x", tmp_path)
    with pytest.raises(UsageError, match="at least two"):
        combine([a], "x", tmp_path)
    with pytest.raises(UsageError, match="not a crossval run folder"):
        combine([a, tmp_path], "x", tmp_path)
    assert not (tmp_path / "x").exists()


def test_an_existing_output_folder_is_refused(members: tuple[Path, Path], ensemble: Path) -> None:
    before = (ensemble / "predictions.csv").read_bytes()
    with pytest.raises(OutputExistsError, match="already exists"):
        combine(list(members), ensemble.name, ensemble.parent)
    assert (ensemble / "predictions.csv").read_bytes() == before


def test_the_command_end_to_end(
    members: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = (str(m) for m in members)
    args = ["crossval", "ensemble", a, b, "--name", "cli", "--runs-dir", str(tmp_path)]
    assert main(args) == 0
    out = tmp_path / "cli"
    assert {"predictions.csv", "metrics.json", "report.html", "crossval.json", "crossval.log"} <= {
        p.name for p in out.iterdir()
    }
    assert f"run folder: {out}" in capsys.readouterr().out
    assert main(args) == 2  # exists: refused
    assert main(["crossval", "ensemble", a, "--runs-dir", str(tmp_path)]) == 2  # one member
    assert (
        main(["crossval", "--data", a, "ensemble", a, b, "--runs-dir", str(tmp_path)]) == 2
    )  # a training flag
    # a flag whose value is 0 is given too (the members were trained already)
    assert main(["crossval", "--seed", "0", "ensemble", a, b, "--runs-dir", str(tmp_path)]) == 2
    assert "--seed is a training option" in capsys.readouterr().err
    # the default name; --runs-dir may come before the sub-command
    assert main(["crossval", "--runs-dir", str(tmp_path), "ensemble", a, b]) == 0
    assert (tmp_path / "ensemble-a+b" / "metrics.json").is_file()
    # the candidates table takes an ensemble run as a row, naming its members
    spec = importlib.util.spec_from_file_location("crossval_table", ROOT / "scripts" / "crossval_table.py")
    assert spec and spec.loader
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    capsys.readouterr()
    assert table.main([a, str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("| cli | ensemble (mean probability) of a + b |") for line in lines)
    assert any(line.startswith("| a | test_resnet 64px") for line in lines)
