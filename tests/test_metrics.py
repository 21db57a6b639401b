from __future__ import annotations

import numpy as np
import pytest
import torch

from xraydx.metrics import compute_metrics, expected_calibration_error, fit_temperature, format_metrics

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
