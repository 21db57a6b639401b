from __future__ import annotations

import numpy as np
import pytest
import torch

from xraydx.metrics import (
    compute_metrics,
    evaluation_summary,
    expected_calibration_error,
    fit_temperature,
    format_metrics,
    wilson,
)

CLASSES = ("covid", "non_covid", "normal")


def test_metrics_match_a_hand_computed_case() -> None:
    # truth:      0 0 0 0 1 1 1 2 2 2
    # predicted:  0 0 0 1 1 1 2 2 2 0
    y = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    pred = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 0])
    probs = np.full((10, 3), 0.1)
    probs[np.arange(10), pred] = 0.8
    m = compute_metrics(y, probs, CLASSES)
    assert m["confusion_matrix"] == [[3, 1, 0], [0, 2, 1], [1, 0, 2]]
    assert m["accuracy"] == pytest.approx(0.7)
    c = m["per_class"]["covid"]  # tp 3, fn 1, fp 1, tn 5
    assert c["sensitivity"] == pytest.approx(3 / 4)
    assert c["specificity"] == pytest.approx(5 / 6)
    assert c["ppv"] == pytest.approx(3 / 4)
    assert c["npv"] == pytest.approx(5 / 6)
    assert c["f1"] == pytest.approx(0.75)
    nc = m["per_class"]["non_covid"]  # tp 2, fn 1, fp 1, tn 6
    assert nc["sensitivity"] == pytest.approx(2 / 3) and nc["ppv"] == pytest.approx(2 / 3)
    assert nc["specificity"] == pytest.approx(6 / 7)
    assert m["macro_f1"] == pytest.approx((0.75 + 2 / 3 + 2 / 3) / 3)
    assert m["balanced_accuracy"] == pytest.approx((3 / 4 + 2 / 3 + 2 / 3) / 3)
    # every prediction has confidence 0.8 and 70% are right: ECE = |0.7 - 0.8|
    assert m["ece"] == pytest.approx(0.1)
    text = format_metrics(m)
    assert "covid" in text and "0.750" in text


def test_auc_is_perfect_for_separable_scores() -> None:
    y = np.array([0, 1, 2, 0, 1, 2])
    probs = np.eye(3)[y] * 0.7 + 0.1
    m = compute_metrics(y, probs, CLASSES)
    assert m["macro_roc_auc"] == pytest.approx(1.0)
    assert m["per_class"]["normal"]["roc_auc"] == pytest.approx(1.0)


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ValueError):
        compute_metrics([0, 1], np.zeros((3, 3)), CLASSES)
    with pytest.raises(ValueError):
        compute_metrics([], np.zeros((0, 3)), CLASSES)


def test_temperature_scaling_lowers_nll_of_an_overconfident_model() -> None:
    g = torch.Generator().manual_seed(0)
    n = 600
    y = torch.randint(0, 3, (n,), generator=g)
    clean = torch.randn(n, 3, generator=g)
    clean[torch.arange(n), y] += 1.0  # ~ 60-70% accurate
    logits = clean * 5.0  # far too confident
    t = fit_temperature(logits, y)
    assert t > 2.0
    nll = torch.nn.functional.cross_entropy
    assert nll(logits / t, y) < nll(logits, y) - 0.2
    p_before = torch.softmax(logits, 1).numpy()
    p_after = torch.softmax(logits / t, 1).numpy()
    assert expected_calibration_error(y.numpy(), p_after) < expected_calibration_error(y.numpy(), p_before)


def _logits_for(pred: np.ndarray) -> np.ndarray:
    lg = np.zeros((len(pred), 3))
    lg[np.arange(len(pred)), pred] = 3.0
    return lg


def test_intervals_are_not_zero_width_at_small_n() -> None:
    # 10 of 10 right, per class 4 / 3 / 3, two sources of 4 and 6: a within-class bootstrap says
    # "1.000 (1.000-1.000)" for every one of these
    y = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    src = ["a", "a", "b", "b", "a", "b", "b", "a", "b", "b"]
    m = evaluation_summary(y, _logits_for(y), CLASSES, sources=src, n_boot=200)
    ci = m["ci"]
    assert ci["small_n"] is True and ci["n"] == 10
    assert ci["accuracy"] == pytest.approx(wilson(10, 10)) and ci["accuracy"][0] < 0.75
    for c in CLASSES:
        lo, hi = ci["per_class"][c]["sensitivity"]
        assert lo < 0.6 and hi == pytest.approx(1.0)
    lo, hi = ci["balanced_accuracy"]
    assert lo < 0.9 and hi > 0.98 and hi - lo > 0.05
    assert ci["macro_f1"] is None and ci["macro_roc_auc"] is None  # no bootstrap at n < 30: said, not faked
    for s, v in m["per_source"]["sources"].items():
        assert v["small"] is True
        assert v["accuracy_ci"][0] < 0.7, s
        assert all(cell["ci"][1] > cell["ci"][0] for cell in v["recall_cells"].values())


def test_wilson_interval_matches_a_hand_computed_case() -> None:
    # Wilson, z = 1.95996: centre (k + z^2/2) / (n + z^2), half-width z sqrt(k(n-k)/n + z^2/4) / (n + z^2)
    z = 1.959963984540054
    k, n = 7, 20
    centre = (k + z * z / 2) / (n + z * z)
    half = z * np.sqrt(k * (n - k) / n + z * z / 4) / (n + z * z)
    assert wilson(k, n) == pytest.approx([centre - half, centre + half], abs=1e-9)
    assert wilson(0, 0) is None


def test_bootstrap_intervals_remain_at_large_n() -> None:
    rng = np.random.default_rng(0)
    y = np.arange(90) % 3
    pred = np.where(rng.random(90) < 0.8, y, (y + 1) % 3)
    m = evaluation_summary(y, _logits_for(pred) + rng.normal(0, 0.5, (90, 3)), CLASSES, n_boot=200)
    ci = m["ci"]
    assert ci["small_n"] is False
    for key in ("macro_f1", "macro_roc_auc", "ece", "nll", "accuracy", "balanced_accuracy"):
        lo, hi = ci[key]
        assert lo < m[key] < hi, key


def test_balanced_accuracy_warns_nothing_when_a_predicted_class_is_absent_from_the_labels() -> None:
    import warnings

    from sklearn.metrics import balanced_accuracy_score

    y = np.array([0, 0, 1, 1])
    pred = np.array([0, 2, 1, 1])  # class 2 predicted, never a label: sklearn warns on stderr
    probs = np.full((4, 3), 0.1)
    probs[np.arange(4), pred] = 0.8
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        m = compute_metrics(y, probs, CLASSES)
    assert not seen, [str(w.message) for w in seen]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
