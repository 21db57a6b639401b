"""``xraydx train ensemble``: two tiny runs on the real sample combined into one checkpoint, used as any other."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from conftest import sample_images, tiny_config
from xraydx.checkpoint import read_metadata
from xraydx.checkpoint import save as save_checkpoint
from xraydx.cli import main
from xraydx.errors import CheckpointError, OutputExistsError, UsageError
from xraydx.explain import GradCAM
from xraydx.io import read_image
from xraydx.models import SeedEnsemble, load_checkpoint
from xraydx.predict import Predictor, batch_logits
from xraydx.train_ensemble import build_ensemble
from xraydx.transforms import preprocess


@pytest.fixture(scope="module")
def second_run(trained_run: Path, sample_dir: Path) -> Path:
    from xraydx.train import run_training

    cfg = tiny_config(sample_dir, trained_run.parent, epochs=3, seed=1)
    cfg.name = "tiny-seed1"
    return run_training(cfg, progress=False)


@pytest.fixture(scope="module")
def ensemble_run(trained_run: Path, second_run: Path) -> Path:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["train", "ensemble", str(trained_run), str(second_run), "--name", "ens", "-q"])
    assert rc == 0, buf.getvalue()
    run = trained_run.parent / "ens"
    assert f"run folder: {run}" in buf.getvalue()
    return run


def _images(meta: dict) -> np.ndarray:
    from xraydx.transforms import Preprocessing

    spec = Preprocessing.from_dict(meta["preprocessing"])
    return np.stack([preprocess(read_image(p), spec) for p in sample_images("test")[:8]])


def test_the_ensemble_is_the_mean_of_its_members_calibrated_probabilities(
    ensemble_run: Path, trained_run: Path, second_run: Path
) -> None:
    model, meta = load_checkpoint(ensemble_run / "checkpoints" / "best.safetensors")
    assert isinstance(model, SeedEnsemble) and len(model.members) == 2
    from xraydx.transforms import Preprocessing

    spec = Preprocessing.from_dict(meta["preprocessing"])
    x = _images(meta)
    want = []
    for run in (trained_run, second_run):
        m, mm = load_checkpoint(run / "checkpoints" / "best.safetensors")
        want.append(
            torch.softmax(batch_logits(m, x, spec, torch.device("cpu")) / mm["calibration"]["temperature"], 1)
        )
    mean = torch.stack(want).mean(0)
    got = torch.softmax(batch_logits(model, x, spec, torch.device("cpu")), 1)
    assert torch.allclose(got, mean, atol=1e-5)
    assert not torch.allclose(want[0], want[1], atol=1e-3)  # two different models, or the test proves nothing
    temps = meta["architecture"]["member_temperatures"]
    assert temps == [read_metadata(r / "checkpoints" / "best.safetensors")["calibration"]["temperature"]
                     for r in (trained_run, second_run)]  # fmt: skip


def test_the_ensemble_run_is_finished_like_a_training_run(ensemble_run: Path, trained_run: Path) -> None:
    for f in ("config.yaml", "train.log", "metrics.json", "report.html", "predictions.csv", "manifest.csv"):
        assert (ensemble_run / f).is_file(), f
    metrics = json.loads((ensemble_run / "metrics.json").read_text())
    assert metrics["best_epoch"] is None
    members = metrics["ensemble"]["members"]
    assert [m["seed"] for m in members] == [0, 1]
    assert (
        members[0]["test_macro_f1"]
        == read_metadata(trained_run / "checkpoints/best.safetensors")["test_metrics"]["macro_f1"]
    )
    assert 0.0 <= metrics["test"]["macro_f1"] <= 1.0 and metrics["test"]["n"] == len(sample_images("test"))
    meta = read_metadata(ensemble_run / "checkpoints" / "best.safetensors")
    assert 0.0 <= meta["abstention"]["threshold"] <= 1.0 and meta["calibration"]["temperature"] > 0
    assert meta["abstention"] == metrics["abstention"]
    assert meta["test_metrics"]["macro_f1"] == metrics["test"]["macro_f1"]
    rows = (ensemble_run / "predictions.csv").read_text().splitlines()
    assert len(rows) == 1 + len(sample_images("test"))
    # the test split's table is in the log as readable lines, one per row (not one line with \x0a in it)
    log = (ensemble_run / "train.log").read_text()
    assert "\\x0a" not in log
    assert any(line.split(" ", 1)[-1].startswith("confusion matrix") for line in log.splitlines())


def test_predict_explain_and_export_take_the_ensemble(ensemble_run: Path, tmp_path: Path) -> None:
    ck = ensemble_run / "checkpoints" / "best.safetensors"
    pred = Predictor(ck, "cpu", ood=False)
    paths = sample_images("test")[:4]
    out = list(pred.predict_files(paths, progress=False))
    assert [p.status for p in out] == ["ok"] * 4
    x = _images(pred.meta)[:4]
    probs = np.array([p.probs for p in out])
    assert np.allclose(probs, pred.probs(x), atol=1e-5)
    heat, cam_probs = GradCAM(pred.model, pred.spec, temperature=pred.temperature).batch(x)
    assert heat.shape == x.shape and np.isfinite(heat).all() and heat.max() > 0
    assert np.allclose(cam_probs, probs, atol=1e-4)
    onnx = tmp_path / "ens.onnx"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["export", "--checkpoint", str(ck), "--out", str(onnx)])
    assert rc == 0, buf.getvalue()
    onnx_pred = Predictor(onnx, "cpu", engine="onnx", ood=False)
    assert np.allclose(onnx_pred.probs(x), probs, atol=1e-4)


def test_members_that_differ_are_refused_naming_the_member(trained_run: Path, tmp_path: Path) -> None:
    src = trained_run / "checkpoints" / "best.safetensors"
    model, meta = load_checkpoint(src)
    other = tmp_path / "other.safetensors"
    save_checkpoint(other, model, {**meta, "preprocessing": {**meta["preprocessing"], "size": 96}})
    with pytest.raises(UsageError, match=r"other\.safetensors: its preprocessing differs"):
        build_ensemble([trained_run, other], "x", tmp_path)
    with pytest.raises(UsageError, match="the same checkpoint given twice"):
        build_ensemble([trained_run, src], "x", tmp_path)
    with pytest.raises(UsageError, match="at least two"):
        build_ensemble([trained_run], "x", tmp_path)
    with pytest.raises(UsageError, match="not a finished training run"):
        build_ensemble([trained_run, tmp_path], "x", tmp_path)
    assert not (tmp_path / "x").exists()


def test_an_ensemble_is_not_a_member_and_its_folder_is_never_replaced(
    ensemble_run: Path, trained_run: Path, second_run: Path
) -> None:
    with pytest.raises(UsageError, match="already an ensemble"):
        build_ensemble([ensemble_run, trained_run], "y", trained_run.parent)
    before = (ensemble_run / "metrics.json").read_bytes()
    with pytest.raises(OutputExistsError):
        build_ensemble([trained_run, second_run], "ens", trained_run.parent)
    assert (ensemble_run / "metrics.json").read_bytes() == before
    with pytest.raises(SystemExit) as exc:  # argparse: the ensemble command has no --epochs
        main(["train", "ensemble", str(trained_run), str(second_run), "--name", "z", "--epochs", "3"])
    assert exc.value.code == 2
    rc = main(["train", "--epochs", "3", "ensemble", str(trained_run), str(second_run), "--name", "z"])
    assert rc == 2 and not (trained_run.parent / "z").exists()


def test_member_temperatures_in_the_metadata_are_checked(ensemble_run: Path, tmp_path: Path) -> None:
    src = ensemble_run / "checkpoints" / "best.safetensors"
    bad = tmp_path / "bad.safetensors"
    shutil.copy(src, bad)
    model, meta = load_checkpoint(src)
    meta["architecture"]["member_temperatures"] = [1.0, -2.0]
    save_checkpoint(bad, model, meta)
    with pytest.raises(CheckpointError, match=r"bad\.safetensors.*member_temperatures"):
        load_checkpoint(bad)


def _member_agreement(runs: tuple[Path, ...], x: np.ndarray, spec: object) -> np.ndarray:
    """Independently of the ensemble: do the member runs' own checkpoints pick the same class?"""
    tops = [
        batch_logits(load_checkpoint(r / "checkpoints" / "best.safetensors")[0], x, spec, torch.device("cpu"))
        .argmax(1)
        .numpy()
        for r in runs
    ]
    return np.all(np.stack(tops) == tops[0], axis=0)


def test_the_ensembles_rule_flags_where_its_members_disagree_on_every_path(
    ensemble_run: Path, trained_run: Path, second_run: Path, tmp_path: Path
) -> None:
    from xraydx import serve
    from xraydx.constants import UNCERTAIN_FLAG
    from xraydx.metrics import rule_flags
    from xraydx.onnxio import read_onnx_metadata
    from xraydx.predict import batch_outputs
    from xraydx.transforms import Preprocessing

    src = ensemble_run / "checkpoints" / "best.safetensors"
    model, meta = load_checkpoint(src)
    rule = meta["abstention"]
    assert rule["members_disagree"] is True and 0.0 <= rule["val_members_agree"] <= 1.0
    assert json.loads((ensemble_run / "metrics.json").read_text())["test"]["abstention"]["members_disagree"]
    spec = Preprocessing.from_dict(meta["preprocessing"])
    paths = sample_images("test") + sample_images("val")
    x = np.stack([preprocess(read_image(p), spec) for p in paths])
    want = _member_agreement((trained_run, second_run), x, spec)
    assert want.any() and (~want).any(), "the tiny members must disagree somewhere, or this proves nothing"
    logits, agree = batch_outputs(model, x, spec, torch.device("cpu"))
    assert agree is not None and agree.tolist() == want.tolist()
    # the finished run's test predictions carry the rule with the members' agreement
    n_test = len(sample_images("test"))
    probs = torch.softmax(logits / meta["calibration"]["temperature"], 1).numpy()
    rows = (ensemble_run / "predictions.csv").read_text().splitlines()[1:]
    assert sum(UNCERTAIN_FLAG in r for r in rows) == int(
        rule_flags(probs[:n_test], rule, want[:n_test]).sum()
    )
    # a rule whose threshold flags nothing: the flag is exactly the members' disagreement
    ck = tmp_path / "ens-rule.safetensors"
    save_checkpoint(ck, model, {**meta, "abstention": {**rule, "threshold": 1e-6, "flag_all": False}})
    pred = Predictor(ck, "cpu", ood=False)
    assert "2 networks do not all pick the same class" in pred.abstention_note()
    flags = [p.extra["flag"] for p in pred.predict_files(paths, progress=False)]
    assert [f == UNCERTAIN_FLAG for f in flags] == (~want).tolist()
    # the exported ONNX graph has the members' output, and the onnx engine flags alike
    onnx = tmp_path / "ens.onnx"
    assert main(["export", "--checkpoint", str(ck), "--out", str(onnx)]) == 0
    assert read_onnx_metadata(onnx)["onnx"]["outputs"] == ["logits", "member_logp"]
    onnx_pred = Predictor(onnx, "cpu", engine="onnx", ood=False)
    assert onnx_pred.probs_agree(x)[1].tolist() == want.tolist()
    # the API says uncertain, and why, where the members disagree (and only the rule's threshold is 0)
    i_no, i_yes = int(np.flatnonzero(~want)[0]), int(np.flatnonzero(want)[0])
    with TestClient(serve.create_app(ck), base_url="http://127.0.0.1") as c:
        for i, agrees in ((i_no, False), (i_yes, True)):
            p = paths[i]
            d = c.post("/api/predict", files={"file": (p.name, p.read_bytes(), "image/png")}).json()
            assert d["uncertain"] is (not agrees) and d["uncertainty"]["members_agree"] is agrees
            if not agrees:
                assert "networks pick different classes" in d["uncertainty"]["message"]


def test_a_members_rule_on_one_network_or_not_a_bool_is_refused(
    ensemble_run: Path, checkpoint: Path, tmp_path: Path
) -> None:
    model, meta = load_checkpoint(checkpoint)
    one = tmp_path / "one.safetensors"
    save_checkpoint(one, model, {**meta, "abstention": {"threshold": 0.5, "members_disagree": True}})
    with pytest.raises(CheckpointError, match=r"one\.safetensors.*members_disagree is for an ensemble"):
        load_checkpoint(one)
    model, meta = load_checkpoint(ensemble_run / "checkpoints" / "best.safetensors")
    odd = tmp_path / "odd.safetensors"
    save_checkpoint(odd, model, {**meta, "abstention": {"threshold": 0.5, "members_disagree": "yes"}})
    with pytest.raises(CheckpointError, match=r"odd\.safetensors.*must be true or false"):
        load_checkpoint(odd)
