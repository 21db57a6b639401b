"""Calibration and the abstention rule when they fail (issue 17 item 2): a temperature that makes held-out NLL
worse is not applied, one at its bound is warned about, and an unreachable target accuracy flags every
prediction (never "within the model's confidence rule")."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import sample_images
from xraydx.calibration import T_MAX, calibrate
from xraydx.metrics import abstention_flags, choose_abstention, fit_temperature


def _confident(y: np.ndarray, right: np.ndarray, margin: float = 6.0) -> np.ndarray:
    """Logits with ``margin`` on the true class where ``right``, on the next class otherwise."""
    lg = np.zeros((len(y), 3))
    pred = np.where(right, y, (y + 1) % 3)
    lg[np.arange(len(y)), pred] = margin
    return lg


def test_a_temperature_that_makes_held_out_nll_worse_is_not_applied() -> None:
    # alternate cases of each class: one half confidently right, the other confidently wrong, so a temperature
    # fitted on either half ruins the other (calibrate's 2-fold check sees it; a fit on all of val cannot)
    y = np.repeat(np.arange(3), 20)
    right = np.arange(60) % 2 == 0
    lg = _confident(y, right)
    fitted = fit_temperature(lg, y)
    c = calibrate(lg, y)
    assert c["fitted_temperature"] == pytest.approx(fitted)
    assert c["kept_uncalibrated"] and c["temperature"] == 1.0
    assert c["heldout_nll_calibrated"] > c["heldout_nll_uncalibrated"]
    assert any("held-out NLL worse" in w for w in c["warnings"])


def test_a_temperature_at_its_bound_is_warned_about_and_a_good_one_is_kept() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 90)
    noise = _confident(rng.integers(0, 3, 90), np.ones(90, bool), 8.0)  # confident and unrelated to y
    c = calibrate(noise, y)
    assert c["at_cap"] and c["fitted_temperature"] == pytest.approx(T_MAX)
    assert any("at its bound" in w for w in c["warnings"])
    good = _confident(y, rng.random(90) < 0.8, 3.0)  # right 80% of the time, a little under-confident
    c = calibrate(good, y)
    assert not c["at_cap"] and not c["kept_uncalibrated"] and c["warnings"] == []
    assert c["temperature"] == pytest.approx(fit_temperature(good, y))


def test_an_unreachable_target_flags_every_prediction_and_says_why() -> None:
    y = np.repeat(np.arange(3), 10)
    probs = np.full((30, 3), 0.2)
    probs[np.arange(30), (y + np.arange(30) % 2) % 3] = 0.6  # half right at any threshold: 0.95 unreachable
    a = choose_abstention(y, probs, 0.95)
    assert a["flag_all"] and not a["target_reached"] and a["threshold"] == 1.0
    assert "every prediction is flagged" in a["reason"] and "0.95" in a["reason"]
    assert a["best_unreached"]["accuracy"] == pytest.approx(0.5)
    assert abstention_flags(probs, a["threshold"], a["flag_all"]).all()
    assert abstention_flags(np.eye(3), a["threshold"], a["flag_all"]).all()  # even a probability of 1
    assert not choose_abstention(y, np.eye(3)[y], 0.95)["flag_all"]


def _with_meta(src: Path, dst: Path, **meta: Any) -> Path:
    from xraydx.models import load_checkpoint, save_checkpoint

    model, m = load_checkpoint(src)
    m.update(meta)
    save_checkpoint(dst, model, m)
    return dst


def test_predictor_and_server_never_say_within_the_rule_when_it_flags_everything(
    checkpoint: Path, tmp_path: Path
) -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from xraydx import serve
    from xraydx.predict import Predictor

    rule = {"threshold": 1.0, "flag_all": True, "target_accuracy": 0.95, "target_reached": False,
            "reason": "no confidence threshold reaches the target accuracy 0.95 on validation"}  # fmt: skip
    ckpt = _with_meta(checkpoint, tmp_path / "flagall.safetensors", abstention=rule)
    pred = Predictor(ckpt, "cpu")
    assert pred.flag_all and pred.uncertain([1.0, 0.0, 0.0]) is True
    assert (
        "every prediction is flagged uncertain" in pred.abstention_note() and "0.95" in pred.abstention_note()
    )
    p = sample_images("test")[0]
    with TestClient(serve.create_app(ckpt), base_url="http://127.0.0.1") as c:
        d = c.post("/api/predict", files={"file": (p.name, p.read_bytes(), "image/png")}).json()
    assert d["uncertain"] is True
    assert "within" not in (d["uncertainty"]["message"] or "")


def test_an_ensembles_rule_also_flags_where_its_members_disagree() -> None:
    from xraydx.metrics import members_agree, rule_flags

    # 40 cases, all confident; the members disagree on the first 10, of which 8 are wrong
    y = np.repeat(np.arange(4) % 3, 10)
    right = np.ones(40, bool)
    right[:8] = False
    probs = np.full((40, 3), 0.05)
    probs[np.arange(40), np.where(right, y, (y + 1) % 3)] = 0.9
    top = np.stack([probs.argmax(1)] * 3, axis=1)
    top[:10, 1] = (top[:10, 1] + 1) % 3  # member 1 picks another class on the first 10
    agree = members_agree(np.eye(3)[top])  # (N, M, C) one-hot scores
    assert agree.tolist() == [False] * 10 + [True] * 30
    plain = choose_abstention(y, probs, 0.95)
    assert plain["flag_all"] and "members_disagree" not in plain  # 80% right at any threshold
    a = choose_abstention(y, probs, 0.95, agree=agree)
    assert not a["flag_all"] and a["members_disagree"] is True and a["val_members_agree"] == 0.75
    assert a["val_coverage"] == pytest.approx(0.75) and a["val_accuracy_accepted"] == 1.0
    assert "members' top classes differ" in a["rule"]
    flags = rule_flags(probs, a, agree)
    assert flags.tolist() == [True] * 10 + [False] * 30
    assert not rule_flags(probs, a, None).any()  # agreement unknown: the threshold part alone
    assert not rule_flags(probs, {**a, "members_disagree": False}, agree).any()
    with pytest.raises(ValueError, match="one bool per case"):
        choose_abstention(y, probs, agree=agree[:5])
    none = choose_abstention(y, probs, 0.95, agree=np.zeros(40, bool))  # they never agree: nothing accepted
    assert none["flag_all"] and rule_flags(probs, none, agree).all()
