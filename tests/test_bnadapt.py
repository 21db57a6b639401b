"""Test-time BatchNorm adaptation (xraydx.bnadapt) and its use in crossval (data.adapt_bn)."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from xraydx.bnadapt import MIN_IMAGES, adapt_batchnorm, adapt_predictor_to_files, rebatch
from xraydx.cli import main
from xraydx.errors import UsageError

SPEC = SimpleNamespace(mean=0.5, std=0.25)
CPU = torch.device("cpu")


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5),
        nn.Conv2d(4, 3, 3), nn.BatchNorm2d(3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )  # fmt: skip


def _images(n: int, level: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal(level, 30, size=(n, 16, 16)), 0, 255).astype(np.uint8)


def test_statistics_are_those_of_the_new_images_and_no_weight_moves() -> None:
    net = _net().eval()
    weights = {k: v.clone() for k, v in net.state_dict().items() if "running" not in k and "batches" not in k}
    new = _images(64, level=200)  # a brighter "site" than the statistics the layers hold (0 / 1)
    assert adapt_batchnorm(net, new, SPEC, CPU, batch_size=32) == (2, 64)
    x = (torch.from_numpy(new).float()[:, None] / 255 - SPEC.mean) / SPEC.std
    conv = net[0](x)
    # equal batches: the mean of the batch means is the mean over the whole set
    assert torch.allclose(net[1].running_mean, conv.mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(net[1].running_var, conv.var(dim=(0, 2, 3)), rtol=0.05)
    assert not net.training and not any(m.training for m in net.modules())
    assert net[1].momentum == 0.1 and net[5].momentum == 0.1
    for k, v in net.state_dict().items():
        if k in weights:
            assert torch.equal(v, weights[k]), k
    # read in eval mode, the first layer's output is now centred on its shift for these images
    with torch.no_grad():
        out = net[1](conv).mean(dim=(0, 2, 3))
    assert torch.allclose(out, net[1].bias, atol=1e-4)


def test_a_weight_below_one_keeps_that_share_of_the_training_statistics() -> None:
    new = _images(64, level=200)
    full, half = _net().eval(), _net().eval()
    for m in (full[1], half[1]):
        m.running_mean.fill_(0.3)
        m.running_var.fill_(2.0)
    adapt_batchnorm(full, new, SPEC, CPU)
    adapt_batchnorm(half, new, SPEC, CPU, weight=0.5)
    assert torch.allclose(half[1].running_mean, 0.5 * full[1].running_mean + 0.15, atol=1e-6)
    assert torch.allclose(half[1].running_var, 0.5 * full[1].running_var + 1.0, atol=1e-6)
    with pytest.raises(UsageError, match="weight"):
        adapt_batchnorm(_net(), new, SPEC, CPU, weight=0.0)


def test_only_the_first_layers_of_each_network_when_asked() -> None:
    from xraydx.bnadapt import batchnorms

    net = _net()
    before = [m.running_mean.clone() for m in batchnorms(net)]
    assert adapt_batchnorm(net, _images(64, level=200), SPEC, CPU, first=1) == (1, 64)
    assert not torch.equal(net[1].running_mean, before[0]) and torch.equal(net[5].running_mean, before[1])
    ens = nn.Module()
    ens.members = nn.ModuleList([_net(), _net()])  # an ensemble: the first K of each member
    assert [id(m) for m in batchnorms(ens, 1)] == [id(ens.members[0][1]), id(ens.members[1][1])]


def test_a_last_batch_of_one_is_folded_into_the_one_before() -> None:
    net = _net()
    adapt_batchnorm(net, _images(33, level=90), SPEC, CPU, batch_size=32)  # 32 + 1: one batch of 33
    assert int(net[1].num_batches_tracked) == 1
    assert torch.isfinite(net[1].running_var).all()


def test_rebatch_gives_full_batches_in_order_and_never_a_batch_of_one() -> None:
    chunks = [np.arange(n) + 100 * i for i, n in enumerate((3, 0, 5, 1, 4))]  # 13 images
    out = list(rebatch(chunks, 4))
    assert [len(b) for b in out] == [4, 4, 5]  # the last one folded into the batch before
    assert np.array_equal(np.concatenate(out), np.concatenate(chunks))
    assert [len(b) for b in rebatch([np.zeros(6)], 4)] == [4, 2]
    assert [len(b) for b in rebatch([np.zeros(1)], 4)] == [1]


def test_a_stream_gives_the_statistics_of_the_whole_array() -> None:
    new = _images(96, level=160)
    a, b = _net(), _net()
    adapt_batchnorm(a, new, SPEC, CPU, batch_size=32)
    adapt_batchnorm(b, (new[i : i + 7] for i in range(0, 96, 7)), SPEC, CPU, batch_size=32)
    assert torch.allclose(a[1].running_mean, b[1].running_mean) and torch.allclose(
        a[5].running_var, b[5].running_var
    )


def test_refusals_name_the_problem() -> None:
    net = _net()
    before = net[1].running_mean.clone()
    with pytest.raises(UsageError, match=f"site X: {MIN_IMAGES - 1} image.*at least {MIN_IMAGES}"):
        adapt_batchnorm(net, iter([_images(MIN_IMAGES - 1, 100)]), SPEC, CPU, what="site X")
    assert torch.equal(net[1].running_mean, before) and not net.training  # left as it was
    with pytest.raises(UsageError, match="no BatchNorm"):
        adapt_batchnorm(nn.Sequential(nn.Conv2d(1, 3, 3), nn.Flatten()), _images(64, 100), SPEC, CPU)


def _rows(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return {r["path"]: r for r in csv.DictReader(fh)}


def test_crossval_adapts_each_held_out_source_with_the_fold_models_reused(
    cv_run: Path, tmp_path: Path
) -> None:
    """``--reuse-folds RUN --set data.adapt_bn=1``: the same fold models, each adapted to each held-out
    source before predicting it; same images, other probabilities, the shift score unchanged."""
    args = ["crossval", "--reuse-folds", str(cv_run), "--runs-dir", str(tmp_path), "--name", "bn", "-q"]
    assert main([*args, "--set", "data.adapt_bn=1"]) == 0
    a, b = _rows(cv_run / "predictions.csv"), _rows(tmp_path / "bn" / "predictions.csv")
    assert a.keys() == b.keys()
    moved = [abs(float(a[k]["prob_covid"]) - float(b[k]["prob_covid"])) for k in a]
    assert max(moved) > 1e-3
    for k in a:
        assert float(a[k]["shift_score"]) == pytest.approx(float(b[k]["shift_score"]), abs=1e-4)
    log = (tmp_path / "bn" / "crossval.log").read_text()
    assert "BatchNorm layers to" in log and "of kermany" in log and "of nihcxr8" in log
    import json

    assert json.loads((tmp_path / "bn" / "metrics.json").read_text())["recipe"]["adapt_bn"] == 1.0


def test_crossval_refuses_adaptation_in_the_deployed_pipeline(cv_run: Path, tmp_path: Path) -> None:
    args = ["crossval", "--reuse-folds", str(cv_run), "--runs-dir", str(tmp_path), "--name", "bn2", "-q"]
    assert main([*args, "--oos-pipeline", "deployed", "--set", "data.adapt_bn=0.5"]) != 0


SAMPLE_TEST = Path(__file__).resolve().parents[1] / "data" / "sample" / "test"


def test_predict_adapts_to_its_inputs_and_says_so_in_every_row(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``xraydx predict FOLDER --adapt-bn 1``: the network's statistics come from the folder's accepted
    images; other probabilities than without, every row's model_id marks it, the trained model is kept."""
    plain, adapted = tmp_path / "plain.csv", tmp_path / "adapted.csv"
    common = ["predict", str(SAMPLE_TEST), "--checkpoint", str(checkpoint), "-q"]
    assert main([*common, "--out", str(plain)]) == 0
    assert main([*common, "--out", str(adapted), "--adapt-bn", "1"]) == 0
    assert "BatchNorm statistics adapted to" in capsys.readouterr().err
    a, b = _rows(plain), _rows(adapted)
    assert a.keys() == b.keys() and len(a) == 30
    assert all("+adabn1-" in r["model_id"] for r in b.values())
    assert not any("adabn" in r["model_id"] for r in a.values())
    assert max(abs(float(a[k]["prob_covid"]) - float(b[k]["prob_covid"])) for k in a) > 1e-3


def test_predictor_adaptation_keeps_the_trained_network_for_the_shift_score(checkpoint: Path) -> None:
    from xraydx.bnadapt import batchnorms
    from xraydx.predict import Predictor

    pred = Predictor(checkpoint, "cpu")
    trained = pred.model
    before = [m.running_mean.clone() for m in batchnorms(trained)]
    info = adapt_predictor_to_files(pred, sorted(SAMPLE_TEST.rglob("*.png")), weight=0.5, progress=False)
    assert info["images"] == 30 and info["weight"] == 0.5 and info["layers"] == len(before)
    assert pred.trained_model is trained and pred.model is not trained
    assert all(torch.equal(m.running_mean, b) for m, b in zip(batchnorms(trained), before, strict=True))
    assert any(
        not torch.equal(m.running_mean, b) for m, b in zip(batchnorms(pred.model), before, strict=True)
    )
    assert pred.classifier.model is pred.model
    with pytest.raises(UsageError, match="already adapted"):
        adapt_predictor_to_files(pred, sorted(SAMPLE_TEST.rglob("*.png")), progress=False)


def test_predict_refuses_adaptation_it_cannot_do(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    few = sorted(SAMPLE_TEST.rglob("*.png"))[:3]
    args = ["predict", *map(str, few), "--checkpoint", str(checkpoint), "-q", "--adapt-bn", "1"]
    assert main([*args, "--out", str(tmp_path / "a.csv")]) != 0
    assert "at least 16" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "b.csv"), "--engine", "onnx"]) == 2
    assert "PyTorch engine" in capsys.readouterr().err
    assert main([*args[:-1], "1.5", "--out", str(tmp_path / "c.csv")]) == 2
    assert not any((tmp_path / n).exists() for n in ("a.csv", "b.csv", "c.csv"))


def test_evaluate_adapts_to_the_split_and_records_it(
    checkpoint: Path, sample_dir: Path, tmp_path: Path
) -> None:
    import json

    base = ["evaluate", "--checkpoint", str(checkpoint), "--data", str(sample_dir), "-q"]
    assert main([*base, "--out", str(tmp_path / "plain")]) == 0
    assert main([*base, "--out", str(tmp_path / "ad"), "--adapt-bn", "1", "--adapt-bn-layers", "3"]) == 0
    plain = json.loads((tmp_path / "plain" / "metrics.json").read_text())
    ad = json.loads((tmp_path / "ad" / "metrics.json").read_text())
    assert plain["adapted"] is None
    assert ad["adapted"] == {"images": 30, "layers": 3, "weight": 1.0, "first": 3}
    rows = _rows(tmp_path / "ad" / "predictions.csv")
    assert all("+adabn1l3-" in r["model_id"] for r in rows.values())
    before = _rows(tmp_path / "plain" / "predictions.csv")
    assert max(abs(float(before[k]["prob_covid"]) - float(rows[k]["prob_covid"])) for k in rows) > 1e-4
    assert "BatchNorm adapted" in (tmp_path / "ad" / "report.html").read_text()
    # refused before any image is read: with the audit, and a weight out of range
    assert main([*base, "--out", str(tmp_path / "x"), "--adapt-bn", "1", "--audit"]) == 2
    assert main([*base, "--out", str(tmp_path / "y"), "--adapt-bn", "2"]) == 2
