"""train warns about (and with --strict-data refuses) the leakage `data inspect` finds: exact and near
duplicates across splits, and conflicting labels (issue 17 item 8)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xraydx.cli import main
from xraydx.data import discover
from xraydx.data.inspect import find_leaks, inspect
from xraydx.errors import EXIT_FATAL
from xraydx.io import read_image


@pytest.fixture(scope="module")
def leaky(tmp_path_factory: pytest.TempPathFactory, sample_dir: Path) -> Path:
    """The sample plus an exact copy of a train image in test, a re-exposed one (+2 grey levels) in val,
    and a copy of a covid train image labelled normal."""
    data = tmp_path_factory.mktemp("leaky") / "data"
    shutil.copytree(sample_dir, data)
    covid = sorted((data / "train" / "covid").glob("*.png"))
    shutil.copy(covid[0], data / "test" / "covid" / "copy.png")
    img = read_image(covid[1]).astype(np.int16) + 2
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(data / "val" / "covid" / "brighter.png")
    shutil.copy(covid[2], data / "train" / "normal" / "relabelled.png")
    with open(data / "manifest.csv", "a", newline="") as fh:
        w = csv.writer(fh)
        for path, label, split in (("test/covid/copy.png", "covid", "test"), ("val/covid/brighter.png", "covid", "val"),
                                   ("train/normal/relabelled.png", "normal", "train")):  # fmt: skip
            w.writerow([path, label, split, path, "leak", "", "", "", ""])
    return data


def test_find_leaks_agrees_with_data_inspect(leaky: Path) -> None:
    m = discover(leaky)
    leaks = find_leaks(m.records, [read_image(r.path) for r in m.records])
    rep = inspect(m, progress=False)
    assert len(leaks.exact_cross_split) == len(rep.cross_split_duplicates) == 1
    assert len(leaks.near_cross_split) == len(rep.near_cross_split_duplicates) == 1
    assert len(leaks.label_conflicts) == len(rep.label_conflicts) == 1
    assert not find_leaks([], [])


def _args(data: Path, runs: Path) -> list[str]:
    return ["train", "--data", str(data), "--model", "test_resnet", "--pretrained", "none", "--image-size", "64",
            "--epochs", "1", "--runs-dir", str(runs), "--name", "leaky", "-q", "--set", "train.threads=1"]  # fmt: skip


def test_train_warns_about_leakage(
    leaky: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import xraydx.train as train_mod

    class Stop(Exception):
        pass

    def stop(*a: object, **k: object) -> None:
        raise Stop  # the data checks are done; no need to train

    monkeypatch.setattr(train_mod, "create_model", stop)
    with pytest.raises(Stop):
        main(_args(leaky, tmp_path / "runs"))
    log = (tmp_path / "runs" / "leaky" / "train.log").read_text()
    assert "WARNING: leakage: 1 groups of exact duplicates across splits" in log
    assert (
        "1 groups of near duplicates across splits" in log
        and "1 groups of duplicates with conflicting labels" in log
    )
    assert "copy.png" in log and "--strict-data" in log


def test_strict_data_refuses_to_train_on_leaky_data(
    leaky: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*_args(leaky, tmp_path / "runs"), "--strict-data"]) == EXIT_FATAL
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1 and "exact duplicates across splits" in err[0] and "refused (--strict-data)" in err[0]
    )
    assert not list((tmp_path / "runs" / "leaky" / "checkpoints").glob("*.safetensors"))
