"""Leave-source-out crossval on the real bundled sample (tiny network, 64 px): the pooled out-of-source
predictions come only from fold models that never saw the image's source, and the summary holds."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import CV_TINY as TINY
from conftest import tiny_config
from xraydx.cli import main
from xraydx.crossval import run_crossval
from xraydx.crossval_folds import fold_manifest, parse_folds
from xraydx.crossval_metrics import (
    flag_summary,
    shift_summary,
    shift_threshold,
    summarize,
    training_coverage,
    wilson,
)
from xraydx.data import CLASSES, discover
from xraydx.errors import UsageError


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_no_image_is_predicted_by_a_model_trained_on_its_source(cv_run: Path, sample_dir: Path) -> None:
    pooled = _rows(cv_run / "predictions.csv")
    sample = discover(sample_dir).records
    held = [r for r in sample if r.source in ("kermany", "nihcxr8")]
    assert sorted(r["path"] for r in pooled) == sorted(str(r.path) for r in held)  # each once, none missing
    for row in pooled:
        # the fold's own training run wrote the manifest it trained on
        trained = [
            r
            for r in _rows(cv_run / "folds" / row["fold"] / "manifest.csv")
            if r["split"] in ("train", "val")
        ]
        assert trained, row["fold"]
        assert row["source"] not in {r["source"] for r in trained}
        assert Path(row["path"]).name not in {Path(r["path"]).name for r in trained}
        assert row["source"] in row["fold"]


def test_summary_is_consistent_with_the_pooled_predictions(cv_run: Path) -> None:
    m = json.loads((cv_run / "metrics.json").read_text())
    pooled = _rows(cv_run / "predictions.csv")
    y = np.array([CLASSES.index(r["label"]) for r in pooled])
    pred = np.array([CLASSES.index(r["prediction"]) for r in pooled])
    assert m["pooled"]["n"] == len(pooled)
    assert np.array(m["pooled"]["confusion_matrix"]).sum() == len(pooled)
    present = sorted(set(y.tolist()))
    bal = np.mean([(pred[y == c] == c).mean() for c in present])
    assert m["pooled"]["balanced_accuracy"] == pytest.approx(bal)
    lo, hi = m["pooled"]["ci"]["balanced_accuracy"]
    assert lo <= m["pooled"]["balanced_accuracy"] <= hi
    assert set(m["per_source"]) == {"kermany", "nihcxr8"}
    assert m["per_source"]["kermany"]["n"] == sum(r["source"] == "kermany" for r in pooled)
    assert set(m["per_fold"]) == {"1-kermany", "2-nihcxr8"}
    assert m["per_fold"]["1-kermany"]["in_source_test"]["n"] > 0
    flagged = sum(bool(r["flag"]) or r["status"] != "ok" for r in pooled)
    assert m["flag"]["n_flagged"] == flagged
    # the source-shift score: computed for every pooled image by its fold's model, summarised with the
    # threshold of each fold chosen on the other folds
    shift = np.array([float(r["shift_score"]) for r in pooled])
    assert np.isfinite(shift).all() and (shift >= 0).all()
    sf = m["shift_flag"]
    assert set(sf["honest"]["threshold_per_fold"]) == {"1-kermany", "2-nihcxr8"}
    assert set(sf["honest"]["per_source"]) == {"kermany", "nihcxr8"}
    assert 0.0 <= sf["honest"]["coverage"] <= 1.0
    assert (cv_run / "report.html").read_text().count("<table") >= 4


def test_what_each_fold_model_learned_each_class_from(cv_run: Path) -> None:
    """Counted from the manifest each fold's own training run wrote, independently of the summary."""
    m = json.loads((cv_run / "metrics.json").read_text())
    pooled = _rows(cv_run / "predictions.csv")
    one_source_images = 0
    for fold, v in m["per_fold"].items():
        train = [r for r in _rows(cv_run / "folds" / fold / "manifest.csv") if r["split"] == "train"]
        for c in CLASSES:
            by_source: dict[str, int] = {}
            for r in train:
                if r["label"] == c:
                    by_source[r["source"]] = by_source.get(r["source"], 0) + 1
            got = v["trained_on"][c]
            assert got["by_source"] == by_source and got["n"] == sum(by_source.values())
            assert got["one_source"] == (max(by_source.values()) / sum(by_source.values()) >= 0.9)
            if got["one_source"]:
                one_source_images += sum(r["fold"] == fold and r["label"] == c for r in pooled)
        held = {r["source"] for r in pooled if r["fold"] == fold}
        assert not held & {s for c in CLASSES for s in v["trained_on"][c]["by_source"]}
    o = m["one_source"]
    assert o["of"] == len(pooled) and o["n"] == one_source_images
    right = [r["prediction"] == r["label"] for r in pooled]
    assert o["recall"] is None or 0.0 <= o["recall"] <= 1.0
    assert o["n"] == 0 or o["recall"] * o["n"] + (o["recall_rest"] or 0) * (
        o["of"] - o["n"]
    ) == pytest.approx(sum(right))
    log = (cv_run / "crossval.log").read_text()
    assert ("learned from one source" in log) == (o["n"] > 0)
    assert "held-out classes learned from one source" in (cv_run / "report.html").read_text()


def test_training_coverage_counts_and_the_one_source_share() -> None:
    train = [("covid", "a")] * 9 + [("covid", "b")] + [("normal", "a")] * 8 + [("normal", "b")] * 2
    cov = training_coverage(train, CLASSES)
    assert cov["covid"] == {
        "n": 10,
        "by_source": {"a": 9, "b": 1},
        "top_source": "a",
        "top_share": 0.9,
        "one_source": True,
    }
    assert cov["normal"]["one_source"] is False and cov["normal"]["top_share"] == 0.8
    assert cov["non_covid"]["n"] == 0 and cov["non_covid"]["one_source"] is True  # never trained on


def test_resume_trains_only_the_missing_fold_and_gives_the_same_pooled_predictions(
    cv_run: Path, tmp_path: Path
) -> None:
    run = tmp_path / "cv"
    shutil.copytree(cv_run, run)
    # the copied fold manifests and run configs point into the original folder: re-root them
    for f in run.rglob("*"):
        if f.suffix in (".csv", ".yaml", ".json") and f.is_file():
            f.write_text(f.read_text().replace(str(cv_run), str(run)))
    first = run / "folds" / "1-kermany" / "checkpoints" / "best.safetensors"
    before = first.stat().st_mtime_ns
    shutil.rmtree(run / "folds" / "2-nihcxr8")  # killed before fold 2 started
    (run / "predictions.csv").unlink()
    (run / "metrics.json").unlink()
    run_crossval(None, resume=run, progress=False)
    assert first.stat().st_mtime_ns == before
    a = {r["path"]: r for r in _rows(cv_run / "predictions.csv")}
    b = {r["path"]: r for r in _rows(run / "predictions.csv")}
    assert a.keys() == b.keys()
    for k in a:
        assert a[k]["prediction"] == b[k]["prediction"]
        assert float(a[k]["prob_covid"]) == pytest.approx(float(b[k]["prob_covid"]), abs=1e-6)


def test_folds_are_checked_before_any_training(sample_dir: Path, tmp_path: Path) -> None:
    man = discover(sample_dir)
    assert [f.sources for f in parse_folds(None, man)] == [("kermany",), ("nihcxr8",), ("radiographydb",)]
    assert [f.name for f in parse_folds("kermany+nihcxr8", man)] == ["1-kermany+nihcxr8"]
    with pytest.raises(UsageError, match="'nope' is not in the data"):
        parse_folds("kermany;nope", man)
    with pytest.raises(UsageError, match="more than one fold"):
        parse_folds("kermany;kermany+nihcxr8", man)
    # every COVID-19 image of the sample is radiographydb's: without it, training has no covid class
    with pytest.raises(UsageError, match="no covid images"):
        fold_manifest(man, parse_folds("radiographydb", man)[0])
    args = ["crossval", "--data", str(sample_dir), "--folds", "radiographydb", "--runs-dir", str(tmp_path)]
    assert main([*args, "--name", "x", "-q", *TINY]) == 2  # bad usage, before any training
    assert not (tmp_path / "x" / "folds").exists()
    assert main([*args, "--name", "y", "-q", "--folds", "kermany;nope", *TINY]) == 2


def test_wilson_interval_is_honest_at_small_n() -> None:
    lo, hi = wilson(10, 10)
    assert hi == pytest.approx(1.0) and lo < 0.75  # a bootstrap would say 1.000-1.000
    lo, hi = wilson(2, 4)
    assert lo < 0.2 and hi > 0.8


def test_flag_summary_counts_and_the_out_of_source_threshold() -> None:
    classes = list(CLASSES)
    # 6 images: 3 right and confident, 3 wrong of which 2 unconfident
    p = np.array([[0.9, 0.05, 0.05], [0.8, 0.1, 0.1], [0.1, 0.85, 0.05],
                  [0.5, 0.3, 0.2], [0.45, 0.35, 0.2], [0.95, 0.03, 0.02]])  # fmt: skip
    y = np.array([0, 0, 1, 2, 2, 2])
    rows = [
        {"label": classes[t], "prediction": classes[int(q.argmax())], "status": "ok", "source": "s", "fold": "1-s",
         "flag": "uncertain" if q.max() < 0.6 else "", **{f"prob_{c}": str(v) for c, v in zip(classes, q, strict=True)}}
        for q, t in zip(p, y, strict=True)
    ]  # fmt: skip
    s = summarize(rows, classes, folds=["1-s"], n_boot=50)
    fl = s["flag"]
    assert fl["n_errors"] == 3 and fl["n_flagged"] == 2
    assert fl["errors_flagged"] == pytest.approx(2 / 3)
    assert fl["accuracy_accepted"] == pytest.approx(3 / 4)
    # >= half of the 3 errors flagged, keeping the most cases: below 0.5 flags one error, below 0.8 two
    t = fl["oos_threshold"]
    assert t["threshold"] == pytest.approx(0.8)
    assert t["errors_flagged"] == pytest.approx(2 / 3) and t["coverage"] == pytest.approx(4 / 6)
    assert t["accuracy_accepted"] == pytest.approx(3 / 4)
    direct = flag_summary(
        {"y": y, "p": p, "flagged": p.max(1) < 0.6, "not_cxr": np.zeros(6, bool)}, target=1.0
    )["oos_threshold"]
    # the confident error (0.95) is caught only by flagging everything
    assert direct["errors_flagged"] == pytest.approx(1.0) and direct["threshold"] == pytest.approx(1.0)
    assert direct["coverage"] == 0.0


def test_a_threshold_chosen_out_of_source_is_what_the_checkpoint_flags_by(
    sample_dir: Path, tmp_path: Path
) -> None:
    from xraydx.models import read_metadata
    from xraydx.predict import Predictor
    from xraydx.train import run_training

    cfg = tiny_config(sample_dir, tmp_path, epochs=1)
    cfg.train.abstention_threshold = 0.9
    run = run_training(cfg, progress=False)
    ab = read_metadata(run / "checkpoints" / "best.safetensors")["abstention"]
    assert ab["threshold"] == 0.9 and ab["chosen_on"].startswith("given")
    pred = Predictor(run / "checkpoints" / "best.safetensors")
    assert pred.flag([0.89, 0.1, 0.01]) and not pred.flag([0.91, 0.08, 0.01])


def test_shift_threshold_and_the_honest_per_fold_choice() -> None:
    wrong = np.array([1, 1, 1, 1, 0, 0], bool)
    base = np.array([1, 0, 0, 0, 0, 0], bool)
    shift = np.array([0.1, 3.0, 2.0, 0.5, 4.0, 0.2])
    # half of 4 errors: base holds one; the next error by score is 3.0
    assert shift_threshold(wrong, base, shift, 0.5) == pytest.approx(3.0)
    assert shift_threshold(wrong, base, shift, 0.25) == float("inf")  # base alone reaches it
    assert shift_threshold(wrong, base, shift, 1.0) == pytest.approx(0.5)
    # two folds, each with 2 wrong (prob says covid, truth normal) and 2 right; errors far, right ones near
    p = np.tile([0.9, 0.05, 0.05], (8, 1))
    y = np.array([2, 2, 0, 0, 2, 2, 0, 0])
    a = {"y": y, "p": p, "flagged": np.zeros(8, bool), "not_cxr": np.zeros(8, bool),
         "fold": np.array(["f1"] * 4 + ["f2"] * 4, dtype=object), "source": np.array(["a"] * 4 + ["b"] * 4, dtype=object),
         "shift": np.array([5.0, 4.0, 1.0, 0.5, 6.0, 3.0, 0.8, 0.7])}  # fmt: skip
    s = shift_summary(a, target=0.5)
    assert s is not None and s["auroc_errors"]["shift_score"] == pytest.approx(1.0)
    assert s["auroc_errors"]["one_minus_top_probability"] == pytest.approx(0.5)  # all equally confident
    # fold f1 gets f2's threshold (6.0: half of f2's 2 errors) and f2 gets f1's (5.0)
    assert s["honest"]["threshold_per_fold"] == {"f1": pytest.approx(6.0), "f2": pytest.approx(5.0)}
    assert s["honest"]["errors_flagged"] == pytest.approx(1 / 4)  # only 6.0 in f2 passes 5.0
    assert s["honest"]["accuracy_accepted"] == pytest.approx(4 / 7)
    assert shift_summary({**a, "shift": np.full(8, np.nan)}) is None


def test_shift_score_is_one_at_the_validation_quantile_and_larger_far_away() -> None:
    from xraydx.shift import ShiftScore

    rng = np.random.default_rng(0)

    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    centre = np.zeros(16)
    centre[0] = 1.0
    train = unit(centre + 0.1 * rng.normal(size=(200, 16)))
    val = unit(centre + 0.1 * rng.normal(size=(100, 16)))
    far = unit(-centre + 0.1 * rng.normal(size=(20, 16)))
    s = ShiftScore.fit(train, val, k=5, quantile=0.9, max_bank=150)
    assert len(s.bank) == 150
    assert np.mean(s.score(val) <= 1.0 + 1e-9) == pytest.approx(0.9, abs=0.011)
    assert s.score(far).min() > 3 * s.score(val).max()
    with pytest.raises(ValueError, match="more than k"):
        ShiftScore.fit(train[:5], val, k=5)


def test_copies_of_held_out_images_in_other_sources_are_left_out_of_the_fold(
    sample_dir: Path, tmp_path: Path
) -> None:
    """Public collections share radiographs: a held-out image's copy filed under another source (here a
    re-saved, slightly changed copy of a real kermany image filed as nihcxr8, and an exact copy of another
    filed as radiographydb) must not be trained on by the fold that holds the original out, and vice versa."""
    from dataclasses import replace

    from PIL import Image

    from xraydx.crossval import CrossVal
    from xraydx.crossval_folds import Fold, cross_source_copies
    from xraydx.io import read_image

    manifest = discover(sample_dir)
    kermany = [r for r in manifest.records if r.source == "kermany"]
    near_src, exact_src = kermany[0], kermany[1]
    near = tmp_path / "near-copy.png"
    Image.fromarray(np.clip(read_image(near_src.path).astype(np.int16) + 2, 0, 255).astype(np.uint8)).save(
        near
    )
    exact = tmp_path / "exact-copy.png"
    shutil.copy(exact_src.path, exact)
    extra = [
        replace(near_src, path=near, split="train", group="copy-1", source="nihcxr8"),
        replace(exact_src, path=exact, split="val", group="copy-2", source="radiographydb"),
    ]
    planted = replace(manifest, records=[*manifest.records, *extra])
    copies = cross_source_copies(planted, progress=False)
    assert sorted(copies) == sorted(
        [sorted([str(near_src.path), str(near)]), sorted([str(exact_src.path), str(exact)])]
    )

    by_kermany = {str(r.path): r for r in fold_manifest(planted, Fold(1, ("kermany",)), copies).records}
    assert str(near) not in by_kermany and str(exact) not in by_kermany  # copies of held-out images: out
    assert by_kermany[str(near_src.path)].split == "external"
    by_nih = {str(r.path): r for r in fold_manifest(planted, Fold(2, ("nihcxr8",)), copies).records}
    assert by_nih[str(near)].split == "external" and str(near_src.path) not in by_nih  # and the other way
    assert by_nih[str(exact)].split == "val"  # a copy of no held-out image stays
    assert len(fold_manifest(planted, Fold(2, ("nihcxr8",))).records) == len(
        planted.records
    )  # no copies given

    csv_path = tmp_path / "planted.csv"
    planted.to_csv(csv_path)
    cfg = tiny_config(csv_path, tmp_path / "runs")
    cfg.name = "cv-copies"  # type: ignore[attr-defined]
    cv = CrossVal.create(cfg, "kermany;nihcxr8", progress=False)  # type: ignore[arg-type]
    info = json.loads((cv.run / "crossval.json").read_text())
    assert info["copies_left_out"] == {cv.folds[0].name: 2, cv.folds[1].name: 1}
    fold1 = {r["path"] for r in _rows(cv.fold_dir / f"{cv.folds[0].name}.csv")}
    assert not any(p.endswith(("near-copy.png", "exact-copy.png")) for p in fold1)
    assert "2 copies of its held-out images" in (cv.run / "crossval.log").read_text()
