"""Bootstrap CIs, calibration / coverage / abstention figures, and report.html from evaluate and train."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from xraydx.cli import EXIT_OK, main
from xraydx.metrics import (
    CI_METRICS,
    _weighted_metrics,
    bootstrap_ci,
    choose_abstention,
    compute_metrics,
    coverage_curve,
    evaluation_summary,
    expected_calibration_error,
    fit_temperature,
    per_source_metrics,
    reliability_bins,
)
from xraydx.models import read_metadata

CLASSES = ("covid", "non_covid", "normal")
SECTIONS = ("summary", "metrics", "confusion", "roc", "calibration", "abstention", "errors", "sources")


def _probs_for(pred: np.ndarray, conf: np.ndarray | float = 0.8) -> np.ndarray:
    """3-class probabilities whose argmax is ``pred`` with top probability ``conf``."""
    conf = np.broadcast_to(np.asarray(conf, dtype=float), pred.shape)
    p = np.repeat(((1 - conf) / 2)[:, None], 3, axis=1)
    p[np.arange(len(pred)), pred] = conf
    return p


def _random_case(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    logits = rng.normal(size=(n, 3))
    logits[np.arange(n), y] += 1.0
    p = np.exp(logits)
    return y, p / p.sum(1, keepdims=True)


def test_ci_hand_computed_cases() -> None:
    # all right: every resample is perfect
    y = np.array([0, 0, 1, 1, 2, 2])
    ci = bootstrap_ci(y, _probs_for(y), CLASSES, n_boot=200, stratified=True)
    assert ci["accuracy"] == [1.0, 1.0]
    assert ci["per_class"]["normal"]["sensitivity"] == [1.0, 1.0]
    # covid: 2 images, one right; the other 8 right. Resampling within class, covid recall is
    # Binomial(2, 1/2) / 2 in {0, 0.5, 1} (p = 1/4, 1/2, 1/4) -> 95% interval [0, 1];
    # accuracy is (8 + that count) / 10 in {0.8, 0.9, 1.0} -> [0.8, 1.0]
    y = np.array([0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    pred = y.copy()
    pred[1] = 2
    ci = bootstrap_ci(y, _probs_for(pred), CLASSES, n_boot=1000, seed=3, stratified=True)
    assert ci["per_class"]["covid"]["sensitivity"] == [0.0, 1.0]
    assert ci["accuracy"] == pytest.approx([0.8, 1.0])
    assert ci["per_class"]["non_covid"]["sensitivity"] == [1.0, 1.0]
    # a class never recognised has recall 0 in every resample
    pred = y.copy()
    pred[y == 2] = 1
    ci = bootstrap_ci(y, _probs_for(pred), CLASSES, n_boot=300, stratified=True)
    assert ci["per_class"]["normal"]["sensitivity"] == [0.0, 0.0]
    assert ci["per_class"]["normal"]["ppv"] is None  # never predicted: undefined in every resample


def test_resample_metrics_equal_compute_metrics() -> None:
    y, p = _random_case(90, seed=1)
    p[:6] = p[6]  # ties in the scores
    m = compute_metrics(y, p, CLASSES)
    w = _weighted_metrics(np.ones((1, len(y))), y, p, 3)
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "macro_roc_auc", "ece", "nll"):
        assert w[key][0] == pytest.approx(m[key], abs=1e-9), key
    for i, c in enumerate(CLASSES):
        for key in ("sensitivity", "specificity", "ppv", "npv", "f1", "roc_auc"):
            assert w[key][0, i] == pytest.approx(m["per_class"][c][key], abs=1e-9), (c, key)
    # duplicating every sample (weight 2) changes nothing
    w2 = _weighted_metrics(np.full((1, len(y)), 2.0), y, p, 3)
    assert w2["macro_roc_auc"][0] == pytest.approx(m["macro_roc_auc"])


def test_ci_contains_the_estimate_shrinks_with_n_and_is_seeded() -> None:
    y, p = _random_case(60)
    small = bootstrap_ci(y, p, CLASSES, n_boot=500, seed=0)
    m = compute_metrics(y, p, CLASSES)
    for key in ("accuracy", "macro_f1", "macro_roc_auc", "balanced_accuracy"):
        lo, hi = small[key]
        assert lo <= m[key] <= hi, key
    big = bootstrap_ci(np.tile(y, 8), np.tile(p, (8, 1)), CLASSES, n_boot=500, seed=0)
    for key in ("accuracy", "macro_f1", "macro_roc_auc"):
        assert big[key][1] - big[key][0] < 0.6 * (small[key][1] - small[key][0]), key
    assert bootstrap_ci(y, p, CLASSES, n_boot=500, seed=0) == small
    other = bootstrap_ci(y, p, CLASSES, n_boot=500, seed=1)
    assert [other[k] for k in CI_METRICS] != [small[k] for k in CI_METRICS]
    with pytest.raises(ValueError):
        bootstrap_ci(y[:3], p, CLASSES)


def test_reliability_bins_add_up_to_ece() -> None:
    y, p = _random_case(120, seed=2)
    bins = reliability_bins(y, p)
    assert sum(b["count"] for b in bins) == len(y)
    ece = sum(b["count"] / len(y) * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"])
    assert ece == pytest.approx(expected_calibration_error(y, p))


def test_coverage_curve_and_abstention_rule_by_hand() -> None:
    # confidences 0.9 0.8 0.7 0.6 0.5, right / wrong: R R W R W
    y = np.zeros(5, dtype=int)
    pred = np.array([0, 0, 1, 0, 1])
    p = _probs_for(pred, np.array([0.9, 0.8, 0.7, 0.6, 0.5]))
    curve = coverage_curve(y, p)
    assert [c["coverage"] for c in curve] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert [c["accuracy"] for c in curve] == pytest.approx([1, 1, 2 / 3, 3 / 4, 3 / 5])
    a = choose_abstention(y, p, 0.95, min_accepted=2)
    assert (
        a["threshold"] == pytest.approx(0.8)
        and a["val_coverage"] == pytest.approx(0.4)
        and a["target_reached"]
    )
    a = choose_abstention(y, p, 0.7, min_accepted=2)  # the most cases at >= 70%: 3 of the top 4
    assert a["threshold"] == pytest.approx(0.6) and a["val_accuracy_accepted"] == pytest.approx(0.75)
    a = choose_abstention(y, p, 0.95, min_accepted=3)  # unreachable: every prediction flagged
    assert not a["target_reached"] and a["flag_all"] and a["threshold"] == 1.0 and a["val_coverage"] == 0.0
    # the best one at >= 50% coverage is kept for the record only
    assert a["best_unreached"]["threshold"] == pytest.approx(0.6)
    assert a["best_unreached"]["coverage"] == pytest.approx(0.8)


def test_per_source_metrics_and_confounding_notes() -> None:
    y = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    p = _probs_for(y)
    src = ["a", "a", "a", "b", "b", "b", "c", "c"]
    ps = per_source_metrics(y, p, CLASSES, src, n_boot=50)
    assert ps is not None
    assert ps["sources"]["a"]["counts"] == {"covid": 3, "non_covid": 0, "normal": 0}
    assert ps["sources"]["b"]["n"] == 3 and ps["sources"]["b"]["accuracy"] == 1.0
    # a source's macro-F1 averages over the classes it holds: one class, all right -> 1.0, not 1/3
    assert ps["sources"]["a"]["classes_present"] == ["covid"] and ps["sources"]["a"]["macro_f1"] == 1.0
    wrong = p.copy()
    wrong[0] = wrong[0][::-1]  # one of a's three covid images now called normal
    pa = per_source_metrics(y, wrong, CLASSES, src, n_boot=50)["sources"]["a"]  # type: ignore[index]
    assert pa["macro_f1"] == pytest.approx(0.8) and pa["accuracy"] == pytest.approx(2 / 3)
    assert any("covid images come from a" in n for n in ps["notes"])
    assert any("of the a images are covid" in n for n in ps["notes"])
    assert per_source_metrics(y, p, CLASSES, [""] * 8) is None


def test_summary_calibration_lowers_nll_of_an_overconfident_model() -> None:
    g = torch.Generator().manual_seed(0)
    n = 300
    y = torch.randint(0, 3, (n,), generator=g)
    logits = torch.randn(n, 3, generator=g)
    logits[torch.arange(n), y] += 1.0
    logits *= 5.0  # far too confident
    t = fit_temperature(logits, y)
    m = evaluation_summary(y.numpy(), logits.numpy(), CLASSES, temperature=t, n_boot=100)
    cal = m["calibration"]
    assert cal["temperature"] == pytest.approx(t) and t > 2
    assert cal["nll_after"] < cal["nll_before"] - 0.2
    assert cal["ece_after"] < cal["ece_before"]
    assert m["ece"] == cal["ece_after"]  # the headline figures are the calibrated ones
    # the most confident errors, most confident first
    conf = [e["confidence"] for e in m["worst_errors"]]
    assert conf == sorted(conf, reverse=True) and all(
        e["label"] != e["prediction"] for e in m["worst_errors"]
    )


def _embedded_pngs(html: str) -> int:
    return len(re.findall(r'src="data:image/png;base64,[A-Za-z0-9+/=]{100,}"', html))


def test_evaluate_writes_report_and_refuses_overwrite(
    checkpoint: Path, sample_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "ev"
    args = [
        "evaluate",
        "--checkpoint",
        str(checkpoint),
        "--data",
        str(sample_dir),
        "--split",
        "val",
        "--out",
        str(out),
        "-q",
    ]
    assert main(args) == EXIT_OK
    html = (out / "report.html").read_text()
    for sec in SECTIONS:
        assert f"<section id={sec}>" in html, sec
    assert _embedded_pngs(html) >= 5
    assert "http://" not in html and "https://" not in html  # self-contained
    assert "kermany" in html and "radiographydb" in html  # per-source table of the sample's sources
    m = json.loads((out / "metrics.json").read_text())
    for key in ("accuracy", "macro_f1", "per_class", "confusion_matrix", "ece", "nll"):
        assert key in m  # compute_metrics' keys are kept
    for key in ("ci", "per_source", "calibration", "coverage_curve", "roc_curves", "abstention"):
        assert m[key], key
    assert m["ci"]["accuracy"][0] <= m["accuracy"] <= m["ci"]["accuracy"][1]
    meta = read_metadata(checkpoint)
    assert m["calibration"]["temperature"] == pytest.approx(meta["calibration"]["temperature"])
    with open(out / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    thr = meta["abstention"]["threshold"]
    for r in rows:
        top = max(float(r[f"prob_{c}"]) for c in CLASSES)
        if abs(top - thr) > 1e-5:  # the CSV rounds to 6 decimals
            assert (r["flag"] == "uncertain: refer to a radiologist") == (top < thr)
    before = (out / "report.html").read_bytes()
    assert main(args) != EXIT_OK  # refuses to overwrite
    assert (out / "report.html").read_bytes() == before
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_training_writes_report_and_abstention_rule(trained_run: Path) -> None:
    html = (trained_run / "report.html").read_text()
    assert all(f"<section id={s}>" in html for s in SECTIONS)
    meta = read_metadata(trained_run / "checkpoints" / "best.safetensors")
    ab = meta["abstention"]
    assert set(ab) >= {"threshold", "target_accuracy", "val_coverage", "val_accuracy_accepted"}
    assert ab["target_accuracy"] == 0.95
    if ab[
        "flag_all"
    ]:  # the tiny model does not reach 0.95 on val: every prediction flagged, and the report says so
        assert (
            ab["val_coverage"] == 0.0
            and ab["threshold"] == 1.0
            and "every prediction is flagged" in ab["reason"]
        )
        assert "Every prediction is marked" in html
    else:
        assert 0.0 < ab["val_coverage"] <= 1.0
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert metrics["test"]["ci"]["n_boot"] == 1000 and metrics["abstention"] == ab
    assert "ece_before" in metrics["test"]["calibration"]


def test_report_marks_small_cells_and_shows_no_zero_width_interval() -> None:
    from xraydx.report import render_report

    y = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])  # all right, two sources of 4 and 6
    lg = np.zeros((10, 3))
    lg[np.arange(10), y] = 3.0
    m = evaluation_summary(y, lg, CLASSES, sources=["a"] * 4 + ["b"] * 6, n_boot=100)
    html = render_report(m)
    assert "1.000 <span class=ci>(1.000&ndash;1.000)" not in html  # what a within-class bootstrap showed
    assert html.count("(n&lt;30)") >= 3 + 1 + 2  # the classes, the test set, the sources
    assert "Wilson" in html
