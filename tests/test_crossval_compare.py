"""``xraydx crossval compare`` (xraydx.crossval_compare) on two recorded screening crossvals of real data
(docs/results/crossval: the pooled out-of-source predictions of 5,111 real images): its point figures are
scikit-learn's, the paired bootstrap is antisymmetric and zero for a run against itself, and runs over other
images are refused."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score, recall_score

from xraydx.cli import main
from xraydx.crossval_compare import compare, figures
from xraydx.ensemble import read_member
from xraydx.errors import UsageError

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results" / "crossval"
A, C = RESULTS / "A-base", RESULTS / "C-lungmask"
N = 200  # resamples: enough to test the mechanics


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        shutil.copy(f, dst / f.name)
    return dst


def test_point_figures_are_scikit_learns_and_the_runs_own() -> None:
    res = compare(A, C, resamples=N)
    got = {r["figure"]: r for r in res["figures"]}
    for run, side in ((A, "a"), (C, "b")):
        m = read_member(run)
        rows = list(m.rows.values())
        y = [r["label"] for r in rows]
        p = [r["prediction"] for r in rows]
        assert got["balanced_accuracy"][side] == pytest.approx(balanced_accuracy_score(y, p))
        metrics = json.loads((run / "metrics.json").read_text())
        assert got["balanced_accuracy"][side] == pytest.approx(
            metrics["pooled"]["balanced_accuracy"], abs=1e-6
        )
        assert got["macro_f1"][side] == pytest.approx(
            f1_score(y, p, labels=list(m.classes), average="macro", zero_division=0)
        )
        for c, r in zip(m.classes, recall_score(y, p, labels=list(m.classes), average=None), strict=True):
            assert got[f"recall {c}"][side] == pytest.approx(r)
        shen = [(a, b) for a, b, r in zip(y, p, rows, strict=True) if r["source"] == "shenzhen"]
        assert got["recall normal @ shenzhen"][side] == pytest.approx(
            np.mean([b == "normal" for _, b in shen])
        )
        assert got["recall normal @ shenzhen"]["n"] == len(shen)
    assert "recall covid @ shenzhen" not in got  # a class the source does not have is no figure
    for r in res["figures"]:
        assert r["difference"] == pytest.approx(r["b"] - r["a"])
        lo, hi = r["ci95"]
        assert lo <= hi
    assert res["n_images"] == 5111 and res["left_out"] == 0 and res["n_groups"] < res["n_images"]


def test_the_bootstrap_is_paired_antisymmetric_and_zero_against_itself(tmp_path: Path) -> None:
    ab, ba = compare(A, C, resamples=N), compare(C, A, resamples=N)
    for x, y in zip(ab["figures"], ba["figures"], strict=True):
        assert x["figure"] == y["figure"] and x["difference"] == pytest.approx(-y["difference"])
        assert x["ci95"][0] == pytest.approx(-y["ci95"][1]) and x["ci95"][1] == pytest.approx(-y["ci95"][0])
    same = compare(C, _copy(C, tmp_path / "C-again"), resamples=N)
    assert all(r["difference"] == 0 and r["ci95"] == [0.0, 0.0] for r in same["figures"])


def test_figures_from_codes_match_a_direct_count() -> None:
    rng = np.random.default_rng(1)
    y, p = rng.integers(0, 3, 500), rng.integers(0, 3, 500)
    src, flag = rng.integers(0, 2, 500), rng.random(500) < 0.3
    f = figures(y, p, flag, src, 3, [0, 1])
    assert f["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, p))
    assert f["recall 2 @ 1"] == pytest.approx(np.mean(p[(src == 1) & (y == 2)] == 2))
    assert f["errors flagged"] == pytest.approx(np.mean(flag[p != y]))


def test_runs_over_other_images_are_refused_naming_the_run(tmp_path: Path) -> None:
    other = _copy(C, tmp_path / "C-fewer")
    lines = gzip.decompress((other / "predictions.csv.gz").read_bytes()).decode().splitlines(True)
    (other / "predictions.csv.gz").write_bytes(gzip.compress("".join(lines[:-10]).encode()))
    with pytest.raises(UsageError, match="C-fewer.*image sets differ"):
        compare(A, other, resamples=N)
    with pytest.raises(UsageError, match="given twice"):
        compare(A, A, resamples=N)
    with pytest.raises(UsageError, match="at least 100"):
        compare(A, C, resamples=10)


def test_cli_prints_the_table_and_writes_json_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cmp.json"
    args = ["crossval", "compare", str(A), str(C), "--resamples", str(N), "--json", str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "| balanced_accuracy | 5111 |" in text and "B − A" in text
    saved = json.loads(out.read_text())
    assert saved["resamples"] == N and saved["bootstrap"] == "paired, patient groups"
    assert main(args) == 2  # never replaced
    assert "exists" in capsys.readouterr().err


C1 = RESULTS / "C1-lungmask-seed1"
C2 = RESULTS / "C2-lungmask-8ep"
C2S1 = RESULTS / "C2s1-lungmask-8ep-seed1"


def test_groups_of_seeds_compare_their_means_and_add_the_seeds_variance(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    singles = {r: {f["figure"]: f for f in compare(A, r, resamples=N)["figures"]} for r in (C, C1, C2, C2S1)}
    res = compare([C, C1], [C2, C2S1], resamples=N)
    assert res["runs_a"] == 2 and res["runs_b"] == 2
    for row in res["figures"]:
        k = row["figure"]
        a_runs = [singles[r][k]["b"] for r in (C, C1)]
        b_runs = [singles[r][k]["b"] for r in (C2, C2S1)]
        assert row["a_runs"] == pytest.approx(a_runs) and row["b_runs"] == pytest.approx(b_runs)
        assert row["a"] == pytest.approx(np.mean(a_runs)) and row["b"] == pytest.approx(np.mean(b_runs))
        lo, hi = row["ci95_seeds"]  # wider than the images-only interval: it adds the seeds' variance
        assert lo <= row["ci95"][0] + 0.01 and hi >= row["ci95"][1] - 0.01 and lo < row["difference"] < hi
    ba = {r["figure"]: r for r in res["figures"]}["balanced_accuracy"]
    seed_var = np.var(ba["a_runs"], ddof=1) / 2 + np.var(ba["b_runs"], ddof=1) / 2
    assert ba["ci95_seeds"][1] - ba["ci95_seeds"][0] > 2 * 1.96 * np.sqrt(seed_var) - 1e-9
    # a group of identical copies has no seed variance and the mean of one run
    twins = compare([C, _copy(C, tmp_path / "C-twin")], [C1], resamples=N)
    one = compare(C, C1, resamples=N)
    for x, y in zip(twins["figures"], one["figures"], strict=True):
        assert x["difference"] == pytest.approx(y["difference"]) and x["ci95"] == pytest.approx(y["ci95"])
    # on the command line a group is one comma-separated argument
    assert main(["crossval", "compare", f"{C},{C1}", f"{C2},{C2S1}", "--resamples", str(N)]) == 0
    text = capsys.readouterr().out
    assert "(mean of 2 runs)" in text and "with seeds' variance" in text
    with pytest.raises(UsageError, match="given twice"):
        compare([C, C1], [C1], resamples=N)
